"""Evaluation of an :class:`~ewc.rl.dqn.Agent`: episodes of one game played in lockstep.

All ``episodes`` episodes run at once, one :class:`~ewc.rl.env.Game` each (episode ``k`` seeded by
``derive_seed(seed, 3, k)`` alone, as before), and every step the still-running episodes take
their ε-greedy actions from ONE batched forward pass of the Q-network (per-sample task contexts).
Why: evaluation is a forward pass per env step with batch 1, and a long game (freeway's
episodes last 2 500 steps) made it a third of a run's time; batching the episodes makes the
forward pass nearly free per episode (measured in docs/benchmarks.md).

Context per episode: the game's index (true labels) or, with inferred labels, the argmax over the
detector's known tasks of the last ``window`` observations' features, re-chosen every
``detect_every`` steps (the detector is not updated). The training RNG and game are not touched.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ewc.rl.config import derive_seed
from ewc.rl.env import GAMES, NUM_ACTIONS, Game, check_game

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from ewc.rl.dqn import Agent

__all__ = ["play_episodes"]


@torch.no_grad()
def play_episodes(
    agent: Agent,
    game: str,
    episodes: int = 10,
    epsilon: float = 0.05,
    seed: int = 0,
    max_steps: int = 27_000,
    window: int = 1_024,
) -> dict[str, Any]:
    """Play ``episodes`` of ``game`` without learning; ``{"mean_return", "returns", "contexts"}``
    (``contexts``: env steps played per context, over all episodes)."""
    check_game(game)
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes!r}")
    c = agent.config
    detector = agent.detector
    gen = torch.Generator().manual_seed(derive_seed(seed, 2))
    envs = [Game(game, seed=seed, sticky_action_prob=c.sticky_action_prob) for _ in range(episodes)]
    obs = [env.reset(seed=derive_seed(seed, 3, k)) for k, env in enumerate(envs)]
    returns = [0.0] * episodes
    fixed = GAMES.index(game) if detector is None else 0
    ctx = [fixed] * episodes
    # per episode: the last ``window`` frames' detector features (block_features of one frame)
    feats: list[deque[torch.Tensor]] = [deque(maxlen=window) for _ in range(episodes)]
    counts: dict[int, int] = {}
    active = list(range(episodes))
    for t in range(max_steps):
        if not active:
            break
        if detector is not None:
            for k in active:
                feats[k].append(obs[k].sum(dim=(1, 2)).sqrt())
                if t % c.detect_every == 0:
                    block = torch.stack(list(feats[k])).mean(0, keepdim=True)
                    ctx[k] = max(detector.predict(block), 0)
        contexts = [ctx[k] for k in active]
        for x in contexts:
            counts[x] = counts.get(x, 0) + 1
        batch = torch.stack([obs[k] for k in active]).to(agent.device)
        task: int | torch.Tensor = contexts[0] if len(set(contexts)) == 1 else torch.tensor(contexts)
        if isinstance(task, torch.Tensor):
            task = task.to(agent.device)
        greedy = agent.qnet(batch, task).argmax(1).cpu()
        explore = torch.rand(len(active), generator=gen) < epsilon
        random = torch.randint(NUM_ACTIONS, (len(active),), generator=gen)
        actions = torch.where(explore, random, greedy).tolist()
        still = []
        for k, a in zip(active, actions, strict=True):
            obs[k], reward, done = envs[k].step(a)
            returns[k] += reward
            if not done:
                still.append(k)
        active = still
    return {
        "mean_return": float(np.mean(returns)),
        "returns": returns,
        "contexts": {str(k): v for k, v in sorted(counts.items())},
    }
