"""Experiments: each builds data + model + method, runs, and hands its results to the report.

``sequence`` is the main job (``ewc run``). The paper's analysis experiments (``ewc experiment
NAME``) follow the contract in :mod:`ewc.experiments.common`; :data:`EXPERIMENTS` maps each
command name to its module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS: dict[str, str] = {
    "patterns": "ewc.experiments.patterns",
    "many-tasks": "ewc.experiments.many_tasks",
    "overlap": "ewc.experiments.overlap",
    "perturb": "ewc.experiments.perturb",
    "kl": "ewc.experiments.kl",
    "batchnorm": "ewc.experiments.batchnorm",
    "languages": "ewc.experiments.languages",
}


def get_experiment(name: str) -> ModuleType:
    """The module of experiment ``name`` (a clear error for an unknown name)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


__all__ = ["EXPERIMENTS", "get_experiment"]
