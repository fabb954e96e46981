"""One evaluation of the merged quadratic λ/2 · (Σ F (θ − θ*)² + C): gradient now, value when read.

:class:`Evaluation` is one call of the penalty with grad enabled and :class:`QuadraticPenalty`
its autograd node. The value costs passes over memory that the gradient does not (λ·F·(θ − θ*)
as a tensor and a dot product), so it is computed only when read (:mod:`ewc.deferred`).

* The gradient: at the end of ``loss.backward()``, θ − θ* goes into the diff buffer (one per
  merged quadratic, reused) and ``.grad += λ·F·(θ − θ*)`` in one fused pass
  (``_foreach_addcmul_``), after autograd has accumulated every other gradient. That is for the
  parameters :meth:`Scratch.direct` allows (not under ``autograd.grad``, tensor hooks or a
  distributed run, nor low-precision, non-contiguous or accelerator parameters) when the
  incoming gradient is 1; the others get a fresh λ·F·(θ − θ*) (scaled) through autograd.
* The value, when read: ½⟨λ·F·(θ − θ*), θ − θ*⟩ from the buffer. Read after ``backward()`` (after
  the optimiser step, say), the buffer still holds θ − θ* of the parameters the penalty was taken
  at: before it is written for another evaluation, an earlier one that still needs it computes
  its value first. Read before ``backward()`` (``torch.isfinite(loss)``), θ − θ* is computed
  then, and the λ·F·(θ − θ*) of the value is kept for the parameters whose gradient goes through
  autograd. The evaluation after one whose value was read computes it in the forward.

Whichever path ran, the value is computed with the same operations, and so is the gradient of a
parameter (reading the value or not never changes the training, bit for bit); the fused and the
autograd gradient differ by one rounding at most. A value that was not read before the
parameters were changed in place, and whose backward has not run, is lost: reading it is a
RuntimeError (as autograd's own check for a changed saved tensor).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from ewc.deferred import defer

__all__ = ["Evaluation", "QuadraticPenalty", "Scratch", "evaluate", "scale_", "sum_scalars"]


def sum_scalars(parts: list[Tensor]) -> Tensor:
    """Sum of 0-dim tensors (on the first one's device)."""
    device = parts[0].device
    if all(t.device == device for t in parts):
        return torch.stack(parts).sum()
    return torch.stack([t.to(device) for t in parts]).sum()


def scale_(tensors: list[Tensor], factor: Tensor) -> None:
    """tensors *= factor (a 0-dim tensor), in place, on whatever devices they live."""
    if all(t.device == factor.device for t in tensors):
        torch._foreach_mul_(tensors, factor)
    else:
        for t in tensors:
            t.mul_(factor.to(t.device))


class Scratch:
    """The diff buffers of one set of merged quadratics and which evaluation they hold θ − θ* of;
    also whether the latest evaluation's value was read (the next one then computes it at once)."""

    def __init__(self, params: list[Tensor], diffs: list[Tensor]) -> None:
        self.owner: weakref.ref[Evaluation] | None = None
        self.latest: weakref.ref[Evaluation] | None = None
        self.latest_read = False
        # parameters whose gradient may be added into .grad directly: dense, contiguous, on the
        # CPU, in the dtype θ − θ* is computed in
        self.addable = [
            p.device.type == "cpu" and p.layout == torch.strided and p.is_contiguous() and p.dtype == d.dtype
            for p, d in zip(params, diffs, strict=True)
        ]
        self.params = params
        self.accumulators: list[Any] | None = None  # the parameters' AccumulateGrad nodes

    def __getstate__(self) -> dict[str, Any]:
        """For copy.deepcopy / pickle: without the AccumulateGrad nodes (found again when needed)
        and the references to this copy's evaluations."""
        return {**self.__dict__, "owner": None, "latest": None, "accumulators": None}

    def direct(self, idx: list[int]) -> list[int]:
        """Which of the parameters at ``idx`` (inside a backward) can have λF(θ − θ*) added into
        ``.grad`` after the backward instead of going through autograd: those whose
        AccumulateGrad runs in this backward (``backward()``, not ``autograd.grad``) and that
        have no tensor hooks (which would see the gradient without it); none in a distributed
        run (DDP and FSDP reduce the gradients in their own hooks)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return []
        if self.accumulators is None:
            with torch.enable_grad():
                self.accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in self.params]
        will_run = torch._C._will_engine_execute_node
        try:
            return [
                i
                for i in idx
                if self.addable[i]
                and not self.params[i]._backward_hooks
                and not self.params[i]._post_accumulate_grad_hooks
                and will_run(self.accumulators[i])
            ]
        except RuntimeError as e:  # torch.autograd.grad(): it answers for no leaf
            if "autograd.grad" not in str(e):
                raise
            return []

    def claim(self, ev: Evaluation) -> None:
        """The buffers are about to hold ``ev``'s θ − θ*: an earlier evaluation that needs them
        for its value computes it now."""
        prev = self.owner() if self.owner is not None else None
        if prev is not None and prev is not ev and prev.total is None and prev.in_diffs:
            prev.value()
        if prev is not None and prev is not ev:
            prev.in_diffs = False
        self.owner = weakref.ref(ev)


class Evaluation:
    """One penalty evaluation: its inputs, w = λF(θ − θ*) while it waits for the backward, and
    the value once computed (see the module docstring)."""

    def __init__(
        self,
        scratch: Scratch,
        lam: float,
        const: float,
        params: list[Tensor],
        anchors: list[Tensor],
        fishers: list[Tensor],
        diffs: list[Tensor],
        zeros: list[Tensor],
    ) -> None:
        self.scratch, self.lam, self.const = scratch, lam, const
        self.params, self.anchors, self.fishers = params, anchors, fishers
        self.diffs, self.zeros = diffs, zeros
        self.versions = [p._version for p in params]
        self.ws: list[Tensor] | None = None  # the gradient, once computed and until handed over
        self.total: Tensor | None = None  # the value, once computed
        self.in_diffs = False  # the diff buffers hold this evaluation's θ − θ*
        self.backward_done = False

    def mark_read(self) -> None:
        """Someone asked for the value: the next evaluation computes it at once."""
        latest = self.scratch.latest
        if latest is not None and latest() is self:
            self.scratch.latest_read = True

    def fill(self) -> None:
        """θ − θ* into the diff buffers (the parameters must be those the penalty was taken at)."""
        if [p._version for p in self.params] != self.versions:
            raise RuntimeError(
                "the penalty's value was not read before its parameters were modified in place "
                "and its backward has not run: read it (or run backward) before changing them"
            )
        self.scratch.claim(self)
        with torch.no_grad():
            for p, a, d in zip(self.params, self.anchors, self.diffs, strict=True):
                torch.sub(p, a, out=d)
        self.in_diffs = True

    def weighted(self, idx: list[int] | None = None) -> list[Tensor]:
        """λ·F·(θ − θ*) from the diff buffers, fresh tensors (of the parameters at ``idx``)."""
        if idx is None:
            idx = list(range(len(self.diffs)))
        return [torch.addcmul(self.zeros[i], self.diffs[i], self.fishers[i], value=self.lam) for i in idx]

    def add_into_grads(self, idx: list[int]) -> None:
        """.grad += λF(θ − θ*) for the parameters at ``idx`` (a callback at the end of the
        backward, after autograd has accumulated every other gradient), θ − θ* into the diff
        buffers first unless they hold it (the value was read, the other parameters' backward
        wrote it, or another evaluation of the same parameters did in this backward: the same
        θ − θ*)."""
        if not self.in_diffs:
            self.fill()
        with torch.no_grad():
            grads, ds, fs = [], [], []
            for i in idx:
                p, d, f = self.params[i], self.diffs[i], self.fishers[i]
                g = p.grad
                if g is None:
                    p.grad = torch.addcmul(self.zeros[i], d, f, value=self.lam)
                elif g.requires_grad or g.layout != torch.strided or g.dtype != d.dtype:
                    p.grad = g + torch.addcmul(self.zeros[i], d, f, value=self.lam)
                else:
                    grads.append(g), ds.append(d), fs.append(f)
            if grads:
                torch._foreach_addcmul_(grads, ds, fs, value=self.lam)

    def value(self) -> Tensor:
        """λ/2 · (Σ F (θ − θ*)² + C) at the parameters the penalty was taken at (0-dim)."""
        if self.total is None:
            # λ·F·(θ − θ*) is kept for a backward still to come that hands it over through
            # autograd; not where every parameter can have it added into .grad from θ − θ*
            keep = not self.backward_done and not all(self.scratch.addable)
            with torch.no_grad():
                if not self.in_diffs:
                    self.fill()
                parts, ws = [], []
                for i, d in enumerate(self.diffs):
                    w = torch.addcmul(self.zeros[i], d, self.fishers[i], value=self.lam)
                    parts.append(torch.dot(w.view(-1), d.view(-1)))
                    if keep:
                        ws.append(w)
                self.total = sum_scalars(parts).add_(self.lam * self.const).mul_(0.5)
            self.ws = ws if keep else None
        return self.total

    def start(self) -> Tensor:
        """The output of the forward: a zero that waits for the value (computed at once if the
        previous evaluation's value was read)."""
        if self.scratch.latest_read:
            self.value()
        self.scratch.latest, self.scratch.latest_read = weakref.ref(self), False
        return torch.zeros((), dtype=self.diffs[0].dtype, device=self.diffs[0].device)

    def gradient(self, grad_out: Tensor, idx: list[int]) -> list[Tensor | None]:
        """The backward: λ·F·(θ − θ*)·grad_out for the parameters at ``idx`` (None for those whose
        gradient is added into ``.grad`` at the end of the backward)."""
        if [p._version for p in self.params] != self.versions:  # as autograd's saved tensors
            raise RuntimeError(
                "a parameter of the penalty was modified by an inplace operation after the "
                "penalty was computed: compute it again before backward"
            )
        grads: list[Tensor | None] = [None] * len(self.params)
        ws, self.ws = self.ws, None
        if torch.is_grad_enabled() or (ws is None and self.backward_done):
            # create_graph=True, or w was already given away by an earlier backward: rebuild the
            # gradient from differentiable operations (Hessian-vector products work).
            self.value()  # now: the buffers may be reused before it is read
            self.ws = None
            for i in idx:
                p, a, f = self.params[i], self.anchors[i], self.fishers[i]
                grads[i] = (p - a) * f * (grad_out * self.lam)
            self.backward_done = True
            return grads
        self.backward_done = True
        # grad_out is 1 in loss.backward(); only read on the CPU, where that costs no device
        # synchronisation
        one = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        direct = self.scratch.direct(idx) if one else []
        if direct:  # from θ − θ*, whether or not the value was computed: the same bits either way
            idx = [i for i in idx if i not in direct]
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: self.add_into_grads(direct))
        if idx:
            if ws is None:  # the value was not read
                if not self.in_diffs:
                    self.fill()
                ws = [None] * len(self.params)  # type: ignore[list-item]
                for i, w in zip(idx, self.weighted(idx), strict=True):
                    ws[i] = w
            if not one:
                scale_([ws[i] for i in idx], grad_out)  # type: ignore[index]
            for i in idx:
                grads[i] = ws[i]  # type: ignore[index]
        return grads


class QuadraticPenalty(torch.autograd.Function):
    """λ/2 · (Σ F·(θ − θ*)² + C) with a hand-written backward (see :class:`Evaluation`).

    Where the gradient goes through autograd, the backward hands a fresh w = λ·F·(θ − θ*) itself
    over (scaled in place only if the incoming gradient is not 1), so the first gradient to arrive
    can be stored as ``.grad`` without a copy; autograd would instead save θ − θ* and redo two
    multiplies. Under ``create_graph=True`` (or a second backward through a retained graph) the
    gradient is rebuilt from differentiable ops, so Hessian-vector products through the penalty
    work.
    """

    @staticmethod
    def forward(ctx: Any, ev: Evaluation, *params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.ev = ev  # which checks that the parameters are unchanged at backward
        return ev.start()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        needs = ctx.needs_input_grad[1:]
        idx = [i for i in range(len(needs)) if needs[i]]
        return (None, *ctx.ev.gradient(grad_out, idx))


def evaluate(ev: Evaluation) -> Tensor:
    """The penalty of ``ev``: a differentiable 0-dim tensor whose value is computed when read."""
    return defer(QuadraticPenalty.apply(ev, *ev.params), [ev], pure=True)
