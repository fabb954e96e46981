"""Runs over several seeds (``ewc run --seeds``): per-seed results → mean ± 95 % CI, paired tests.

A multi-seed ``results.json`` keeps every seed's complete run under ``per_seed`` (a list of
``{"seed", "tasks", "methods"}``, each method's entry as in a single-seed run) and, under
``methods``, one aggregated entry per method: the keys of a single-seed entry with the mean over
the seeds in place of the value (so whatever reads a single run reads the means), plus ``stats``
(per metric: ``mean``, ``ci95`` — the half-width of the 95 % t interval, see :mod:`ewc.stats` —,
``n`` and, for scalars, ``values``: the per-seed values in ``seeds`` order), ``seeds`` and ``n``.
The curves are averaged point by point (a seed whose tasks have other sizes is first mapped onto
the first seed's task boundaries), with their half-width in ``curves["accuracy_ci95"]``.

Methods (within a run) and runs (``ewc report A B``) are compared by a paired t-test on their
per-seed ACC: pair k is the same seed, hence the same data, permutations and initial weights.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ewc.report.style import method_label
from ewc.report.values import METRIC_KEYS, arr, num
from ewc.stats import LEVEL, mean_ci, mean_ci_array, paired_t_test

#: scalar metrics of a method's entry that get a mean ± CI
SCALAR_KEYS = (*METRIC_KEYS, "train_seconds", "memory_bytes")
#: per-task vectors and the accuracy matrix: element-wise mean ± CI
ARRAY_KEYS = ("final_accuracies", "baseline_accuracy", "accuracy_matrix")
#: significance level of the paired tests
ALPHA = 1.0 - LEVEL


def _json_list(x: np.ndarray) -> list:
    """An array as nested lists with None for NaN (plain JSON)."""
    if x.ndim == 0:
        return None if not np.isfinite(x) else float(x)  # type: ignore[return-value]
    return [_json_list(v) for v in x] if x.ndim > 1 else [None if not np.isfinite(v) else float(v) for v in x]


def aggregate_curves(curves: Sequence[Any]) -> dict[str, Any] | None:
    """Point-by-point mean and 95 % half-width of the seeds' curves on the first seed's steps, or
    None when a seed has none. A seed with other steps (tasks of other sizes, e.g. a class split in
    another order) is mapped piecewise-linearly onto the first seed's task boundaries, then read
    at its steps."""
    if not curves or any(
        not isinstance(c, Mapping) or not c.get("steps") or not c.get("accuracy") for c in curves
    ):
        return None
    ref = curves[0]
    steps = arr(ref["steps"])
    T = len(ref["accuracy"][0])
    starts = arr(ref.get("task_starts"))
    stack = []
    for c in curves:
        s, acc = arr(c["steps"]), arr(c["accuracy"])
        if acc.shape != (len(s), T):
            return None
        if s.shape == steps.shape and np.array_equal(s, steps):
            stack.append(acc)
            continue
        own = arr(c.get("task_starts"))
        src, dst = (
            np.append(own, max(s.max(), own[-1] + 1)),
            np.append(starts, max(steps.max(), starts[-1] + 1)),
        )
        if own.shape == starts.shape == (T,) and np.all(np.diff(src) > 0) and np.all(np.diff(dst) > 0):
            x = np.interp(s, src, dst)
        else:
            x = s * (steps.max() / max(s.max(), 1))
        stack.append(np.stack([np.interp(steps, x, acc[:, k]) for k in range(T)], axis=1))
    mean, half = mean_ci_array(np.stack(stack))
    out = {"steps": list(ref["steps"]), "accuracy": _json_list(mean), "accuracy_ci95": _json_list(half)}
    if ref.get("task_starts") is not None:
        out["task_starts"] = list(ref["task_starts"])
    return out


def aggregate_method(runs: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One method's entry over its per-seed results (``runs[k]`` was run with ``seeds[k]``)."""
    if len(runs) != len(seeds) or not runs:
        raise ValueError(f"need one result per seed, got {len(runs)} results for {len(seeds)} seeds")
    skip = {*SCALAR_KEYS, *ARRAY_KEYS, "curves", "checkpoint"}
    entry: dict[str, Any] = {k: v for k, v in runs[0].items() if k not in skip}  # the same for every seed
    stats: dict[str, Any] = {}
    for key in SCALAR_KEYS:
        if any(key in r for r in runs):
            values = [r.get(key) for r in runs]
            stats[key] = mean_ci([None if v is None or isinstance(v, bool) else num(v) for v in values])
            entry[key] = stats[key]["mean"]
    for key in ARRAY_KEYS:
        arrays = [arr(r.get(key)) for r in runs]
        if arrays[0].size and all(a.shape == arrays[0].shape for a in arrays):
            mean, half = mean_ci_array(np.stack(arrays))
            entry[key] = _json_list(mean)
            stats[key] = {"mean": entry[key], "ci95": _json_list(half), "n": len(runs)}
    curves = aggregate_curves([r.get("curves") for r in runs])
    if curves is not None:
        entry["curves"] = curves
    entry.update(stats=stats, seeds=[int(s) for s in seeds], n=len(runs))
    return entry


def aggregate_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{method: aggregated entry}`` from ``[{"seed", "methods": {method: result}}, ...]``."""
    seeds = [p["seed"] for p in per_seed]
    names = list(per_seed[0]["methods"])
    return {m: aggregate_method([p["methods"][m] for p in per_seed], seeds) for m in names}


def is_multi_seed(results: Mapping[str, Any]) -> bool:
    """Whether ``results`` is a ``--seeds`` run (with ``per_seed``)."""
    return isinstance(results.get("per_seed"), list)


def seed_values(entry: Mapping[str, Any], config: Mapping[str, Any], key: str = "average_accuracy") -> dict:
    """``{seed: value}`` of one method's metric: every seed of a ``--seeds`` run, else the run's one."""
    stats = entry.get("stats")
    if isinstance(stats, Mapping) and isinstance(stats.get(key), Mapping) and "values" in stats[key]:
        return {int(s): v for s, v in zip(entry.get("seeds", []), stats[key]["values"], strict=False)}
    seed = config.get("seed", 0)
    return {int(seed) if isinstance(seed, int) else 0: entry.get(key)}


def compare_values(a: Mapping[int, Any], b: Mapping[int, Any]) -> dict[str, Any]:
    """The paired t-test of ``a`` against ``b`` over their common seeds (``seeds``: those)."""
    common = [s for s in a if s in b]
    test = paired_t_test([num(a[s]) for s in common], [num(b[s]) for s in common])
    return {**test, "seeds": common}


def verdict(test: Mapping[str, Any], a: str, b: str) -> str:
    """The plain reading of a paired test of ``a`` against ``b`` (higher is better)."""
    n, p = test["n"], test.get("p")
    if n < 2 or p is None:
        what = "no common seed" if n == 0 else "one seed"
        return f"no test possible ({what}; a paired test needs at least two)"
    if p < ALPHA and test["mean_diff"] > 0:
        return f"{a} beats {b} (p = {p:.3g} < {ALPHA:g})"
    if p < ALPHA and test["mean_diff"] < 0:
        return f"{b} beats {a} (p = {p:.3g} < {ALPHA:g})"
    return f"no significant difference (p = {p:.3g} ≥ {ALPHA:g})"


def paired_tests(results: Mapping[str, Any], key: str = "average_accuracy") -> list[dict[str, Any]]:
    """Every pair of the run's methods (in their order): the paired t-test on the per-seed ``key``."""
    methods, cfg = results["methods"], results.get("config", {})
    out = []
    for a, b in itertools.combinations(methods, 2):
        test = compare_values(seed_values(methods[a], cfg, key), seed_values(methods[b], cfg, key))
        out.append({"a": a, "b": b, **test, "verdict": verdict(test, method_label(a), method_label(b))})
    return out


def paired_table(tests: Sequence[Mapping[str, Any]], what: str = "ACC") -> str:
    """Markdown: one row per test (labels ``a`` / ``b`` as given)."""
    from ewc.report.tables import md_table

    rows = [
        [
            t["a_label"] if "a_label" in t else method_label(t["a"]),
            t["b_label"] if "b_label" in t else method_label(t["b"]),
            fmt_diff(t),
            "–" if t.get("t") is None else f"{t['t']:.2f}",
            "–" if t.get("p") is None else f"{t['p']:.3g}",
            str(t["n"]),
            t["verdict"],
        ]
        for t in tests
    ]
    header = ["A", "B", f"{what}(A) − {what}(B)", "t", "p", "seeds", "reading"]
    return md_table(header, rows, ["---", "---", "---:", "---:", "---:", "---:", "---"])


def fmt_diff(test: Mapping[str, Any]) -> str:
    """A paired test's mean difference ± its 95 % half-width."""
    d, h = test.get("mean_diff"), test.get("ci95")
    if d is None:
        return "–"
    return f"{d:+.3f}" + ("" if h is None else f" ± {h:.3f}")


def seeds_csv(results: Mapping[str, Any]) -> str:
    """``seeds.csv``: one row per method and seed with that seed's scalar metrics."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seed", *METRIC_KEYS])
    for p in results.get("per_seed", []):
        for name, m in p["methods"].items():
            w.writerow([name, p["seed"], *[_cell(m.get(k)) for k in METRIC_KEYS]])
    return buf.getvalue()


def _cell(x: Any) -> str:
    v = num(x)
    return repr(v) if math.isfinite(v) else ""


def seeds_note(results: Mapping[str, Any]) -> str:
    """One sentence saying what ``a ± b`` means in this run's tables."""
    seeds = results.get("config", {}).get("seeds") or [p["seed"] for p in results.get("per_seed", [])]
    n = len(seeds)
    return (
        f"Every value is the mean over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, seeds))}: each "
        "seed its own permutations, validation split, data order and initial weights) ± the half-width of "
        f"its {100 * LEVEL:g} % confidence interval (Student's t, {n - 1} degree{'s' if n != 2 else ''} "
        "of freedom"
        + ("; none with one seed" if n < 2 else "")
        + "). The per-seed values are in results.json (`per_seed`, `stats`) and seeds.csv."
    )


__all__ = [
    "ALPHA",
    "aggregate_curves",
    "aggregate_method",
    "aggregate_seeds",
    "compare_values",
    "is_multi_seed",
    "paired_table",
    "paired_tests",
    "seed_values",
    "seeds_csv",
    "seeds_note",
    "verdict",
]
