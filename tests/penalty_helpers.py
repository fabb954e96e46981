"""Small models and hand-made (anchor, Fisher) terms shared by the penalty tests (no ewc imports)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def snapshot(model: nn.Module) -> Params:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def set_params(model: nn.Module, values: Params) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])


def random_tasks(model: nn.Module, n: int, seed: int = 0) -> list[tuple[Params, Params]]:
    """n (anchor, Fisher) pairs near the model's parameters, for every parameter."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        anchor = {k: p + 0.3 * torch.randn(p.shape, generator=gen) for k, p in snapshot(model).items()}
        fisher = {k: torch.rand(p.shape, generator=gen) * 2.0 + 0.05 for k, p in anchor.items()}
        out.append((anchor, fisher))
    return out
