"""The continual DQN agent's public names, and :func:`train_sequence`, its main loop.

The agent itself (:class:`Agent`, see :mod:`ewc.rl.dqn` for how it learns, consolidates and
resumes) is built from :mod:`ewc.rl.config` (:class:`DQNConfig`), :mod:`ewc.rl.method` (the
method it runs) and :mod:`ewc.rl.consolidation` (the default one, :class:`PolicyEWC`, and the
normalised policy Fisher); this module runs one agent over a schedule of games, with
evaluations and checkpoints.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ewc.checks import check_count
from ewc.rl.config import DQNConfig, derive_seed, saved_config
from ewc.rl.consolidation import PolicyEWC, normalise_fisher, policy_fisher
from ewc.rl.dqn import FORMAT, Agent, td_targets
from ewc.rl.env import block_features, check_game
from ewc.state import PathLike, atomic_save, safe_load

__all__ = [
    "FORMAT",
    "Agent",
    "DQNConfig",
    "PolicyEWC",
    "block_features",
    "normalise_fisher",
    "policy_fisher",
    "td_targets",
    "train_sequence",
]


# ------------------------------------------------------------------------------ the main loop


def train_sequence(
    config: DQNConfig,
    schedule: Sequence[str],
    steps_per_visit: int,
    eval_every: int | None = None,
    eval_episodes: int = 10,
    eval_epsilon: float = 0.05,
    checkpoint: PathLike | None = None,
    checkpoint_every: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one agent on ``schedule`` (game names, repeats allowed), ``steps_per_visit`` env steps
    per visit; evaluate every game of the schedule every ``eval_every`` env steps and after each
    visit. With ``checkpoint``, the agent and the record are saved after every visit (and every
    ``checkpoint_every`` steps), and an existing checkpoint is resumed. Returns a JSON-friendly
    record. Runs on one torch thread (DQN's small updates are several times slower on more).
    """
    for g in schedule:
        check_game(g)
    if not schedule:
        raise ValueError("schedule must name at least one game")
    check_count(steps_per_visit, "steps_per_visit")
    check_count(eval_episodes, "eval_episodes")
    games = list(dict.fromkeys(schedule))
    say = log or (lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # 1. a fresh agent and record, or both from the checkpoint
        agent = Agent(config)
        record: dict[str, Any] = {
            "config": asdict(config),
            "schedule": list(schedule),
            "steps_per_visit": steps_per_visit,
            "eval_every": eval_every,
            "eval_episodes": eval_episodes,
            "eval_epsilon": eval_epsilon,
            "games": games,
            "evaluations": [],
            "visits": [],
            "episode_returns": [],
            "train_seconds": 0.0,
            "eval_seconds": 0.0,
            "env_steps": 0,
            "updates": 0,
        }
        if checkpoint is not None and os.path.exists(checkpoint):
            saved = safe_load(checkpoint)
            differ = _differing_settings(saved["record"], record)
            if differ:
                where = os.fspath(checkpoint)
                raise ValueError(
                    f"checkpoint {where!r} was made with other settings ({'; '.join(differ)}): "
                    "resume with the same ones, or start a new run"
                )
            agent.load_state_dict(saved["agent"])
            record = saved["record"]
            say(f"resumed at visit {agent.visits}, env step {agent.env_steps}")

        def save() -> None:
            if checkpoint is not None:
                atomic_save({"agent": agent.state_dict(), "record": record}, checkpoint)

        def evaluate(visit: int) -> None:
            tic = time.perf_counter()
            scores = {
                g: agent.evaluate(g, eval_episodes, eval_epsilon, seed=derive_seed(config.seed, 4))
                for g in games
            }
            # a record from before issue #19 has no eval_seconds
            record["eval_seconds"] = record.get("eval_seconds", 0.0) + time.perf_counter() - tic
            record["evaluations"].append(
                {
                    "env_step": agent.env_steps,
                    "visit": visit,
                    "game": schedule[visit],
                    "scores": {g: s["mean_return"] for g, s in scores.items()},
                    "contexts": {g: s["contexts"] for g, s in scores.items()},
                }
            )
            say(
                f"step {agent.env_steps}: "
                + ", ".join(f"{g} {s['mean_return']:.2f}" for g, s in scores.items())
            )

        # 2. the visits
        for v in range(agent.visits, len(schedule)):
            game = schedule[v]
            if agent.game_name is None:
                agent.begin_visit(game)
                record["episode_returns"].append([])
            returns = record["episode_returns"][v]
            tic = time.perf_counter()
            while agent.visit_steps < steps_per_visit:
                info = agent.step()
                if "episode_return" in info:
                    returns.append(info["episode_return"])
                last = agent.visit_steps >= steps_per_visit  # evaluated after end_visit below
                due_eval = eval_every is not None and agent.env_steps % eval_every == 0 and not last
                due_save = checkpoint_every is not None and agent.env_steps % checkpoint_every == 0
                if due_eval or due_save:
                    record["train_seconds"] += time.perf_counter() - tic
                    if due_eval:
                        evaluate(v)
                    if due_save:
                        record["env_steps"], record["updates"] = agent.env_steps, agent.updates
                        save()
                    tic = time.perf_counter()
            record["train_seconds"] += time.perf_counter() - tic
            summary = agent.end_visit()
            summary["mean_return"] = float(np.mean(returns)) if returns else None
            summary["episodes"] = len(returns)
            record["visits"].append(summary)
            say(
                f"visit {v} ({game}) done: {summary['episodes']} episodes, mean return "
                f"{summary['mean_return']}, consolidated {summary['consolidated']}"
            )
            evaluate(v)
            record["env_steps"], record["updates"] = agent.env_steps, agent.updates
            save()

        # 3. throughput and detector summary
        secs = max(record["train_seconds"], 1e-9)
        record["env_steps_per_s"] = record["env_steps"] / secs
        record["updates_per_s"] = record["updates"] / secs
        record["num_contexts"] = len(agent.replay.buffers)
        if agent.detector is not None:
            d = agent.detector
            record["detector"] = {"num_tasks": d.num_tasks, "retracted": d.retracted, "cap_hits": d.cap_hits}
        return record
    finally:
        torch.set_num_threads(threads)


# What a run's record holds besides its progress: every setting the agent was trained with.
RUN_SETTINGS = ("config", "schedule", "steps_per_visit", "eval_every", "eval_episodes", "eval_epsilon")


def _differing_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved → now`` for each setting of :data:`RUN_SETTINGS` (the agent's config field
    by field) that differs between a checkpoint's record and the run about to resume it."""
    out = []
    for key in RUN_SETTINGS:
        a, b = saved.get(key), now.get(key)
        if key == "config":
            a = saved_config(a or {})
            keys = sorted(set(a) | set(b))
            out += [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} → {b!r}")
    return out
