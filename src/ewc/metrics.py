"""Continual-learning metrics computed from an accuracy matrix.

Conventions (see ``docs/metrics.md`` for formulas, edge cases and references):

* ``T`` tasks, trained in the order 0, 1, ..., T-1.
* ``R`` is a T x T array-like (list of lists or numpy array); ``R[i][j]`` is the test accuracy
  on task ``j`` after training on tasks ``0..i``, a value in [0, 1].  Entries above the
  diagonal (``j > i``, tasks not trained yet) are only used by :func:`forward_transfer` and may
  be NaN when they were not measured; entries on and below the diagonal must be numbers.
* ``b[j]`` is the accuracy on task ``j`` of the randomly initialised model (for FWT).

Accuracies come from :func:`accuracy_from_counts` (``ewc.evaluation.accuracy`` uses it); under
``torch.distributed`` the (correct, total) counts are first summed over all ranks with
:func:`reduce_counts`, *then* divided.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "accuracy_from_counts",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "learning_curve_area",
    "reduce_counts",
    "summarize",
]

ArrayLike = Sequence[Sequence[float]] | np.ndarray


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _as_float_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a rectangular array of numbers ({e})") from e
    return arr


def _check_unit_interval(arr: np.ndarray, mask: np.ndarray, name: str) -> None:
    """Raise unless every entry of ``arr`` selected by ``mask`` is a number in [0, 1]."""
    bad = mask & ~((arr >= 0.0) & (arr <= 1.0))  # NaN and +-inf fail the comparison too
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        where = "".join(f"[{i}]" for i in idx)
        raise ValueError(f"{name}{where} = {float(arr[idx])!r}: accuracies must be numbers in [0, 1]")


def _validate_matrix(R: ArrayLike) -> np.ndarray:
    """Return ``R`` as a float64 T x T array after checking shape and values."""
    arr = _as_float_array(R, "R")
    if arr.size == 0:
        raise ValueError(f"R is empty (shape {arr.shape}); need at least one task")
    if arr.ndim != 2:
        raise ValueError(f"R must be a 2-D T x T matrix, got {arr.ndim} dimension(s) (shape {arr.shape})")
    if arr.shape[0] != arr.shape[1]:
        raise ValueError(f"R must be square (T x T), got shape {arr.shape}")
    lower = np.tril(np.ones(arr.shape, dtype=bool))  # on and below the diagonal: must be numbers
    nan_low = lower & np.isnan(arr)
    if nan_low.any():
        i, j = (int(v) for v in np.argwhere(nan_low)[0])
        raise ValueError(
            f"R[{i}][{j}] is NaN; NaN is only allowed above the diagonal (tasks not yet trained)"
        )
    _check_unit_interval(arr, ~np.isnan(arr), "R")  # NaN above the diagonal is allowed
    return arr


def _validate_vector(v: Any, T: int, name: str) -> np.ndarray:
    arr = _as_float_array(v, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one entry per task, got shape {arr.shape}")
    if arr.shape[0] != T:
        raise ValueError(f"{name} has {arr.shape[0]} entries but R has T = {T} tasks")
    _check_unit_interval(arr, np.ones(arr.shape, dtype=bool), name)
    return arr


# ----------------------------------------------------------------------------------------------
# Matrix metrics
# ----------------------------------------------------------------------------------------------


def average_accuracy(R: ArrayLike) -> float:
    """ACC = 1/T sum_j R[T-1][j]: mean accuracy over all tasks after training on the last one."""
    arr = _validate_matrix(R)
    return float(arr[-1].mean())


def backward_transfer(R: ArrayLike) -> float:
    """BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]); negative means forgetting; 0.0 if T = 1."""
    arr = _validate_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return 0.0
    idx = np.arange(T - 1)
    return float((arr[-1, idx] - arr[idx, idx]).mean())


def forward_transfer(R: ArrayLike, b: Sequence[float] | np.ndarray) -> float:
    """FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b[j]); 0.0 if T = 1.

    ``b[j]`` is the accuracy of the randomly initialised model on task ``j`` (``len(b) == T``;
    ``b[0]`` is checked but not used).  The super-diagonal entries ``R[j-1][j]`` must have been
    measured: a NaN there raises ``ValueError``.
    """
    arr = _validate_matrix(R)
    T = arr.shape[0]
    base = _validate_vector(b, T, "b")
    if T == 1:
        return 0.0
    j = np.arange(1, T)
    sup = arr[j - 1, j]
    missing = np.isnan(sup)
    if missing.any():
        k = int(j[np.argmax(missing)])
        raise ValueError(
            f"R[{k - 1}][{k}] is NaN: forward transfer needs the accuracy on every task j >= 1 "
            "measured just before training on it (R[j-1][j])"
        )
    return float((sup - base[j]).mean())


def forgetting(R: ArrayLike) -> float:
    """Average forgetting at the end (Chaudhry et al. 2018); 0.0 if T = 1.

    f_j = max_{l in j..T-2} R[l][j] - R[T-1][j] for every j < T-1, averaged over j.  Not clipped:
    a negative value means the final accuracy on a task beats every earlier one.
    """
    arr = _validate_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return 0.0
    f = [arr[j : T - 1, j].max() - arr[T - 1, j] for j in range(T - 1)]
    return float(np.mean(f))


# ----------------------------------------------------------------------------------------------
# Learning curve area
# ----------------------------------------------------------------------------------------------


def learning_curve_area(curves: Sequence[Sequence[float]], beta: int | None = None) -> float:
    """LCA_beta = 1/(beta+1) sum_{b=0}^{beta} Z_b, Z_b = mean_k curves[k][b] (Chaudhry et al. 2019).

    ``curves[k][b]`` is the accuracy on task ``k`` at evaluation point ``b`` of training on task
    ``k`` (point 0: before any update on task ``k``).  Curves may differ in length; ``beta``
    defaults to the last index of the shortest curve and may not exceed it.  The spacing of the
    evaluation points (every ``eval_every`` mini-batches) is set by the trainer, and LCA depends
    on it.
    """
    if isinstance(curves, np.ndarray | torch.Tensor):
        curves = list(curves)
    if len(curves) == 0:
        raise ValueError("curves is empty; need one learning curve per task")
    rows = []
    for k, c in enumerate(curves):
        row = _as_float_array(c, f"curves[{k}]")
        if row.ndim != 1:
            raise ValueError(f"curves[{k}] must be 1-D (one accuracy per evaluation point), got {row.shape}")
        if row.shape[0] == 0:
            raise ValueError(f"curves[{k}] is empty; need at least evaluation point 0")
        _check_unit_interval(row, np.ones(row.shape, dtype=bool), f"curves[{k}]")
        rows.append(row)
    shortest = min(r.shape[0] for r in rows)
    if beta is None:
        beta = shortest - 1
    if isinstance(beta, bool) or not isinstance(beta, int | np.integer):
        raise ValueError(f"beta must be an int or None, got {beta!r}")
    if not 0 <= beta <= shortest - 1:
        raise ValueError(f"beta = {beta} must be in 0..{shortest - 1} (last index of the shortest curve)")
    Z = np.stack([r[: beta + 1] for r in rows]).mean(axis=0)  # Z_b for b = 0..beta
    return float(Z.mean())


# ----------------------------------------------------------------------------------------------
# Summary and aggregation
# ----------------------------------------------------------------------------------------------


def summarize(
    R: ArrayLike,
    b: Sequence[float] | np.ndarray | None = None,
    curves: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """All metrics in one dict.

    Keys: ``average_accuracy``, ``bwt``, ``fwt`` (None if ``b`` is None), ``forgetting``,
    ``lca`` (None if ``curves`` is None) and ``final_accuracies`` (last row of ``R``, a list).
    If ``curves`` is given it must hold one curve per task.
    """
    arr = _validate_matrix(R)
    T = arr.shape[0]
    if curves is not None and len(curves) != T:
        raise ValueError(f"curves has {len(curves)} learning curves but R has T = {T} tasks")
    return {
        "average_accuracy": average_accuracy(arr),
        "bwt": backward_transfer(arr),
        "fwt": None if b is None else forward_transfer(arr, b),
        "forgetting": forgetting(arr),
        "lca": None if curves is None else learning_curve_area(curves),
        "final_accuracies": [float(v) for v in arr[-1]],
    }


# ----------------------------------------------------------------------------------------------
# Accuracy from counts (and distributed reduction)
# ----------------------------------------------------------------------------------------------


def accuracy_from_counts(correct: float | torch.Tensor, total: float | torch.Tensor) -> float:
    """``correct / total`` as a float, after checking ``total > 0`` and ``0 <= correct <= total``.

    Under DDP pass the *global* counts (see :func:`reduce_counts`), never per-rank accuracies:
    averaging per-rank ratios is wrong whenever ranks hold different numbers of samples.
    """
    c, n = float(correct), float(total)
    if not (math.isfinite(c) and math.isfinite(n)):
        raise ValueError(f"counts must be finite, got correct={correct!r}, total={total!r}")
    if n <= 0:
        raise ValueError(f"total must be > 0, got {total!r}")
    if not 0 <= c <= n:
        raise ValueError(f"correct must be in [0, total], got correct={correct!r}, total={total!r}")
    return c / n


def _is_integral(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex())
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def reduce_counts(
    correct: float | torch.Tensor, total: float | torch.Tensor, distributed: bool | None = None
) -> tuple[float, float]:
    """Sum ``(correct, total)`` over all ranks with ``torch.distributed`` (all-reduce, SUM).

    ``distributed=None`` (default) reduces whenever a process group is initialised; otherwise
    (or with ``distributed=False``) the counts come back unchanged.  Every rank must call it
    (it is a collective).  Integer inputs give ``int`` results, anything else ``float``.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    integral = _is_integral(correct) and _is_integral(total)

    def _out(v: Any) -> float:
        v = v.item() if isinstance(v, torch.Tensor | np.generic) else v
        return int(v) if integral else float(v)

    if not distributed:
        return _out(correct), _out(total)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("reduce_counts(distributed=True) needs an initialised process group")
    device = torch.device("cpu")
    if dist.get_backend() == dist.Backend.NCCL:  # NCCL only reduces CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.int64 if integral else torch.float64
    vals = [v.item() if isinstance(v, torch.Tensor) else v for v in (correct, total)]
    buf = torch.tensor(vals, dtype=dtype, device=device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    c, n = buf.cpu().tolist()
    return _out(c), _out(n)
