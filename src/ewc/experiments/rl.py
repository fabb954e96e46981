"""Continual RL on MinAtar games: DQN vs DQN + EWC, inferred or true task labels (``ewc rl``).

The EWC paper's RL experiment (Kirkpatrick et al. 2017, Fig. 3A/B) on MinAtar (:mod:`ewc.rl`):
one agent plays a schedule of games with revisits, and every game is evaluated every
``eval_every`` env steps. Methods (all the same :class:`ewc.rl.agent.Agent`, per-game gains,
biases and replay):

- ``dqn``: λ = 0 with the true task labels, the plain baseline (no EWC term is ever built);
- ``ewc``: λ with task labels inferred by the agent's ``TaskDetector``;
- ``ewc-true-labels``: λ with the true labels, the paper's control.

Schedule: seeded by ``order_seed``; the first ``len(games)`` visits are a random permutation of
the games, every later visit a random game other than the previous one. One schedule for every
method and seed. Every (method, seed) is one :func:`ewc.rl.agent.train_sequence` run in its own
process (``jobs`` at a time, one torch thread each), checkpointed under ``OUT/checkpoints`` so
that running the same command again after a kill resumes where it stopped.

Scores are normalised per game: ``min(1, (score - random) / (reference - random))`` where
``random`` is the uniform policy's mean return (100 episodes) and ``reference`` the final score
of a single-task ``dqn`` agent trained on that game alone for the game's budget (steps per
visit × its visits in the schedule); references are cached under the user cache. The total
normalised score is the sum over games (at most the number of games). With ``perturb``, the
Fisher perturbation test (issue #4, the paper's Fig. 4C) is applied to the final agent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ewc.experiments.common import (
    check_out_dir,
    command_line,
    figure_style,
    finish,
    md_table,
    new_figure,
    param,
)
from ewc.report import method_color
from ewc.rl.agent import DQNConfig
from ewc.rl.env import GAMES

__all__ = [
    "CLAIM",
    "METHODS",
    "TITLE",
    "Config",
    "command",
    "dqn_config",
    "forgetting",
    "make_schedule",
    "normalise",
    "reference_key",
    "run",
    "total_score",
]

TITLE = "Continual RL on MinAtar games: DQN, DQN + EWC (inferred task labels) and EWC with true labels"
CLAIM = (
    "Fig. 3A/B: one DQN agent trained on ten Atari games in turn (with revisits) forgot the earlier "
    "games with plain SGD and kept far more of them with EWC; with the task context inferred by a "
    "Forget-Me-Not process EWC did about as well as with the true task labels. Fig. 4C: noise "
    "shaped by the inverse diagonal Fisher hurt the agent much less than isotropic noise of the "
    "same norm."
)

METHODS = ("dqn", "ewc", "ewc-true-labels")

# ---- defaults: sized so that the default run fits in 40 min on 2 cores (docs/results.md) ----------
DEFAULT_GAMES = ("breakout", "space_invaders")
DEFAULT_VISITS = 3
DEFAULT_STEPS_PER_VISIT = 50_000
DEFAULT_ORDER_SEED = 0
DEFAULT_METHODS = METHODS
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_JOBS = 2
DEFAULT_EVAL_EVERY = 25_000
DEFAULT_EVAL_EPISODES = 30
DEFAULT_EVAL_EPSILON = 0.05
DEFAULT_CHECKPOINT_EVERY = 25_000
DEFAULT_LAM = 10.0
DEFAULT_LR = 1e-4
DEFAULT_TRAIN_EVERY = 2
DEFAULT_LEARNING_STARTS = 5_000
DEFAULT_REPLAY_CAPACITY = 100_000
DEFAULT_HIDDEN = 128
DEFAULT_CONV_CHANNELS = 16
DEFAULT_FISHER_SAMPLES = 1_024
DEFAULT_DETECT_EVERY = 64
DEFAULT_PERTURB_EPISODES = 10
DEFAULT_PERTURB_NORMS = (0.3, 1.0, 3.0, 10.0, 30.0)
DEFAULT_PERTURB_DRAWS = 3
DEFAULT_PERTURB_DAMPING = 1e-3
# -------------------------------------------------------------------------------------------

RANDOM_EPISODES = 100  # episodes of the uniform policy per game (seed 0) for the "random" score
NEVER = 10**18  # dqn's ewc_min_steps: λ = 0, so a consolidation would only cost time
MIN_RANGE = 1e-6  # reference - random at or below this: the game cannot be normalised
REFERENCE_FORMAT = "ewc.rl-reference/1"
PERTURB_EVAL_SEED = 12345  # the same evaluation episodes for every perturbation
PERTURB_KINDS = ("isotropic", "fisher")
_KIND_LABELS = {"isotropic": "isotropic", "fisher": "inverse Fisher, 1/√(F+ε)"}
_KIND_COLORS = {"isotropic": "#1f77b4", "fisher": "#d62728"}
_METHOD_COLORS = {"dqn": "#1f77b4", "ewc": method_color("ewc"), "ewc-true-labels": "#2ca02c"}
_METHOD_LABELS = {"dqn": "DQN (λ = 0)", "ewc": "EWC, inferred labels", "ewc-true-labels": "EWC, true labels"}
_GAME_SHADES = ("#e8e8e8", "#fbe6c9", "#d9ecf7", "#e3f2dc", "#f2def0")


def _names(values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        values = values.split(",")
    return tuple(str(v).strip() for v in values if str(v).strip())


@dataclass(frozen=True)
class Config:
    """The games and schedule, the methods and seeds, the DQN knobs, evaluation and the tests."""

    games: tuple[str, ...] = param(DEFAULT_GAMES, f"MinAtar games, from: {', '.join(GAMES)}")
    visits: int = param(DEFAULT_VISITS, "visits in the schedule (>= number of games; revisits after)")
    steps_per_visit: int = param(DEFAULT_STEPS_PER_VISIT, "env steps per visit")
    order_seed: int = param(DEFAULT_ORDER_SEED, "seed of the game order (one schedule for all runs)")
    methods: tuple[str, ...] = param(DEFAULT_METHODS, f"methods, from: {', '.join(METHODS)}")
    seeds: tuple[int, ...] = param(DEFAULT_SEEDS, "agent seeds (one run per method and seed)")
    jobs: int = param(DEFAULT_JOBS, "runs in parallel worker processes, one torch thread each")
    eval_every: int = param(DEFAULT_EVAL_EVERY, "env steps between evaluations of every game")
    eval_episodes: int = param(DEFAULT_EVAL_EPISODES, "episodes per game and evaluation")
    eval_epsilon: float = param(DEFAULT_EVAL_EPSILON, "ε of the evaluation policy")
    checkpoint_every: int = param(
        DEFAULT_CHECKPOINT_EVERY, "env steps between checkpoints (and after each visit)"
    )
    lam: float = param(DEFAULT_LAM, "EWC λ (the Fisher is normalised to mean 1 over shared parameters)")
    lr: float = param(DEFAULT_LR, "Adam learning rate")
    train_every: int = param(DEFAULT_TRAIN_EVERY, "env steps per DQN update")
    learning_starts: int = param(DEFAULT_LEARNING_STARTS, "transitions in a context's replay before updates")
    eps_decay_steps: int | None = param(
        None, "steps of the ε decay, restarted every visit (None: steps_per_visit // 3)", type=int
    )
    ewc_min_steps: int | None = param(
        None,
        "transitions in one visit before a context is consolidated (None: steps_per_visit // 2)",
        type=int,
    )
    replay_capacity: int = param(DEFAULT_REPLAY_CAPACITY, "replay transitions per task context")
    hidden: int = param(DEFAULT_HIDDEN, "hidden units of the Q-network")
    conv_channels: int = param(DEFAULT_CONV_CHANNELS, "filters of the Q-network's convolution")
    fisher_samples: int = param(DEFAULT_FISHER_SAMPLES, "replay states the Fisher is averaged over")
    detect_every: int = param(DEFAULT_DETECT_EVERY, "observations per task-detector block (ewc)")
    reference: str | None = param(
        None, 'JSON file {"game": reference score, ...}: use these instead of training references', type=str
    )
    cache: bool = param(True, "read and write computed reference scores in the user cache")
    perturb: bool = param(True, "run the Fisher perturbation test on the final agent")
    perturb_episodes: int = param(DEFAULT_PERTURB_EPISODES, "evaluation episodes per perturbation")
    perturb_norms: tuple[float, ...] = param(DEFAULT_PERTURB_NORMS, "L2 norms of the perturbations")
    perturb_draws: int = param(DEFAULT_PERTURB_DRAWS, "noise draws per norm and kind")
    perturb_damping: float = param(DEFAULT_PERTURB_DAMPING, "ε in 1/√(F + ε) (the Fisher has mean 1)")
    device: str = param("cpu", "where the networks train: cpu or cuda (one GPU shared by the --jobs runs)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "games", _names(self.games))
        object.__setattr__(self, "methods", _names(self.methods))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "perturb_norms", tuple(float(v) for v in self.perturb_norms))

        def positive(name: str, lo: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")

        if not self.games:
            raise ValueError("--games is empty: name at least one MinAtar game")
        bad = [g for g in self.games if g not in GAMES]
        if bad:
            raise ValueError(f"unknown game(s) {', '.join(bad)}; expected some of {', '.join(GAMES)}")
        if len(set(self.games)) != len(self.games):
            raise ValueError(f"--games names a game twice: {','.join(self.games)}")
        if not self.methods:
            raise ValueError(f"--methods is empty: name some of {', '.join(METHODS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; expected some of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods names a method twice: {','.join(self.methods)}")
        if not self.seeds:
            raise ValueError("--seeds is empty: give at least one seed")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"--seeds must be integers >= 0, got {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds names a seed twice: {self.seeds}")
        for name in (
            "visits",
            "steps_per_visit",
            "jobs",
            "eval_every",
            "eval_episodes",
            "checkpoint_every",
            "train_every",
            "replay_capacity",
            "hidden",
            "conv_channels",
            "fisher_samples",
            "detect_every",
            "perturb_episodes",
            "perturb_draws",
        ):
            positive(name)
        positive("order_seed", 0)
        positive("learning_starts", 0)
        if self.eps_decay_steps is not None:
            positive("eps_decay_steps")
        if self.ewc_min_steps is not None:
            positive("ewc_min_steps", 0)
        if self.visits < len(self.games):
            raise ValueError(
                f"--visits {self.visits} is fewer than the {len(self.games)} games: a game would never be "
                "trained (give --visits >= number of --games)"
            )
        if len(self.games) == 1 and self.visits > 1:
            raise ValueError(
                "with one game there can be only one visit (a visit never repeats the previous game)"
            )
        if not (0.0 <= self.eval_epsilon <= 1.0):
            raise ValueError(f"--eval-epsilon must be in [0, 1], got {self.eval_epsilon}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"--lam must be a finite number >= 0, got {self.lam}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not self.perturb_norms or any(not (math.isfinite(r) and r > 0) for r in self.perturb_norms):
            raise ValueError(f"--perturb-norms must be positive numbers, got {self.perturb_norms}")
        if not (math.isfinite(self.perturb_damping) and self.perturb_damping > 0):
            raise ValueError(f"--perturb-damping must be a positive number, got {self.perturb_damping}")
        for method in self.methods:  # the agent's own checks (e.g. replay_capacity >= batch size)
            try:
                dqn_config(self, method, self.seeds[0])
            except ValueError as exc:
                raise ValueError(f"invalid DQN setting: {exc}") from None


def command(config: Config) -> str:
    """The ``ewc rl`` command that reproduces ``config`` (only non-default flags)."""
    return command_line("rl", config, prefix=("ewc",))


# ------------------------------------------------------------------------------ pure functions


def make_schedule(games: Sequence[str], visits: int, seed: int) -> list[str]:
    """A seeded game order: a random permutation of ``games``, then random games each different
    from the previous one, ``visits`` in all (ValueError if a game would never be visited)."""
    games = list(games)
    if not games:
        raise ValueError("no games to schedule")
    if visits < len(games):
        raise ValueError(f"{visits} visits cannot cover {len(games)} games")
    if len(games) == 1 and visits > 1:
        raise ValueError("one game cannot be visited twice in a row")
    rng = np.random.default_rng(seed)
    schedule = [games[i] for i in rng.permutation(len(games))]
    while len(schedule) < visits:
        others = [g for g in games if g != schedule[-1]]
        schedule.append(others[int(rng.integers(len(others)))])
    return schedule


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


def dqn_config(config: Config, method: str, seed: int) -> DQNConfig:
    """The agent configuration of ``method`` (``dqn`` never consolidates: with λ = 0 a term would
    only cost time)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    spv = config.steps_per_visit
    min_steps = spv // 2 if config.ewc_min_steps is None else config.ewc_min_steps
    return DQNConfig(
        lr=config.lr,
        replay_capacity=config.replay_capacity,
        learning_starts=config.learning_starts,
        train_every=config.train_every,
        eps_decay_steps=max(1, spv // 3) if config.eps_decay_steps is None else config.eps_decay_steps,
        ewc_lam=0.0 if method == "dqn" else config.lam,
        ewc_min_steps=NEVER if method == "dqn" else min_steps,
        fisher_samples=config.fisher_samples,
        detect_every=config.detect_every,
        true_task_labels=method != "ewc",
        conv_channels=config.conv_channels,
        hidden=config.hidden,
        seed=seed,
        device=config.device,
    )


def reference_key(game: str, budget: int, dqn: DQNConfig, eval_episodes: int, eval_epsilon: float) -> str:
    """sha256 of the canonical JSON of what determines a reference score."""
    spec = {
        "format": REFERENCE_FORMAT,
        "game": game,
        "budget": budget,
        "dqn": asdict(dqn),
        "eval_episodes": eval_episodes,
        "eval_epsilon": eval_epsilon,
    }
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reference_cache(key: str) -> Path:
    from ewc.data.sources import cache_dir

    return cache_dir() / "rl-reference" / f"{key}.json"


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


# --------------------------------------------------------------------------------- the jobs


def _log(name: str) -> Callable[[str], None]:
    def say(msg: str) -> None:
        print(f"[{name}] {msg}", flush=True)

    return say


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """One train_sequence run (a method's run or a reference), in this process or a worker."""
    from ewc.rl.agent import train_sequence

    torch.set_num_threads(1)
    return train_sequence(
        spec["dqn"],
        spec["schedule"],
        spec["steps_per_visit"],
        eval_every=spec["eval_every"],
        eval_episodes=spec["eval_episodes"],
        eval_epsilon=spec["eval_epsilon"],
        checkpoint=spec["checkpoint"],
        checkpoint_every=spec["checkpoint_every"],
        log=_log(spec["name"]),
    )


def _run_jobs(specs: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Every spec's record, in order; in ``jobs`` spawned worker processes when jobs > 1."""
    if jobs <= 1 or len(specs) <= 1:
        return [_job(s) for s in specs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(specs)), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_job, specs))


def _binned(values: Sequence[float], bins: int = 20) -> list[float]:
    """Means of up to ``bins`` consecutive chunks (a compact learning curve)."""
    if not values:
        return []
    return [
        float(np.mean(c)) for c in np.array_split(np.asarray(values, dtype=float), min(bins, len(values)))
    ]


def _trim(record: dict[str, Any]) -> dict[str, Any]:
    """The train_sequence record without the per-episode lists (kept as ≤ 20 binned means per visit)."""
    out = {k: v for k, v in record.items() if k != "episode_returns"}
    out["episode_returns_binned"] = [_binned(r) for r in record.get("episode_returns", [])]
    return out


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "min": float(min(v)),
        "max": float(max(v)),
        "n": len(v),
    }


# ------------------------------------------------------------------------- perturbation test


@torch.no_grad()
def perturbation_test(
    config: Config, dqn: DQNConfig, checkpoint: Path, game: str, record: dict[str, Any]
) -> dict[str, Any]:
    """Issue #4's test on the agent: perturb the shared parameters by noise of norm r, isotropic
    or shaped by 1/√(F + ε) (F: the game context's normalised policy Fisher), and evaluate the game.

    Every point uses the same evaluation episodes; draw ``d`` uses the same Gaussian ``g`` for both
    kinds (only its shaping differs).
    """
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from ewc.rl.agent import Agent, policy_fisher
    from ewc.state import safe_load

    saved = safe_load(checkpoint)
    agent = Agent(dqn)
    agent.load_state_dict(saved["agent"])
    if dqn.true_task_labels:
        ctx = GAMES.index(game)
    else:  # the context the agent used most when playing the game in its final evaluation
        counts = record["evaluations"][-1]["contexts"][game]
        ctx = int(max(counts, key=lambda k: counts[k]))
    if agent.replay.size(ctx) == 0:
        raise ValueError(f"context {ctx} of {game} has no replay states for its Fisher")
    gen = torch.Generator().manual_seed(dqn.seed)
    states = agent.replay.buffer(ctx).observations(config.fisher_samples, gen)
    with torch.enable_grad():
        fisher = policy_fisher(agent.qnet, states, ctx, dqn.fisher_temperature)
    named = dict(agent.qnet.named_parameters())
    names = agent.qnet.shared_parameter_names()
    params = [named[n] for n in names]
    f = torch.cat([fisher[n].reshape(-1) for n in names]).double()
    theta = parameters_to_vector(params).detach().clone()
    scales = {"isotropic": torch.ones_like(f), "fisher": (f + config.perturb_damping).rsqrt()}

    def score() -> float:
        r = agent.evaluate(game, config.perturb_episodes, config.eval_epsilon, seed=PERTURB_EVAL_SEED)
        return float(r["mean_return"])

    base = score()
    scores: dict[str, list[list[float]]] = {k: [] for k in PERTURB_KINDS}
    quad: dict[str, list[float]] = {k: [] for k in PERTURB_KINDS}
    try:
        for r in config.perturb_norms:
            per = {k: [] for k in PERTURB_KINDS}
            fz = {k: [] for k in PERTURB_KINDS}
            for d in range(config.perturb_draws):
                g = torch.randn(
                    f.shape, generator=torch.Generator().manual_seed(1000 + d), dtype=torch.float64
                ).to(f.device)
                for kind in PERTURB_KINDS:
                    z = g * scales[kind]
                    z = z * (r / z.norm())
                    vector_to_parameters((theta + z).to(theta.dtype), params)
                    per[kind].append(score())
                    fz[kind].append(float((f * z * z).sum()))
            vector_to_parameters(theta, params)
            for kind in PERTURB_KINDS:
                scores[kind].append(per[kind])
                quad[kind].append(float(np.mean(fz[kind])))
    finally:
        vector_to_parameters(theta, params)
    return {
        "game": game,
        "context": ctx,
        "episodes": config.perturb_episodes,
        "draws": config.perturb_draws,
        "damping": config.perturb_damping,
        "norms": list(config.perturb_norms),
        "shared_parameters": int(f.numel()),
        "shared_norm": float(theta.norm()),
        "unperturbed": base,
        "scores": {k: [float(np.mean(v)) for v in scores[k]] for k in PERTURB_KINDS},
        "scores_per_draw": scores,
        "fisher_quadratic": quad,  # mean Σ F z² (normalised Fisher) per norm: how much F "sees" the noise
    }


# ---------------------------------------------------------------------------------- figures


def _shade_visits(ax: Any, schedule: Sequence[str], spv: int, legend: bool) -> None:
    games = list(dict.fromkeys(schedule))
    shown: set[str] = set()
    for v, g in enumerate(schedule):
        label = f"training {g}" if legend and g not in shown else None
        shown.add(g)
        ax.axvspan(
            v * spv,
            (v + 1) * spv,
            color=_GAME_SHADES[games.index(g) % len(_GAME_SHADES)],
            lw=0,
            zorder=0,
            label=label,
        )


def _curve(
    runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
) -> tuple[np.ndarray, ...]:
    """(env steps, mean, min, max) over the runs, at the env steps every run evaluated."""
    per_run = []
    for r in runs:
        by_step = {e["env_step"]: value(e) for e in r["record"]["evaluations"]}  # later duplicate wins
        per_run.append(by_step)
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    ys = np.array([[np.nan if d[s] is None else d[s] for s in steps] for d in per_run], dtype=float)
    if not steps:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    return np.array(steps), ys.mean(0), ys.min(0), ys.max(0)


def figure_total(results: dict[str, Any]) -> Any:
    schedule, spv = results["schedule"], results["steps_per_visit"]
    n = len(results["normalised_games"])
    with figure_style():
        fig = new_figure((9, 4.5))
        ax = fig.subplots()
        _shade_visits(ax, schedule, spv, legend=True)
        for method, runs in results["runs"].items():
            x, mean, lo, hi = _curve(runs, lambda e: e["total"])
            color = _METHOD_COLORS[method]
            ax.plot(x, mean, color=color, lw=1.8, marker="o", ms=3, label=_METHOD_LABELS[method])
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        ax.axhline(n, color="black", lw=0.8, ls="--")
        ax.set_xlim(0, len(schedule) * spv)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"total normalised score (max {n})")
        seeds = len(next(iter(results["runs"].values()))) if results["runs"] else 0
        ax.set_title(f"Total normalised score over {n} game(s): mean and min–max over {seeds} seed(s)")
        fig.legend(loc="outside lower center", fontsize=8, ncol=5)
    return fig


def figure_per_game(results: dict[str, Any]) -> Any:
    schedule, spv = results["schedule"], results["steps_per_visit"]
    games = results["games"]
    with figure_style():
        fig = new_figure((5 * len(games), 4))
        axes = np.atleast_1d(fig.subplots(1, len(games), squeeze=False)[0])
        for ax, game in zip(axes, games, strict=True):
            _shade_visits(ax, schedule, spv, legend=False)
            for method, runs in results["runs"].items():
                x, mean, lo, hi = _curve(runs, lambda e, g=game: e["scores"][g])
                color = _METHOD_COLORS[method]
                ax.plot(x, mean, color=color, lw=1.6, marker="o", ms=3, label=_METHOD_LABELS[method])
                if len(runs) > 1:
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            norm = results["normalisation"][game]
            ax.axhline(norm["random"], color="grey", ls="--", lw=1, label="random")
            ax.axhline(norm["reference"], color="black", ls="--", lw=1, label="single-task reference")
            ax.set_xlim(0, len(schedule) * spv)
            ax.set_title(game)
            ax.set_xlabel("env steps")
            ax.set_ylabel("mean return")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=5)
    return fig


def figure_perturb(p: dict[str, Any], norm: dict[str, Any]) -> Any:
    with figure_style():
        fig = new_figure((6, 4))
        ax = fig.subplots()
        for kind in PERTURB_KINDS:
            ax.plot(
                p["norms"], p["scores"][kind], marker="o", color=_KIND_COLORS[kind], label=_KIND_LABELS[kind]
            )
        ax.axhline(p["unperturbed"], color="black", lw=1, ls=":", label="unperturbed")
        ax.axhline(norm["random"], color="grey", lw=1, ls="--", label="random policy")
        ax.set_xscale("log")
        ax.set_xlabel("‖z‖ (L2 norm of the perturbation of the shared parameters)")
        ax.set_ylabel(f"mean return ({p['episodes']} episodes × {p['draws']} draws)")
        ax.set_title(f"Perturbing the {p['method']} agent (seed {p['seed']}) on {p['game']}")
        ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------ findings, tables


def _pm(s: dict[str, Any], digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a"
    std = "n/a" if s["std"] is None else f"{s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {std}"


def findings(results: dict[str, Any]) -> list[str]:
    out = [
        f"Schedule ({len(results['schedule'])} visits of {results['steps_per_visit']} env steps): "
        + " → ".join(results["schedule"])
        + "."
    ]
    excluded = results["excluded_games"]
    for g in excluded:
        n = results["normalisation"][g]
        out.append(
            f"{g} cannot be normalised: its reference score {n['reference']:.3f} is not above the random "
            f"score {n['random']:.3f}; it is left out of the total."
        )
    n_games = len(results["normalised_games"])
    summary = results["summary"]
    for method, s in summary.items():
        t = s["final_total"]
        if t["mean"] is None:
            continue
        out.append(
            f"{method}: final total normalised score {_pm(t)} (mean ± std over {t['n']} seed(s); min "
            f"{t['min']:.3f}, max {t['max']:.3f}; maximum possible {n_games})."
        )
    if "dqn" in summary and summary["dqn"]["final_total"]["mean"] is not None:
        base = summary["dqn"]["final_total"]
        for method in ("ewc", "ewc-true-labels"):
            if method not in summary or summary[method]["final_total"]["mean"] is None:
                continue
            t = summary[method]["final_total"]
            diff = f"{method} − dqn, final total: {t['mean'] - base['mean']:+.3f} (difference of means"
            if t["n"] < 2 or base["n"] < 2:
                out.append(f"{diff}; a single seed on one side, so no spread to compare it with).")
            else:
                overlap = t["min"] <= base["max"] and base["min"] <= t["max"]
                base_by_seed = {r["seed"]: r["final_total"] for r in results["runs"]["dqn"]}
                pairs = [
                    (r["final_total"], base_by_seed[r["seed"]])
                    for r in results["runs"][method]
                    if r["seed"] in base_by_seed
                ]
                above = sum(a > b for a, b in pairs)
                out.append(
                    f"{diff} over {t['n']} and {base['n']} seeds); the seeds' min–max ranges "
                    + ("overlap" if overlap else "do not overlap")
                    + f"; {method} ends above the same-seed dqn run in {above} of {len(pairs)} seeds."
                )
    for method, s in summary.items():
        parts = []
        for g in results["normalised_games"]:
            pg = s["per_game"][g]
            parts.append(f"{g} {_pm(pg['final'])} (forgetting {_pm(pg['forgetting'])})")
        if parts:
            out.append(f"{method}, final normalised score per game: " + "; ".join(parts) + ".")
    det = [r["record"].get("detector") for r in results["runs"].get("ewc", [])]
    if det and all(d is not None for d in det):
        found = ", ".join(str(d["num_tasks"]) for d in det)
        out.append(
            f"ewc's task detector ended with {found} task(s) per seed for {len(results['games'])} games."
        )
    if results.get("perturb_skipped"):
        out.append(f"Perturbation test skipped: {results['perturb_skipped']}.")
    p = results.get("perturb")
    if p:
        pairs = ", ".join(
            f"{r:g}: {a:.2f} vs {b:.2f}"
            for r, a, b in zip(p["norms"], p["scores"]["isotropic"], p["scores"]["fisher"], strict=True)
        )
        out.append(
            f"Perturbation test ({p['method']}, seed {p['seed']}, {p['game']}, unperturbed "
            f"{p['unperturbed']:.2f}): "
            f"mean return at ‖z‖ = {pairs} (isotropic vs inverse-Fisher noise)."
        )
    return out


def tables(results: dict[str, Any]) -> list[str]:
    games = results["games"]
    norm = results["normalisation"]
    t1 = md_table(
        ["game", "visits", "budget (env steps)", "random", "reference", "reference from"],
        [
            [
                g,
                str(results["schedule"].count(g)),
                str(results["budgets"][g]),
                f"{norm[g]['random']:.3f}",
                f"{norm[g]['reference']:.3f}",
                norm[g]["reference_source"],
            ]
            for g in games
        ],
        align=["---", "---:", "---:", "---:", "---:", "---"],
    )
    rows = []
    for method, s in results["summary"].items():
        t = s["final_total"]
        rows.append(
            [
                method,
                _pm(t),
                "n/a" if t["min"] is None else f"{t['min']:.3f} / {t['max']:.3f}",
                *[_pm(s["per_game"][g]["final"]) for g in results["normalised_games"]],
                f"{s['env_steps_per_s']['mean']:.0f}",
                f"{s['updates_per_s']['mean']:.0f}",
            ]
        )
    t2 = md_table(
        [
            "method",
            "final total (mean ± std)",
            "min / max",
            *[f"{g} final" for g in results["normalised_games"]],
            "env steps/s",
            "updates/s",
        ],
        rows,
    )
    out = [t1, t2]
    p = results.get("perturb")
    if p:
        out.append(
            md_table(
                ["‖z‖", "isotropic", "inverse Fisher", "Σ F z² isotropic", "Σ F z² inverse Fisher"],
                [
                    [f"{r:g}", f"{a:.2f}", f"{b:.2f}", f"{qa:.3g}", f"{qb:.3g}"]
                    for r, a, b, qa, qb in zip(
                        p["norms"],
                        p["scores"]["isotropic"],
                        p["scores"]["fisher"],
                        p["fisher_quadratic"]["isotropic"],
                        p["fisher_quadratic"]["fisher"],
                        strict=True,
                    )
                ],
            )
        )
    return out


# ----------------------------------------------------------------------------------- the run


def _references(
    config: Config, schedule: list[str], out_dir: Path, say: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]], dict[str, str]]:
    """Reference scores known now (file or cache), their sources, the specs of those to train,
    and each game's cache key."""
    games = list(dict.fromkeys(schedule))
    budget = budgets(schedule, config.steps_per_visit)
    ref_cfg = dqn_config(config, "dqn", config.seeds[0])
    scores: dict[str, float] = {}
    sources: dict[str, str] = {}
    keys: dict[str, str] = {}
    specs: list[dict[str, Any]] = []
    if config.reference is not None:
        scores = read_reference_file(config.reference, games)
        return scores, dict.fromkeys(games, "file"), specs, keys
    for g in games:
        keys[g] = reference_key(g, budget[g], ref_cfg, config.eval_episodes, config.eval_epsilon)
        path = _reference_cache(keys[g])
        if config.cache and path.is_file():
            try:
                scores[g] = float(json.loads(path.read_text())["score"])
                sources[g] = "cache"
                say(f"reference {g}: {scores[g]:.3f} from the cache ({path})")
                continue
            except (ValueError, KeyError, TypeError):
                say(f"reference {g}: unreadable cache file {path}, recomputing")
        specs.append(
            {
                "name": f"reference-{g}",
                "game": g,
                "dqn": ref_cfg,
                "schedule": [g],
                "steps_per_visit": budget[g],
                "eval_every": None,
                "eval_episodes": config.eval_episodes,
                "eval_epsilon": config.eval_epsilon,
                "checkpoint": str(out_dir / "checkpoints" / f"reference-{g}.pt"),
                "checkpoint_every": config.checkpoint_every,
            }
        )
    return scores, sources, specs, keys


def run(
    config: Config, out: str | Path | None = None, log: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Train every (method, seed) and the references, normalise, test, and report (see module doc)."""
    start = time.perf_counter()
    say = log or (lambda _m: None)
    if config.reference is not None:
        read_reference_file(config.reference, config.games)  # fail before any training
    with contextlib.ExitStack() as stack:
        # without --out the checkpoints (needed by the perturbation test) go to a temporary folder
        out_dir = (
            check_out_dir(out)
            if out is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        return _run(config, out, out_dir, say, start)


def _run(
    config: Config, out: str | Path | None, out_dir: Path, say: Callable[[str], None], start: float
) -> dict[str, Any]:
    from ewc.rl.env import random_policy_score
    from ewc.state import atomic_write_bytes

    schedule = make_schedule(config.games, config.visits, config.order_seed)
    games = list(dict.fromkeys(schedule))
    spv = config.steps_per_visit
    say(f"schedule: {' -> '.join(schedule)} ({spv} env steps per visit)")
    say(f"checkpoints in {out_dir / 'checkpoints'} (run the same command again to resume)")

    ref_scores, ref_sources, ref_specs, ref_keys = _references(config, schedule, out_dir, say)
    run_specs = [
        {
            "name": f"{m}-s{s}",
            "method": m,
            "seed": s,
            "dqn": dqn_config(config, m, s),
            "schedule": schedule,
            "steps_per_visit": spv,
            "eval_every": config.eval_every,
            "eval_episodes": config.eval_episodes,
            "eval_epsilon": config.eval_epsilon,
            "checkpoint": str(out_dir / "checkpoints" / f"{m}-s{s}.pt"),
            "checkpoint_every": config.checkpoint_every,
        }
        for m in config.methods
        for s in config.seeds
    ]
    records = _run_jobs(ref_specs + run_specs, config.jobs)
    ref_records, run_records = records[: len(ref_specs)], records[len(ref_specs) :]

    # references: the final evaluation of each single-task run, cached
    reference_runs = {}
    for spec, rec in zip(ref_specs, ref_records, strict=True):
        g = spec["game"]
        ref_scores[g] = float(rec["evaluations"][-1]["scores"][g])
        ref_sources[g] = "computed"
        reference_runs[g] = {
            k: rec.get(k)
            for k in ("env_steps", "updates", "train_seconds", "env_steps_per_s", "updates_per_s")
        }
        if config.cache:
            path = _reference_cache(ref_keys[g])
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = {
                "format": REFERENCE_FORMAT,
                "game": g,
                "budget": spec["steps_per_visit"],
                "score": ref_scores[g],
                "dqn": asdict(spec["dqn"]),
                "eval_episodes": config.eval_episodes,
                "eval_epsilon": config.eval_epsilon,
            }
            atomic_write_bytes(path, json.dumps(entry, indent=1).encode("utf-8"))
        say(f"reference {g}: {ref_scores[g]:.3f} (single-task dqn, {spec['steps_per_visit']} env steps)")

    normalisation = {}
    for g in games:
        rnd = random_policy_score(g, RANDOM_EPISODES, 0)
        normalisation[g] = {
            "random": rnd,
            "reference": ref_scores[g],
            "reference_source": ref_sources[g],
            "normalisable": ref_scores[g] - rnd > MIN_RANGE,
        }
    excluded = [g for g in games if not normalisation[g]["normalisable"]]
    normalised_games = [g for g in games if normalisation[g]["normalisable"]]

    # per run: normalised scores per evaluation, final total, forgetting, throughput
    last_end = {g: (max(i for i, x in enumerate(schedule) if x == g) + 1) * spv for g in games}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in config.methods}
    for spec, rec in zip(run_specs, run_records, strict=True):
        rec = _trim(rec)
        for e in rec["evaluations"]:
            e["normalised"] = {
                g: normalise(e["scores"][g], normalisation[g]["random"], normalisation[g]["reference"])
                for g in games
            }
            e["total"] = total_score(e["scores"], normalisation)
        final = rec["evaluations"][-1]
        fg = {g: forgetting(rec["evaluations"], g, last_end[g]) for g in games}
        runs[spec["method"]].append(
            {
                "seed": spec["seed"],
                "record": rec,
                "final_total": final["total"],
                "final_normalised": final["normalised"],
                "final_scores": final["scores"],
                "best_before_last_visit_end": {g: None if v is None else v[0] for g, v in fg.items()},
                "forgetting": {g: None if v is None else v[2] for g, v in fg.items()},
                "env_steps_per_s": rec.get("env_steps_per_s"),
                "updates_per_s": rec.get("updates_per_s"),
            }
        )
    summary = {
        m: {
            "final_total": _stats([r["final_total"] for r in rs]),
            "per_game": {
                g: {
                    "final": _stats([r["final_normalised"][g] for r in rs]),
                    "final_raw": _stats([r["final_scores"][g] for r in rs]),
                    "forgetting": _stats([r["forgetting"][g] for r in rs]),
                }
                for g in games
            },
            "env_steps_per_s": _stats([r["env_steps_per_s"] for r in rs]),
            "updates_per_s": _stats([r["updates_per_s"] for r in rs]),
        }
        for m, rs in runs.items()
    }

    perturb, perturb_skipped = None, None
    if config.perturb:
        method = next((m for m in ("ewc-true-labels", "ewc") if m in config.methods), None)
        if method is None:
            perturb_skipped = "it needs ewc-true-labels or ewc among --methods"
        else:
            seed = config.seeds[0]
            say(f"perturbation test on {method}-s{seed}, {schedule[0]}")
            try:
                perturb = perturbation_test(
                    config,
                    dqn_config(config, method, seed),
                    out_dir / "checkpoints" / f"{method}-s{seed}.pt",
                    schedule[0],
                    runs[method][0]["record"],
                )
                perturb = {"method": method, "seed": seed, **perturb}
            except ValueError as exc:  # e.g. no replay states for the context: keep the report
                perturb_skipped = f"{method}-s{seed}: {exc}"
        if perturb_skipped:
            say(f"perturbation test skipped: {perturb_skipped}")

    results = {
        "schedule": schedule,
        "games": games,
        "steps_per_visit": spv,
        "budgets": budgets(schedule, spv),
        "normalisation": normalisation,
        "normalised_games": normalised_games,
        "excluded_games": excluded,
        "random_episodes": RANDOM_EPISODES,
        "reference_runs": reference_runs,
        "runs": runs,
        "summary": summary,
        "perturb": perturb,
        "perturb_skipped": perturb_skipped,
    }
    figures = {}
    if out is not None:
        figures = {"total_score.png": figure_total(results), "per_game.png": figure_per_game(results)}
        if perturb is not None:
            figures["perturb.png"] = figure_perturb(perturb, normalisation[perturb["game"]])
    return finish(
        out,
        "rl",
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures=figures,
        findings=findings(results),
        tables=tables(results),
        seconds=time.perf_counter() - start,
        prefix=("ewc",),
    )
