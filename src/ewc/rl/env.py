"""MinAtar games behind one observation and action space, so a single Q-network can play all of them.

* Observations: float32 tensors ``[C_max, 10, 10]`` (channels first), the game's binary channels
  followed by zero channels up to ``C_max``, the largest channel count over :data:`GAMES` (computed
  from MinAtar, 10 for seaquest). A game's channel ``k`` always lands in channel ``k``.
* Actions: MinAtar's full set of 6 (``n, l, u, r, d, f``); an action outside a game's minimal set
  is a no-op in that game, as in the ALE. One 6-way head therefore serves every game.
* Sticky actions (probability 0.1, MinAtar's default) and MinAtar's difficulty ramping are kept.

MinAtar's ``Environment`` seeds its games through one ``numpy.random.RandomState``; :class:`Game`
seeds it at construction and, optionally, at every ``reset(seed)``, so an episode is reproducible
from its seed alone (the agent uses this to resume a run: see ``ewc.rl.agent``).
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import import_module

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GAMES",
    "NUM_ACTIONS",
    "OBS_SIZE",
    "Game",
    "block_features",
    "max_channels",
    "random_policy_score",
]

GAMES = ("breakout", "space_invaders", "freeway", "asterix", "seaquest")
NUM_ACTIONS = 6  # MinAtar's full action set, shared by every game
OBS_SIZE = 10  # MinAtar screens are 10 x 10


def _minatar():  # noqa: ANN202 - the module
    """Import minatar (an optional dependency), silencing its warning about the GUI-only seaborn."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # minatar logs a warning when seaborn (GUI only) is missing
    try:
        import minatar
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "ewc.rl needs MinAtar: pip install --no-deps 'minatar==1.0.15' (its core needs only numpy)"
        ) from exc
    finally:
        root.setLevel(level)
    return minatar


def check_game(name: str) -> str:
    """``name`` if it is one of :data:`GAMES`, else a ValueError listing the valid names."""
    if name not in GAMES:
        raise ValueError(f"unknown MinAtar game {name!r}; expected one of {', '.join(GAMES)}")
    return name


@cache
def channels(name: str) -> int:
    """Number of observation channels of game ``name``, as MinAtar defines it."""
    _minatar()
    env = import_module(f"minatar.environments.{check_game(name)}").Env()
    return int(env.state_shape()[2])


@cache
def max_channels() -> int:
    """``C_max``: the largest channel count over :data:`GAMES` (the padded observation depth)."""
    return max(channels(g) for g in GAMES)


class Game:
    """One MinAtar game with padded float observations ``[C_max, 10, 10]`` and the full action set.

    ``reset(seed=None)`` starts an episode (re-seeding the game's RNG first when ``seed`` is given)
    and returns the first observation; ``step(a)`` returns ``(obs, reward, done)``. Stepping a
    finished episode raises: the caller must reset.
    """

    def __init__(self, name: str, seed: int = 0, sticky_action_prob: float = 0.1) -> None:
        check_game(name)
        if not (0.0 <= float(sticky_action_prob) < 1.0):
            raise ValueError(f"sticky_action_prob must be in [0, 1), got {sticky_action_prob!r}")
        minatar = _minatar()
        self.name = name
        self.env = minatar.Environment(name, sticky_action_prob=float(sticky_action_prob))
        self.channels = int(self.env.state_shape()[2])
        self.c_max = max_channels()
        self._buf = np.zeros((self.c_max, OBS_SIZE, OBS_SIZE), dtype=np.float32)
        self.env.seed(int(seed))
        self.done = True

    @property
    def minimal_action_set(self) -> list[int]:
        """Indices (into the full set of 6) of the actions that do something in this game."""
        return [int(a) for a in self.env.minimal_action_set()]

    def _obs(self) -> Tensor:
        self._buf[: self.channels] = np.moveaxis(self.env.state(), 2, 0)
        return torch.from_numpy(self._buf.copy())

    def reset(self, seed: int | None = None) -> Tensor:
        """Start an episode (seeded by ``seed`` if given) and return its first observation."""
        if seed is not None:
            self.env.seed(int(seed))
        self.env.reset()
        self.env.last_action = 0  # sticky actions repeat the previous action; none yet
        self.done = False
        return self._obs()

    def step(self, action: int) -> tuple[Tensor, float, bool]:
        """Take ``action`` (0..5, the full action set): ``(next obs, reward, episode done)``."""
        if self.done:
            raise RuntimeError("the episode is over: call reset() first")
        a = int(action)
        if not 0 <= a < NUM_ACTIONS:
            raise ValueError(f"action must be in 0..{NUM_ACTIONS - 1}, got {action!r}")
        reward, done = self.env.act(a)
        self.done = bool(done)
        return self._obs(), float(reward), self.done


def random_policy_score(game: str, episodes: int = 100, seed: int = 0, max_steps: int = 100_000) -> float:
    """Mean return of the uniform policy over the full 6-action set (sticky actions 0.1).

    The reference "random" score for normalising returns: it is the agent's ε = 1 behaviour.
    ``max_steps`` caps an episode's length (MinAtar episodes under a random policy are short).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes!r}")
    env = Game(game, seed=seed)
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(episodes):
        env.reset()
        for _ in range(max_steps):
            _, r, done = env.step(int(rng.integers(NUM_ACTIONS)))
            total += r
            if done:
                break
    return total / episodes


def block_features(frames: Tensor) -> Tensor:
    """What the task detector sees of a block of observations ``[n, C, 10, 10]``: one sample ``[1, C]``,
    the square root of each channel's active-cell count, averaged over the block.

    Why: MinAtar games differ in which object channels exist and how many objects each holds (a
    breakout frame has 1 paddle, 1 ball and ~30 bricks; space invaders ~20 aliens), while the
    pixel layout drifts within a game (bricks and aliens are destroyed, a better policy survives
    longer). A per-frame model of raw pixels or of a random projection split one game into many
    ids under a learning policy (10 ids, 51 % of blocks right, on a DQN's own breakout / space
    invaders frames), and consecutive frames are so correlated that a block is one piece of
    evidence, not n. The square root keeps the counts' spread near 1 (a Poisson count's root has
    variance ~1/4), the scale the detector's prior assumes. Measured in docs/rl.md.
    """
    return frames.sum(dim=(2, 3)).sqrt().mean(0, keepdim=True)
