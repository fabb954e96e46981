"""A continual DQN agent for a sequence of MinAtar games in one network (EWC paper, RL section).

One :class:`~ewc.rl.qnet.QNetwork` plays every game. Each task context ``t`` has its own gains
and biases, its own replay buffer and (after a long enough visit) its own EWC term on the shared
parameters. The context is the game's index in :data:`~ewc.rl.env.GAMES` with
``true_task_labels``, otherwise the id a :class:`~ewc.taskid.TaskDetector` gives each block of
``detect_every`` consecutive observations (the paper inferred it with a Forget-Me-Not process).

Learning (per env step, :meth:`Agent.step`): ε-greedy action in the current context (ε decays
linearly from ``eps_start`` to ``eps_end`` over ``eps_decay_steps`` steps, restarting at every
visit of a game) -> transition stored in the context's replay -> every ``train_every`` steps, once
the context's buffer holds ``learning_starts`` transitions, one Adam step on

    Huber(Q(s, a; t) - [r + γ (1 - done) Q_target(s', argmax_a' Q(s', a'; t); t)]) + EWC penalty

on a batch from that buffer (Double DQN; plain max with ``double_dqn=False``), gradient norm
clipped; the target network is copied every ``target_update`` env steps.

EWC (:meth:`Agent.end_visit`): every context that received at least ``ewc_min_steps`` transitions
during the visit is consolidated: anchor = current shared parameters, precision = the diagonal
Fisher of the Boltzmann policy softmax(Q(s; t)/τ) on ``fisher_samples`` states of its replay
buffer with its own gains/biases active, divided by its mean over the shared parameters (mean 1;
see docs/rl.md). Per-task gains and biases are never anchored. In ``separate`` mode a context owns
at most one term: when it becomes active again its term is set aside (it would pull the task back
to its old solution while it learns more of itself); at the end of the visit it is consolidated
afresh, or, if it got fewer than ``ewc_min_steps`` transitions, its old term is put back.

Checkpoints (:meth:`Agent.save` / :meth:`Agent.load`) hold networks, optimiser, EWC terms,
detector, replay buffers, counters and the RNG state. The game's internal state is not saved: a
resumed run starts a fresh episode (seeded by the episode counter), so a run saved at an episode
boundary continues exactly as it would have without the interruption.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.checks import check_count
from ewc.fisher import diagonal_fisher
from ewc.penalty import EWC, Term
from ewc.rl.env import GAMES, NUM_ACTIONS, OBS_SIZE, Game, check_game, max_channels
from ewc.rl.qnet import TASK_PREFIX, QNetwork
from ewc.rl.replay import TaskReplay
from ewc.state import PathLike, atomic_save, safe_load
from ewc.taskid import TaskDetector

__all__ = [
    "FORMAT",
    "Agent",
    "DQNConfig",
    "block_features",
    "normalise_fisher",
    "policy_fisher",
    "td_targets",
    "train_sequence",
]

FORMAT = "ewc.rl.agent/1"


# ------------------------------------------------------------------------------------- config


@dataclass
class DQNConfig:
    """Hyper-parameters of :class:`Agent` (defaults: MinAtar DQN with Adam, see docs/rl.md)."""

    gamma: float = 0.99  # discount
    lr: float = 1e-4  # Adam learning rate
    adam_eps: float = 3.125e-4  # Adam epsilon (the value Obando-Ceron & Castro 2021 use on MinAtar)
    batch_size: int = 32
    replay_capacity: int = 100_000  # transitions per task context
    learning_starts: int = 5_000  # transitions in the current context's buffer before updates
    train_every: int = 1  # env steps per update
    target_update: int = 1_000  # env steps between target-network copies
    eps_start: float = 1.0
    eps_end: float = 0.1
    eps_decay_steps: int = 100_000  # per visit: the schedule restarts whenever a game is visited
    huber_delta: float = 1.0
    grad_clip: float = 10.0  # max global gradient norm (inf: no clipping)
    double_dqn: bool = True
    ewc_lam: float = 10.0  # λ with the Fisher normalised to mean 1 over shared parameters
    ewc_mode: str = "separate"  # or "online"
    ewc_gamma: float = 1.0  # online-mode decay
    ewc_min_steps: int = 50_000  # a visit's context is consolidated only after this many transitions
    fisher_temperature: float = 1.0  # τ of the Boltzmann policy softmax(Q/τ)
    fisher_samples: int = 1_024  # replay states the Fisher is averaged over
    detect_every: int = 64  # block length (observations) for the task detector
    detector_temperature: float = 1.0  # divides block log-likelihoods (one sample per block)
    detector_hazard: float = 0.02  # prior probability of a task switch between two blocks
    detector_kappa0: float = 0.1  # prior precision of a task's mean features (see block_features)
    true_task_labels: bool = True  # context = game index; False: TaskDetector ids
    max_tasks: int = 10  # task-context slots of the network (and the detector's cap)
    conv_channels: int = 16
    hidden: int = 128
    sticky_action_prob: float = 0.1
    seed: int = 0
    device: str = "cpu"  # where the networks and updates run ("cuda": a GPU; replay stays in CPU memory)

    def __post_init__(self) -> None:
        def number(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                left, right = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {v!r}")

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        number("gamma", 0.0, 1.0)
        number("lr", 0.0, math.inf, lo_open=True, hi_open=True)
        number("adam_eps", 0.0, math.inf, lo_open=True, hi_open=True)
        for name in (
            "batch_size",
            "replay_capacity",
            "train_every",
            "target_update",
            "eps_decay_steps",
            "fisher_samples",
            "detect_every",
            "max_tasks",
            "conv_channels",
            "hidden",
        ):
            integer(name, 1)
        for name in ("learning_starts", "ewc_min_steps", "seed"):
            integer(name, 0)
        number("eps_start", 0.0, 1.0)
        number("eps_end", 0.0, 1.0)
        number("huber_delta", 0.0, math.inf, lo_open=True, hi_open=True)
        number("grad_clip", 0.0, math.inf, lo_open=True)
        number("ewc_lam", 0.0, math.inf, hi_open=True)
        number("ewc_gamma", 0.0, 1.0, lo_open=True)
        number("fisher_temperature", 0.0, math.inf, lo_open=True, hi_open=True)
        number("sticky_action_prob", 0.0, 1.0, hi_open=True)
        number("detector_temperature", 0.0, math.inf, lo_open=True, hi_open=True)
        number("detector_hazard", 0.0, 1.0, lo_open=True, hi_open=True)
        number("detector_kappa0", 0.0, math.inf, lo_open=True, hi_open=True)
        if self.ewc_mode not in ("separate", "online"):
            raise ValueError(f"ewc_mode must be 'separate' or 'online', got {self.ewc_mode!r}")
        for name in ("double_dqn", "true_task_labels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.true_task_labels and self.max_tasks < len(GAMES):
            raise ValueError(
                f"true_task_labels needs max_tasks >= {len(GAMES)} (one slot per game), got {self.max_tasks}"
            )
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.replay_capacity < self.batch_size:
            raise ValueError(
                f"replay_capacity ({self.replay_capacity}) must be >= batch_size ({self.batch_size})"
            )


# ---------------------------------------------------------------------------- pure functions


@torch.no_grad()
def td_targets(
    online: Callable[[Tensor, int], Tensor],
    target: Callable[[Tensor, int], Tensor],
    next_obs: Tensor,
    rewards: Tensor,
    dones: Tensor,
    task: int,
    gamma: float,
    double: bool = True,
) -> Tensor:
    """r + γ (1 − done) Q_target(s', a*; t) with a* = argmax Q_online(s'; t) (Double DQN) or the
    target's own argmax (``double=False``, i.e. max_a Q_target)."""
    q_target = target(next_obs, task)
    if double:
        best = online(next_obs, task).argmax(1, keepdim=True)
        q_next = q_target.gather(1, best).squeeze(1)
    else:
        q_next = q_target.max(1).values
    return rewards + gamma * (1.0 - dones) * q_next


class _Boltzmann(nn.Module):
    """Logits Q(x; task)/τ of the Q-network's Boltzmann policy, for the Fisher engine (x only)."""

    def __init__(self, net: QNetwork, task: int, temperature: float) -> None:
        super().__init__()
        self.net, self.task, self.temperature = net, task, temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.task) / self.temperature


def normalise_fisher(fisher: dict[str, Tensor]) -> dict[str, Tensor]:
    """F / mean(F), the mean taken over every element of every tensor (ValueError if it is 0)."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    if not (count and math.isfinite(total) and total > 0):
        raise ValueError(f"cannot normalise a Fisher with mean {total / max(count, 1)!r}")
    mean = total / count
    return {n: f / mean for n, f in fisher.items()}


def policy_fisher(
    net: QNetwork, states: Tensor, task: int, temperature: float = 1.0, *, normalise: bool = True
) -> dict[str, Tensor]:
    """Diagonal Fisher of π(a|s) = softmax(Q(s; task)/τ) over the SHARED parameters of ``net``.

    Exact categorical Fisher (:func:`ewc.fisher.diagonal_fisher`, expectation over a ~ π) averaged
    over ``states``, with context ``task``'s gains/biases active (they get no Fisher: they are
    not anchored). ``normalise``: divided by its mean over the shared parameters.
    """
    task_params = [p for n, p in net.named_parameters() if n.startswith(TASK_PREFIX)]
    flags = [p.requires_grad for p in task_params]
    try:
        for p in task_params:
            p.requires_grad_(False)  # no Fisher for them: saves the engine's fallback path
        model = _Boltzmann(net, task, temperature)
        states = states.to(next(net.parameters()).device)
        raw = diagonal_fisher(model, states, mode="exact", likelihood="categorical")
    finally:
        for p, f in zip(task_params, flags, strict=True):
            p.requires_grad_(f)
    fisher = {n: raw[f"net.{n}"] for n in net.shared_parameter_names()}
    return normalise_fisher(fisher) if normalise else fisher


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


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (independent streams for episodes, evaluations, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# -------------------------------------------------------------------------------- the agent


class Agent:
    """DQN + EWC + per-task gains/biases and replay over MinAtar games (see the module doc).

    Typical use: ``begin_visit(game)``, ``step()`` repeatedly, ``end_visit()``; ``evaluate`` at any
    time between steps (it does not touch the training RNG or the game in progress).
    """

    def __init__(self, config: DQNConfig) -> None:
        if not isinstance(config, DQNConfig):
            raise ValueError(f"config must be a DQNConfig, got {type(config).__name__}")
        c = self.config = config
        self.obs_shape = (max_channels(), OBS_SIZE, OBS_SIZE)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.qnet = QNetwork(self.obs_shape[0], NUM_ACTIONS, c.max_tasks, c.conv_channels, c.hidden)
        self.device = torch.device(c.device)
        self.qnet.to(self.device)
        self.target = copy.deepcopy(self.qnet).requires_grad_(False)
        # fused: one kernel over all tensors, ~3x faster than the default loop for this small net
        self.optimizer = torch.optim.Adam(self.qnet.parameters(), lr=c.lr, eps=c.adam_eps, fused=True)
        self._params = list(self.qnet.parameters())
        self.ewc = EWC(self.qnet, lam=c.ewc_lam, mode=c.ewc_mode, gamma=c.ewc_gamma)
        self.detector = (
            None
            if c.true_task_labels
            else TaskDetector(
                max_tasks=c.max_tasks,
                seed=c.seed,
                temperature=c.detector_temperature,
                hazard=c.detector_hazard,
                kappa0=c.detector_kappa0,
                proj_dim=None,
            )
        )
        self.replay = TaskReplay(c.replay_capacity, self.obs_shape)
        self.gen = torch.Generator().manual_seed(c.seed)
        self.set_aside: dict[int, Term] = {}  # separate mode: terms of contexts active in this visit
        self.consolidations: list[int] = []  # contexts consolidated, in order
        self.env_steps = self.updates = self.episodes = self.visits = 0
        self.last_loss = math.nan
        # the visit in progress
        self.game: Game | None = None
        self.game_name: str | None = None
        self.visit_steps = 0
        self.context = -1  # -1: not known yet (inferred labels, first block of a visit)
        self.context_steps: dict[int, int] = {}  # transitions stored per context in this visit
        self.obs: Tensor | None = None  # None: the next step starts an episode
        self.episode_return = 0.0
        self.pending: list[tuple[Tensor, int, float, Tensor, bool]] = []  # block awaiting its task id

    # -- acting -------------------------------------------------------------------------------

    def epsilon(self) -> float:
        """ε of the current visit's linear schedule."""
        c = self.config
        frac = min(1.0, self.visit_steps / c.eps_decay_steps)
        return c.eps_start + frac * (c.eps_end - c.eps_start)

    @torch.no_grad()
    def act(
        self,
        obs: Tensor,
        epsilon: float,
        context: int | None = None,
        generator: torch.Generator | None = None,
    ) -> int:
        """ε-greedy action for one observation ``[C, 10, 10]`` in ``context`` (default: current)."""
        gen = self.gen if generator is None else generator
        if float(torch.rand((), generator=gen)) < epsilon:
            return int(torch.randint(NUM_ACTIONS, (), generator=gen))
        ctx = self._acting_context() if context is None else context
        return int(self.qnet(obs.unsqueeze(0).to(self.device), ctx).argmax(1))

    def _acting_context(self) -> int:
        """The current context; before the first block of a visit is labelled (inferred labels),
        the known task that best explains the visit's observations so far (0 if none is known)."""
        if self.context >= 0:
            return self.context
        seen = [t[0] for t in self.pending] + ([self.obs] if self.obs is not None else [])
        return self._scored_context(seen)

    # -- visits -------------------------------------------------------------------------------

    def begin_visit(self, game: str) -> None:
        """Start playing ``game``: new episode on the next step, ε schedule restarted."""
        check_game(game)
        if self.game is not None:
            raise RuntimeError(f"a visit of {self.game_name!r} is in progress: call end_visit() first")
        self.game_name = game
        self.game = Game(game, seed=0, sticky_action_prob=self.config.sticky_action_prob)
        self.visit_steps, self.context_steps, self.obs, self.pending = 0, {}, None, []
        self.context = -1
        if self.config.true_task_labels:
            self._activate(GAMES.index(game))

    def end_visit(self) -> dict[str, Any]:
        """End the visit: label the last partial block, consolidate each context that got at least
        ``ewc_min_steps`` transitions, put back the set-aside terms of the others."""
        if self.game is None:
            raise RuntimeError("no visit in progress")
        self._flush()
        consolidated, restored, skipped = [], [], []
        for ctx, n in sorted(self.context_steps.items()):
            if n >= self.config.ewc_min_steps and self.replay.size(ctx) > 0:
                if self._consolidate(ctx):
                    consolidated.append(ctx)
                    self.set_aside.pop(ctx, None)
                    continue
                skipped.append(ctx)
            if ctx in self.set_aside:
                self.ewc.restore(ctx, self.set_aside.pop(ctx))
                restored.append(ctx)
        self.set_aside = {}
        summary = {
            "game": self.game_name,
            "steps": self.visit_steps,
            "contexts": {str(k): v for k, v in sorted(self.context_steps.items())},
            "consolidated": consolidated,
            "restored": restored,
            "skipped": skipped,
        }
        self.game = self.game_name = self.obs = None
        self.context, self.context_steps, self.visits = -1, {}, self.visits + 1
        return summary

    def _activate(self, ctx: int) -> None:
        """Make ``ctx`` the current context; set its own EWC term aside for the rest of the visit."""
        self.context = ctx
        self.context_steps.setdefault(ctx, 0)
        if ctx in self.owners:
            self.set_aside[ctx] = self.ewc.pop(ctx)

    @property
    def owners(self) -> list[int]:
        """``separate`` mode: the context owning each EWC term (its key), oldest first; else []."""
        return [int(k) for k in self.ewc.keys] if self.config.ewc_mode == "separate" else []

    def _consolidate(self, ctx: int) -> bool:
        """Anchor the shared parameters with context ``ctx``'s normalised policy Fisher."""
        states = self.replay.buffer(ctx).observations(self.config.fisher_samples, self.gen)
        try:
            fisher = policy_fisher(self.qnet, states, ctx, self.config.fisher_temperature)
        except ValueError as exc:
            warnings.warn(f"context {ctx} not consolidated: {exc}", RuntimeWarning, stacklevel=3)
            return False
        self.ewc.consolidate(fisher_diag=fisher, key=ctx)  # online: the merged term takes the key
        self.consolidations.append(ctx)
        return True

    # -- interaction and learning -------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One env step (starting an episode if needed) and, when due, one update and target copy.

        Returns ``{"reward", "done", "context", "epsilon"}`` and ``"episode_return"`` when an
        episode ends.
        """
        if self.game is None:
            raise RuntimeError("no visit in progress: call begin_visit(game) first")
        c = self.config
        if self.obs is None:
            self.obs = self.game.reset(seed=_seed(c.seed, 1, self.episodes))
            self.episodes += 1
            self.episode_return = 0.0
        eps = self.epsilon()
        action = self.act(self.obs, eps)
        next_obs, reward, done = self.game.step(action)
        self._store(self.obs, action, reward, next_obs, done)
        self.env_steps += 1
        self.visit_steps += 1
        self.episode_return += reward
        info: dict[str, Any] = {"reward": reward, "done": done, "context": self.context, "epsilon": eps}
        if done:
            info["episode_return"] = self.episode_return
        self.obs = None if done else next_obs
        ctx = self.context
        if (
            ctx >= 0
            and self.env_steps % c.train_every == 0
            and self.replay.size(ctx) >= max(c.learning_starts, c.batch_size)
        ):
            self._update(ctx)
        if self.env_steps % c.target_update == 0:
            self.target.load_state_dict(self.qnet.state_dict())
        return info

    def _store(self, obs: Tensor, action: int, reward: float, next_obs: Tensor, done: bool) -> None:
        """True labels: into the context's replay now. Inferred: once the block has its task id."""
        if self.detector is None:
            self.replay.add(self.context, obs, action, reward, next_obs, done)
            self.context_steps[self.context] += 1
            return
        self.pending.append((obs, action, reward, next_obs, done))
        if len(self.pending) >= self.config.detect_every:
            self._flush()

    def _flush(self) -> None:
        """Label the pending block with the detector, store it in that context's replay, switch."""
        if self.detector is None or not self.pending:
            return
        block = block_features(torch.stack([t[0] for t in self.pending]))
        retracted = self.detector.retracted
        ctx = self.detector.update(block)
        if self.detector.retracted != retracted:  # the tentative id we were in did not exist
            gone = int(self.detector.history[-1]["retracted"])
            self.replay.clear(gone)
            self.qnet.reset_task(gone)
            self.target.reset_task(gone)
            self.context_steps.pop(gone, None)
            if gone in self.owners:
                self.ewc.drop(gone)
            self.set_aside.pop(gone, None)
        self._activate(ctx)
        for t in self.pending:
            self.replay.add(ctx, *t)
        self.context_steps[ctx] += len(self.pending)
        self.pending = []

    def _update(self, ctx: int) -> None:
        """One Adam step of the Double-DQN Huber loss (+ EWC penalty) on a batch of ``ctx``'s replay."""
        c = self.config
        batch = self.replay.buffer(ctx).sample(c.batch_size, self.gen)
        obs, actions, rewards, next_obs, dones = (t.to(self.device, non_blocking=True) for t in batch)
        y = td_targets(self.qnet, self.target, next_obs, rewards, dones, ctx, c.gamma, c.double_dqn)
        q = self.qnet(obs, ctx).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.huber_loss(q, y, delta=c.huber_delta)
        total = loss + self.ewc.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if math.isfinite(c.grad_clip):
            params = [p for p in self._params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.updates += 1
        self.last_loss = float(loss.detach())

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self,
        game: str,
        episodes: int = 10,
        epsilon: float = 0.05,
        seed: int = 0,
        max_steps: int = 27_000,
        window: int = 1_024,
    ) -> dict[str, Any]:
        """Play ``episodes`` of ``game`` without learning; ``{"mean_return", "returns", "contexts"}``.

        Context: the game's index (true labels) or, with inferred labels, the argmax over known
        tasks of the detector's ``score`` of the episode's last ``window`` observations, re-chosen
        every ``detect_every`` steps (no detector update). ``contexts`` counts steps per context.
        Uses its own RNG and game, so training is unaffected.
        """
        check_game(game)
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes!r}")
        env = Game(game, seed=seed, sticky_action_prob=self.config.sticky_action_prob)
        gen = torch.Generator().manual_seed(_seed(seed, 2))
        returns: list[float] = []
        counts: dict[int, int] = {}
        for ep in range(episodes):
            obs = env.reset(seed=_seed(seed, 3, ep))
            seen: list[Tensor] = []
            total, ctx = 0.0, 0
            for t in range(max_steps):
                if self.detector is None:
                    ctx = GAMES.index(game)
                elif t % self.config.detect_every == 0:
                    seen = (seen + [obs])[-window:]
                    ctx = self._scored_context(seen)
                else:
                    seen = (seen + [obs])[-window:]
                counts[ctx] = counts.get(ctx, 0) + 1
                obs, reward, done = env.step(self.act(obs, epsilon, ctx, gen))
                total += reward
                if done:
                    break
            returns.append(total)
        return {
            "mean_return": float(np.mean(returns)),
            "returns": returns,
            "contexts": {str(k): v for k, v in sorted(counts.items())},
        }

    def _scored_context(self, seen: list[Tensor]) -> int:
        """The known task that best explains observations ``seen`` (0 before any task exists)."""
        assert self.detector is not None
        return max(self.detector.predict(block_features(torch.stack(seen))), 0)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training, as tensors and plain values (weights_only)."""
        visit = None
        if self.game is not None:
            pending = None
            if self.pending:
                pending = {
                    "obs": torch.stack([t[0] for t in self.pending]),
                    "actions": torch.tensor([t[1] for t in self.pending]),
                    "rewards": torch.tensor([t[2] for t in self.pending], dtype=torch.float32),
                    "next_obs": torch.stack([t[3] for t in self.pending]),
                    "dones": torch.tensor([t[4] for t in self.pending]),
                }
            visit = {
                "game": self.game_name,
                "visit_steps": self.visit_steps,
                "context": self.context,
                "context_steps": {str(k): v for k, v in self.context_steps.items()},
                "pending": pending,
            }
        return {
            "format": FORMAT,
            "config": asdict(self.config),
            "qnet": {k: v.clone() for k, v in self.qnet.state_dict().items()},
            "target": {k: v.clone() for k, v in self.target.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "ewc": self.ewc.state_dict(),
            "set_aside": {str(k): v for k, v in self.set_aside.items()},
            "consolidations": list(self.consolidations),
            "detector": None if self.detector is None else self.detector.state_dict(),
            "replay": self.replay.state_dict(),
            "rng": self.gen.get_state(),
            "counters": {
                "env_steps": self.env_steps,
                "updates": self.updates,
                "episodes": self.episodes,
                "visits": self.visits,
            },
            "visit": visit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same config); a visit in progress resumes with a new episode."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not an agent state (expected format {FORMAT!r})")
        if state["config"] != asdict(self.config):
            raise ValueError("the state was saved with another DQNConfig")
        self.qnet.load_state_dict(state["qnet"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ewc.load_state_dict(state["ewc"])
        if "owners" in state and self.config.ewc_mode == "separate":
            self._key_terms_by_owner([int(t) for t in state["owners"]])
        self.set_aside = {int(k): v for k, v in state["set_aside"].items()}
        self.consolidations = [int(t) for t in state["consolidations"]]
        if self.detector is not None:
            self.detector.load_state_dict(state["detector"])
        self.replay.load_state_dict(state["replay"])
        self.gen.set_state(state["rng"])
        counters = state["counters"]
        self.env_steps, self.updates = int(counters["env_steps"]), int(counters["updates"])
        self.episodes, self.visits = int(counters["episodes"]), int(counters["visits"])
        self.game = self.game_name = self.obs = None
        self.context, self.context_steps, self.pending = -1, {}, []
        visit = state["visit"]
        if visit is not None:
            self.game_name = str(visit["game"])
            self.game = Game(self.game_name, seed=0, sticky_action_prob=self.config.sticky_action_prob)
            self.visit_steps = int(visit["visit_steps"])
            self.context = int(visit["context"])
            self.context_steps = {int(k): int(v) for k, v in visit["context_steps"].items()}
            p = visit["pending"]
            if p is not None:
                self.pending = [
                    (
                        p["obs"][i],
                        int(p["actions"][i]),
                        float(p["rewards"][i]),
                        p["next_obs"][i],
                        bool(p["dones"][i]),
                    )
                    for i in range(p["obs"].shape[0])
                ]

    def _key_terms_by_owner(self, owners: list[int]) -> None:
        """Checkpoints saved before penalty terms had keys kept the owners beside terms keyed
        0, 1, ...: key each term by its context (pop all, restore in order: bit-identical)."""
        if len(owners) != len(self.ewc.keys):
            raise ValueError(f"state has {len(self.ewc.keys)} EWC terms but {len(owners)} owners")
        terms = [self.ewc.pop(k) for k in self.ewc.keys]
        for ctx, term in zip(owners, terms, strict=True):
            self.ewc.restore(ctx, term)

    def save(self, path: PathLike) -> None:
        """:meth:`state_dict` to ``path``, atomically (a crash mid-save keeps the old file)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: PathLike) -> Agent:
        """An agent rebuilt from :meth:`save` output (weights_only: no code is run)."""
        state = safe_load(path)
        known = {f.name for f in fields(DQNConfig)}
        agent = cls(DQNConfig(**{k: v for k, v in state["config"].items() if k in known}))
        agent.load_state_dict(state)
        return agent


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
            "env_steps": 0,
            "updates": 0,
        }
        if checkpoint is not None and os.path.exists(checkpoint):
            saved = safe_load(checkpoint)
            if saved["record"]["schedule"] != list(schedule) or saved["record"]["config"] != asdict(config):
                raise ValueError(f"checkpoint {os.fspath(checkpoint)!r} is for another config or schedule")
            agent.load_state_dict(saved["agent"])
            record = saved["record"]
            say(f"resumed at visit {agent.visits}, env step {agent.env_steps}")

        def save() -> None:
            if checkpoint is not None:
                atomic_save({"agent": agent.state_dict(), "record": record}, checkpoint)

        def evaluate(visit: int) -> None:
            scores = {
                g: agent.evaluate(g, eval_episodes, eval_epsilon, seed=_seed(config.seed, 4)) for g in games
            }
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
