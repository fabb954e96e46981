"""Figures, CSV and Markdown report for a continual-learning run, drawn from ``results.json`` only.

A run's ``results.json`` (see :func:`load_results` for the schema) holds everything needed to
redraw its report, so a saved run can be re-plotted or compared with others without re-training::

    from ewc.report import load_results, write_report, compare_runs
    write_report(load_results("runs/permuted"), "runs/permuted/report")
    print(compare_runs(["runs/permuted", "runs/permuted-lam1000"], out_dir="runs/compare"))

or from the shell: ``python -m ewc.report RUN_DIR [--out DIR]`` and
``python -m ewc.report --compare RUN_DIR RUN_DIR ... [--out DIR]``.

matplotlib is imported lazily (``import ewc`` stays fast) and only the object-oriented
``Figure`` API is used, so no pyplot state is touched; the Agg backend is selected when pyplot
has not been imported yet.  Every file is written to a temporary file then ``os.replace``-d, so an
interrupted report never leaves a half-written file behind.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ewc.state import atomic_write_bytes

__all__ = [
    "compare_runs",
    "figure_style",
    "load_results",
    "md_table",
    "method_color",
    "method_label",
    "new_figure",
    "save_figure",
    "write_report",
]

RESULTS_FILE = "results.json"
DPI = 130

# Colours follow the EWC paper (Kirkpatrick et al. 2017, Fig. 2): SGD blue, L2 green, EWC red.
_KNOWN_COLORS: dict[str, str] = {
    "sgd": "#1f77b4",
    "l2": "#2ca02c",
    "ewc": "#d62728",
    "online-ewc": "#ff7f0e",
    "joint": "#3a3a3a",
    "si": "#9467bd",
    "mas": "#8c564b",
    "lwf": "#e377c2",
    "dropout": "#17becf",
    "replay": "#bcbd22",
    "gem": "#7f7f7f",
    "agem": "#aec7e8",
    "ewc+replay": "#98df8a",
    "joint-cumulative": "#000000",
}
_KNOWN_LABELS: dict[str, str] = {
    "sgd": "SGD",
    "l2": "L2",
    "ewc": "EWC",
    "online-ewc": "Online EWC",
    "joint": "Joint",
    "si": "SI",
    "mas": "MAS",
    "lwf": "LwF",
    "dropout": "SGD + dropout",
    "replay": "Replay",
    "gem": "GEM",
    "agem": "A-GEM",
    "ewc+replay": "EWC + replay",
    "joint-cumulative": "Joint (cumulative)",
}
_EXTRA_COLORS = ["#9467bd", "#e377c2", "#17becf", "#bcbd22", "#8c564b", "#7f7f7f", "#aec7e8", "#98df8a"]

_METRIC_KEYS = ("average_accuracy", "bwt", "fwt", "forgetting", "lca", "seconds")
_METRIC_TITLES = {
    "average_accuracy": "ACC",
    "bwt": "BWT",
    "fwt": "FWT",
    "forgetting": "Forgetting",
    "lca": "LCA",
    "seconds": "Seconds",
}

_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _canon(name: str) -> str:
    """Normalise a method name for colour/label lookup (``Online_EWC`` -> ``online-ewc``)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    return {"onlineewc": "online-ewc", "multitask": "joint", "multi-task": "joint"}.get(key, key)


def method_label(name: str) -> str:
    """Human-readable label of a method (``online-ewc`` -> ``Online EWC``)."""
    return _KNOWN_LABELS.get(_canon(name), name)


def method_color(name: str, others: Sequence[str] = ()) -> str:
    """Colour of a method: fixed for known methods, else a distinct one by position in ``others``.

    Pass the full list of methods being drawn as ``others`` so unknown methods get distinct
    colours that stay the same in every figure of a report.
    """
    key = _canon(name)
    if key in _KNOWN_COLORS:
        return _KNOWN_COLORS[key]
    used = {_KNOWN_COLORS[_canon(m)] for m in others if _canon(m) in _KNOWN_COLORS}
    free = [c for c in _EXTRA_COLORS if c not in used] or _EXTRA_COLORS
    unknown = sorted({_canon(m) for m in others if _canon(m) not in _KNOWN_COLORS} | {key})
    return free[unknown.index(key) % len(free)]


def _num(x: Any) -> float:
    """``x`` as a float, NaN for None / non-numbers (so missing values flow through arithmetic)."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _arr(x: Any) -> np.ndarray:
    """Nested list with possible None entries -> float array with NaN."""
    if x is None:
        return np.full(0, np.nan)
    if isinstance(x, list | tuple) and x and isinstance(x[0], list | tuple):
        width = max(len(r) for r in x)
        return np.array([[_num(v) for v in r] + [math.nan] * (width - len(r)) for r in x], dtype=float)
    if isinstance(x, list | tuple):
        return np.array([_num(v) for v in x], dtype=float)
    return np.asarray(x, dtype=float)


def _fmt(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _pct(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return "n/a" if not math.isfinite(v) else f"{100 * v:.{digits}f}%"


def _pp(x: Any, digits: int = 1) -> str:
    """A difference of accuracies in percentage points."""
    v = _num(x)
    return "n/a" if not math.isfinite(v) else f"{100 * v:.{digits}f} pp"


def _md_cell(x: Any) -> str:
    if isinstance(x, str):
        s = x
    elif isinstance(x, float):
        s = "NaN" if math.isnan(x) else repr(x)
    else:
        s = json.dumps(x, default=str)
    if len(s) > 120:
        s = s[:117] + "..."
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _atomic_write_text(path: Path, text: str) -> Path:
    return _atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return _atomic_write_bytes(path, buf.getvalue())


def figure_style() -> Any:
    """A context manager with the report's matplotlib style (font sizes, no top/right spines)."""
    return _mpl().rc_context(_RC)


def _mpl() -> Any:
    """Import matplotlib lazily; select Agg unless the user already set up pyplot."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure (no pyplot state, constrained layout) for the report figures."""
    _mpl()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------


def _validate(results: Any, source: str) -> dict[str, Any]:
    """Check the parts of the schema the report relies on; raise ValueError naming ``source``."""

    def fail(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    if not isinstance(results, dict):
        raise fail(f"top level must be a JSON object, got {type(results).__name__}")
    for key, typ in (("config", dict), ("tasks", list), ("methods", dict)):
        if key not in results:
            raise fail(f"missing key {key!r}")
        if not isinstance(results[key], typ):
            raise fail(f"key {key!r} must be a {'object' if typ is dict else 'list'}")
    T = len(results["tasks"])
    if T == 0:
        raise fail("'tasks' is empty; need at least one task")
    for i, t in enumerate(results["tasks"]):
        if not isinstance(t, dict):
            raise fail(f"tasks[{i}] must be an object")
    if not results["methods"]:
        raise fail("'methods' is empty; need at least one method")
    for name, m in results["methods"].items():
        where = f"methods[{name!r}]"
        if not isinstance(m, dict):
            raise fail(f"{where} must be an object")
        if "accuracy_matrix" not in m:
            raise fail(f"{where}: missing key 'accuracy_matrix'")
        R = m["accuracy_matrix"]
        if not isinstance(R, list) or len(R) != T or any(not isinstance(r, list) or len(r) != T for r in R):
            raise fail(f"{where}['accuracy_matrix'] must be a {T} x {T} list of lists (one row per task)")
        curves = m.get("curves")
        if curves is None:
            continue
        if not isinstance(curves, dict):
            raise fail(f"{where}['curves'] must be an object")
        if "accuracy" in curves or "steps" in curves:
            for key in ("steps", "accuracy"):
                if not isinstance(curves.get(key), list):
                    raise fail(f"{where}['curves']: missing key {key!r}")
            if len(curves["steps"]) != len(curves["accuracy"]):
                raise fail(
                    f"{where}['curves']: 'steps' has {len(curves['steps'])} points but 'accuracy' has "
                    f"{len(curves['accuracy'])}"
                )
            for p, row in enumerate(curves["accuracy"]):
                if not isinstance(row, list) or len(row) != T:
                    raise fail(f"{where}['curves']['accuracy'][{p}] must list the accuracy of all {T} tasks")
        ts = curves.get("task_starts")
        if ts is not None and (not isinstance(ts, list) or len(ts) != T):
            raise fail(f"{where}['curves']['task_starts'] must have one step per task ({T})")
    return results


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``run_dir/results.json`` (``run_dir`` may also be the JSON file itself).

    Raises FileNotFoundError naming the path when it is missing and ValueError naming the file
    and the offending key when it is malformed.
    """
    p = Path(run_dir)
    path = p if p.suffix == ".json" or p.is_file() else p / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return _validate(results, str(path))


# ----------------------------------------------------------------------------------------------
# Tabular outputs
# ----------------------------------------------------------------------------------------------


def _final_accuracies(m: Mapping[str, Any], T: int) -> np.ndarray:
    fa = _arr(m.get("final_accuracies"))
    if fa.shape != (T,):
        fa = _arr(m["accuracy_matrix"])[-1]
    return fa


def _csv_value(x: Any) -> str:
    v = _num(x)
    return "" if not math.isfinite(v) else repr(v)


def _metrics_csv(results: Mapping[str, Any]) -> str:
    T = len(results["tasks"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *_METRIC_KEYS, *[f"final_acc_{j}" for j in range(T)]])
    for name, m in results["methods"].items():
        fa = _final_accuracies(m, T)
        w.writerow([name, *[_csv_value(m.get(k)) for k in _METRIC_KEYS], *[_csv_value(v) for v in fa]])
    return buf.getvalue()


def _metrics_table(results: Mapping[str, Any]) -> str:
    methods = results["methods"]
    best_acc = max(
        (_num(m.get("average_accuracy")) for m in methods.values()), default=math.nan, key=_nan_low
    )
    rows = []
    for name, m in methods.items():
        acc = _fmt(m.get("average_accuracy"))
        if math.isfinite(best_acc) and _num(m.get("average_accuracy")) == best_acc:
            acc = f"**{acc}**"
        rows.append(
            [
                method_label(name),
                acc,
                _fmt(m.get("bwt")),
                _fmt(m.get("fwt")),
                _fmt(m.get("forgetting")),
                _fmt(m.get("lca")),
                _fmt(m.get("seconds"), 1),
            ]
        )
    return md_table(["Method", "ACC ↑", "BWT ↑", "FWT ↑", "Forgetting ↓", "LCA ↑", "Seconds"], rows)


def _nan_low(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _final_table(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    T = len(tasks)
    header = ["Method", *[str(t.get("name", f"task {j}")) for j, t in enumerate(tasks)]]
    rows = [
        [method_label(n), *[_fmt(v) for v in _final_accuracies(m, T)]] for n, m in results["methods"].items()
    ]
    return md_table(header, rows)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_table(config: Mapping[str, Any]) -> str:
    flat = _flatten(config)
    if not flat:
        return "_(empty)_"
    return md_table(["Key", "Value"], [[f"`{k}`", _md_cell(v)] for k, v in flat.items()], ["---", "---"])


def _tasks_table(tasks: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for j, t in enumerate(tasks):
        classes = t.get("classes")
        if isinstance(classes, list) and len(classes) > 12:
            cls = f"{len(classes)} classes"
        else:
            cls = _md_cell(classes) if classes is not None else "–"
        rows.append(
            [str(j), _md_cell(str(t.get("name", f"task {j}"))), cls]
            + [_md_cell(t.get(k, "–")) for k in ("n_train", "n_val", "n_test")]
        )
    return md_table(
        ["#", "Name", "Classes", "Train", "Val", "Test"], rows, ["---:", "---", "---", *["---:"] * 3]
    )


# ----------------------------------------------------------------------------------------------
# Auto-generated reading of the numbers
# ----------------------------------------------------------------------------------------------


def _find(methods: Mapping[str, Any], canon: str) -> str | None:
    return next((n for n in methods if _canon(n) == canon), None)


def _reading(results: Mapping[str, Any]) -> list[str]:
    """A few plain-language bullet points about the run."""
    methods = results["methods"]
    tasks = results["tasks"]
    T = len(tasks)
    acc = {n: _num(m.get("average_accuracy")) for n, m in methods.items()}
    out: list[str] = []
    joint = _find(methods, "joint")
    sgd = _find(methods, "sgd")

    ranked = sorted((n for n in acc if math.isfinite(acc[n])), key=lambda n: -acc[n])
    sequential = [n for n in ranked if n != joint]
    if sequential:
        best = sequential[0]
        s = (
            f"**{method_label(best)}** has the best average accuracy (ACC) of the sequential methods: "
            f"{_pct(acc[best])}"
        )
        if len(sequential) > 1:
            s += " (then " + ", ".join(f"{method_label(n)} {_pct(acc[n])}" for n in sequential[1:]) + ")"
        out.append(s + ".")
    if joint and math.isfinite(acc[joint]):
        out.append(f"Joint training (the non-continual upper bound) reaches {_pct(acc[joint])}.")
    if T == 1:
        out.append("With a single task there is nothing to forget: BWT and forgetting are 0 by definition.")
        return out

    if sgd:
        m = methods[sgd]
        R = _arr(m["accuracy_matrix"])
        s = f"Plain SGD forgets {_pp(m.get('forgetting'))} on average (BWT {_fmt(m.get('bwt'))})"
        a0, aT = R[0, 0], R[-1, 0]
        if math.isfinite(a0) and math.isfinite(aT):
            name0 = tasks[0].get("name", "task 0")
            s += (
                f"; its accuracy on the first task ({name0}) goes from {_pct(a0)} right after training it "
                f"to {_pct(aT)} at the end"
            )
        out.append(s + ".")

    if sgd and joint:
        gap = acc[joint] - acc[sgd]
        for n in methods:
            if n in (sgd, joint) or not math.isfinite(acc[n]):
                continue
            if math.isfinite(gap) and gap > 1e-9:
                frac = (acc[n] - acc[sgd]) / gap
                out.append(
                    f"{method_label(n)} closes {100 * frac:.0f}% of the SGD → joint gap in ACC "
                    f"(({_pct(acc[n])} − {_pct(acc[sgd])}) / ({_pct(acc[joint])} − {_pct(acc[sgd])}))."
                )
            else:
                out.append(
                    f"Joint does not beat SGD here ({_pct(acc[joint])} vs {_pct(acc[sgd])}), "
                    f"so the fraction of the SGD → joint gap closed by {method_label(n)} is undefined."
                )
                break

    ewc = _find(methods, "ewc") or _find(methods, "online-ewc")
    if sgd and ewc:
        f_s, f_e = _num(methods[sgd].get("forgetting")), _num(methods[ewc].get("forgetting"))
        if math.isfinite(f_s) and math.isfinite(f_e) and f_s > 1e-9:
            out.append(
                f"{method_label(ewc)} forgets {_pp(f_e)} vs {_pp(f_s)} for SGD "
                f"({100 * (1 - f_e / f_s):.0f}% less forgetting)."
            )
        t_s, t_e = _num(methods[sgd].get("seconds")), _num(methods[ewc].get("seconds"))
        if math.isfinite(t_s) and math.isfinite(t_e) and t_s > 0:
            out.append(
                f"{method_label(ewc)} took {t_e / t_s:.2f}× the wall time of SGD "
                f"({t_e:.1f} s vs {t_s:.1f} s)."
            )
    return out


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _curve_series(m: Mapping[str, Any], T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(steps [P], accuracy [P, T], task_starts [T] or None) of a method, or None without curves."""
    c = m.get("curves")
    if not isinstance(c, Mapping):
        return None
    starts = _arr(c.get("task_starts")) if c.get("task_starts") is not None else None
    if starts is not None and starts.shape != (T,):
        starts = None
    if c.get("accuracy") and c.get("steps"):
        steps = _arr(c["steps"])
        acc = _arr(c["accuracy"]).reshape(len(steps), T)
        return steps, acc, starts
    per_task = c.get("per_task")
    if isinstance(per_task, list) and len(per_task) == T and starts is not None:
        # Rebuild from the per-task curves: task k's points evenly cover [start_k, start_{k+1}]; the
        # last task's window is extrapolated from the point spacing of the one before it.
        xs, rows = [], []
        n_prev = len(per_task[-2]) if T > 1 else 0
        spacing = (starts[-1] - starts[-2]) / (n_prev - 1) if T > 1 and n_prev > 1 else 1.0
        last = starts[-1] + spacing * max(len(per_task[-1]) - 1, 1)
        ends = np.append(starts[1:], last if np.isfinite(last) and last > starts[-1] else starts[-1] + 1.0)
        for k, pts in enumerate(per_task):
            v = _arr(pts)
            x = np.linspace(starts[k], ends[k], v.size) if v.size > 1 else np.full(v.size, ends[k])
            for xi, vi in zip(x, v, strict=True):
                row = np.full(T, np.nan)
                row[k] = vi
                xs.append(xi)
                rows.append(row)
        if xs:
            return np.array(xs), np.array(rows), starts
    return None


def _remap(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of steps so that task boundaries ``src`` land on ``dst``."""
    if src.shape != dst.shape or np.any(~np.isfinite(src)) or np.any(np.diff(src) <= 0):
        return x
    return np.interp(x, src, dst, left=np.nan, right=np.nan)


def _plot_curves(results: Mapping[str, Any], path: Path) -> Path:
    """Fig. 2A analogue: one panel per task, its test accuracy vs training step for every method."""
    mpl = _mpl()
    tasks = results["tasks"]
    T = len(tasks)
    names = list(results["methods"])
    series = {n: _curve_series(results["methods"][n], T) for n in names}

    # Reference time axis: task boundaries of the first method that has them (non-joint preferred).
    with_starts = [n for n in names if series[n] is not None and series[n][2] is not None]
    with_starts.sort(key=lambda n: _canon(n) == "joint")
    ref = with_starts[0] if with_starts else None
    if ref is not None:
        r_steps, _, r_starts = series[ref]
        r_end = float(np.nanmax(r_steps))
        bounds = np.append(r_starts, max(r_end, r_starts[-1]))
        xlabel = "Training step (mini-batches)"
    else:
        bounds = np.arange(T + 1, dtype=float)
        xlabel = "Tasks trained"
    rescaled: list[str] = []

    def xy(n: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = results["methods"][n]
        s = series[n]
        if s is None or ref is None:
            # No curve: one point per task from the accuracy matrix, at the end of each task, plus the
            # accuracy just before training task k (row k-1, or the random-init baseline for k = 0).
            R = _arr(m["accuracy_matrix"])
            base = _arr(m.get("baseline_accuracy"))
            before = R[k - 1, k] if k > 0 else (base[0] if base.shape == (T,) else math.nan)
            return bounds[k:], np.concatenate([[before], R[k:, k]])
        steps, acc, starts = s
        x = steps
        if starts is not None and n != ref and not np.allclose(starts, r_starts):
            end = max(float(np.nanmax(steps)), starts[-1])
            x = _remap(steps, np.append(starts, end), bounds)
            if method_label(n) not in rescaled:
                rescaled.append(method_label(n))
        t0 = starts[k] if starts is not None else bounds[k]
        keep = steps >= t0
        return x[keep], acc[keep, k]

    panel_h = 1.75 if T <= 4 else max(0.7, 13.0 / T) if T > 8 else 1.45
    height = min(1.4 + panel_h * T, 17.0)
    with mpl.rc_context(_RC):
        fig = new_figure((9.5, height))
        axes = fig.subplots(T, 1, sharex=True, sharey=True, squeeze=False)[:, 0]
        lo = 1.0
        for k, ax in enumerate(axes):
            ax.axvspan(bounds[k], bounds[k + 1], color="#fff1c9", zorder=0, lw=0)
            for b in bounds[1:-1]:
                ax.axvline(
                    b,
                    color="#888888" if T <= 15 else "#bbbbbb",
                    lw=0.8 if T <= 15 else 0.5,
                    ls="--",
                    zorder=1,
                )
            for n in names:
                x, y = xy(n, k)
                ok = np.isfinite(x) & np.isfinite(y)
                if ok.any():
                    lo = min(lo, float(np.min(y[ok])))
                    joint = _canon(n) == "joint"
                    sparse = series[n] is None or ref is None or len(series[n][0]) <= 3 * T + 1
                    ax.plot(
                        x[ok],
                        y[ok],
                        color=method_color(n, names),
                        lw=1.6,
                        ls="--" if joint else "-",
                        marker="o" if sparse else None,
                        ms=3,
                        label=method_label(n),
                        zorder=3 if not joint else 2,
                        clip_on=not sparse,
                    )
            task_name = str(tasks[k].get("name", f"task {k}"))
            ax.set_ylabel(
                task_name if T > 1 else f"Test accuracy on {task_name}",
                rotation=0 if T > 6 else 90,
                ha="right" if T > 6 else "center",
                va="center",
                fontsize=9 if T <= 10 else 7,
            )
            ax.grid(axis="y", color="#e0e0e0", lw=0.6, zorder=0)
            ax.margins(x=0)
            if T > 8:
                ax.tick_params(axis="y", labelsize=7)
        lo = max(0.0, math.floor((lo - 0.02) * 10) / 10) if lo < 1.0 else 0.0
        axes[0].set_ylim(lo, 1.02)
        axes[0].set_xlim(bounds[0], bounds[-1])
        if ref is None:
            axes[0].set_xticks(range(T + 1))
        if T > 6:
            axes[0].set_yticks([lo, (lo + 1) / 2, 1.0])
        axes[-1].set_xlabel(
            xlabel + (f"; {', '.join(rescaled)} rescaled to the same task boundaries" if rescaled else "")
        )
        if T > 1:
            fig.supylabel("Test accuracy" if T <= 6 else "Test accuracy per task", fontsize=10)
        if T <= 12:
            top = axes[0].secondary_xaxis("top")
            top.set_xticks((bounds[:-1] + bounds[1:]) / 2)
            top.set_xticklabels([f"train {j}" for j in range(T)], fontsize=8, color="#7a5c00")
            top.tick_params(length=0)
        handles, labels = [], []
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="#fff1c9", edgecolor="none"))
        labels.append("this task being trained")
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
        fig.suptitle(_title(results, "Accuracy on each task during sequential training"))
        return save_figure(fig, path)


def _title(results: Mapping[str, Any], what: str) -> str:
    cfg = results.get("config", {})
    bits = [str(cfg[k]) for k in ("dataset", "sequence") if cfg.get(k) is not None]
    T = len(results["tasks"])
    bits.append(f"{T} task{'s' if T != 1 else ''}")
    return f"{what} ({', '.join(bits)})"


def _plot_matrix(results: Mapping[str, Any], path: Path) -> Path:
    """One annotated accuracy-matrix heatmap per method, shared 0-1 colour scale."""
    mpl = _mpl()
    T = len(results["tasks"])
    names = list(results["methods"])
    n = len(names)
    panel = min(max(0.38 * T + 1.2, 3.0), 7.5, max(16.5 / min(n, 3), 3.0))
    ncols = max(1, min(n, int(16.5 // panel)))
    nrows = math.ceil(n / ncols)
    font = 10 if T <= 4 else 8 if T <= 7 else 7 if T <= 10 else 6 if T <= 14 else 0
    with mpl.rc_context(_RC):
        fig = new_figure((panel * ncols + 1.0, min(panel * nrows + 0.9, 18.0)))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        cmap = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
        im = None
        for idx, ax in enumerate(axes.flat):
            if idx >= n:
                ax.set_axis_off()
                continue
            name = names[idx]
            m = results["methods"][name]
            R = _arr(m["accuracy_matrix"])
            im = ax.imshow(np.ma.masked_invalid(R), cmap=cmap, vmin=0.0, vmax=1.0, aspect="equal")
            if font:
                for i in range(T):
                    for j in range(T):
                        v = R[i, j]
                        txt = "–" if not math.isfinite(v) else f"{v:.2f}"
                        color = "black" if (math.isfinite(v) and v > 0.6) else "white"
                        if not math.isfinite(v):
                            color = "#555555"
                        ax.text(
                            j,
                            i,
                            txt,
                            ha="center",
                            va="center",
                            fontsize=font,
                            color=color,
                            alpha=1.0 if j <= i else 0.75,
                        )
            ax.set_title(
                f"{method_label(name)}  (ACC {_fmt(m.get('average_accuracy'))}, BWT {_fmt(m.get('bwt'))})",
                color=method_color(name, names),
                fontweight="bold",
                fontsize=10,
            )
            step = max(1, math.ceil(T / 12))
            ticks = list(range(0, T, step))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.set_xlabel("Evaluated on task j")
            ax.set_ylabel("Trained up to task i")
            ax.spines[:].set_visible(False)
            ax.set_xticks(np.arange(T + 1) - 0.5, minor=True)
            ax.set_yticks(np.arange(T + 1) - 0.5, minor=True)
            ax.grid(which="minor", color="white", lw=1.0 if T <= 20 else 0.3)
            ax.tick_params(which="minor", length=0)
        if im is not None:
            cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.9 if nrows == 1 else 0.6, pad=0.02)
            cb.set_label("Test accuracy")
        fig.suptitle(_title(results, "Accuracy matrix R[i, j]"))
        return save_figure(fig, path)


def _bar_labels(ax: Any, bars: Any, values: Sequence[float], digits: int, fontsize: float = 8) -> None:
    for b, v in zip(bars, values, strict=True):
        if not math.isfinite(v):
            ax.annotate(
                "n/a",
                (b.get_x() + b.get_width() / 2, 0),
                ha="center",
                va="bottom",
                fontsize=fontsize,
                color="#777777",
                xytext=(0, 2),
                textcoords="offset points",
            )
            continue
        ax.annotate(
            f"{v:.{digits}f}",
            (b.get_x() + b.get_width() / 2, v),
            ha="center",
            va="bottom" if v >= 0 else "top",
            fontsize=fontsize,
            xytext=(0, 2 if v >= 0 else -2),
            textcoords="offset points",
        )


def _plot_summary(results: Mapping[str, Any], path: Path) -> Path:
    """Bars per method (method colours) for ACC, forgetting, BWT, and FWT / time when present."""
    mpl = _mpl()
    methods = results["methods"]
    names = list(methods)
    vals = {k: np.array([_num(methods[n].get(k)) for n in names]) for k in _METRIC_KEYS}
    panels = [("average_accuracy", "ACC (higher is better)")]
    if len(results["tasks"]) > 1:  # with one task both are 0 by definition
        panels += [("forgetting", "Forgetting (lower is better)"), ("bwt", "BWT (higher is better)")]
    if np.isfinite(vals["fwt"]).any():
        panels.append(("fwt", "FWT (higher is better)"))
    if np.isfinite(vals["seconds"]).any():
        panels.append(("seconds", "Wall time (s)"))
    width = min(max(2.6, 0.45 * len(names) + 1.0), 17.0 / len(panels))
    with mpl.rc_context(_RC):
        fig = new_figure((width * len(panels) + 0.4, 3.8))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        x = np.arange(len(names))
        colors = [method_color(n, names) for n in names]
        for ax, (key, title) in zip(axes, panels, strict=True):
            v = vals[key]
            bars = ax.bar(x, np.nan_to_num(v, nan=0.0), color=colors, width=0.7, edgecolor="white")
            _bar_labels(ax, bars, list(v), 1 if key == "seconds" else 3)
            fin = v[np.isfinite(v)]
            hi = float(fin.max()) if fin.size else 1.0
            lo_v = float(fin.min()) if fin.size else 0.0
            if key == "average_accuracy":
                ax.set_ylim(0, 1.1)
            elif key in ("bwt", "fwt"):
                span = max(abs(lo_v), abs(hi), 0.02) * 1.35
                if lo_v < 0 or hi > 0:
                    ax.set_ylim(-span if lo_v < 0 else -0.1 * span, span if hi > 0 else 0.1 * span)
                else:
                    ax.set_ylim(-span, span)
            else:
                ax.set_ylim(min(0.0, lo_v * 1.3), max(hi * 1.2, 0.02 if key != "seconds" else 1.0))
            ax.axhline(0, color="#444444", lw=0.8)
            ax.set_title(title)
            ax.set_xticks(x)
            ax.set_xticklabels(
                [method_label(n) for n in names],
                rotation=30 if len(names) > 3 else 0,
                ha="right" if len(names) > 3 else "center",
            )
            ax.grid(axis="y", color="#e6e6e6", lw=0.6)
            ax.set_axisbelow(True)
        fig.suptitle(_title(results, "Summary"))
        return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``metrics.csv``, ``curves.png``, ``matrix.png``, ``summary.png`` and ``report.md``.

    ``results`` is the parsed ``results.json`` of a run (see :func:`load_results`).  Returns the
    written paths under the keys ``metrics``, ``curves``, ``matrix``, ``summary`` and ``report``.
    """
    _validate(results, "results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": _atomic_write_text(out / "metrics.csv", _metrics_csv(results)),
        "curves": _plot_curves(results, out / "curves.png"),
        "matrix": _plot_matrix(results, out / "matrix.png"),
        "summary": _plot_summary(results, out / "summary.png"),
    }
    paths["report"] = _atomic_write_text(out / "report.md", _report_md(results))
    return paths


def _report_md(results: Mapping[str, Any]) -> str:
    cfg = results["config"]
    T = len(results["tasks"])
    parts = [f"# {_title(results, 'Continual-learning report')}", ""]
    reading = _reading(results)
    if reading:
        parts += ["## Summary", "", *[f"- {r}" for r in reading], ""]
    parts += [
        "## Metrics",
        "",
        "ACC: mean final accuracy over tasks; BWT: mean change on earlier tasks after training the last one "
        "(negative = forgetting); FWT: accuracy on a task before training it, relative to a random init; "
        "Forgetting: mean drop from the best earlier accuracy; LCA: learning-curve area (fast learning). "
        "Accuracies are fractions in [0, 1].",
        "",
        _metrics_table(results),
        "",
        "## Learning curves",
        "",
        "Test accuracy of each task (one panel per task) over the whole training sequence; "
        "the shaded band is the period in which that task is trained, dashed lines mark task switches.",
        "",
        "![Accuracy on each task during training](curves.png)",
        "",
        "## Accuracy matrix",
        "",
        "Row i: after training tasks 0..i; column j: evaluated on task j "
        "(above the diagonal: not trained yet).",
        "",
        "![Accuracy matrices](matrix.png)",
        "",
        "## Summary figure",
        "",
        "![ACC, forgetting and BWT per method](summary.png)",
        "",
        "## Final accuracy per task",
        "",
        _final_table(results),
        "",
        "## Configuration",
        "",
        _config_table(cfg),
        "",
        f"## Tasks ({T})",
        "",
        _tasks_table(results["tasks"]),
        "",
    ]
    return "\n".join(parts)


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, disambiguated with their parents when two runs share a name."""
    dirs = [p.parent if p.suffix == ".json" else p for p in paths]
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}/{d.name}" if d.parent.name else d.name for d in dirs]
    seen: dict[str, int] = {}
    out = []
    for nm in names:
        seen[nm] = seen.get(nm, 0) + 1
        out.append(nm if seen[nm] == 1 else f"{nm} ({seen[nm]})")
    return out


def compare_runs(
    run_dirs: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str] | None = None
) -> str:
    """Markdown comparison of the methods across saved runs, plus the config keys that differ.

    With ``out_dir``, also writes ``comparison.md`` and ``comparison.png`` (ACC per method per run).
    """
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    runs = [load_results(p) for p in paths]
    names = _run_names(paths)
    methods: list[str] = []
    for r in runs:
        methods += [m for m in r["methods"] if m not in methods]

    rows = []
    for m in methods:
        accs = [_num(r["methods"][m].get("average_accuracy")) for r in runs if m in r["methods"]]
        best = max(accs, key=_nan_low, default=math.nan)
        for name, r in zip(names, runs, strict=True):
            if m not in r["methods"]:
                continue
            mm = r["methods"][m]
            acc = _fmt(mm.get("average_accuracy"))
            if len(accs) > 1 and math.isfinite(best) and _num(mm.get("average_accuracy")) == best:
                acc = f"**{acc}**"
            rows.append(
                [
                    method_label(m),
                    f"`{name}`",
                    acc,
                    *[_fmt(mm.get(k)) for k in ("bwt", "fwt", "forgetting", "lca")],
                    _fmt(mm.get("seconds"), 1),
                ]
            )
    table = md_table(
        ["Method", "Run", "ACC ↑", "BWT ↑", "FWT ↑", "Forgetting ↓", "LCA ↑", "Seconds"],
        rows,
        ["---", "---", *["---:"] * 6],
    )

    flats = [_flatten(r["config"]) for r in runs]
    if not any("tasks" in f for f in flats):
        flats = [{**f, "tasks": len(r["tasks"])} for f, r in zip(flats, runs, strict=True)]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    missing = object()

    def key_of(v: Any) -> str:
        return "<missing>" if v is missing else json.dumps(v, sort_keys=True, default=str)

    diff = [k for k in keys if len({key_of(f.get(k, missing)) for f in flats}) > 1]
    same = [k for k in keys if k not in diff]
    parts = [
        f"# Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}",
        "",
        table,
        "",
        "## Config differences",
        "",
    ]
    if diff:
        parts.append(
            md_table(
                ["Key", *[f"`{n}`" for n in names]],
                [
                    [f"`{k}`", *["–" if f.get(k, missing) is missing else _md_cell(f[k]) for f in flats]]
                    for k in diff
                ],
                ["---", *["---"] * len(names)],
            )
        )
    else:
        parts.append("_No differences: all runs share the same config._")
    if same:
        shared = ", ".join(f"`{k}`={_md_cell(flats[0][k])}" for k in same)
        parts += ["", f"Shared: {shared}"]
    parts.append("")
    text = "\n".join(parts)

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _plot_comparison(runs, names, methods, out / "comparison.png")
        _atomic_write_text(out / "comparison.md", text + "\n![ACC per method per run](comparison.png)\n")
    return text


def _plot_comparison(
    runs: Sequence[Mapping[str, Any]], names: Sequence[str], methods: Sequence[str], path: Path
) -> Path:
    """Grouped bars: ACC per method (groups) per run (bars)."""
    mpl = _mpl()
    nr, nm = len(runs), len(methods)
    cmap = mpl.colormaps["cividis"]
    run_colors = [cmap(0.15 + 0.7 * i / max(nr - 1, 1)) for i in range(nr)]
    bw = 0.8 / nr
    with mpl.rc_context(_RC):
        fig = new_figure((min(max(4.5, 0.9 + nm * (0.35 * nr + 0.5)), 16.0), 4.2))
        ax = fig.subplots()
        x = np.arange(nm)
        for i, (name, r) in enumerate(zip(names, runs, strict=True)):
            v = np.array(
                [
                    _num(r["methods"][m].get("average_accuracy")) if m in r["methods"] else math.nan
                    for m in methods
                ]
            )
            bars = ax.bar(
                x - 0.4 + bw * (i + 0.5), np.nan_to_num(v), bw * 0.92, color=run_colors[i], label=name
            )
            if nr * nm <= 30:
                _bar_labels(ax, bars, list(v), 2, fontsize=7 if nr > 2 else 8)
        ax.set_xticks(x)
        ax.set_xticklabels([method_label(m) for m in methods])
        for t, m in zip(ax.get_xticklabels(), methods, strict=True):
            t.set_color(method_color(m, methods))
            t.set_fontweight("bold")
        ax.set_ylim(0, 1.12)
        ax.set_ylabel("Average accuracy (ACC)")
        ax.grid(axis="y", color="#e6e6e6", lw=0.6)
        ax.set_axisbelow(True)
        fig.legend(loc="outside right upper", frameon=False, title="Run")
        fig.suptitle("ACC per method across runs")
        return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ewc.report RUN_DIR [--out DIR]`` or ``--compare RUN_DIR ... [--out DIR]``."""
    p = argparse.ArgumentParser(prog="python -m ewc.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (holding results.json)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report, or print only with --compare)")
    p.add_argument("--compare", action="store_true", help="compare several runs instead of reporting one")
    a = p.parse_args(argv)
    if a.compare or len(a.runs) > 1:
        print(compare_runs(a.runs, a.out))
        return 0
    run = Path(a.runs[0])
    out = Path(a.out) if a.out else (run.parent if run.suffix == ".json" else run) / "report"
    for key, path in write_report(load_results(run), out).items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
