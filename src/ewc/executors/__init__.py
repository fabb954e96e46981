"""Where a command's independent, seeded jobs run: ``--executor local`` (worker processes on this
machine, :mod:`ewc.pool`) or ``--executor ray`` (tasks on a Ray cluster, the optional extra
``ewc[ray]``), behind one interface (:class:`Executor`, :mod:`ewc.executors.base`). Each executor
registers itself in :data:`EXECUTORS`; the settings that choose one are declared here once.
"""

from __future__ import annotations

from typing import Any

from ewc.checks import Registered
from ewc.config import param
from ewc.executors import local, ray_cluster  # noqa: F401 (register)
from ewc.executors.base import (
    EXECUTORS,
    Executor,
    ExecutorError,
    ExecutorSpec,
    make_executor,
    register_executor,
)

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorError",
    "ExecutorSpec",
    "executor_param",
    "make_executor",
    "ray_address_param",
    "register_executor",
]


def executor_param() -> Any:
    """The ``--executor`` field, declared once for ``ewc run`` and ``ewc compare``."""
    return param(
        "local",
        "where the training jobs run (the numbers do not depend on it): "
        + "; ".join(f"{name}: {spec.help}" for name, spec in EXECUTORS.items())
        + " (see docs/robustness.md)",
        check=Registered(EXECUTORS),
    )


def ray_address_param() -> Any:
    """The ``--ray-address`` field: the cluster of ``--executor ray``."""
    return param(
        None,
        "the cluster of --executor ray: its head's HOST:PORT, auto (the cluster this machine belongs "
        "to) or local (start one here for this run)",
        type=str,
        metavar="ADDRESS",
        shown="$RAY_ADDRESS",
    )
