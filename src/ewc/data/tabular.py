"""A user's own tabular stream: ``load_table`` reads a CSV or ``.npz`` file into a :class:`Table`.

The rows are the stream, in file order, or in time order when a timestamp column is named (a
stable sort, so rows with equal times keep their file order). Every other column is a numeric
feature, except the label column (class labels: any values, mapped to ``0..C-1``), the optional
timestamp column (numbers or ISO 8601 date-times) and the optional task column (the true task of
each row, for evaluation only: ids ``0, 1, ...`` in order of first appearance).

Missing or non-finite feature values (an empty CSV field, ``nan``, ``NA``, ``inf``) make a row
unusable: with ``nan_policy="drop"`` (default) such rows are dropped and counted in
``Table.n_dropped``; with ``"raise"`` they are an error naming the first bad row and column. A
missing label is always an error (a labelled stream needs every label).

CSV: a header row, comma separated (Python's ``csv`` dialect sniffing is not used: commas only,
quotes allowed). ``.npz``: an array ``x`` ``[N, ...]`` of features (flattened to ``[N, D]``) and
the label array named by ``label_column`` (e.g. ``y``), plus the optional timestamp / task arrays
by name.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ewc.state import PathLike

__all__ = ["NAN_POLICIES", "Table", "load_table"]

NAN_POLICIES = ("drop", "raise")
MISSING = {"", "na", "nan", "n/a", "null", "none"}


@dataclass(frozen=True)
class Table:
    """A labelled stream of rows: ``x`` ``[N, D]`` float32, ``y`` ``[N]`` int64 in ``0..C-1``."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]  # original label of each class index
    features: tuple[str, ...]  # feature column names (``x0, x1, ...`` for npz)
    time: np.ndarray | None  # float seconds (or the numbers given), sorted, or None
    task: list[int] | None  # true task id of each row, or None
    task_names: tuple[str, ...]  # original value of each task id
    n_dropped: int  # rows dropped for missing / non-finite features
    reordered: bool  # rows were sorted by the timestamp column

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _number(text: str) -> float:
    t = text.strip()
    return math.nan if t.lower() in MISSING else float(t)


def _timestamps(values: list[Any], column: str) -> np.ndarray:
    """Numbers as they are; otherwise ISO 8601 date-times as POSIX seconds."""
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            try:
                out[i] = datetime.fromisoformat(str(v).strip()).timestamp()
            except ValueError:
                raise ValueError(
                    f"timestamp column {column!r}, row {i + 1}: {v!r} is neither a number nor an "
                    "ISO 8601 date-time"
                ) from None
    if not np.isfinite(out).all():
        raise ValueError(f"timestamp column {column!r} has missing or non-finite values")
    return out


def _codes(values: list[str]) -> tuple[list[int], tuple[str, ...]]:
    """Map values to ids: labels in sorted order (numerically when all are numbers)."""
    distinct = set(values)
    try:
        order = sorted(distinct, key=float)
    except ValueError:
        order = sorted(distinct)
    index = {v: i for i, v in enumerate(order)}
    return [index[v] for v in values], tuple(order)


def _first_seen(values: list[str]) -> tuple[list[int], tuple[str, ...]]:
    index: dict[str, int] = {}
    return [index.setdefault(v, len(index)) for v in values], tuple(index)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text CSV file ({err.reason} at byte {err.start})") from None
    if not rows:
        raise ValueError(f"{path}: empty CSV file (no header row)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise ValueError(f"{path}: duplicate column name(s) {dup}")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]  # skip blank lines
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"{path}: data row {i + 1} has {len(r)} fields, the header has {len(header)}")
    return header, body


def _column(header: list[str], name: str, what: str, path: Path) -> int:
    if name not in header:
        raise ValueError(f"{path}: no {what} column {name!r}; the columns are {', '.join(header)}")
    return header.index(name)


def load_table(
    path: PathLike,
    label_column: str,
    *,
    timestamp_column: str | None = None,
    task_column: str | None = None,
    nan_policy: str = "drop",
) -> Table:
    """Read a CSV or ``.npz`` stream (see the module doc); clear ``ValueError`` on bad input."""
    path = Path(path)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    names = [label_column, timestamp_column, task_column]
    given = [n for n in names if n is not None]
    if len(set(given)) != len(given):
        raise ValueError("the label, timestamp and task columns must be different columns")
    if path.suffix.lower() == ".npz":
        x, labels, times, tasks, features = _from_npz(path, label_column, timestamp_column, task_column)
    else:
        x, labels, times, tasks, features = _from_csv(path, label_column, timestamp_column, task_column)
    if x.shape[0] == 0:
        raise ValueError(f"{path}: no data rows")
    if x.shape[1] == 0:
        raise ValueError(f"{path}: no feature columns besides the label/timestamp/task columns")
    missing = [i for i, v in enumerate(labels) if v.strip().lower() in MISSING]
    if missing:
        raise ValueError(f"{path}: label column {label_column!r} is missing in row {missing[0] + 1}")
    ok = np.isfinite(x).all(axis=1)
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        if nan_policy == "raise":
            col = features[int(np.flatnonzero(~np.isfinite(x[first]))[0])]
            raise ValueError(f"{path}: row {first + 1} has a missing or non-finite value in column {col!r}")
        keep = np.flatnonzero(ok)
        x, labels = x[keep], [labels[i] for i in keep]
        times = None if times is None else times[keep]
        tasks = None if tasks is None else [tasks[i] for i in keep]
        if x.shape[0] == 0:
            raise ValueError(f"{path}: every row has a missing or non-finite feature value")
    reordered = False
    if times is not None:
        order = np.argsort(times, kind="stable")
        reordered = bool((order != np.arange(len(order))).any())
        x, times, labels = x[order], times[order], [labels[i] for i in order]
        tasks = None if tasks is None else [tasks[i] for i in order]
    codes, classes = _codes(labels)
    task_ids, task_names = _first_seen(tasks) if tasks is not None else (None, ())
    return Table(
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        y=torch.tensor(codes, dtype=torch.int64),
        classes=classes,
        features=tuple(features),
        time=times,
        task=task_ids,
        task_names=task_names,
        n_dropped=int((~ok).sum()),
        reordered=reordered,
    )


def _from_csv(
    path: Path, label: str, timestamp: str | None, task: str | None
) -> tuple[np.ndarray, list[str], np.ndarray | None, list[str] | None, list[str]]:
    header, body = _read_csv(path)
    li = _column(header, label, "label", path)
    ti = None if timestamp is None else _column(header, timestamp, "timestamp", path)
    ki = None if task is None else _column(header, task, "task", path)
    special = {li, ti, ki} - {None}
    feat = [j for j in range(len(header)) if j not in special]
    x = np.empty((len(body), len(feat)), dtype=np.float64)
    for i, row in enumerate(body):
        for k, j in enumerate(feat):
            try:
                x[i, k] = _number(row[j])
            except ValueError:
                raise ValueError(
                    f"{path}: feature column {header[j]!r}, row {i + 1}: {row[j]!r} is not a number "
                    "(name it as the label, timestamp or task column, or remove it)"
                ) from None
    labels = [row[li].strip() for row in body]
    times = None if ti is None else _timestamps([row[ti] for row in body], header[ti])
    tasks = None if ki is None else [row[ki].strip() for row in body]
    return x, labels, times, tasks, [header[j] for j in feat]


def _from_npz(
    path: Path, label: str, timestamp: str | None, task: str | None
) -> tuple[np.ndarray, list[str], np.ndarray | None, list[str] | None, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    if "x" not in arrays:
        raise ValueError(f"{path}: no feature array 'x'; the arrays are {', '.join(sorted(arrays))}")

    def get(name: str, what: str) -> np.ndarray:
        if name not in arrays:
            raise ValueError(f"{path}: no {what} array {name!r}; the arrays are {', '.join(sorted(arrays))}")
        a = arrays[name]
        if a.ndim != 1 or a.shape[0] != arrays["x"].shape[0]:
            raise ValueError(f"{path}: {what} array {name!r} must be 1-D with one entry per row of x")
        return a

    x = arrays["x"]
    if x.ndim < 2:
        raise ValueError(f"{path}: 'x' must be [rows, features...], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{path}: 'x' must be numeric, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{path}: no data rows ('x' has shape {x.shape})")
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    labels = [str(v) for v in get(label, "label").tolist()]
    times = None if timestamp is None else _timestamps(get(timestamp, "timestamp").tolist(), timestamp)
    tasks = None if task is None else [str(v) for v in get(task, "task").tolist()]
    return x, labels, times, tasks, [f"x{j}" for j in range(x.shape[1])]
