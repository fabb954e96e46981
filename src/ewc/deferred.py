"""A tensor whose value waits for addends that are computed only when it is read.

The EWC penalty's gradient is needed at every step, its value only when someone looks at it (a
log line, a check). :class:`Deferred` lets ``loss = task_loss + reg.penalty()`` be built, trained
on (``loss.backward()``) and thrown away without the value ever being computed, while any read of
it (``loss.item()``, ``float(loss)``, ``print(loss)``, ``torch.isfinite(loss)``, any other torch
operation) gets the exact value first, bit for bit what adding the computed values would have
given.

A deferred tensor holds a stored part and a list of addends, objects with a ``value()`` method
returning a 0-dim tensor; its value is ``((stored + a_0) + a_1) + ...``, added in that order. It
is *pure* when the stored part is zero by construction (a penalty as returned, or a sum of
penalties). Only ``+`` is deferred (``Tensor.__add__`` / ``__radd__``, ``torch.add`` and
``Tensor.add`` without ``alpha`` or ``out``), and only where the rounding of the result does not
change: ``x + p`` with ``p`` pure (the value of ``p`` is added last; ``x`` any tensor, Python
number or deferred tensor), or ``p + x`` with ``p`` pure and ``x`` not deferred. Every other
operation first *settles* its deferred arguments: their addends are evaluated and added into
their storage in place, and they become ordinary tensors again (``type(t) is Tensor``). Metadata
(``shape``, ``dtype``, ``device``, ``requires_grad``, ``grad_fn``, ...) and ``backward()`` need no
value and settle nothing.

:func:`known_part` is the stored part alone (the sum of everything that is not deferred), e.g. to
check a loss for NaN without paying for the penalty's value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["Addend", "Deferred", "added_value", "defer", "is_deferred", "known_part", "settle"]


class Addend(Protocol):
    """Something whose value is computed when first needed."""

    def value(self) -> Tensor: ...  # a 0-dim tensor


class _Sum:
    """The value of a pure deferred tensor with several addends: a_0 + a_1 + ..., in order."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Addend]) -> None:
        self.parts = parts

    def value(self) -> Tensor:
        total = self.parts[0].value()
        for part in self.parts[1:]:
            total = total + part.value()
        return total


class Deferred(Tensor):
    """A tensor with addends still to be added (see the module docstring). Create with :func:`defer`."""

    _addends: list[Addend]
    _pure: bool

    @classmethod
    def __torch_function__(
        cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _ADD and len(args) == 2 and not kwargs:
            x, y = (args[1], args[0]) if func is _RADD else args
            out = _add(x, y)
            if out is not None:
                return out
        elif func in _NO_VALUE:
            return _as_plain(func, args, kwargs)
        for a in (*args, *kwargs.values()):
            _settle_nested(a)
        return func(*args, **kwargs)


def defer(t: Tensor, addends: list[Addend], pure: bool) -> Tensor:
    """Make ``t`` (an ordinary tensor, changed in place and returned) wait for ``addends``;
    ``pure``: its stored value is zero."""
    t.__class__ = Deferred
    t._addends, t._pure = addends, pure  # type: ignore[attr-defined]
    return t


def is_deferred(t: Any) -> bool:
    return isinstance(t, Deferred)


def settle(t: Any, read: bool = True) -> Tensor | None:
    """Add the pending addends of a deferred ``t`` into its storage; ``t`` becomes an ordinary
    tensor. Return the sum of the values added (in order), or None for anything else (nothing is
    done). (``read``: tell the addends their value was asked for.)"""
    if not isinstance(t, Deferred):
        return None
    addends = t._addends
    t.__class__ = Tensor
    del t._addends, t._pure
    total = None
    with torch.no_grad():
        stored = t.detach()
        for a in addends:
            if read and hasattr(a, "mark_read"):
                a.mark_read()
            value = a.value()
            stored.add_(value)
            total = value if total is None else total + value
    return total


def added_value(t: Tensor, base: Tensor) -> float:
    """What ``t`` adds to ``base`` (a method's loss to its task loss: the penalty), read now: the
    stored part of ``t`` minus ``base`` plus the values ``t`` was waiting for. Exact for a penalty
    added to the task loss (``t = base + p``, ``p`` pure: its value itself, not a difference of
    rounded sums); ``float(t) - float(base)`` when nothing is deferred. ``t`` is settled, without
    telling its addends they were read (a reader now and then, not at every step: the next
    evaluation need not compute its value at once)."""
    known = float(known_part(t).detach()) - float(base.detach())
    pending = settle(t, read=False)
    return known + (float(pending) if pending is not None else 0.0)


def known_part(t: Tensor) -> Tensor:
    """``t`` without the values it is still waiting for (a detached copy of its stored part), or
    ``t`` itself when nothing is deferred."""
    if not isinstance(t, Deferred):
        return t
    with torch._C.DisableTorchFunctionSubclass():
        return t.detach().clone()


def _settle_nested(a: Any) -> None:
    if isinstance(a, Deferred):
        settle(a)
    elif isinstance(a, list | tuple):
        for b in a:
            _settle_nested(b)
    elif isinstance(a, dict):
        for b in a.values():
            _settle_nested(b)


def _plain(x: Any) -> bool:
    """An operand ``+`` may add to a pure deferred tensor: an ordinary tensor or a real number."""
    if isinstance(x, Tensor):
        return not isinstance(x, Deferred)
    return isinstance(x, int | float) and not isinstance(x, bool)


def _add(x: Any, y: Any) -> Tensor | None:
    """``x + y`` with the addends kept, or None where that could change the rounding."""
    if isinstance(y, Deferred) and y._pure and (isinstance(x, Deferred) or _plain(x)):
        base, last = x, y
    elif isinstance(x, Deferred) and x._pure and _plain(y):
        base, last = y, x
    else:
        return None
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.add(x, y) if isinstance(x, Tensor) else torch.add(y, x)  # stored parts: base + 0
    group = last._addends[0] if len(last._addends) == 1 else _Sum(list(last._addends))
    if isinstance(base, Deferred):
        return defer(out, [*base._addends, group], base._pure)
    return defer(out, [group], False)


def _as_plain(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` on the deferred arguments seen as ordinary tensors, left deferred afterwards."""
    demoted = [a for a in args if isinstance(a, Deferred)]
    for a in demoted:
        a.__class__ = Tensor
    try:
        return func(*args, **kwargs)
    finally:
        for a in demoted:
            a.__class__ = Deferred


_RADD = Tensor.__radd__
_ADD = {torch.add, Tensor.add, Tensor.__add__, _RADD}
_NO_VALUE = {
    Tensor.backward,
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.requires_grad_,
    Tensor.retain_grad,
    Tensor.register_hook,
    *(
        getattr(Tensor, name).__get__
        for name in (
            "shape",
            "dtype",
            "device",
            "requires_grad",
            "grad_fn",
            "is_leaf",
            "ndim",
            "layout",
            "is_cuda",
            "grad",
            "retains_grad",
            "_backward_hooks",
        )
    ),
}
