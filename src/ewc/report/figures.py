"""The figures of a report: learning curves per task, accuracy matrices and the summary bars.

Each ``plot_*`` function draws from a validated ``results.json`` dict only and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ewc.report.style import (
    canonical_name,
    figure_style,
    load_matplotlib,
    method_color,
    method_label,
    new_figure,
    save_figure,
)
from ewc.report.values import METRIC_KEYS, arr, fmt_stat, num, run_title, stat


def _curve_series(m: Mapping[str, Any], T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(steps [P], accuracy [P, T], task_starts [T] or None) of a method, or None without curves."""
    c = m.get("curves")
    if not isinstance(c, Mapping):
        return None
    starts = arr(c.get("task_starts")) if c.get("task_starts") is not None else None
    if starts is not None and starts.shape != (T,):
        starts = None
    if c.get("accuracy") and c.get("steps"):
        steps = arr(c["steps"])
        acc = arr(c["accuracy"]).reshape(len(steps), T)
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
            v = arr(pts)
            x = np.linspace(starts[k], ends[k], v.size) if v.size > 1 else np.full(v.size, ends[k])
            for xi, vi in zip(x, v, strict=True):
                row = np.full(T, np.nan)
                row[k] = vi
                xs.append(xi)
                rows.append(row)
        if xs:
            return np.array(xs), np.array(rows), starts
    return None


def _curve_band(m: Mapping[str, Any], shape: tuple[int, int]) -> np.ndarray | None:
    """The 95 % half-width of a ``--seeds`` run's mean curves ([P, T]), or None."""
    c = m.get("curves")
    band = arr(c.get("accuracy_ci95")) if isinstance(c, Mapping) and c.get("accuracy_ci95") else None
    return band if band is not None and band.shape == shape else None


def _remap(x: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Piecewise-linear map of steps so that task boundaries ``src`` land on ``dst``."""
    if src.shape != dst.shape or np.any(~np.isfinite(src)) or np.any(np.diff(src) <= 0):
        return x
    return np.interp(x, src, dst, left=np.nan, right=np.nan)


def plot_curves(results: Mapping[str, Any], path: Path) -> Path:
    """Fig. 2A analogue: one panel per task, its test accuracy vs training step for every method."""
    tasks = results["tasks"]
    T = len(tasks)
    names = list(results["methods"])
    series = {n: _curve_series(results["methods"][n], T) for n in names}

    # Reference time axis: task boundaries of the first method that has them (non-joint preferred).
    with_starts = [n for n in names if series[n] is not None and series[n][2] is not None]
    with_starts.sort(key=lambda n: canonical_name(n) == "joint")
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

    def xy(n: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        m = results["methods"][n]
        s = series[n]
        if s is None or ref is None:
            # No curve: one point per task from the accuracy matrix, at the end of each task, plus the
            # accuracy just before training task k (row k-1, or the random-init baseline for k = 0).
            R = arr(m["accuracy_matrix"])
            base = arr(m.get("baseline_accuracy"))
            before = R[k - 1, k] if k > 0 else (base[0] if base.shape == (T,) else math.nan)
            return bounds[k:], np.concatenate([[before], R[k:, k]]), None
        steps, acc, starts = s
        band = _curve_band(m, acc.shape)
        x = steps
        if starts is not None and n != ref and not np.allclose(starts, r_starts):
            end = max(float(np.nanmax(steps)), starts[-1])
            x = _remap(steps, np.append(starts, end), bounds)
            if method_label(n) not in rescaled:
                rescaled.append(method_label(n))
        t0 = starts[k] if starts is not None else bounds[k]
        keep = steps >= t0
        return x[keep], acc[keep, k], None if band is None else band[keep, k]

    panel_h = 1.75 if T <= 4 else max(0.7, 13.0 / T) if T > 8 else 1.45
    height = min(1.4 + panel_h * T, 17.0)
    with figure_style():
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
                x, y, h = xy(n, k)
                ok = np.isfinite(x) & np.isfinite(y)
                if h is not None and (ok & np.isfinite(h)).any():  # the 95 % CI of a --seeds run's mean
                    b = ok & np.isfinite(h)
                    y_lo, y_hi = np.clip(y - h, 0, 1), np.clip(y + h, 0, 1)
                    ax.fill_between(x[b], y_lo[b], y_hi[b], color=method_color(n, names), alpha=0.2, lw=0)
                if ok.any():
                    lo = min(lo, float(np.min(y[ok])))
                    joint = canonical_name(n) == "joint"
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
        if any(num(results["methods"][n].get("n")) > 1 for n in names):  # a band was drawn
            handles.append(Patch(facecolor="#999999", alpha=0.3, edgecolor="none"))
            labels.append("95 % CI of the mean over seeds")
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
        fig.suptitle(run_title(results, "Accuracy on each task during sequential training"))
        return save_figure(fig, path)


def plot_matrix(results: Mapping[str, Any], path: Path) -> Path:
    """One annotated accuracy-matrix heatmap per method, shared 0-1 colour scale."""
    mpl = load_matplotlib()
    T = len(results["tasks"])
    names = list(results["methods"])
    n = len(names)
    panel = min(max(0.38 * T + 1.2, 3.0), 7.5, max(16.5 / min(n, 3), 3.0))
    ncols = max(1, min(n, int(16.5 // panel)))
    nrows = math.ceil(n / ncols)
    font = 10 if T <= 4 else 8 if T <= 7 else 7 if T <= 10 else 6 if T <= 14 else 0
    with figure_style():
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
            R = arr(m["accuracy_matrix"])
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
                f"{method_label(name)}  (ACC {fmt_stat(m, 'average_accuracy')}, BWT {fmt_stat(m, 'bwt')})",
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
        fig.suptitle(run_title(results, "Accuracy matrix R[i, j]"))
        return save_figure(fig, path)


def bar_labels(ax: Any, bars: Any, values: Sequence[float], digits: int, fontsize: float = 8) -> None:
    """Write each bar's value above it (below it when negative), ``n/a`` at the base when missing."""
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


def plot_summary(results: Mapping[str, Any], path: Path) -> Path:
    """Bars per method (method colours) for ACC, forgetting, BWT, and FWT / time when present."""
    methods = results["methods"]
    names = list(methods)
    vals = {k: np.array([num(methods[n].get(k)) for n in names]) for k in METRIC_KEYS}
    errs = {k: np.array([stat(methods[n], k)[1] for n in names]) for k in METRIC_KEYS}  # --seeds: 95 % CI
    panels = [("average_accuracy", "ACC (higher is better)")]
    if len(results["tasks"]) > 1:  # with one task both are 0 by definition
        panels += [("forgetting", "Forgetting (lower is better)"), ("bwt", "BWT (higher is better)")]
    if np.isfinite(vals["fwt"]).any():
        panels.append(("fwt", "FWT (higher is better)"))
    if np.isfinite(vals["seconds"]).any():
        panels.append(("seconds", "Wall time (s)"))
    width = min(max(2.6, 0.45 * len(names) + 1.0), 17.0 / len(panels))
    with figure_style():
        fig = new_figure((width * len(panels) + 0.4, 3.8))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        x = np.arange(len(names))
        colors = [method_color(n, names) for n in names]
        for ax, (key, title) in zip(axes, panels, strict=True):
            v = vals[key]
            e = errs[key]
            yerr = np.nan_to_num(e, nan=0.0) if np.isfinite(e).any() else None
            bars = ax.bar(x, np.nan_to_num(v, nan=0.0), color=colors, width=0.7, edgecolor="white")
            if yerr is not None:
                ax.errorbar(
                    x, np.nan_to_num(v, nan=0.0), yerr=yerr, fmt="none", ecolor="#333333", capsize=3, lw=1
                )
            bar_labels(ax, bars, list(v), 1 if key == "seconds" else 3)
            ends = np.concatenate([v, v + np.nan_to_num(e), v - np.nan_to_num(e)])
            fin = ends[np.isfinite(ends)]
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
        seeds = np.isfinite(errs["average_accuracy"]).any()
        fig.suptitle(run_title(results, "Summary" + (": mean ± 95 % CI over seeds" if seeds else "")))
        return save_figure(fig, path)
