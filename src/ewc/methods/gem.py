"""Gradient Episodic Memory (GEM) and Averaged GEM (A-GEM): constrain the update, not the loss.

Both keep an episodic memory of earlier tasks (filled at the end of each task, see
:class:`ewc.methods.replay.EpisodicMethod`) and change the gradient g of the current batch in
``after_backward``, before the optimiser step, so that the loss on the memories does not go up.

GEM (Lopez-Paz & Ranzato, NeurIPS 2017, Eqs. 10-13): with g_k the gradient of the loss on task
k's memory and G = (g_1, ..., g_t)ᵀ, if some ⟨g, g_k⟩ < 0 the gradient becomes the closest
vector satisfying every constraint,

    g̃ = argmin_z ½‖z − g‖²  s.t.  G z ≥ 0,   solved in its dual:
    v* = argmin_{v ≥ γ} ½ vᵀ G Gᵀ v + (G g)ᵀ v,   g̃ = Gᵀ v* + g.

γ = 0 is the exact projection. γ > 0 is the paper's "memory strength" (it biases the update
towards the memories); the authors' code imposes it as the bound v ≥ γ with γ = 0.5, as here.
Either way ⟨g̃, g_k⟩ ≥ 0 for every k (the dual's KKT conditions). The dual is solved exactly by
:func:`ewc.qp.nonneg_qp`.

A-GEM (Chaudhry et al., ICLR 2019, Eq. 11): one constraint on the average memory gradient g_ref,
computed on a random batch of the whole memory; if ⟨g, g_ref⟩ < 0,

    g̃ = g − (⟨g, g_ref⟩ / ⟨g_ref, g_ref⟩) g_ref.

The memory gradients come from extra forward/backward passes with ``torch.autograd.grad`` in
the mode the trainer left the model in (train: BatchNorm batch statistics, dropout on), so the
optimiser's ``p.grad`` is only touched by the projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ewc.checks import check_count
from ewc.memory import memory_loss
from ewc.methods.base import check_number
from ewc.methods.registry import MethodSpec, register
from ewc.methods.replay import MEMORY_DEFAULTS, EpisodicMethod
from ewc.qp import nonneg_qp

__all__ = ["AGEMMethod", "GEMMethod", "project_agem", "project_gem"]


def project_gem(g: Tensor, G: Tensor, margin: float = 0.0) -> Tensor:
    """GEM's projection of ``g`` [p] given the memory gradients ``G`` [t, p] (``g`` itself if
    no constraint is violated); computed in float64, returned in ``g``'s dtype."""
    if G.dim() != 2 or g.dim() != 1 or G.shape[1] != g.shape[0]:
        raise ValueError(f"need g [p] and G [t, p], got {tuple(g.shape)} and {tuple(G.shape)}")
    if len(G) == 0 or bool((G @ g >= 0).all()):
        return g
    G64, g64 = G.double(), g.double()
    P = (G64 @ G64.T).cpu()
    q = (G64 @ g64).cpu()
    u = nonneg_qp(P, q + margin * P.sum(1))  # v = γ + u with u ≥ 0
    v = (u + margin).to(G.device)
    return (G64.T @ v + g64).to(g.dtype)


def project_agem(g: Tensor, g_ref: Tensor) -> Tensor:
    """A-GEM's projection of ``g`` onto the half-space ⟨·, g_ref⟩ ≥ 0 (``g`` itself if inside)."""
    dot = torch.dot(g.double(), g_ref.double())
    if dot >= 0:
        return g
    return (g.double() - dot / torch.dot(g_ref.double(), g_ref.double()) * g_ref.double()).to(g.dtype)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _flat(grads: list[Tensor | None] | tuple[Tensor | None, ...], params: list[nn.Parameter]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if d is None else d).reshape(-1) for d, p in zip(grads, params, strict=True)]
    )


def _set_grad(params: list[nn.Parameter], flat: Tensor) -> None:
    offset = 0
    for p in params:
        part = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)


class _Projected(EpisodicMethod):
    """An episodic method that changes ``p.grad`` using gradients of the loss on its memory."""

    def _memory_grad(self, x: Tensor, y: Tensor, task: Tensor, params: list[nn.Parameter]) -> Tensor:
        """Flat gradient of the memory loss, leaving ``p.grad`` alone."""
        device = self._device()
        with torch.enable_grad():
            loss = memory_loss(
                self.model, self.scenario, x.to(device), y.to(device), task.to(device), self.current
            )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return _flat(grads, params)


class GEMMethod(_Projected):
    """GEM: project the gradient so that no past task's memory loss increases (to first order)."""

    name = "gem"

    def __init__(
        self,
        capacity: int = 1000,
        policy: str = "balanced",
        per: str = "task",
        memory_strength: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(capacity, policy, per, seed)
        self.memory_strength = check_number(memory_strength, "memory_strength")

    def after_backward(self) -> None:
        past = [k for k in self.memory.tasks() if k != self.current]
        if not past:
            return
        params = _params(self.model)
        g = _flat([p.grad for p in params], params)
        G = torch.stack([self._memory_grad(*self.memory.get(k), params) for k in past])
        projected = project_gem(g, G, self.memory_strength)
        if projected is not g:
            _set_grad(params, projected)


class AGEMMethod(_Projected):
    """A-GEM: keep the update from increasing the average loss on a random memory batch."""

    name = "agem"

    def __init__(
        self,
        capacity: int = 1000,
        policy: str = "balanced",
        per: str = "task",
        sample_size: int = 256,
        seed: int = 0,
    ):
        super().__init__(capacity, policy, per, seed)
        self.sample_size = check_count(sample_size, "sample_size")

    def after_backward(self) -> None:
        if len(self.memory) == 0:
            return
        params = _params(self.model)
        g = _flat([p.grad for p in params], params)
        g_ref = self._memory_grad(*self.memory.sample(self.sample_size), params)
        projected = project_agem(g, g_ref)
        if projected is not g:
            _set_grad(params, projected)


register(
    MethodSpec(
        "gem",
        GEMMethod,
        {**MEMORY_DEFAULTS, "memory_strength": 0.5},
        {"memory_strength": (0.0, 0.5, 1.0)},
        "Gradient Episodic Memory: project so no past task's memory loss increases",
        label="GEM",
        color="#7f7f7f",
        order=9,
    )
)
register(
    MethodSpec(
        "agem",
        AGEMMethod,
        {**MEMORY_DEFAULTS, "sample_size": 256},
        {"sample_size": (64, 256)},
        "Averaged GEM: one projection against the memory's mean gradient",
        label="A-GEM",
        color="#aec7e8",
        order=10,
    )
)
