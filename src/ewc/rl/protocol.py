"""The continual-RL protocol of ``ewc rl``: schedule, normalised scores, forgetting, reference cache.

Schedule: seeded; the first ``len(games)`` visits are a random permutation of the games, every
later visit a random game other than the previous one, drawn again until every game has at least
``min_visits`` visits (the full protocol: every game returns at least once). Scores are normalised per game:
``min(1, (score - random) / (reference - random))`` where ``random`` is the uniform policy's mean
return and ``reference`` the final score of a single-task agent trained on that game for the
game's budget (steps per visit × its visits in the schedule), cached under the user cache by a
hash of everything that determines it. Kept apart from the experiment so that other runs of
:func:`ewc.rl.agent.train_sequence` can be scored the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ewc.methods import METHOD_SPECS
from ewc.rl.agent import DQNConfig
from ewc.rl.config import config_key

__all__ = [
    "AGENTS",
    "GOOD",
    "AgentVariant",
    "MIN_RANGE",
    "RANDOM_EPISODES",
    "REFERENCE_FORMAT",
    "budgets",
    "forgetting",
    "games_at",
    "make_schedule",
    "mean_total",
    "normalisation_table",
    "normalise",
    "read_cached_reference",
    "read_reference_file",
    "reference_cache_path",
    "reference_key",
    "score_run",
    "stats",
    "summarise",
    "task_inference",
    "total_score",
    "trim_record",
    "write_cached_reference",
]


@dataclass(frozen=True)
class AgentVariant:
    """One agent of the comparison: whether it consolidates (EWC with ``--lam``; otherwise λ = 0
    and no consolidation at all), whether it is given the true task labels, and how figures draw it."""

    ewc: bool
    true_labels: bool
    label: str
    color: str
    mode: str = "separate"  # the EWC penalty: one term per context, or one merged term (online)


#: the agents ``ewc rl --methods`` chooses from, in the order of tables and legends
AGENTS: dict[str, AgentVariant] = {
    "dqn": AgentVariant(False, True, "DQN (λ = 0)", "#1f77b4"),
    "ewc": AgentVariant(True, False, "EWC, inferred labels", METHOD_SPECS["ewc"].color),
    "ewc-true-labels": AgentVariant(True, True, "EWC, true labels", "#2ca02c"),
    "online-ewc": AgentVariant(
        True, True, "online EWC, true labels", METHOD_SPECS["online-ewc"].color, mode="online"
    ),
}

RANDOM_EPISODES = 100  # episodes of the uniform policy per game (seed 0) for the "random" score
MIN_RANGE = 1e-6  # reference - random at or below this: the game cannot be normalised
REFERENCE_FORMAT = "ewc.rl-reference/1"
GOOD = 0.5  # a game counts as played well at this normalised score or above
_SCHEDULE_TRIES = 10_000  # draws of a schedule before min_visits is declared out of reach


def make_schedule(games: Sequence[str], visits: int, seed: int, min_visits: int = 1) -> list[str]:
    """A seeded game order: a random permutation of ``games``, then random games each different
    from the previous one, ``visits`` in all, and every game at least ``min_visits`` times (the
    continuation is drawn again, from the same RNG, until it is; ``min_visits=1`` gives the
    first draw, the schedules of the earlier code). ValueError if the constraints cannot hold."""
    games = list(games)
    if not games:
        raise ValueError("no games to schedule")
    if isinstance(min_visits, bool) or not isinstance(min_visits, int) or min_visits < 1:
        raise ValueError(f"min_visits must be an int >= 1, got {min_visits!r}")
    if visits < len(games) * min_visits:
        raise ValueError(f"{visits} visits cannot cover {len(games)} games {min_visits} time(s) each")
    if len(games) == 1 and visits > 1:
        raise ValueError("one game cannot be visited twice in a row")
    rng = np.random.default_rng(seed)
    first = [games[i] for i in rng.permutation(len(games))]
    for _ in range(_SCHEDULE_TRIES):
        schedule = list(first)
        while len(schedule) < visits:
            others = [g for g in games if g != schedule[-1]]
            schedule.append(others[int(rng.integers(len(others)))])
        if min(schedule.count(g) for g in games) >= min_visits:
            return schedule
    raise ValueError(  # pragma: no cover - only for extreme visits / min_visits combinations
        f"no schedule of {visits} visits with every game at least {min_visits} times found "
        f"in {_SCHEDULE_TRIES} draws"
    )


def budgets(schedule: Sequence[str], steps_per_visit: int) -> dict[str, int]:
    """Per game: env steps it is trained for in the schedule (the reference's budget)."""
    return {g: steps_per_visit * list(schedule).count(g) for g in dict.fromkeys(schedule)}


def normalise(score: float, random: float, reference: float) -> float | None:
    """min(1, (score − random) / (reference − random)); None when reference − random <= 1e-6."""
    span = reference - random
    if not span > MIN_RANGE:
        return None
    return min(1.0, (score - random) / span)


def total_score(scores: dict[str, float], norm: dict[str, dict[str, Any]]) -> float:
    """Sum of the normalised scores over the games that can be normalised."""
    total = 0.0
    for game, s in scores.items():
        v = normalise(s, norm[game]["random"], norm[game]["reference"])
        if v is not None:
            total += v
    return total


def forgetting(
    evaluations: Sequence[dict[str, Any]], game: str, last_visit_end: int
) -> tuple[float, float, float] | None:
    """(best normalised score of ``game`` up to the end of its last visit, final one, best − final)
    from evaluations carrying ``normalised`` scores; None if the game is not normalised."""
    before = [e["normalised"][game] for e in evaluations if e["env_step"] <= last_visit_end]
    final = evaluations[-1]["normalised"][game] if evaluations else None
    before = [v for v in before if v is not None]
    if final is None or not before:
        return None
    best = max(before)
    return best, final, best - final


# ------------------------------------------------------------------------------ references


def reference_key(game: str, budget: int, dqn: DQNConfig, eval_episodes: int, eval_epsilon: float) -> str:
    """sha256 of the canonical JSON of what determines a reference score."""
    spec = {
        "format": REFERENCE_FORMAT,
        "game": game,
        "budget": budget,
        "dqn": config_key(dqn),  # the earlier code's key for the same settings
        "eval_episodes": eval_episodes,
        "eval_epsilon": eval_epsilon,
    }
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def reference_cache_path(key: str) -> Path:
    """Where the reference score with cache key ``key`` is kept (under the user cache)."""
    from ewc.data.sources import cache_dir

    return cache_dir() / "rl-reference" / f"{key}.json"


def read_cached_reference(path: Path) -> float:
    """The score in a cache file (ValueError, KeyError or TypeError when it is unreadable)."""
    return float(json.loads(path.read_text())["score"])


def write_cached_reference(
    key: str, game: str, budget: int, score: float, dqn: DQNConfig, eval_episodes: int, eval_epsilon: float
) -> Path:
    """Cache a computed reference score (atomically) under ``key``; returns the file."""
    from ewc.state import atomic_write_bytes

    path = reference_cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "format": REFERENCE_FORMAT,
        "game": game,
        "budget": budget,
        "score": score,
        "dqn": asdict(dqn),
        "eval_episodes": eval_episodes,
        "eval_epsilon": eval_epsilon,
    }
    atomic_write_bytes(path, json.dumps(entry, indent=1).encode("utf-8"))
    return path


def read_reference_file(path: str | os.PathLike, games: Sequence[str]) -> dict[str, float]:
    """``{game: score}`` from a JSON file; every game must be there with a finite number."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--reference {str(p)!r}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--reference {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f'--reference {str(p)!r} must hold a JSON object {{"game": score, ...}}')
    missing = [g for g in games if g not in data]
    if missing:
        raise ValueError(f"--reference {str(p)!r} has no score for {', '.join(missing)}")
    out = {}
    for g in games:
        v = data[g]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"--reference {str(p)!r}: the score of {g} must be a finite number, got {v!r}")
        out[g] = float(v)
    return out


# ---------------------------------------------------------------------------- scoring runs


def normalisation_table(
    games: Sequence[str], references: dict[str, float], sources: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Per game: the random policy's score (RANDOM_EPISODES episodes, seed 0), the reference, where
    the reference came from, and whether the game can be normalised."""
    from ewc.rl.env import random_policy_score

    table = {}
    for g in games:
        rnd = random_policy_score(g, RANDOM_EPISODES, 0)
        table[g] = {
            "random": rnd,
            "reference": references[g],
            "reference_source": sources[g],
            "normalisable": references[g] - rnd > MIN_RANGE,
        }
    return table


def _binned(values: Sequence[float], bins: int = 20) -> list[float]:
    """Means of up to ``bins`` consecutive chunks (a compact learning curve)."""
    if not values:
        return []
    return [
        float(np.mean(c)) for c in np.array_split(np.asarray(values, dtype=float), min(bins, len(values)))
    ]


def trim_record(record: dict[str, Any]) -> dict[str, Any]:
    """The train_sequence record without the per-episode lists (kept as ≤ 20 binned means per visit)."""
    out = {k: v for k, v in record.items() if k != "episode_returns"}
    out["episode_returns_binned"] = [_binned(r) for r in record.get("episode_returns", [])]
    return out


def score_run(
    record: dict[str, Any],
    seed: int,
    schedule: Sequence[str],
    steps_per_visit: int,
    normalisation: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """One run of the schedule, scored: its trimmed record with normalised scores and totals added to
    every evaluation, the final total and scores, and each game's forgetting."""
    games = list(dict.fromkeys(schedule))
    last_end = {g: (max(i for i, x in enumerate(schedule) if x == g) + 1) * steps_per_visit for g in games}
    rec = trim_record(record)
    for e in rec["evaluations"]:
        e["normalised"] = {
            g: normalise(e["scores"][g], normalisation[g]["random"], normalisation[g]["reference"])
            for g in games
        }
        e["total"] = total_score(e["scores"], normalisation)
        e["games_good"] = games_at(e["normalised"])
    final = rec["evaluations"][-1]
    fg = {g: forgetting(rec["evaluations"], g, last_end[g]) for g in games}
    return {
        "seed": seed,
        "record": rec,
        "final_total": final["total"],
        "mean_total": mean_total({"record": rec}),
        "final_games_good": final["games_good"],
        "final_normalised": final["normalised"],
        "final_scores": final["scores"],
        "best_before_last_visit_end": {g: None if v is None else v[0] for g, v in fg.items()},
        "forgetting": {g: None if v is None else v[2] for g, v in fg.items()},
        "env_steps_per_s": rec.get("env_steps_per_s"),
        "updates_per_s": rec.get("updates_per_s"),
        "task_inference": task_inference(rec),
    }


def task_inference(record: dict[str, Any]) -> dict[str, Any] | None:
    """How the detector labelled a run (None with true labels): per visit, the share of its
    transitions in each context (its row of the confusion matrix); each game's context (the one
    holding most of its transitions over all its visits); whether that map is one to one; how many
    return visits went mostly to the game's context of its earlier visits; the share of all
    transitions in their game's context; and the contexts the detector ended with."""
    det = record.get("detector")
    if det is None:
        return None
    visits = record["visits"]
    per_game: dict[str, dict[str, int]] = {}
    rows = []
    for v, summary in enumerate(visits):
        counts = {str(k): int(n) for k, n in summary["contexts"].items()}
        total = max(sum(counts.values()), 1)
        game = summary["game"]
        for k, n in counts.items():
            per_game.setdefault(game, {}).setdefault(k, 0)
            per_game[game][k] += n
        major = max(counts, key=lambda k: counts[k]) if counts else None
        rows.append(
            {
                "visit": v,
                "game": game,
                "shares": {k: n / total for k, n in sorted(counts.items(), key=lambda kv: -kv[1])},
                "majority": major,
            }
        )
    game_context = {g: max(c, key=lambda k: c[k]) for g, c in per_game.items()}
    returns, recognised, seen = 0, 0, {}
    for row in rows:
        g = row["game"]
        if g in seen:
            returns += 1
            recognised += row["majority"] == seen[g]
        else:
            seen[g] = row["majority"]
    right = sum(per_game[g].get(game_context[g], 0) for g in per_game)
    total = sum(sum(c.values()) for c in per_game.values())
    return {
        "per_visit": rows,
        "game_context": game_context,
        "one_to_one": len(set(game_context.values())) == len(game_context),
        "num_contexts": int(det["num_tasks"]),
        "returns": returns,
        "returns_recognised": recognised,
        "accuracy": right / total if total else None,
    }


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std and the half-width of the 95 % t interval of the mean (None for one
    value), min, max and count of the values that are not None."""
    from ewc.stats import mean_ci

    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "ci95": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "ci95": mean_ci(v)["ci95"],
        "min": float(min(v)),
        "max": float(max(v)),
        "n": len(v),
    }


def mean_total(run: dict[str, Any]) -> float | None:
    """The total normalised score averaged over a run's evaluations (every ``eval_every`` steps and
    at each visit's end): about the area under its total-score curve over its length (exactly, when
    ``eval_every`` divides the visit), which weighs the whole sequence rather than the last
    evaluation alone (30 episodes of one game can move the final total by a game's whole span).
    Read from the run, or computed for a run scored before it was (None without totals)."""
    if run.get("mean_total") is not None:
        return run["mean_total"]
    totals = [e["total"] for e in run["record"]["evaluations"] if e.get("total") is not None]
    return float(np.mean(totals)) if totals else None


def games_at(normalised: dict[str, float | None], level: float = GOOD) -> int:
    """How many games have a normalised score of at least ``level``."""
    return sum(v is not None and v >= level for v in normalised.values())


def summarise(runs: dict[str, list[dict[str, Any]]], games: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method: statistics over its seeds' scored runs (:func:`score_run`)."""
    return {
        m: {
            "final_total": stats([r["final_total"] for r in rs]),
            "mean_total": stats([mean_total(r) for r in rs]),
            # a run scored before issue #19 has no final_games_good: counted from its scores
            "final_games_good": stats(
                [r.get("final_games_good", games_at(r["final_normalised"])) for r in rs]
            ),
            "per_game": {
                g: {
                    "final": stats([r["final_normalised"][g] for r in rs]),
                    "final_raw": stats([r["final_scores"][g] for r in rs]),
                    "forgetting": stats([r["forgetting"][g] for r in rs]),
                }
                for g in games
            },
            "env_steps_per_s": stats([r["env_steps_per_s"] for r in rs]),
            "updates_per_s": stats([r["updates_per_s"] for r in rs]),
        }
        for m, rs in runs.items()
    }
