"""What the agent consolidates: the paper's policy EWC (:class:`PolicyEWC`) and its Fisher.

One context's precision is the diagonal Fisher of π(a|s) = softmax(Q(s; t)/τ) with context ``t``'s
gains and biases active, on the shared parameters, divided by its mean over them (see docs/rl.md).
:class:`PolicyEWC` is the :class:`ewc.methods.Method` the agent runs by default: an
:class:`ewc.penalty.EWC` on the shared parameters whose terms are keyed by context and which a
context's visit (:class:`ContextVisit`) consolidates, sets aside or puts back.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import Tensor, nn

from ewc.fisher import diagonal_fisher
from ewc.methods import Batch, Method
from ewc.methods.base import check_state_keys
from ewc.penalty import EWC, Term
from ewc.quadratic import check_term
from ewc.rl.qnet import TASK_PREFIX, QNetwork, SharedView
from ewc.scenario import Scenario

__all__ = ["ContextVisit", "PolicyEWC", "normalise_fisher", "policy_fisher"]


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


@dataclass
class ContextVisit:
    """What the agent hands a method for one context of a visit (``before_task`` / ``after_task``).

    ``index``: the context; ``steps``: transitions it received in this visit; ``size``: transitions
    in its replay buffer; ``x_train``: ``fisher_samples`` states of that buffer, drawn on first use
    (a method that does not look at them costs no draw from the agent's RNG). ``outcome``: what the
    method did at ``after_task`` if it says so (a list of ``consolidated`` / ``skipped`` /
    ``restored``, possibly empty); None (a method that does not say): consolidated.
    """

    index: int
    steps: int
    size: int
    draw: Callable[[], Tensor] = field(repr=False)
    outcome: list[str] | None = None

    @cached_property
    def x_train(self) -> Tensor:
        return self.draw()


class PolicyEWC(Method):
    """The EWC paper's RL consolidation: EWC on the shared parameters with the normalised policy Fisher.

    ``after_task(ctx, visit)``: if the context received at least ``min_steps`` transitions in the
    visit, anchor the shared parameters with :func:`policy_fisher` on ``visit.x_train`` (its
    replay states), term keyed ``ctx`` (``online``: merged). ``forget_task(ctx)`` (a returning
    context becomes active, ``separate`` mode): its own term leaves the penalty and is kept aside
    until its ``after_task``, which replaces it by the fresh consolidation or, after a visit too
    short for one, puts it back unchanged. A second ``forget_task(ctx)`` before that (the detector
    retracted the context) discards the kept term. ``leave_task(ctx, visit)`` (the agent's context
    switched away from ``ctx`` mid-visit): a context left after fewer than ``min_steps``
    transitions cannot be consolidated by this visit, so its set-aside term goes back into the
    penalty at once rather than at the visit's end (a detector that labels a new game's first
    block as the game before would otherwise leave that game unprotected for the whole visit);
    it is set aside again if the context comes back. ``online``: a returning context stays merged.
    Gains and biases are never anchored: the Fisher names only the shared parameters.
    """

    name = "ewc"

    def __init__(
        self,
        lam: float,
        mode: str = "separate",
        gamma: float = 1.0,
        min_steps: int = 0,
        temperature: float = 1.0,
    ) -> None:
        self.lam, self.mode, self.gamma = lam, mode, gamma
        self.min_steps, self.temperature = min_steps, temperature
        self.set_aside: dict[int, Term] = {}  # separate: terms of returning contexts, until after_task

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        """Bind to a :class:`QNetwork` (or its :class:`SharedView`)."""
        super().setup(model, scenario)
        net = model.net if isinstance(model, SharedView) else model
        if not isinstance(net, QNetwork):
            raise ValueError(f"PolicyEWC needs a QNetwork or its SharedView, got {type(model).__name__}")
        self.net = net
        self.reg = EWC(net, lam=self.lam, mode=self.mode, gamma=self.gamma)

    @property
    def owners(self) -> list[int]:
        """``separate`` mode: the context owning each term in the penalty (its key), oldest first; else []."""
        return [int(k) for k in self.reg.keys] if self.mode == "separate" else []

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        return task_loss + self.reg.penalty()

    def forget_task(self, index: int) -> None:
        if self.mode != "separate":
            return
        if self.set_aside.pop(index, None) is None and index in self.reg.keys:
            self.set_aside[index] = self.reg.pop(index)

    def leave_task(self, index: int, task: Any) -> bool:
        """Put ``index``'s set-aside term back when the visit left it too short to consolidate."""
        if task.steps < self.min_steps and index in self.set_aside:
            self.reg.restore(index, self.set_aside.pop(index))
            return True
        return False

    def after_task(self, index: int, task: Any) -> None:
        """Consolidate ``index`` after a long enough visit (``task``: a :class:`ContextVisit`),
        else put its set-aside term back; ``task.outcome`` says which."""
        task.outcome = outcome = []
        if task.steps >= self.min_steps and task.size > 0:
            try:
                fisher = policy_fisher(self.net, task.x_train, index, self.temperature)
            except ValueError as exc:
                warnings.warn(f"context {index} not consolidated: {exc}", RuntimeWarning, stacklevel=2)
                outcome.append("skipped")
            else:
                self.reg.consolidate(fisher_diag=fisher, key=index)  # online: the merged term takes the key
                self.set_aside.pop(index, None)
                outcome.append("consolidated")
                return
        if index in self.set_aside:
            self.reg.restore(index, self.set_aside.pop(index))
            outcome.append("restored")

    def memory_bytes(self) -> int:
        """Bytes of the penalty's terms and of the set-aside ones."""
        kept = sum(
            t.numel() * t.element_size()
            for term in self.set_aside.values()
            for d in term.values()
            for t in d.values()
        )
        return self.reg.memory_bytes() + kept

    def state_dict(self) -> dict[str, Any]:
        """The penalty and the set-aside terms (the tensors are the stored ones, not copies)."""
        return {"penalty": self.reg.state_dict(), "set_aside": {str(k): v for k, v in self.set_aside.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A state with ``owners`` (saved before penalty terms had keys:
        terms keyed 0, 1, ... and their contexts listed beside them) has each term keyed by its
        context (pop all, restore in order: bit-identical)."""
        keys = {"penalty", "set_aside"} | (
            {"owners"} if isinstance(state, Mapping) and "owners" in state else set()
        )
        check_state_keys(state, keys, "PolicyEWC")
        aside, penalty = state["set_aside"], state["penalty"]  # all checked before the penalty loads
        if not isinstance(aside, Mapping) or not all(str(k).lstrip("-").isdigit() for k in aside):
            raise ValueError("PolicyEWC state 'set_aside' must map task contexts to terms")
        set_aside = {int(k): check_term(v, f"PolicyEWC state 'set_aside'[{k!r}]") for k, v in aside.items()}
        owners = None
        if "owners" in state and self.mode == "separate":
            owners = [int(t) for t in state["owners"]]
            terms = penalty.get("tasks") if isinstance(penalty, Mapping) else None
            if not isinstance(terms, list) or len(owners) != len(terms):
                raise ValueError(f"state's EWC terms and its {len(owners)} owners do not match")
        self.reg.load_state_dict(penalty)
        if owners is not None:
            terms = [self.reg.pop(k) for k in self.reg.keys]
            for ctx, term in zip(owners, terms, strict=True):
                self.reg.restore(ctx, term)
        self.set_aside = set_aside
