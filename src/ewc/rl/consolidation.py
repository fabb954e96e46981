"""What the agent consolidates: the diagonal Fisher of its Boltzmann policy on the shared parameters.

One context's precision is the Fisher of π(a|s) = softmax(Q(s; t)/τ) with context ``t``'s gains
and biases active, divided by its mean over the shared parameters (see docs/rl.md); the agent
hands it to :meth:`ewc.penalty.EWC.consolidate` as ``fisher_diag``, keyed by the context.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ewc.fisher import diagonal_fisher
from ewc.rl.qnet import TASK_PREFIX, QNetwork

__all__ = ["normalise_fisher", "policy_fisher"]


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
