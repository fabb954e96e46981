"""Streams and scores for evaluating a task detector (:class:`ewc.taskid.TaskDetector`).

``make_stream`` builds a stream of batches from a task schedule with returns; ``assignment_metrics``
scores inferred ids against true ids (best one-to-one matching, delays, false alarms, splits);
``best_matching`` is the exact assignment it uses. Kept apart from the detector: a learner needs
the detector, only tests, experiments and scripts need these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["assignment_metrics", "best_matching", "make_stream"]


def make_stream(
    tasks: Sequence[Any],
    schedule: Sequence[int],
    batch_size: int = 32,
    seed: int = 0,
    min_len: int = 20,
    max_len: int = 60,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """Batches ``(x, y)`` following ``schedule`` (task indices, returns allowed), and their true ids.

    Each segment lasts a random number of batches in ``[min_len, max_len]``. Within a task, samples
    are drawn from ``x_train``/``y_train`` without replacement, reshuffled whenever the task's data
    run out (a returning task continues where it left off). Seeded and reproducible.
    """
    if batch_size < 1 or min_len < 1 or max_len < min_len:
        raise ValueError(
            f"need batch_size >= 1 and 1 <= min_len <= max_len, got {batch_size}, {min_len}, {max_len}"
        )
    for t in schedule:
        if not 0 <= int(t) < len(tasks):
            raise ValueError(f"schedule entry {t} is not a task index in [0, {len(tasks)})")
    rng = np.random.default_rng(seed)
    order: dict[int, np.ndarray] = {}
    pos: dict[int, int] = {}
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    true_ids: list[int] = []
    for t in map(int, schedule):
        task = tasks[t]
        x, y = task.x_train, task.y_train  # read once per segment (a lazy task builds them then)
        n = len(x)
        if n < batch_size:
            raise ValueError(f"task {t} has {n} training samples, fewer than batch_size={batch_size}")
        for _ in range(int(rng.integers(min_len, max_len + 1))):
            if t not in order or pos[t] + batch_size > n:
                order[t], pos[t] = rng.permutation(n), 0
            idx = torch.as_tensor(order[t][pos[t] : pos[t] + batch_size])
            pos[t] += batch_size
            batches.append((x[idx], y[idx]))
            true_ids.append(t)
    return batches, true_ids


def best_matching(cost: Sequence[Sequence[float]] | np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of rows to columns (Hungarian algorithm, exact).

    Works for rectangular matrices; returns ``(row, col)`` pairs, ``min(rows, cols)`` of them.
    O(n^2 m): fine for the tens of ids of a stream. No scipy needed.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError("cost must be a 2-D matrix")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        return []
    inf = math.inf
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=int)  # p[j]: row (1-based) matched to column j
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = c[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = [(int(p[j]) - 1, j - 1) for j in range(1, m + 1) if p[j] != 0]
    if transposed:
        pairs = [(b, a) for a, b in pairs]
    return sorted(pairs)


def assignment_metrics(
    true_ids: Sequence[int], inferred_ids: Sequence[int], batch_size: int = 32
) -> dict[str, Any]:
    """Score inferred task ids against the truth, batch by batch.

    - ``accuracy``: fraction of batches whose inferred id maps to their true id under the best
      one-to-one matching of inferred to true ids (Hungarian on the confusion matrix).
    - ``mean_delay`` / ``max_delay``: for each true change point (and the stream start), batches
      until the inferred id first equals the matched id of the new task (the segment length if never).
    - ``false_alarms`` / ``false_alarms_per_10k``: inferred changes of id that are not the first
      change after a true change point, per 10 000 samples (``batch_size`` samples per batch).
    - ``tasks_true`` / ``tasks_found``: distinct true and inferred ids; ``split_tasks``: true tasks
      that two or more inferred ids (each mostly holding that task) were given.
    """
    t = [int(a) for a in true_ids]
    f = [int(a) for a in inferred_ids]
    if len(t) != len(f):
        raise ValueError(f"true_ids has {len(t)} entries, inferred_ids {len(f)}")
    if not t:
        raise ValueError("empty stream")
    tu, fu = sorted(set(t)), sorted(set(f))
    ti, fi = {a: i for i, a in enumerate(tu)}, {a: i for i, a in enumerate(fu)}
    conf = np.zeros((len(tu), len(fu)), dtype=np.int64)
    for a, b in zip(t, f, strict=True):
        conf[ti[a], fi[b]] += 1
    pairs = best_matching(-conf)
    match = {tu[r]: fu[c] for r, c in pairs}
    correct = sum(int(conf[r, c]) for r, c in pairs)
    starts = [0] + [i for i in range(1, len(t)) if t[i] != t[i - 1]]
    ends = starts[1:] + [len(t)]
    delays = []
    for s, e in zip(starts, ends, strict=True):
        target = match.get(t[s])
        d = next((i - s for i in range(s, e) if f[i] == target), e - s)
        delays.append(d)
    true_changes = starts[1:]
    inferred_changes = [i for i in range(1, len(f)) if f[i] != f[i - 1]]
    detections = set()
    for s, e in zip(true_changes, ends[1:], strict=True):
        first = next((i for i in inferred_changes if s <= i < e), None)
        if first is not None:
            detections.add(first)
    false_alarms = len(inferred_changes) - len(detections)
    owner = conf.argmax(axis=0)  # the true task that holds most of each inferred id
    split = sum(1 for r in range(len(tu)) if int((owner == r).sum()) > 1)
    return {
        "accuracy": correct / len(t),
        "mean_delay": float(np.mean(delays[1:])) if len(delays) > 1 else 0.0,
        "max_delay": int(max(delays[1:])) if len(delays) > 1 else 0,
        "first_delay": int(delays[0]),
        "false_alarms": int(false_alarms),
        "false_alarms_per_10k": false_alarms * 10_000 / (len(t) * batch_size),
        "tasks_true": len(tu),
        "tasks_found": len(fu),
        "split_tasks": int(split),
        "matching": {int(k): int(v) for k, v in match.items()},
        "n_batches": len(t),
    }
