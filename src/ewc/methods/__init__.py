"""Continual-learning methods behind one small interface (:class:`Method`), and their registry.

Every module of this package declares its methods' :class:`MethodSpec` (``register``); importing
the package imports them all, so ``METHOD_SPECS`` / ``METHODS`` list every method without a list
written by hand. ``METHOD_SPECS[name]`` says how to build a method from keyword parameters, its
defaults, the grid ``ewc run --search`` tries on validation data, the run settings it takes and
how figures label and colour it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ewc.methods.base import Batch, Joint, Method
from ewc.methods.compose import Compose
from ewc.methods.dropout import DropoutMethod
from ewc.methods.gem import AGEMMethod, GEMMethod
from ewc.methods.importance import MASMethod, SIMethod
from ewc.methods.lwf import LwFMethod
from ewc.methods.registry import AUTO, METHOD_SPECS, MethodSpec, register
from ewc.methods.regularizers import EWCMethod, L2Method
from ewc.methods.replay import ReplayMethod

for _module in pkgutil.iter_modules(__path__):  # discovery: a new method file registers itself
    importlib.import_module(f"{__name__}.{_module.name}")

#: the methods of this package, in declared order (a snapshot; ``METHOD_SPECS`` also holds any
#: method registered later, and is what the runner checks names against)
METHODS: tuple[str, ...] = tuple(METHOD_SPECS)


def make_method(name: str, **params: Any) -> Method:
    """A fresh method by name, its registered defaults overridden by ``params``."""
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHOD_SPECS)}")
    spec = METHOD_SPECS[name]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        known = ", ".join(spec.defaults) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)} (parameters: {known})")
    return spec.build(**{**spec.defaults, **params})


__all__ = [
    "AUTO",
    "AGEMMethod",
    "Compose",
    "GEMMethod",
    "METHODS",
    "METHOD_SPECS",
    "Batch",
    "DropoutMethod",
    "EWCMethod",
    "Joint",
    "L2Method",
    "LwFMethod",
    "MASMethod",
    "Method",
    "MethodSpec",
    "ReplayMethod",
    "SIMethod",
    "make_method",
    "register",
]
