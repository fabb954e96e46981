"""The continual DQN agent for a sequence of MinAtar games in one network (EWC paper, RL section).

One :class:`~ewc.rl.qnet.QNetwork` plays every game. Each task context ``t`` has its own gains
and biases, its own replay buffer and (with the default method, after a long enough visit) its
own EWC term on the shared parameters. The context is the game's index in :data:`~ewc.rl.env.GAMES` with
``true_task_labels``, otherwise the id a :class:`~ewc.taskid.TaskDetector` gives each block of
``detect_every`` consecutive observations (the paper inferred it with a Forget-Me-Not process).

Learning (per env step, :meth:`Agent.step`): ε-greedy action in the current context (ε decays
linearly from ``eps_start`` to ``eps_end`` over ``eps_decay_steps`` steps, restarting at every
visit of a game) -> transition stored in the context's replay -> every ``train_every`` steps, once
the context's buffer holds ``learning_starts`` transitions, one Adam step on

    method.loss(Huber(Q(s, a; t) - [r + γ (1 - done) Q_target(s', argmax_a' Q(s', a'; t); t)]), batch)

on a batch from that buffer (Double DQN; plain max with ``double_dqn=False``), backward,
``method.after_backward()``, gradient norm clipped, Adam step, ``method.after_step()``; the target
network is copied every ``target_update`` env steps.

The method (:attr:`Agent.method`, an :class:`ewc.methods.Method` built by
:func:`ewc.rl.method.build_method`; see docs/rl.md): when a context first becomes active in a
visit, ``forget_task(t)`` then ``before_task(t, visit)``; at :meth:`Agent.end_visit`,
``after_task(t, visit)`` for every context of the visit (``visit``: a
:class:`~ewc.rl.consolidation.ContextVisit` with its step count and replay states); a context
the detector retracts gets ``forget_task(t)``; a context left mid-visit gets ``leave_task(t, visit)``
(and ``forget_task(t)`` again if it comes back after the method put something back). The default,
:class:`~ewc.rl.consolidation.PolicyEWC`, consolidates a context that received at least
``ewc_min_steps`` transitions with the normalised Fisher of its Boltzmann policy on its replay
states, on the shared parameters only, and sets a returning context's own term aside while it is
trained (put back unchanged after a short visit, or as soon as the agent leaves it too early).

Checkpoints (:meth:`Agent.save` / :meth:`Agent.load`) hold networks, optimiser, the method's state,
detector, replay buffers, counters and the RNG state. The game's internal state is not saved: a
resumed run starts a fresh episode (seeded by the episode counter), so a run saved at an episode
boundary continues exactly as it would have without the interruption.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ewc.methods import Batch
from ewc.rl.config import DQNConfig, derive_seed, saved_config
from ewc.rl.consolidation import ContextVisit
from ewc.rl.env import GAMES, NUM_ACTIONS, OBS_SIZE, Game, block_features, check_game, max_channels
from ewc.rl.evaluation import play_episodes
from ewc.rl.method import build_method
from ewc.rl.qnet import QNetwork, SharedView
from ewc.rl.replay import TaskReplay
from ewc.state import PathLike, atomic_save, check_model_state, safe_load
from ewc.taskid import TaskDetector

__all__ = ["FORMAT", "Agent", "td_targets"]

FORMAT = "ewc.rl.agent/2"
LEGACY_FORMAT = "ewc.rl.agent/1"  # the EWC penalty's state and set-aside terms instead of the method's


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


# -------------------------------------------------------------------------------- the agent


class Agent:
    """DQN + a continual-learning method + per-task gains/biases and replay over MinAtar games.

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
        self.view = SharedView(self.qnet)  # what the method sees: the shared parameters
        self.method = build_method(c, self.view)
        self.detector = (
            None
            if c.true_task_labels
            else TaskDetector(
                max_tasks=c.max_tasks,
                seed=c.seed,
                temperature=c.detector_temperature,
                hazard=c.detector_hazard,
                kappa0=c.detector_kappa0,
                var_floor=c.detector_var_floor,
                proj_dim=None,
            )
        )
        self.replay = TaskReplay(c.replay_capacity, self.obs_shape)
        self.gen = torch.Generator().manual_seed(c.seed)
        self.consolidations: list[int] = []  # contexts consolidated, in order
        self.env_steps = self.updates = self.episodes = self.visits = 0
        self.last_loss = math.nan
        # the visit in progress
        self.game: Game | None = None
        self.game_name: str | None = None
        self.visit_steps = 0
        self.context = -1  # -1: not known yet (inferred labels, first block of a visit)
        self.context_steps: dict[int, int] = {}  # transitions stored per context in this visit
        self.left: set[int] = set()  # contexts left in this visit whose term the method put back
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
        self.context, self.left = -1, set()
        if self.config.true_task_labels:
            self._activate(GAMES.index(game))

    def end_visit(self) -> dict[str, Any]:
        """End the visit: label the last partial block, then ``method.after_task`` for each of the
        visit's contexts (PolicyEWC: consolidated after ``ewc_min_steps`` transitions, else its
        set-aside term put back); the summary lists what the method did with each."""
        if self.game is None:
            raise RuntimeError("no visit in progress")
        self._flush()
        done: dict[str, list[int]] = {"consolidated": [], "restored": [], "skipped": []}
        for ctx in sorted(self.context_steps):
            visit = self._visit(ctx)
            self.view.task = ctx
            self.method.after_task(ctx, visit)
            outcome = ["consolidated"] if visit.outcome is None else visit.outcome
            for what in outcome or (["restored"] if ctx in self.left else []):  # put back on leaving
                done[what].append(ctx)
        self.consolidations.extend(done["consolidated"])
        summary = {
            "game": self.game_name,
            "steps": self.visit_steps,
            "contexts": {str(k): v for k, v in sorted(self.context_steps.items())},
            **done,
        }
        self.game = self.game_name = self.obs = None
        self.context, self.context_steps, self.visits = -1, {}, self.visits + 1
        self.left = set()
        return summary

    def _activate(self, ctx: int) -> None:
        """Make ``ctx`` the current context; the first time in a visit, ``method.forget_task`` (a
        returning context's own share leaves the penalty: PolicyEWC sets it aside) and ``before_task``.
        Switching away from a context mid-visit (inferred labels) is ``method.leave_task`` (PolicyEWC
        puts a short-lived context's term back); coming back to it then is ``forget_task`` again."""
        prev = self.context
        if prev not in (-1, ctx) and prev in self.context_steps:
            if self.method.leave_task(prev, self._visit(prev)):
                self.left.add(prev)
        self.context = ctx
        if ctx not in self.context_steps:
            self.context_steps[ctx] = 0
            self.view.task = ctx
            self.method.forget_task(ctx)
            self.method.before_task(ctx, self._visit(ctx))
        elif ctx in self.left:
            self.left.discard(ctx)
            self.method.forget_task(ctx)

    def _visit(self, ctx: int) -> ContextVisit:
        """Context ``ctx`` in this visit, as a method sees it (states drawn only if it asks)."""
        n = self.config.fisher_samples
        return ContextVisit(
            ctx,
            self.context_steps[ctx],
            self.replay.size(ctx),
            lambda: self.replay.buffer(ctx).observations(n, self.gen),
        )

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
            self.obs = self.game.reset(seed=derive_seed(c.seed, 1, self.episodes))
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
            self.left.discard(gone)
            self.method.forget_task(gone)  # PolicyEWC: its term (kept or set aside) is gone
        self._activate(ctx)
        for t in self.pending:
            self.replay.add(ctx, *t)
        self.context_steps[ctx] += len(self.pending)
        self.pending = []

    def _update(self, ctx: int) -> None:
        """One Adam step of the method's loss on the Double-DQN Huber loss of a batch of ``ctx``'s
        replay (the method sees ``Batch(obs, actions, Q(obs; ctx), ctx)``)."""
        c = self.config
        batch = self.replay.buffer(ctx).sample(c.batch_size, self.gen)
        obs, actions, rewards, next_obs, dones = (t.to(self.device, non_blocking=True) for t in batch)
        y = td_targets(self.qnet, self.target, next_obs, rewards, dones, ctx, c.gamma, c.double_dqn)
        out = self.qnet(obs, ctx)
        q = out.gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.huber_loss(q, y, delta=c.huber_delta)
        total = self.method.loss(loss, Batch(obs, actions, out, ctx))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.method.after_backward()
        if math.isfinite(c.grad_clip):
            params = [p for p in self._params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.method.after_step()
        self.updates += 1
        self.last_loss = float(loss.detach())

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self,
        game: str,
        episodes: int = 10,
        epsilon: float = 0.05,
        seed: int = 0,
        max_steps: int = 27_000,
        window: int = 1_024,
    ) -> dict[str, Any]:
        """Play ``episodes`` of ``game`` without learning, all at once with batched forward passes
        (:func:`ewc.rl.evaluation.play_episodes`); ``{"mean_return", "returns", "contexts"}``.

        Context: the game's index (true labels) or, with inferred labels, the argmax over known
        tasks of the detector's ``score`` of the episode's last ``window`` observations, re-chosen
        every ``detect_every`` steps (no detector update). ``contexts`` counts steps per context.
        Uses its own RNG and games, so training is unaffected.
        """
        return play_episodes(self, game, episodes, epsilon, seed, max_steps, window)

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
                "left": sorted(self.left),
                "pending": pending,
            }
        return {
            "format": FORMAT,
            "config": asdict(self.config),
            "qnet": {k: v.clone() for k, v in self.qnet.state_dict().items()},
            "target": {k: v.clone() for k, v in self.target.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "method": self.method.state_dict(),
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
        """Restore :meth:`state_dict` (same config); a visit in progress resumes with a new episode.

        Also reads states of the earlier format (``ewc.rl.agent/1``: the EWC penalty's state and the
        set-aside terms, and in the oldest ones the terms' ``owners``), as PolicyEWC's state. A
        trial load into copies of the networks, optimiser, method, detector and replay comes
        first: a state that does not fit (or holds NaN / inf weights) is a ValueError and the agent
        is exactly as it was."""
        trial = copy.copy(self)
        parts = ("qnet", "target", "optimizer", "_params", "view", "method", "detector", "replay")
        for name, part in zip(parts, copy.deepcopy([getattr(self, n) for n in parts]), strict=True):
            setattr(trial, name, part)
        trial.gen = torch.Generator()
        try:
            trial._load(state)
        except (KeyError, TypeError, IndexError, RuntimeError, AttributeError) as err:
            raise ValueError(f"the agent state does not fit this agent: {err!r}") from None
        self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") not in (FORMAT, LEGACY_FORMAT):
            raise ValueError(f"not an agent state (expected format {FORMAT!r})")
        if saved_config(state["config"]) != asdict(self.config):
            raise ValueError("the state was saved with another DQNConfig")
        method_state = state.get("method")
        if state["format"] == LEGACY_FORMAT:
            owners = {"owners": state["owners"]} if "owners" in state else {}
            method_state = {"penalty": state["ewc"], "set_aside": state["set_aside"], **owners}
        for net in ("qnet", "target"):
            check_model_state(getattr(self, net), state[net], f"agent state {net!r}")
            getattr(self, net).load_state_dict(state[net])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(method_state)
        self.consolidations = [int(t) for t in state["consolidations"]]
        if self.detector is not None:
            self.detector.load_state_dict(state["detector"])
        self.replay.load_state_dict(state["replay"])
        self.gen.set_state(state["rng"])
        counters = state["counters"]
        self.env_steps, self.updates = int(counters["env_steps"]), int(counters["updates"])
        self.episodes, self.visits = int(counters["episodes"]), int(counters["visits"])
        self.game = self.game_name = self.obs = None
        self.context, self.context_steps, self.pending, self.left = -1, {}, [], set()
        visit = state["visit"]
        if visit is not None:
            self.game_name = str(visit["game"])
            self.game = Game(self.game_name, seed=0, sticky_action_prob=self.config.sticky_action_prob)
            self.visit_steps = int(visit["visit_steps"])
            self.context = int(visit["context"])
            self.context_steps = {int(k): int(v) for k, v in visit["context_steps"].items()}
            self.left = {int(k) for k in visit.get("left", [])}  # absent before leave_task
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
