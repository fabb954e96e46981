"""Experiment tracking: ``--track tensorboard,mlflow,wandb,jsonl`` through one Logger interface.

:mod:`ewc.tracking.base` holds the interface (:class:`Logger`), the registry :data:`TRACKERS`
and the fan-out (:class:`Tracking`, :func:`open_tracking`); each backend is one module that
registers itself: ``tensorboard`` (event files), ``mlflow`` (a local SQLite store or
``MLFLOW_TRACKING_URI``), ``wandb`` (offline run files unless configured) and ``jsonl`` (no extra).
What a command logs is decided by the command (``ewc.experiments.tracked``), from its record.
"""

from __future__ import annotations

from typing import Any

from ewc.config import param
from ewc.tracking import jsonl_logger, mlflow_logger, tensorboard_logger, wandb_logger  # noqa: F401 (register)
from ewc.tracking.base import (
    TRACKERS,
    Logger,
    MissingExtra,
    TrackerNames,
    TrackerSpec,
    Tracking,
    flatten,
    open_tracking,
    register_tracker,
)

__all__ = [
    "TRACKERS",
    "Logger",
    "MissingExtra",
    "TrackerNames",
    "TrackerSpec",
    "Tracking",
    "flatten",
    "open_tracking",
    "register_tracker",
    "parse_names",
    "track_param",
]


def parse_names(text: str | Any) -> tuple[str, ...]:
    """``"tensorboard, mlflow"`` → ``("tensorboard", "mlflow")`` (checked by the config: unknown
    names and missing extras get one message there)."""
    if not isinstance(text, str):
        return tuple(text)
    return tuple(v.strip() for v in text.split(",") if v.strip())


def track_param() -> Any:
    """The ``--track`` field, declared once for ``ewc run`` / ``compare`` / ``stream`` / ``rl``."""
    return param(
        (),
        f"send the run's record to trackers, comma-separated, from: {', '.join(TRACKERS)} "
        "(optional extras; see docs/tracking.md)",
        type=parse_names,
        check=TrackerNames(),
        metavar="NAMES",
        shown="none",
    )
