"""The one logger interface of experiment tracking, its registry, and the fan-out to several.

A :class:`Logger` is one run of a tracker (Avalanche's loggers are the model: one small
interface, one class per backend). A command opens one top run and a child run per method,
learner or seed (:meth:`Logger.child`: a TensorBoard sub-folder, an MLflow nested run, a W&B run
in the command's group), and sends each run

- ``log_params(params)``: its settings, a nested JSON-able dict (each backend flattens it as
  it must: ``a.b`` keys, lists as JSON text);
- ``log_metrics(metrics, step)``: numbers named ``GROUP/NAME``; ``step`` is the position on that
  group's own axis (training step, task index, env step), None for a final value (a summary);
- ``log_artifact(path)``: a file (figure, report, results.json);
- ``close(failed)``: the run's end.

Backends declare themselves in :data:`TRACKERS` (:func:`register_tracker`) with the optional
extra that installs their library; their library is imported only when a run is opened, and a
missing one is a :class:`MissingExtra` error naming what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from ewc.checks import Constraint

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
    "require",
    "safe_name",
]


class Logger(Protocol):
    """One run of a tracker (see the module docstring)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | os.PathLike) -> None: ...

    def child(self, name: str) -> Logger: ...

    def close(self, failed: bool = False) -> None: ...


@dataclass(frozen=True)
class TrackerSpec:
    """A tracker: ``open(out, name)`` starts the top run of a command writing into ``out``;
    ``module`` is the library it needs, installed by ``pip install 'ewc[EXTRA]'``."""

    name: str
    open: Callable[[Path, str], Logger]
    help: str
    module: str | None = None
    extra: str | None = None

    def installed(self) -> bool:
        """Whether the library is there (found, not imported: importing mlflow takes seconds)."""
        if self.module is None:
            return True
        if self.module in sys.modules:
            return sys.modules[self.module] is not None
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def missing(self) -> str:
        """The one-line error of a tracker whose library is not installed."""
        return f"--track {self.name} needs {self.module}: pip install 'ewc[{self.extra}]'"


#: name → tracker; each backend module registers itself (``ewc.tracking`` imports them all)
TRACKERS: dict[str, TrackerSpec] = {}


def register_tracker(spec: TrackerSpec) -> TrackerSpec:
    TRACKERS[spec.name] = spec
    return spec


class MissingExtra(ValueError):
    """A tracker's library is not installed (the message names the extra to install)."""


def require(module: str, tracker: str) -> ModuleType:
    """Import ``module`` for ``tracker``, or raise :class:`MissingExtra` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(TRACKERS[tracker].missing()) from None


@dataclass(frozen=True)
class TrackerNames(Constraint):
    """Distinct registered tracker names (none: no tracking), each with its library installed."""

    def accepts(self, value: Any) -> bool:
        return (
            isinstance(value, tuple | list)
            and all(isinstance(v, str) and v in TRACKERS and TRACKERS[v].installed() for v in value)
            and len(set(value)) == len(value)
        )

    def describe(self) -> str:
        return "distinct names from " + ", ".join(TRACKERS)

    def message(self, value: Any, what: str) -> str:
        """The missing extra of an installable tracker, else the one wording."""
        if isinstance(value, tuple | list):
            for v in value:
                if isinstance(v, str) and v in TRACKERS and not TRACKERS[v].installed():
                    return TRACKERS[v].missing()
        return super().message(value, what)


class Tracking:
    """Several loggers as one (each call goes to every one); none: nothing is logged. A context
    manager: leaving it closes every run, marked failed when an exception leaves."""

    def __init__(self, loggers: Sequence[Logger] = ()):
        self.loggers = list(loggers)
        self.children: list[Tracking] = []
        self.closed = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """The metrics whose value is a number (None values are left out: nothing was measured)."""
        values = {k: float(v) for k, v in metrics.items() if _number(v)}
        if values:
            for lg in self.loggers:
                lg.log_metrics(values, step)

    def log_artifact(self, path: str | os.PathLike) -> None:
        for lg in self.loggers:
            lg.log_artifact(path)

    def child(self, name: str) -> Tracking:
        """A child run in every tracker (ended by :meth:`close`, or with this one)."""
        child = Tracking([lg.child(name) for lg in self.loggers])
        self.children.append(child)
        return child

    def close(self, failed: bool = False) -> None:
        """End the children still open (as failed with this one), then every run; once."""
        if self.closed:
            return
        self.closed = True
        for child in self.children:
            child.close(failed)
        self.children.clear()
        for lg in self.loggers:
            lg.close(failed)

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(failed=kind is not None)


def open_tracking(names: Sequence[str], out: str | os.PathLike | None, name: str) -> Tracking:
    """The top run ``name`` of every tracker in ``names``, writing under ``out`` (the run's
    output folder). Unknown names and missing libraries fail before anything is opened."""
    names = list(names)
    if not names:
        return Tracking()
    check = TrackerNames()
    if not check.accepts(names):
        known = all(isinstance(n, str) and n in TRACKERS for n in names) and len(set(names)) == len(names)
        raise (MissingExtra if known else ValueError)(check.message(names, "track"))
    if out is None:
        raise ValueError("tracking (--track) writes its runs under the output folder: give out")
    out = Path(out)
    opened: list[Logger] = []
    try:
        for n in names:
            opened.append(TRACKERS[n].open(out, name))
    except BaseException:
        for lg in opened:
            lg.close(failed=True)
        raise
    return Tracking(opened)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` → ``{"a.b": 1, "c": "[1, 2]"}``: nested keys dotted,
    lists as JSON text, None as ``"None"`` (for backends whose parameters are flat scalars)."""
    import json

    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)):
            out[key] = v
        elif v is None:
            out[key] = "None"
        else:
            out[key] = json.dumps(v, default=str)
    return out


def safe_name(name: str) -> str:
    """A run name usable as a folder name (letters, digits, ``-_.=`` kept; others become ``_``)."""
    cleaned = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name).strip(".")
    return cleaned or "_"
