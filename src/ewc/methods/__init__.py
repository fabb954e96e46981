"""Continual-learning methods behind one small interface (:class:`Method`), and their registry.

``METHOD_SPECS[name]`` says how to build a method from keyword parameters, its defaults, and the
small grid its hyper-parameters are searched over on validation data (``ewc run --search``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ewc.methods.base import Batch, Joint, Method
from ewc.methods.compose import Compose
from ewc.methods.dropout import DropoutMethod
from ewc.methods.gem import AGEMMethod, GEMMethod
from ewc.methods.importance import MASMethod, SIMethod
from ewc.methods.lwf import LwFMethod
from ewc.methods.regularizers import EWCMethod, L2Method
from ewc.methods.replay import ReplayMethod


@dataclass(frozen=True)
class MethodSpec:
    """How to build one registered method: ``build(**params)`` with ``defaults`` overridden."""

    build: Callable[..., Method]
    defaults: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    help: str = ""

    def combinations(self) -> list[dict[str, Any]]:
        """Every point of the search grid (one empty dict when there is nothing to search)."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]


def _ewc(mode: str) -> Callable[..., Method]:
    def build(lam: float, gamma: float, fisher: str, fisher_samples: int | None) -> Method:
        return EWCMethod(lam, mode, gamma, fisher, fisher_samples)

    return build


_EWC_DEFAULTS = {"lam": 100.0, "gamma": 1.0, "fisher": "exact", "fisher_samples": 1000}
_MEMORY = {"capacity": 1000, "policy": "balanced", "per": "task", "seed": 0}


def _ewc_replay(
    lam: float,
    gamma: float,
    fisher: str,
    fisher_samples: int | None,
    capacity: int,
    policy: str,
    per: str,
    replay_batch: int | None,
    weight: float,
    seed: int,
) -> Method:
    """EWC's penalty plus a replay memory, by composition (the blog's memory + constrained update)."""
    return Compose(
        EWCMethod(lam, "separate", gamma, fisher, fisher_samples),
        ReplayMethod(
            capacity=capacity, policy=policy, per=per, replay_batch=replay_batch, weight=weight, seed=seed
        ),
    )


METHOD_SPECS: dict[str, MethodSpec] = {
    "sgd": MethodSpec(Method, help="fine-tuning: no memory, no penalty (the lower bound)"),
    "l2": MethodSpec(L2Method, {"lam": 100.0}, {"lam": (0.01, 0.1, 1.0)}, "isotropic anchor λ/2‖θ − θ*‖²"),
    "ewc": MethodSpec(
        _ewc("separate"), _EWC_DEFAULTS, {"lam": (30.0, 100.0, 300.0, 1000.0)}, "EWC, one penalty per task"
    ),
    "online-ewc": MethodSpec(
        _ewc("online"), _EWC_DEFAULTS, {"lam": (30.0, 100.0, 300.0, 1000.0)}, "EWC merged into one penalty"
    ),
    "si": MethodSpec(
        SIMethod,
        {"c": 0.1, "xi": 0.1},
        {"c": (0.1, 1.0, 10.0)},
        "Synaptic Intelligence: path-integral importances, penalty c·ΣΩ(θ − θ*)²",
    ),
    "mas": MethodSpec(
        MASMethod,
        {"lam": 1.0, "max_samples": 1000, "batch_size": 256},
        {"lam": (0.1, 1.0, 10.0)},
        "Memory Aware Synapses: importances |∂‖f(x)‖²/∂θ| on unlabelled data",
    ),
    "dropout": MethodSpec(DropoutMethod, {"rate": 0.5}, {"rate": (0.2, 0.5)}, "fine-tuning with dropout"),
    "lwf": MethodSpec(
        LwFMethod,
        {"alpha": 1.0, "temperature": 2.0},
        {"alpha": (0.5, 1.0, 2.0)},
        "Learning without Forgetting: distil the previous model's outputs",
    ),
    "replay": MethodSpec(
        ReplayMethod,
        {**_MEMORY, "policy": "reservoir", "replay_batch": None, "weight": 1.0},
        {"weight": (0.5, 1.0, 2.0)},
        "experience replay from a bounded memory",
    ),
    "gem": MethodSpec(
        GEMMethod,
        {**_MEMORY, "memory_strength": 0.5},
        {"memory_strength": (0.0, 0.5, 1.0)},
        "Gradient Episodic Memory: project so no past task's memory loss increases",
    ),
    "agem": MethodSpec(
        AGEMMethod,
        {**_MEMORY, "sample_size": 256},
        {"sample_size": (64, 256)},
        "Averaged GEM: one projection against the memory's mean gradient",
    ),
    "ewc+replay": MethodSpec(
        _ewc_replay,
        {**_EWC_DEFAULTS, **_MEMORY, "policy": "reservoir", "replay_batch": None, "weight": 1.0},
        {"lam": (30.0, 100.0, 300.0, 1000.0)},
        "EWC and replay composed (Compose)",
    ),
    "joint": MethodSpec(lambda: Joint("task"), help="all tasks so far, as many updates as the others"),
    "joint-cumulative": MethodSpec(lambda: Joint("all"), help="all tasks so far, every epoch over all"),
}

METHODS: tuple[str, ...] = tuple(METHOD_SPECS)


def make_method(name: str, **params: Any) -> Method:
    """A fresh method by name, its registered defaults overridden by ``params``."""
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    spec = METHOD_SPECS[name]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        known = ", ".join(spec.defaults) or "none"
        raise ValueError(f"method {name!r} has no parameter(s) {', '.join(unknown)} (parameters: {known})")
    return spec.build(**{**spec.defaults, **params})


__all__ = [
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
]
