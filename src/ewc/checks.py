"""Argument checks shared by the package: one wording for the same mistake everywhere."""

from __future__ import annotations

from typing import Any


def check_count(value: Any, what: str, *, allow_none: bool = False) -> int | None:
    """A positive int (or None when ``allow_none``), else a ValueError naming ``what``.

    Booleans are refused although they are ints: ``batch_size=True`` is a mistake, not 1.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{what} must be a positive integer{' or None' if allow_none else ''}, got {value!r}"
        )
    return value


def check_counts(obj: Any, names: tuple[str, ...]) -> None:
    """``check_count`` on each named attribute of ``obj`` (a config dataclass)."""
    for name in names:
        check_count(getattr(obj, name), name)
