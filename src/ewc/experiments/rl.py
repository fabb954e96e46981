"""Continual RL on MinAtar games: DQN vs DQN + EWC, inferred or true task labels (``ewc rl``).

The EWC paper's RL experiment (Kirkpatrick et al. 2017, Fig. 3A/B) on MinAtar (:mod:`ewc.rl`):
one agent plays a schedule of games with revisits, and every game is evaluated every
``eval_every`` env steps. Methods (all the same :class:`ewc.rl.agent.Agent`, per-game gains,
biases and replay):

- ``dqn``: λ = 0 with the true task labels, the plain baseline (no EWC term is ever built);
- ``ewc``: λ with task labels inferred by the agent's ``TaskDetector``;
- ``ewc-true-labels``: λ with the true labels, the paper's control;
- ``online-ewc``: λ with the true labels and one merged penalty (decay ``online_gamma``).

Schedule: seeded by ``order_seed``; the first ``len(games)`` visits are a random permutation of
the games, every later visit a random game other than the previous one, every game at least
``min_visits`` times. One schedule for every
method and seed. Every (method, seed) is one :func:`ewc.rl.agent.train_sequence` run in its own
process (``jobs`` at a time, one torch thread each), checkpointed under ``OUT/checkpoints`` so
that running the same command again after a kill resumes where it stopped.

Scores are normalised per game: ``min(1, (score - random) / (reference - random))`` where
``random`` is the uniform policy's mean return (100 episodes) and ``reference`` the final score
of a single-task ``dqn`` agent (seed ``reference_seed``) trained on that game alone for the
game's budget (steps per visit × its visits in the schedule); references are cached under the
user cache. The total normalised score is the sum over games (at most the number of games).
With ``perturb``, the Fisher perturbation test (issue #4, the paper's Fig. 4C) is applied to
the final agent of the first seed, once per game in that game's consolidated context.

The settings are :mod:`ewc.experiments.rl_config`; this module runs the experiment; the protocol (schedule,
normalisation, forgetting, reference cache) is :mod:`ewc.rl.protocol`, the perturbation test
:mod:`ewc.rl.perturb`, the figures, findings and tables :mod:`ewc.experiments.rl_report`, and the
worker processes :func:`ewc.pool.run_jobs`.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ewc.experiments.common import check_out_dir, finish
from ewc.experiments.rl_claims import claims
from ewc.experiments.rl_config import FULL_PROTOCOL, METHODS, Config, command, dqn_config
from ewc.experiments.rl_report import figure_per_game, figure_perturb, figure_total, findings, tables
from ewc.experiments.tracked import log_rl, open_for
from ewc.pool import run_jobs
from ewc.rl.perturb import perturbation_test
from ewc.rl.protocol import (
    RANDOM_EPISODES,
    budgets,
    forgetting,
    make_schedule,
    normalisation_table,
    normalise,
    read_cached_reference,
    read_reference_file,
    reference_cache_path,
    reference_key,
    score_run,
    summarise,
    total_score,
    write_cached_reference,
)

__all__ = [
    "CLAIM",
    "FULL_PROTOCOL",
    "METHODS",
    "TITLE",
    "Config",
    "budgets",
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


# ----------------------------------------------------------------------------------- the run


def _references(
    config: Config, schedule: list[str], out_dir: Path, say: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, str], list[dict[str, Any]], dict[str, str]]:
    """Reference scores known now (file or cache), their sources, the specs of those to train,
    and each game's cache key."""
    games = list(dict.fromkeys(schedule))
    budget = budgets(schedule, config.steps_per_visit)
    ref_cfg = dqn_config(config, "dqn", config.reference_seed)
    scores: dict[str, float] = {}
    sources: dict[str, str] = {}
    keys: dict[str, str] = {}
    specs: list[dict[str, Any]] = []
    if config.reference is not None:
        scores = read_reference_file(config.reference, games)
        return scores, dict.fromkeys(games, "file"), specs, keys
    for g in games:
        keys[g] = reference_key(g, budget[g], ref_cfg, config.eval_episodes, config.eval_epsilon)
        path = reference_cache_path(keys[g])
        if config.cache and path.is_file():
            try:
                scores[g] = read_cached_reference(path)
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


def _perturb(
    config: Config,
    schedule: list[str],
    out_dir: Path,
    runs: dict[str, list[dict[str, Any]]],
    say: Callable[[str], None],
) -> tuple[dict[str, Any] | None, str | None]:
    """The perturbation test of the first seed's final EWC agent (true labels if it ran), per game:
    ``({"method", "seed", "per_game": {game: perturbation_test(...)}}, None)``, or
    ``(None, why)``; a game that cannot be tested (no replay states) is listed in ``skipped``."""
    if not config.perturb:
        return None, None
    method = next((m for m in ("ewc-true-labels", "ewc", "online-ewc") if m in config.methods), None)
    if method is None:
        why = "it needs ewc-true-labels, ewc or online-ewc among --methods"
        say(f"perturbation test skipped: {why}")
        return None, why
    seed = config.seeds[0]
    per_game: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for game in dict.fromkeys(schedule):
        say(f"perturbation test on {method}-s{seed}, {game}")
        try:
            per_game[game] = perturbation_test(
                dqn_config(config, method, seed),
                out_dir / "checkpoints" / f"{method}-s{seed}.pt",
                game,
                runs[method][0]["record"],
                fisher_samples=config.fisher_samples,
                episodes=config.perturb_episodes,
                eval_epsilon=config.eval_epsilon,
                norms=config.perturb_norms,
                draws=config.perturb_draws,
                damping=config.perturb_damping,
            )
        except ValueError as exc:  # e.g. no replay states for the context: keep the report
            skipped[game] = str(exc)
            say(f"perturbation test on {game} skipped: {exc}")
    if not per_game:
        return None, f"{method}-s{seed}: " + "; ".join(f"{g}: {w}" for g, w in skipped.items())
    return {"method": method, "seed": seed, "per_game": per_game, "skipped": skipped}, None


def run(
    config: Config, out: str | Path | None = None, log: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Train every (method, seed) and the references, normalise, test, and report (see module doc);
    then send the record to the trackers of ``config.track``."""
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
        tracker = stack.enter_context(open_for("rl", config.track, out))
        record = _run(config, out, out_dir, say, start)
        log_rl(tracker, record, Path(out) if out is not None else None)
        return record


def _run(
    config: Config, out: str | Path | None, out_dir: Path, say: Callable[[str], None], start: float
) -> dict[str, Any]:
    schedule = make_schedule(config.games, config.visits, config.order_seed, config.min_visits)
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
    records = run_jobs(_job, ref_specs + run_specs, config.jobs)
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
            write_cached_reference(
                ref_keys[g],
                g,
                spec["steps_per_visit"],
                ref_scores[g],
                spec["dqn"],
                config.eval_episodes,
                config.eval_epsilon,
            )
        say(f"reference {g}: {ref_scores[g]:.3f} (single-task dqn, {spec['steps_per_visit']} env steps)")

    normalisation = normalisation_table(games, ref_scores, ref_sources)
    excluded = [g for g in games if not normalisation[g]["normalisable"]]
    normalised_games = [g for g in games if normalisation[g]["normalisable"]]

    # per run: normalised scores per evaluation, final total, forgetting, throughput
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in config.methods}
    for spec, rec in zip(run_specs, run_records, strict=True):
        runs[spec["method"]].append(score_run(rec, spec["seed"], schedule, spv, normalisation))
    summary = summarise(runs, games)

    perturb, perturb_skipped = _perturb(config, schedule, out_dir, runs, say)
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
    results["claims"] = claims(results)
    figures = {}
    if out is not None:
        figures = {"total_score.png": figure_total(results), "per_game.png": figure_per_game(results)}
        if perturb is not None:
            figures["perturb.png"] = figure_perturb(perturb, normalisation)
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
