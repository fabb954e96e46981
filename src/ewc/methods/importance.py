"""Importance-weighted anchors other than the Fisher: Synaptic Intelligence and MAS.

Both keep one quadratic, Σ_i Ω_i (θ_i − θ*_i)², with importances Ω accumulated over the tasks
(Ω ← Ω + Ω_k) and the anchor θ* at the parameters after the latest task. That is exactly the
``online`` mode of :class:`ewc.penalty.EWC` with γ = 1 and the importances passed as
``fisher_diag``, so both reuse it. Its value is λ/2 · Σ F (θ − θ*)²; each method says how its
own strength maps onto λ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewc.checks import check_count
from ewc.data import Task
from ewc.fisher import diagonal_importance
from ewc.methods.base import Batch, Method, check_number, check_state_keys
from ewc.methods.registry import MethodSpec, decades, register
from ewc.penalty import EWC
from ewc.scenario import Scenario
from ewc.state import check_finite_state


class _Importance(Method):
    """What SI and MAS share: one merged quadratic (``self.reg``) holding Ω and θ*."""

    reg: EWC

    def importance(self) -> dict[str, Tensor]:
        """The cumulative Ω (empty before the first task ends)."""
        return self.reg.precisions()

    def memory_bytes(self) -> int:
        return self.reg.memory_bytes()


class SIMethod(_Importance):
    """Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

    During task k every optimiser step adds its share of the path integral of the task loss,

        ω_i += −g_i · Δθ_i      (g: gradient at the step, Δθ: the step's parameter change),

    and at the end of the task (Eq. 5) Ω_i += max(ω_i, 0) / ((θ_i(end) − θ_i(start))² + ξ),
    ω ← 0, θ* ← θ(end). Later tasks train on (Eq. 4)

        task_loss + c · Σ_i Ω_i (θ_i − θ*_i)²,

    i.e. :class:`ewc.penalty.EWC` (λ/2 Σ F (θ − θ*)²) with λ = 2c and F = Ω, online mode, γ = 1:
    its merge F ← F + Ω_k, θ* ← θ(end) is the paper's cumulative Ω_μ = Σ_{ν<μ} Ω_ν anchored at
    the previous task's final parameters.

    Choices: g is the gradient of the task loss alone, as in the original code (the surrogate
    penalty's own pull towards θ* is not credited as "work done on the task"): ``after_backward``
    subtracts SI's closed-form penalty gradient 2c·Ω·(θ − θ*) from ``p.grad``, so under a
    composition the other terms (replay losses, other penalties) count as task loss. Δθ is the
    actual change made by the optimiser (momentum and weight decay included). Negative
    contributions max(ω, 0) are clipped because the penalty needs Ω >= 0 (a negative importance
    would push parameters away from θ*); the paper's formula has no clip.

    Memory between tasks: Ω and θ* (two copies of the parameters). During a task: ω, the start
    parameters, the previous step's parameters and the step's gradient (four more).
    """

    name = "si"

    def __init__(self, c: float = 0.1, xi: float = 0.1):
        self.c = check_number(c, "SI strength c")
        self.xi = check_number(xi, "SI damping xi", positive=True)

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        self.reg = EWC(model, lam=2 * self.c, mode="online", gamma=1.0)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters that require grad")
        self.omega = {
            n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.params.items()
        }
        self._start: dict[str, Tensor] | None = None  # θ at the start of the current task
        self._prev: dict[str, Tensor] | None = None  # θ before the current step
        self._grad: dict[str, Tensor] = {}  # the current step's task-loss gradient

    def before_task(self, index: int, task: Task) -> None:
        self._start = {n: p.detach().clone() for n, p in self.params.items()}
        self._prev = {n: p.detach().clone() for n, p in self.params.items()}

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        return task_loss + self.reg.penalty()

    @torch.no_grad()
    def after_backward(self) -> None:
        """Keep the task-loss gradient: p.grad minus the penalty's gradient 2c·Ω·(θ − θ*)."""
        anchor, omega = self.reg.anchors(), self.reg.precisions()  # the live θ* and Ω, not copies
        for n, p in self.params.items():
            if p.grad is None:
                self._grad.pop(n, None)
                continue
            g = self._grad.get(n)
            g = self._grad[n] = p.grad.clone() if g is None else g.copy_(p.grad)
            if n in omega:
                g.addcmul_(p.detach() - anchor[n], omega[n], value=-self.reg.lam)

    @torch.no_grad()
    def after_step(self) -> None:
        """ω += −g·Δθ with Δθ = θ(after the step) − θ(before)."""
        if self._prev is None:
            raise RuntimeError("SI: after_step before before_task")
        for n, p in self.params.items():
            prev = self._prev[n]
            if n in self._grad:
                self.omega[n].addcmul_(self._grad[n], p.detach() - prev, value=-1.0)
            prev.copy_(p.detach())
        self._grad.clear()

    @torch.no_grad()
    def after_task(self, index: int, task: Task) -> None:
        if self._start is None:
            raise RuntimeError("SI: after_task before before_task")
        new = {}
        for n, p in self.params.items():
            delta = p.detach() - self._start[n]
            new[n] = self.omega[n].clamp_min(0) / (delta.square() + self.xi)
            self.omega[n].zero_()
        self.reg.consolidate(fisher_diag=new)
        self._start = self._prev = None

    def set_strength(self, value: float) -> None:
        self.c = check_number(value, "SI strength c")
        self.reg.lam = 2 * self.c

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, the penalty (Ω, θ*) and, mid-task, ω and the task's start parameters."""
        return {
            "c": self.c,
            "xi": self.xi,
            "penalty": self.reg.state_dict(),
            "omega": {n: t.clone() for n, t in self.omega.items()},
            "start": None if self._start is None else {n: t.clone() for n, t in self._start.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(state, {"c", "xi", "penalty", "omega", "start"}, "SI")
        c, xi = (
            check_number(state["c"], "SI strength c"),
            check_number(state["xi"], "SI damping xi", positive=True),
        )
        omega = self._param_dict(state["omega"], "omega")
        start = None if state["start"] is None else self._param_dict(state["start"], "start")
        self.reg.load_state_dict(state["penalty"])
        self.c, self.xi = c, xi
        self.reg.lam = 2 * c
        for n, t in omega.items():
            self.omega[n].copy_(t)
        self._start = start
        self._prev = None if start is None else {n: p.detach().clone() for n, p in self.params.items()}
        self._grad.clear()

    def _param_dict(self, tensors: Any, what: str) -> dict[str, Tensor]:
        """A {name: tensor} for exactly the trainable parameters, copied to their device/dtype."""
        if not isinstance(tensors, Mapping) or set(tensors) != set(self.params):
            raise ValueError(f"SI state {what!r} must name exactly the model's trainable parameters")
        out = {}
        for n, p in self.params.items():
            t = tensors[n]
            if not isinstance(t, Tensor) or t.shape != p.shape:
                raise ValueError(f"SI state {what!r}: {n!r} must be a tensor of shape {tuple(p.shape)}")
            check_finite_state(t, f"SI state {what!r}[{n!r}]")
            out[n] = t.detach().to(device=p.device, dtype=p.dtype, copy=True)
        return out


class MASMethod(_Importance):
    """Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, ECCV 2018).

    After task k, the importance of every parameter on the task's inputs (no labels, Eq. 2-4):

        Ω_k,i = 1/N Σ_n |∂ ‖f(x_n)‖²₂ / ∂θ_i|

    with f(x) the softmax-free outputs of the task's active head (``scenario.head``: the task's
    units for task-IL, the shared head for domain-IL, all classes seen so far for class-IL),
    computed per sample in eval mode by :func:`ewc.fisher.diagonal_importance` (the Fisher
    engine with an absolute-value reduction). Importances add up over tasks, Ω ← Ω + Ω_k, as
    the paper accumulates them, and θ* ← θ(end of task k). Later tasks train on

        task_loss + λ/2 · Σ_i Ω_i (θ_i − θ*_i)²

    (:class:`ewc.penalty.EWC`, online, γ = 1). The paper writes λ Σ Ω (θ − θ*)² (Eq. 6): its λ is
    half of ours. ``max_samples`` caps the samples per task (first ones in data order).

    Memory between tasks: Ω and θ* (two copies of the parameters).
    """

    name = "mas"

    def __init__(self, lam: float = 1.0, max_samples: int | None = None, batch_size: int = 256):
        self.lam = check_number(lam, "MAS strength lam")
        self.max_samples = check_count(max_samples, "MAS max_samples", allow_none=True)
        self.batch_size = check_count(batch_size, "MAS batch_size", allow_none=False)

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        self.reg = EWC(model, lam=self.lam, mode="online", gamma=1.0)

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        return task_loss + self.reg.penalty()

    def task_importance(self, index: int, task: Task) -> dict[str, Tensor]:
        """Ω_k of one task on its training inputs, through the task's active head."""
        return diagonal_importance(
            self.model,
            task.x_train,
            "mas",
            self.max_samples,
            output_fn=lambda out: self.scenario.head(out, index),
            batch_size=self.batch_size,
        )

    def after_task(self, index: int, task: Task) -> None:
        self.reg.consolidate(fisher_diag=self.task_importance(index, task))

    def set_strength(self, value: float) -> None:
        self.lam = check_number(value, "MAS strength lam")
        self.reg.lam = self.lam

    def state_dict(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "max_samples": self.max_samples,
            "batch_size": self.batch_size,
            "penalty": self.reg.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(state, {"lam", "max_samples", "batch_size", "penalty"}, "MAS")
        lam = check_number(state["lam"], "MAS strength lam")
        max_samples = check_count(state["max_samples"], "MAS max_samples", allow_none=True)
        batch_size = check_count(state["batch_size"], "MAS batch_size", allow_none=False)
        self.reg.load_state_dict(state["penalty"])
        self.lam, self.max_samples, self.batch_size = lam, max_samples, batch_size
        self.reg.lam = lam


register(
    MethodSpec(
        "si",
        SIMethod,
        {"c": 0.1, "xi": 0.1},
        {"c": (0.1, 1.0, 10.0)},
        "Synaptic Intelligence: path-integral importances, penalty c·ΣΩ(θ − θ*)²",
        label="SI",
        color="#9467bd",
        order=4,
        strength="c",
        bracket=decades(-3, 3),
    )
)
register(
    MethodSpec(
        "mas",
        MASMethod,
        {"lam": 1.0, "max_samples": 1000, "batch_size": 256},
        {"lam": (0.1, 1.0, 10.0)},
        "Memory Aware Synapses: importances |∂‖f(x)‖²/∂θ| on unlabelled data",
        label="MAS",
        color="#8c564b",
        order=5,
        strength="lam",
        bracket=decades(-3, 3),
    )
)
