"""The numeric kernel of the anchored quadratic: stored terms merged per parameter, evaluated fast.

A term is ``{"anchor": {name: θ*}, "fisher": {name: F}}``; a set of terms on a model is the penalty

    λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²

:class:`Quadratic` holds the terms of one model and their merge into one diagonal quadratic per
parameter: a sum of diagonal quadratics is one diagonal quadratic, Σ_k F_k (θ − θ*_k)² =
F̄ (θ − θ̄)² + C with F̄ = Σ_k F_k, θ̄ = Σ_k F_k θ*_k / F̄ and a constant C, all computed in float64
when the terms change (:func:`merge_separate`). Only the rounding of θ̄ to the parameter dtype
differs from the term-by-term sum: it is as if each anchor moved by at most half an ulp. So the
cost of :meth:`Quadratic.value` does not depend on the number of terms: one pass over the
anchored parameters for the gradient, added into ``.grad`` after the backward, and a value
computed only when read (:mod:`ewc.quadratic_eval`).

Storage: the terms and their merge are kept in a store dtype and on a store device (default:
each parameter's; ``store_dtype=`` / ``store_device=`` of :class:`ewc.EWC`). The penalty is always
computed on the parameter's device in :func:`compute_dtype` of the parameter (float32 at least):
stored tensors on another device are copied over for each evaluation, and a lower-precision
θ* or F enters the float32 arithmetic directly (PyTorch promotes mixed dtypes element by element;
widening is exact), so compact storage costs no parameter-sized conversion on the same device.

Which terms exist, their keys, modes and saved state are :mod:`ewc.penalty`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ewc.quadratic_eval import Evaluation, QuadraticPenalty, Scratch, evaluate, scale_, sum_scalars

__all__ = [
    "Merged",
    "Quadratic",
    "QuadraticPenalty",
    "Term",
    "build",
    "check_precision",
    "check_term",
    "compute_dtype",
    "lookup",
    "merge_online",
    "merge_separate",
    "new_term",
    "on_device_of",
    "placed",
    "scale_",
    "sum_scalars",
]

# One consolidated quadratic as stored: {"anchor": {name: θ*}, "fisher": {name: F}}.
Term = dict[str, dict[str, Tensor]]


@dataclass
class Merged:
    """The merged quadratic of one parameter, plus the scratch buffer the penalty writes into."""

    name: str
    path: tuple[str, ...] | None  # module path for a fast lookup; None: use named_parameters()
    param: Tensor
    anchor: Tensor
    fisher: Tensor
    diff: Tensor | None = None  # θ − θ* of the latest evaluation (its value may still read it)
    zero: Tensor | None = None  # 0-dim zero, the "input" of addcmul


def lookup(model: nn.Module, path: tuple[str, ...]) -> Tensor | None:
    """The parameter at a module path (``("0", "weight")``), without walking named_parameters()."""
    module: nn.Module | None = model
    for part in path[:-1]:
        module = module._modules.get(part)  # type: ignore[union-attr]
        if module is None:
            return None
    return module._parameters.get(path[-1])  # type: ignore[union-attr]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype θ − θ* is computed in: the parameter's if float32/float64, else float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def placed(
    t: Tensor, p: Tensor, dtype: torch.dtype | None, device: torch.device | None, copy: bool = False
) -> Tensor:
    """``t`` detached in the storage of parameter ``p``: ``dtype``/``device``, or ``p``'s where None."""
    return t.detach().to(device=device or p.device, dtype=dtype or p.dtype, copy=copy)


def on_device_of(stored: list[Tensor], params: tuple[Tensor, ...] | list[Tensor]) -> list[Tensor]:
    """Stored tensors on their parameters' devices (the same tensors where they already are; a copy
    to the host waits for the data, one to an accelerator is queued without blocking)."""
    return [
        t if t.device == p.device else t.to(p.device, non_blocking=p.device.type != "cpu")
        for t, p in zip(stored, params, strict=True)
    ]


def merge_separate(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, float]:
    """Σ_k F_k (θ − a_k)² = F̄ (θ − ā)² + C: return ā, F̄ (parameter dtype) and C (float64 sum).

    ā is the Fisher-weighted mean of the anchors (the latest anchor where F̄ = 0) and
    C = Σ_k Σ_i F_k (a_k − ā)² with the rounded ā, so the identity holds up to the rounding of ā.
    """
    ref = pairs[-1][0]
    work = torch.float64 if ref.device.type != "mps" else torch.float32
    f_sum = torch.zeros(ref.shape, dtype=work, device=ref.device)
    fa_sum = torch.zeros_like(f_sum)
    for a, f in pairs:
        f64 = f.to(work)
        f_sum += f64
        fa_sum += f64 * a.to(work)
    mean = torch.where(f_sum > 0, fa_sum / f_sum.clamp_min(torch.finfo(work).tiny), ref.to(work))
    anchor = mean.to(ref.dtype)
    anchor64 = anchor.to(work)
    const = sum(float((f.to(work) * (a.to(work) - anchor64).square()).sum()) for a, f in pairs)
    return anchor, f_sum.to(ref.dtype), const


def merge_online(
    old: Term | None,
    anchor: dict[str, Tensor],
    fisher: dict[str, Tensor],
    named: dict[str, Tensor],
    gamma: float,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Term:
    """Online merge: F ← γ·F_old + F_new and θ* ← the current parameters, for the union of names.

    ``old`` is the merged term so far (None before the first), ``anchor``/``fisher`` the new
    consolidation, ``named`` the model's parameters by name (the anchor of a name only ``old``
    has), ``dtype``/``device`` the storage (None: the parameter's). In a 16-bit store dtype the sum
    is rounded once (PyTorch adds in float32). ValueError for a consolidated parameter that is
    missing or changed shape.
    """
    if old is None:
        return {"anchor": anchor, "fisher": fisher}
    merged_f: dict[str, Tensor] = {}
    merged_a: dict[str, Tensor] = {}
    for name, f_old in old["fisher"].items():
        p = named.get(name)
        if p is None:
            raise ValueError(f"consolidated parameter {name!r} is missing from the model")
        if p.shape != f_old.shape:
            raise ValueError(
                f"parameter {name!r} changed shape since consolidation: "
                f"{tuple(f_old.shape)} then, {tuple(p.shape)} now"
            )
        f_old = placed(f_old, p, dtype, device)
        new = fisher.get(name)
        merged_f[name] = f_old * gamma if new is None else torch.add(new, f_old, alpha=gamma)
        merged_a[name] = anchor[name] if name in anchor else placed(p, p, dtype, device, copy=True)
    for name, f_new in fisher.items():
        if name not in merged_f:
            merged_f[name], merged_a[name] = f_new, anchor[name]
    return {"anchor": merged_a, "fisher": merged_f}


def build(
    model: nn.Module,
    terms: list[Term],
    *,
    copy: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[list[Merged], float, list[Term]]:
    """Resolve every stored name in ``model`` and merge the terms into one quadratic per parameter.

    Returns the merged quadratics, the constant C and the terms with their tensors moved to the
    storage (``dtype``/``device``; None: each parameter's), copied if ``copy``. The merge of
    several terms is computed in float64 and kept in the store dtype too. Raises ValueError naming
    a parameter that is missing from the model or whose shape changed.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    moved: list[Term] = [{"anchor": {}, "fisher": {}} for _ in terms]
    per_name: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for k, task in enumerate(terms):
        for name, a in task["anchor"].items():
            f = task["fisher"][name]
            p = named.get(name)
            if p is None:
                raise ValueError(f"consolidated parameter {name!r} is missing from the model")
            if a.shape != p.shape or f.shape != p.shape:
                raise ValueError(
                    f"parameter {name!r} changed shape since consolidation: "
                    f"{tuple(a.shape)} in task {k}, {tuple(p.shape)} now"
                )
            a, f = placed(a, p, dtype, device, copy), placed(f, p, dtype, device, copy)
            moved[k]["anchor"][name], moved[k]["fisher"][name] = a, f
            per_name.setdefault(name, []).append((a, f))
    merged: list[Merged] = []
    const = 0.0
    for name, pairs in per_name.items():
        p = named[name]
        path: tuple[str, ...] | None = tuple(name.split("."))
        if lookup(model, path) is not p:  # type: ignore[arg-type]
            path = None  # exotic module layout: resolve through named_parameters()
        if len(pairs) == 1:
            anchor, fisher = pairs[0]
        else:
            anchor, fisher, c = merge_separate(pairs)
            const += c
        merged.append(Merged(name, path, p, anchor, fisher))
    return merged, const, moved


def new_term(
    named: Mapping[str, Tensor],
    fisher: Any,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(anchor, precision) of a consolidation: the parameters ``named`` now and ``fisher``, checked
    against them (names, shapes, F finite and >= 0) and copied into the storage."""
    if not isinstance(fisher, Mapping) or not fisher:
        raise ValueError("the Fisher must be a non-empty dict {parameter name: tensor}")
    anchor: dict[str, Tensor] = {}
    precision: dict[str, Tensor] = {}
    for name, f in fisher.items():
        p = named.get(name)
        if p is None:
            raise ValueError(f"the Fisher names {name!r}, not a parameter of the model")
        if not isinstance(f, Tensor) or f.shape != p.shape:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"Fisher of parameter {name!r} has shape {shape}, the parameter has {tuple(p.shape)}"
            )
        stored = placed(f, p, dtype, device, copy=True)
        a = placed(p, p, dtype, device, copy=True)
        if dtype is not None and not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(stored).all())):
            if bool(torch.isfinite(f).all()):  # finite before the conversion: say why
                raise ValueError(f"the anchor or Fisher of parameter {name!r} overflows store_dtype {dtype}")
        check_precision(stored, name)
        precision[name], anchor[name] = stored, a
    return anchor, precision


def check_precision(f: Tensor, name: str) -> None:
    """A precision F of parameter ``name`` must be floating-point, finite and >= 0."""
    if not f.is_floating_point():
        raise ValueError(f"Fisher of parameter {name!r} must be a floating-point tensor")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"Fisher of parameter {name!r} has NaN or infinite values")
    if bool((f < 0).any()):
        raise ValueError(f"Fisher of parameter {name!r} has negative values")


def check_term(task: Any, what: str) -> Term:
    """Type checks of one stored term (``what`` names it in errors): matching anchor/fisher
    names, finite tensors, F >= 0."""
    if not isinstance(task, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(task).__name__}")
    if set(task) != {"anchor", "fisher"}:
        raise ValueError(f"{what} must have keys ['anchor', 'fisher'], got {sorted(task)}")
    anchor, fisher = task["anchor"], task["fisher"]
    if not isinstance(anchor, Mapping) or not isinstance(fisher, Mapping):
        raise ValueError(f"{what}: 'anchor' and 'fisher' must be dicts of tensors")
    if set(anchor) != set(fisher):
        raise ValueError(
            f"{what}: anchor and fisher name different parameters: "
            f"{sorted(set(anchor) ^ set(fisher), key=str)}"
        )
    if not anchor:
        raise ValueError(f"{what} is empty")
    for name in anchor:
        a, f = anchor[name], fisher[name]
        if not isinstance(a, Tensor) or not isinstance(f, Tensor):
            raise ValueError(f"{what}: anchor and fisher of {name!r} must be tensors")
        if a.shape != f.shape:
            raise ValueError(
                f"{what}: anchor and fisher of {name!r} have different shapes "
                f"{tuple(a.shape)} and {tuple(f.shape)}"
            )
        if not a.is_floating_point() or not bool(torch.isfinite(a).all()):
            raise ValueError(f"{what}: anchor of {name!r} must be finite floating-point")
        check_precision(f, name)
    return {"anchor": dict(anchor), "fisher": dict(fisher)}


class Quadratic:
    """The stored terms of one model, their merged quadratic and its evaluation.

    ``terms`` holds the tensors in the storage (``dtype``/``device``; None: each parameter's);
    :meth:`set` replaces them (checked against the model first: nothing changes on error);
    :meth:`current` follows a model whose parameters were replaced, moved or reshaped;
    :meth:`value` is the penalty.
    """

    def __init__(
        self, model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.terms: list[Term] = []
        self.merged: list[Merged] = []
        self.const = 0.0
        self._lists: tuple | None = None  # (merged, params, anchors, fishers, diffs, zeros) of value()

    def set(self, terms: list[Term], *, copy: bool = False) -> None:
        """Replace the terms (moved to the storage, copied if ``copy``)."""
        merged, const, moved = build(self.model, terms, copy=copy, dtype=self.dtype, device=self.device)
        self.terms, self.merged, self.const = moved, merged, const

    def current(self) -> list[Merged]:
        """The merged quadratics, rebuilt if the model's parameters were replaced, moved or reshaped."""
        named: dict[str, Tensor] | None = None
        apart = self.dtype is not None or self.device is not None  # storage need not follow p
        for t in self.merged:
            if t.path is not None:
                p = lookup(self.model, t.path)
            else:
                if named is None:
                    named = dict(self.model.named_parameters(remove_duplicate=False))
                p = named.get(t.name)
            if (
                p is not t.param
                or p.shape != t.anchor.shape
                or (self.device or p.device) != t.anchor.device
                or (self.dtype or p.dtype) != t.anchor.dtype
                or (
                    apart
                    and t.diff is not None
                    and (t.diff.device, t.diff.dtype) != (p.device, compute_dtype(p.dtype))
                )
            ):
                self.set(self.terms)
                break
        return self.merged

    def lists(self) -> tuple[Any, ...]:
        """Per-parameter (params, anchors, fishers, diff buffers, zeros) and the buffers' Scratch,
        built once per set of merged quadratics (any change of terms or parameters makes a new set)."""
        merged = self.current()
        if self._lists is None or self._lists[0] is not merged:
            for t in merged:
                if t.diff is None or t.zero is None:
                    dtype = compute_dtype(t.param.dtype)
                    t.diff = torch.empty(t.anchor.shape, dtype=dtype, device=t.param.device)
                    t.zero = torch.zeros((), dtype=dtype, device=t.param.device)
            fields = ("param", "anchor", "fisher", "diff", "zero")
            lists = [[getattr(t, f) for t in merged] for f in fields]
            self._lists = (merged, *lists, Scratch(lists[0], lists[3]))
        return self._lists[1:]

    def value(self, lam: float) -> Tensor:
        """λ/2 · (Σ F̄ (θ − θ̄)² + C), differentiable w.r.t. the model when grad is enabled (then
        computed when read: :mod:`ewc.quadratic_eval`); zero (on the model's device) with no terms."""
        if not self.merged:
            first = next(self.model.parameters(), None)
            return torch.zeros((), device=first.device if first is not None else None)
        params, anchors, fishers, diffs, zeros, scratch = self.lists()
        if self.device is not None:  # stored on another device: copied over for this evaluation
            anchors, fishers = on_device_of(anchors, params), on_device_of(fishers, params)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            ev = Evaluation(scratch, lam, self.const, params, anchors, fishers, diffs, zeros)
            return evaluate(ev)
        with torch.no_grad():
            parts = []
            for p, a, f, d in zip(params, anchors, fishers, diffs, strict=True):
                torch.sub(p, a, out=d)
                parts.append(torch.dot(torch.mul(d, f).view(-1), d.view(-1)))
            return sum_scalars(parts).add_(self.const).mul_(0.5 * lam)
