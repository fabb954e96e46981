"""``ewc stream``'s figure, findings and tables, drawn from its record (results.json's ``results``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ewc.experiments.common import figure_style, md_table, new_figure

WINDOW = 10  # batches in the moving average of prequential accuracy


def _moving(values: list[float], window: int = WINDOW) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def figure(results: dict[str, Any]) -> Any:
    """timeline.png: true vs inferred task; log-likelihoods per known task; prequential accuracy."""
    true_ids = results["true_ids"]
    main = results["learners"][0]
    xs = np.arange(len(main["ids"]))
    with figure_style():
        fig = new_figure((10, 8))
        ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True, height_ratios=[1, 1.4, 1])
        if true_ids is not None:
            match = results["assignment"]["matching"]  # true id -> inferred id
            inv = {int(v): int(k) for k, v in match.items()}
            ax1.step(xs, true_ids, where="post", lw=3, alpha=0.4, color="black", label="true task")
            shown = [inv.get(i, np.nan) for i in main["ids"]]
            ax1.step(xs, shown, where="post", lw=1.2, color="C3", label="inferred (matched to true ids)")
            ax1.set_yticks(sorted(set(true_ids)))
            ax1.set_title("True vs inferred task over the stream")
        else:
            ax1.step(xs, main["ids"], where="post", lw=1.2, color="C3", label="inferred task")
            ax1.set_yticks(sorted(set(main["ids"])))
            ax1.set_title("Inferred task over the stream")
        ax1.set_ylabel("task")
        ax1.legend(loc="upper left", fontsize=8)
        table = np.array([[np.nan if v is None else v for v in row] for row in main["loglik"]], dtype=float)
        if table.ndim == 2 and table.shape[1] > 0:
            for k in range(table.shape[1] - 1):
                ax2.plot(xs, table[:, k], lw=1, label=f"inferred task {k}")
            ax2.plot(xs, table[:, -1], lw=1, ls="--", color="grey", label="new task")
            finite = table[np.isfinite(table)]
            if finite.size:  # clip the first batches of young tasks so the bulk stays readable
                lo, hi = np.percentile(finite, 2), finite.max()
                ax2.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax2.set_ylabel("log p(batch | task)")
        ax2.legend(loc="lower left", fontsize=7, ncol=4)
        for r in results["learners"]:
            ax3.plot(xs, _moving(r["prequential"]), lw=1.2, label=r["label"])
        ax3.set_ylabel(f"prequential acc.\n(moving avg, {WINDOW})")
        ax3.set_xlabel("batch")
        ax3.set_ylim(0, 1.02)
        ax3.legend(loc="lower right", fontsize=8)
        marks = true_ids if true_ids is not None else main["ids"]
        for ax in (ax1, ax2, ax3):
            for i in range(1, len(marks)):
                if marks[i] != marks[i - 1]:
                    ax.axvline(i, color="grey", lw=0.5, ls=":")
    return fig


def _mean(values: list[float | None]) -> float:
    """Mean test accuracy over the test sets that have rows."""
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else math.nan


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def findings(results: dict[str, Any]) -> list[str]:
    a = results["assignment"]
    if a is None:
        found = results["learners"][0]["tasks_found"]
        n = len(results["learners"][0]["ids"])
        out = [f"{found} task(s) inferred over {n} batches (no true tasks given)."]
    else:
        out = [
            f"Task assignment accuracy {a['accuracy']:.4f} over {a['n_batches']} batches; {a['tasks_found']} "
            f"tasks found for {a['tasks_true']} true; mean/max detection delay {a['mean_delay']:.2f}/"
            f"{a['max_delay']} batches; {a['false_alarms_per_10k']:.2f} false alarms per 10 000 samples.",
        ]
    names = results["tests"]
    for r in results["learners"]:
        acc = r["test_accuracy"]
        per = ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, acc, strict=True))
        out.append(
            f"{r['label']}: prequential accuracy {r['prequential_accuracy']:.4f}; final test accuracy "
            f"mean {_mean(acc):.4f} ({per})."
        )
    by_ids = {r["task_ids"]: r for r in results["learners"] if r["label"] != r["method"]}
    if "true" in by_ids:
        inferred, true = (_mean(by_ids[k]["test_accuracy"]) for k in ("inferred", "true"))
        out.append(
            f"With inferred task ids the final mean test accuracy is {inferred / true:.1%} of that with "
            f"the true ids ({inferred:.4f} vs {true:.4f})."
        )
    return out


def tables(results: dict[str, Any]) -> list[str]:
    a = results["assignment"]
    t2 = md_table(
        ["method", "prequential", *[f"test {n}" for n in results["tests"]], "test mean"],
        [
            [
                r["label"],
                f"{r['prequential_accuracy']:.4f}",
                *[_fmt(v) for v in r["test_accuracy"]],
                f"{_mean(r['test_accuracy']):.4f}",
            ]
            for r in results["learners"]
        ],
    )
    if a is None:
        return [t2]
    t1 = md_table(
        ["assignment", "value"],
        [
            ["accuracy", f"{a['accuracy']:.4f}"],
            ["mean delay (batches)", f"{a['mean_delay']:.2f}"],
            ["max delay (batches)", str(a["max_delay"])],
            ["false alarms / 10k samples", f"{a['false_alarms_per_10k']:.2f}"],
            ["tasks found / true", f"{a['tasks_found']} / {a['tasks_true']}"],
            ["split tasks", str(a["split_tasks"])],
        ],
    )
    return [t1, t2]
