"""Argument checks shared by the package: one constraint vocabulary, one wording everywhere.

A constraint (:class:`Interval`, :class:`Options`, :class:`Sizes`, :class:`Numbers`, :class:`Subset`,
:class:`Boolean`, :class:`Registered`, :class:`OrWord`) says what a value must be;
:func:`check` raises ``ValueError("NAME must be DESCRIPTION, got VALUE")`` when it is not. Config
fields declare their constraint next to their default (``ewc.config.param(check=...)``), so the
command line, the docs and the library refuse the same values with the same message
(scikit-learn's ``Interval`` / ``StrOptions`` are the model).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any


class Constraint:
    """What a value must be: ``accepts(value)`` and a ``describe()`` for the error message."""

    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def message(self, value: Any, what: str) -> str:
        """The one error wording: ``WHAT must be DESCRIPTION[ or None], got VALUE``."""
        return f"{what} must be {self.describe()}{' or None' if self.allow_none else ''}, got {value!r}"


def _is_number(value: Any, kind: type, finite: bool = True) -> bool:
    if isinstance(value, bool):  # batch_size=True is a mistake, not 1
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)  # numpy integers too
    return isinstance(value, numbers.Real) and (math.isfinite(value) if finite else not math.isnan(value))


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Interval(Constraint):
    """An int or a finite float between ``low`` and ``high`` (None: unbounded), ends closed or not;
    ``finite=False`` also admits ±inf (where inf means "no limit", e.g. a gradient-norm clip)."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    closed: str = "both"  # both | left | right | neither
    allow_none: bool = False
    finite: bool = True

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        if not _is_number(value, self.kind, self.finite):
            return False
        lo_ok = self.low is None or (
            value >= self.low if self.closed in ("both", "left") else value > self.low
        )
        hi_ok = self.high is None or (
            value <= self.high if self.closed in ("both", "right") else value < self.high
        )
        return lo_ok and hi_ok

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number" if self.finite else "a number"
        left = self.closed in ("both", "left")
        right = self.closed in ("both", "right")
        if self.kind is int and self.high is None and (self.low, left) in ((1, True), (0, False)):
            return "a positive integer"
        if self.kind is int and self.high is None and (self.low, left) == (0, True):
            return "a non-negative integer"
        if self.high is None and self.low is not None:
            return f"{noun} {'>=' if left else '>'} {_fmt(self.low)}"
        if self.low is None and self.high is not None:
            return f"{noun} {'<=' if right else '<'} {_fmt(self.high)}"
        if self.low is None:
            return noun
        return f"{noun} in {'[' if left else '('}{_fmt(self.low)}, {_fmt(self.high)}{']' if right else ')'}"


@dataclass(frozen=True)
class Options(Constraint):
    """One of a fixed set of values (names of registered methods, datasets, modes, ...)."""

    values: tuple[Any, ...] = ()
    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        return (value is None and self.allow_none) or value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.values))


@dataclass(frozen=True)
class Numbers(Constraint):
    """A non-empty sequence of finite numbers within ``each`` (a grid of λ values, noise norms);
    ``distinct``: no value twice (seeds, patch sizes)."""

    each: Interval = Interval(float)
    allow_none: bool = False
    distinct: bool = False
    allow_empty: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        return (
            isinstance(value, tuple | list)
            and (len(value) > 0 or self.allow_empty)
            and all(self.each.accepts(v) for v in value)
            and (not self.distinct or len(set(value)) == len(value))
        )

    def describe(self) -> str:
        kind = "a list" if self.allow_empty else "a non-empty list"
        return f"{kind}{' of distinct values' if self.distinct else ''}, each {self.each.describe()}"


@dataclass(frozen=True)
class Sizes(Numbers):
    """A non-empty sequence of positive integers (layer widths)."""

    each: Interval = Interval(int, 1)

    def describe(self) -> str:
        return "positive integers" + ("" if self.allow_empty else ", at least one")


@dataclass(frozen=True)
class Subset(Constraint):
    """A non-empty sequence of distinct values from a fixed set (the games or methods of a run)."""

    values: tuple[Any, ...] = ()
    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        return (
            isinstance(value, tuple | list)
            and len(value) > 0
            and all(v in self.values for v in value)
            and len(set(value)) == len(value)  # hashable: each is one of the values
        )

    def describe(self) -> str:
        return "distinct names from " + ", ".join(map(str, self.values)) + ", at least one"


@dataclass(frozen=True)
class Boolean(Constraint):
    """True or False itself (1 or a numpy bool is refused: a flag given a count is a mistake)."""

    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        return (value is None and self.allow_none) or isinstance(value, bool)

    def describe(self) -> str:
        return "True or False"


@dataclass(frozen=True)
class OrWord(Constraint):
    """A value ``inner`` accepts, or the one word ``word`` (``--lam auto``: chosen by a search)."""

    inner: Constraint
    word: str

    def accepts(self, value: Any) -> bool:
        return value == self.word or self.inner.accepts(value)

    def describe(self) -> str:
        return f"{self.inner.describe()}{' or None' if self.inner.allow_none else ''} or {self.word!r}"


POSITIVE_INT = Interval(int, 1)
NON_NEGATIVE_INT = Interval(int, 0)
POSITIVE = Interval(float, 0, closed="neither")
NON_NEGATIVE = Interval(float, 0)
#: a seed every generator takes (torch's, numpy's, ``seed * 10_007 + i`` included)
SEED = Interval(int, 0, 2**32 - 1)
#: torch threads at most (a million threads crashed torch)
MAX_THREADS = 1024
THREADS = Interval(int, 1, MAX_THREADS)


def check(value: Any, constraint: Constraint, what: str) -> Any:
    """``value`` if ``constraint`` accepts it, else a ValueError in the one wording."""
    if not constraint.accepts(value):
        raise ValueError(constraint.message(value, what))
    return value


def check_float(value: Any, constraint: Constraint, what: str) -> float:
    """``float(value)`` if ``constraint`` accepts it, else a ValueError in the one wording.

    For arguments read with ``float()`` (a numpy scalar, a 0-dim tensor, a numeric string are
    numbers there); a bool is refused, as by :func:`check`."""
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not constraint.accepts(number):
        raise ValueError(constraint.message(value, what))
    return number


def check_count(value: Any, what: str, *, allow_none: bool = False) -> int | None:
    """A positive int (or None when ``allow_none``), else a ValueError naming ``what``."""
    return check(value, Interval(int, 1, allow_none=allow_none), what)


def check_int(value: Any, what: str, minimum: int) -> int:
    """An integer >= ``minimum`` (numpy integers accepted) as a Python int, else a ValueError."""
    return int(check(value, Interval(int, minimum), what))


@dataclass(frozen=True)
class Registered(Constraint):
    """A name in a registry (a dict filled as modules register themselves), read when checked."""

    registry: dict = None  # type: ignore[assignment]
    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        return (value is None and self.allow_none) or (isinstance(value, str) and value in self.registry)

    def describe(self) -> str:
        return "one of " + ", ".join(self.registry)

    def __hash__(self) -> int:
        return id(self.registry)
