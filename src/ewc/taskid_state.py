"""A saved :class:`ewc.taskid.TaskDetector` state, checked part by part before it is restored.

:func:`check_config` reads the state's configuration (the detector builds itself from it and
checks the values); :func:`restore` checks the counters and every tensor (shape against the
configuration and the number of tasks, finite, counts >= 0) and sets them on a fresh detector, so
that ``load_state_dict`` can swap a fully loaded detector in or raise with nothing changed. Every
error is a ValueError that names the part: ``TaskDetector state 'sum' must be finite, ...``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ewc.state import check_finite_state

__all__ = ["COUNTERS", "check_config", "restore"]

WHAT = "TaskDetector state"
TENSORS = ("proj", "phase", "lin_center", "lin_scale", "center", "scale", "count", "sum", "sumsq")
COUNTERS = ("in_dim", "current", "tentative", "n_batches", "n_samples", "n_dropped", "cap_hits", "retracted")


def _fail(message: str) -> ValueError:
    return ValueError(f"{WHAT} {message}")


def check_config(state: Any) -> dict[str, Any]:
    """The saved configuration (keyword arguments of ``TaskDetector``) of a state with every key."""
    if not isinstance(state, Mapping):
        raise _fail(f"must be a dict, got {type(state).__name__}")
    missing = sorted({"config", "counters", *TENSORS} - set(state))
    if missing:
        raise _fail(f"is missing {missing}")
    if not isinstance(state["config"], Mapping) or not all(isinstance(k, str) for k in state["config"]):
        raise _fail("'config' must be a dict of settings")
    return dict(state["config"])


def _counters(counters: Any) -> dict[str, Any]:
    if not isinstance(counters, Mapping) or set(counters) != set(COUNTERS):
        got = sorted(map(str, counters)) if isinstance(counters, Mapping) else type(counters).__name__
        raise _fail(f"'counters' must have keys {sorted(COUNTERS)}, got {got}")
    out: dict[str, Any] = {}
    for k in COUNTERS:
        v = counters[k]
        if k == "tentative":
            ok = isinstance(v, bool)
        elif k == "in_dim":
            ok = v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= (-1 if k == "current" else 0)
        if not ok:
            kind = {"tentative": "True or False", "in_dim": "a positive integer or None"}
            need = kind.get(k, "an integer >= -1" if k == "current" else "a non-negative integer")
            raise _fail(f"'counters'['{k}'] must be {need}, got {v!r}")
        out[k] = v
    return out


def _tensor(state: Mapping[str, Any], key: str, shape: tuple[int, ...] | None) -> torch.Tensor | None:
    """``state[key]`` as float64, of ``shape`` (None: the key must be None), finite."""
    t = state.get(key)
    if shape is None:
        if t is not None:
            raise _fail(f"'{key}' must be None for this configuration and stream, got a tensor")
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise _fail(f"'{key}' must be a floating-point tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise _fail(f"'{key}' must have shape {shape}, got {tuple(t.shape)}")
    check_finite_state(t, f"{WHAT} '{key}'")
    return t.detach().to("cpu", torch.float64, copy=True)


def restore(det: Any, state: Mapping[str, Any]) -> None:
    """Check the counters and tensors of ``state`` against ``det`` (a fresh detector built from the
    state's configuration) and set them on it."""
    counters = _counters(state["counters"])
    count = state["count"]
    if not isinstance(count, torch.Tensor) or count.ndim != 1:
        raise _fail(f"'count' must be a 1-D tensor (one count per task), got {type(count).__name__}")
    k, in_dim = int(count.numel()), counters["in_dim"]
    if k > det.max_tasks:
        raise _fail(f"'count' has {k} tasks, more than max_tasks={det.max_tasks}")
    if not -1 <= counters["current"] < k:
        raise _fail(f"'counters'['current'] must be -1 or a task id below {k}, got {counters['current']}")
    if counters["tentative"] and k == 0:
        raise _fail("'counters'['tentative'] is True with no task")
    if in_dim is None and k:
        raise _fail(f"'counters'['in_dim'] is None with {k} tasks")
    seen = in_dim is not None
    d = det.proj_dim if det.proj_dim is not None else in_dim
    proj = (in_dim, det.proj_dim) if seen and det.proj_dim is not None else None
    det._proj = _tensor(state, "proj", proj)
    det._phase = _tensor(state, "phase", (det.proj_dim,) if proj else None)
    for key in ("lin_center", "lin_scale", "center", "scale"):
        setattr(det, f"_{key}", _tensor(state, key, (d,) if seen and state.get(key) is not None else None))
    stats = (k, d) if k else tuple(state["sum"].shape) if isinstance(state["sum"], torch.Tensor) else (0, 0)
    if k == 0 and (len(stats) != 2 or stats[0] != 0):
        raise _fail(f"'sum' must be empty [0, d] with no task, got shape {stats}")
    det._count = _tensor(state, "count", (k,))
    det._sum, det._sumsq = _tensor(state, "sum", stats), _tensor(state, "sumsq", stats)
    labels = state.get("labels")
    c = labels.shape[1] if isinstance(labels, torch.Tensor) and labels.ndim == 2 else 0
    det._labels = (
        torch.zeros(k, 0, dtype=torch.float64) if labels is None else _tensor(state, "labels", (k, c))
    )
    for key, low in (("count", 0), ("sumsq", 0), ("labels", 0), ("lin_scale", None), ("scale", None)):
        t = getattr(det, f"_{key}")
        if t is not None and bool((t < 0).any() if low == 0 else (t <= 0).any()):
            raise _fail(f"'{key}' must be {'>= 0' if low == 0 else '> 0'}")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
        raise _fail("'history' must be a list of dicts")
    for key, value in counters.items():
        setattr(det, key, value)
    det.history = [dict(h) for h in history]
