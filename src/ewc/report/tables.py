"""The text outputs of a report: ``metrics.csv``, the Markdown tables and the ``report.md`` page,
including a few plain-language sentences that read the numbers for the user.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ewc.report.search import search_section
from ewc.report.seeds import is_multi_seed, paired_table, paired_tests, seeds_note
from ewc.report.style import canonical_name, method_label
from ewc.report.values import METRIC_KEYS, arr, fmt, fmt_ci, fmt_stat, nan_low, num, pct, pp, run_title, stat

# ----------------------------------------------------------------------------------------------
# Markdown helpers
# ----------------------------------------------------------------------------------------------


def md_cell(x: Any) -> str:
    """A value as one Markdown table cell: JSON for non-strings, cut to 120 characters, pipes escaped."""
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
    """A Markdown table; by default the first column is left-aligned and the others right-aligned."""
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Tabular outputs
# ----------------------------------------------------------------------------------------------


def _final_accuracies(m: Mapping[str, Any], T: int) -> np.ndarray:
    fa = arr(m.get("final_accuracies"))
    if fa.shape != (T,):
        fa = arr(m["accuracy_matrix"])[-1]
    return fa


def _csv_value(x: Any) -> str:
    v = num(x)
    return "" if not math.isfinite(v) else repr(v)


def metrics_csv(results: Mapping[str, Any]) -> str:
    """``metrics.csv``: one row per method, the scalar metrics then the final accuracy of each task
    (a ``--seeds`` run: their means, then ``n`` and each scalar metric's 95 % half-width)."""
    T = len(results["tasks"])
    seeds = is_multi_seed(results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = ["n", *[f"{k}_ci95" for k in METRIC_KEYS]] if seeds else []
    w.writerow(["method", *METRIC_KEYS, *[f"final_acc_{j}" for j in range(T)], *extra])
    for name, m in results["methods"].items():
        fa = _final_accuracies(m, T)
        row = [name, *[_csv_value(m.get(k)) for k in METRIC_KEYS], *[_csv_value(v) for v in fa]]
        if seeds:
            row += [str(m.get("n", "")), *[_csv_value(stat(m, k)[1]) for k in METRIC_KEYS]]
        w.writerow(row)
    return buf.getvalue()


def _metrics_table(results: Mapping[str, Any]) -> str:
    methods = results["methods"]
    best_acc = max((num(m.get("average_accuracy")) for m in methods.values()), default=math.nan, key=nan_low)
    rows = []
    for name, m in methods.items():
        acc = fmt_stat(m, "average_accuracy")
        if math.isfinite(best_acc) and num(m.get("average_accuracy")) == best_acc:
            acc = f"**{acc}**"
        rest = [fmt_stat(m, k) for k in ("bwt", "fwt", "forgetting", "lca")]
        rows.append([method_label(name), acc, *rest, fmt_stat(m, "seconds", 1)])
    return md_table(["Method", "ACC ↑", "BWT ↑", "FWT ↑", "Forgetting ↓", "LCA ↑", "Seconds"], rows)


def _final_table(results: Mapping[str, Any]) -> str:
    tasks = results["tasks"]
    T = len(tasks)
    header = ["Method", *[str(t.get("name", f"task {j}")) for j, t in enumerate(tasks)]]
    rows = []
    for n, m in results["methods"].items():
        half = arr((m.get("stats") or {}).get("final_accuracies", {}).get("ci95"))
        half = half if half.shape == (T,) else np.full(T, np.nan)
        rows.append(
            [method_label(n), *[fmt_ci(v, h) for v, h in zip(_final_accuracies(m, T), half, strict=True)]]
        )
    return md_table(header, rows)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as one level with dotted keys (``fisher.mode``); empty mappings stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _config_table(config: Mapping[str, Any]) -> str:
    flat = flatten(config)
    if not flat:
        return "_(empty)_"
    return md_table(["Key", "Value"], [[f"`{k}`", md_cell(v)] for k, v in flat.items()], ["---", "---"])


def _tasks_table(tasks: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for j, t in enumerate(tasks):
        classes = t.get("classes")
        if isinstance(classes, list) and len(classes) > 12:
            cls = f"{len(classes)} classes"
        else:
            cls = md_cell(classes) if classes is not None else "–"
        rows.append(
            [str(j), md_cell(str(t.get("name", f"task {j}"))), cls]
            + [md_cell(t.get(k, "–")) for k in ("n_train", "n_val", "n_test")]
        )
    return md_table(
        ["#", "Name", "Classes", "Train", "Val", "Test"], rows, ["---:", "---", "---", *["---:"] * 3]
    )


# ----------------------------------------------------------------------------------------------
# Auto-generated reading of the numbers
# ----------------------------------------------------------------------------------------------


def _find(methods: Mapping[str, Any], canon: str) -> str | None:
    return next((n for n in methods if canonical_name(n) == canon), None)


def _reading(results: Mapping[str, Any]) -> list[str]:
    """A few plain-language bullet points about the run."""
    methods = results["methods"]
    tasks = results["tasks"]
    T = len(tasks)
    acc = {n: num(m.get("average_accuracy")) for n, m in methods.items()}
    out: list[str] = []
    joint = _find(methods, "joint")
    sgd = _find(methods, "sgd")

    if is_multi_seed(results):
        n_seeds = len(results["per_seed"])
        out.append(f"Means over {n_seeds} seed{'s' if n_seeds != 1 else ''}; see the paired tests below.")
    ranked = sorted((n for n in acc if math.isfinite(acc[n])), key=lambda n: -acc[n])
    sequential = [n for n in ranked if n != joint]
    if sequential:
        best = sequential[0]
        s = (
            f"**{method_label(best)}** has the best average accuracy (ACC) of the sequential methods: "
            f"{pct(acc[best])}"
        )
        if len(sequential) > 1:
            s += " (then " + ", ".join(f"{method_label(n)} {pct(acc[n])}" for n in sequential[1:]) + ")"
        out.append(s + ".")
    if joint and math.isfinite(acc[joint]):
        out.append(f"Joint training (the non-continual upper bound) reaches {pct(acc[joint])}.")
    if T == 1:
        out.append("With a single task there is nothing to forget: BWT and forgetting are 0 by definition.")
        return out

    if sgd:
        m = methods[sgd]
        R = arr(m["accuracy_matrix"])
        s = f"Plain SGD forgets {pp(m.get('forgetting'))} on average (BWT {fmt(m.get('bwt'))})"
        a0, aT = R[0, 0], R[-1, 0]
        if math.isfinite(a0) and math.isfinite(aT):
            name0 = tasks[0].get("name", "task 0")
            s += (
                f"; its accuracy on the first task ({name0}) goes from {pct(a0)} right after training it "
                f"to {pct(aT)} at the end"
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
                    f"(({pct(acc[n])} − {pct(acc[sgd])}) / ({pct(acc[joint])} − {pct(acc[sgd])}))."
                )
            else:
                out.append(
                    f"Joint does not beat SGD here ({pct(acc[joint])} vs {pct(acc[sgd])}), "
                    f"so the fraction of the SGD → joint gap closed by {method_label(n)} is undefined."
                )
                break

    ewc = _find(methods, "ewc") or _find(methods, "online-ewc")
    if sgd and ewc:
        f_s, f_e = num(methods[sgd].get("forgetting")), num(methods[ewc].get("forgetting"))
        if math.isfinite(f_s) and math.isfinite(f_e) and f_s > 1e-9:
            out.append(
                f"{method_label(ewc)} forgets {pp(f_e)} vs {pp(f_s)} for SGD "
                f"({100 * (1 - f_e / f_s):.0f}% less forgetting)."
            )
        t_s, t_e = num(methods[sgd].get("seconds")), num(methods[ewc].get("seconds"))
        if math.isfinite(t_s) and math.isfinite(t_e) and t_s > 0:
            out.append(
                f"{method_label(ewc)} took {t_e / t_s:.2f}× the wall time of SGD "
                f"({t_e:.1f} s vs {t_s:.1f} s)."
            )
    return out


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------


def _paired_section(results: Mapping[str, Any]) -> list[str]:
    """The paired t-tests of every pair of methods on their per-seed ACC."""
    return [
        "## Paired tests over seeds",
        "",
        "Each pair of methods compared by a paired t-test on their per-seed ACC (pair k: the same seed, "
        "so the same data, permutations and initial weights): the mean difference ± its 95 % half-width, "
        't, the two-sided p-value, and the reading at the 5 % level ("beats" only when significant).',
        "",
        paired_table(paired_tests(results)),
        "",
    ]


def report_md(results: Mapping[str, Any]) -> str:
    """The ``report.md`` page: summary, metrics, the figures, final accuracies, config and tasks."""
    cfg = results["config"]
    T = len(results["tasks"])
    parts = [f"# {run_title(results, 'Continual-learning report')}", ""]
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
        *(["", seeds_note(results)] if is_multi_seed(results) else []),
        "",
        _metrics_table(results),
        "",
        *(_paired_section(results) if is_multi_seed(results) else []),
        *search_section(results),
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
