"""The method registry: each method file declares its :class:`MethodSpec` with :func:`register`.

A spec is everything the rest of the package knows about a method by name: how to build it,
its default parameters, the grid ``--search`` tries on validation data, which run-level settings
it takes (``run_params``: ``--lam``, ``--gamma``, ``--fisher``, ...; the same declaration tells
``--select-lam`` which methods have a λ to choose), and its label and colour in figures.
``ewc.methods`` imports every module of the package, so adding a method is one file.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: the run settings a method's λ can come from (``--lam`` / ``--l2-lam``), each chosen by its own
#: grid (``--select-lam`` / ``--select-l2-lam``)
LAM_SETTINGS: tuple[str, ...] = ("lam", "l2_lam")
#: a strength given as this word is chosen by ``ewc run``'s search (``--lam auto``, ``--set si.c=auto``)
AUTO = "auto"


def decades(low: int, high: int) -> tuple[float, ...]:
    """One value per decade, ``10**low .. 10**high`` (a log-scale bracket of strengths)."""
    return tuple(float(10.0**e) for e in range(low, high + 1))


@dataclass(frozen=True)
class MethodSpec:
    """How to build one registered method: ``build(**params)`` with ``defaults`` overridden.

    ``run_params`` maps a parameter of the method to the run setting (a ``TrainConfig`` field)
    it is taken from when the method runs in a sequence; ``order`` places the method in
    ``METHODS`` (the order of ``--methods all``, tables and legends). ``strength`` names the
    parameter that weighs what the method adds to the task loss (EWC's λ, SI's c), which
    ``auto`` chooses by a search over ``bracket`` (log-spaced values; λ = 0 is added to them as
    the reference: plain fine-tuning).
    """

    name: str
    build: Callable[..., Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    help: str = ""
    label: str = ""
    color: str = "#7f7f7f"
    order: int = 100
    run_params: dict[str, str] = field(default_factory=dict)
    strength: str | None = None
    bracket: tuple[float, ...] = ()

    def combinations(self) -> list[dict[str, Any]]:
        """Every point of the search grid (one empty dict when there is nothing to search)."""
        return combinations(self.grid)

    @property
    def lam_setting(self) -> str | None:
        """The run setting this method's λ comes from (``lam`` / ``l2_lam``), or None."""
        setting = self.run_params.get("lam")
        return setting if setting in LAM_SETTINGS else None


METHOD_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a clear error for a name registered twice)."""
    if spec.name in METHOD_SPECS and METHOD_SPECS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    METHOD_SPECS[spec.name] = spec
    ordered = sorted(METHOD_SPECS.values(), key=lambda s: (s.order, s.name))
    METHOD_SPECS.clear()  # kept in declared order: --methods all, choices, tables, legends
    METHOD_SPECS.update((s.name, s) for s in ordered)
    return spec


def combinations(grid: dict[str, tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Every point of a parameter grid (one empty dict for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
