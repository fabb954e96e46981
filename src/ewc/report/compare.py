"""Comparison of several saved runs: the methods' metrics side by side (mean ± 95 % CI for
``--seeds`` runs), paired t-tests of each method between runs over their common seeds, the config
keys that differ, and a grouped bar chart of ACC per method per run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ewc.report.checks import load_results
from ewc.report.figures import bar_labels
from ewc.report.seeds import compare_values, paired_table, seed_values, verdict
from ewc.report.style import (
    figure_style,
    load_matplotlib,
    method_color,
    method_label,
    new_figure,
    save_figure,
)
from ewc.report.tables import flatten, md_cell, md_table
from ewc.report.values import fmt_stat, nan_low, num, stat
from ewc.state import atomic_write_bytes


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
        accs = [num(r["methods"][m].get("average_accuracy")) for r in runs if m in r["methods"]]
        best = max(accs, key=nan_low, default=math.nan)
        for name, r in zip(names, runs, strict=True):
            if m not in r["methods"]:
                continue
            mm = r["methods"][m]
            acc = fmt_stat(mm, "average_accuracy")
            if len(accs) > 1 and math.isfinite(best) and num(mm.get("average_accuracy")) == best:
                acc = f"**{acc}**"
            rows.append(
                [
                    method_label(m),
                    f"`{name}`",
                    acc,
                    *[fmt_stat(mm, k) for k in ("bwt", "fwt", "forgetting", "lca")],
                    fmt_stat(mm, "seconds", 1),
                    str(mm.get("n", 1)),
                ]
            )
    table = md_table(
        ["Method", "Run", "ACC ↑", "BWT ↑", "FWT ↑", "Forgetting ↓", "LCA ↑", "Seconds", "Seeds"],
        rows,
        ["---", "---", *["---:"] * 7],
    )
    tests = _paired_across_runs(runs, names, methods)

    flats = [flatten(r["config"]) for r in runs]
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
        "Values of a `--seeds` run are the mean over its seeds ± the half-width of the 95 % confidence "
        "interval (Student's t); a single run's are its values.",
        "",
        table,
        "",
    ]
    if tests:
        parts += [
            "## Paired tests between runs",
            "",
            "Each method's ACC in two runs, compared by a paired t-test over the seeds both runs ran "
            "(the same seed: the same data, permutations and initial weights, when the runs share those "
            "settings); "
            '"beats" only when significant at the 5 % level.',
            "",
            paired_table(tests),
            "",
        ]
    parts += [
        "## Config differences",
        "",
    ]
    if diff:
        parts.append(
            md_table(
                ["Key", *[f"`{n}`" for n in names]],
                [
                    [f"`{k}`", *["–" if f.get(k, missing) is missing else md_cell(f[k]) for f in flats]]
                    for k in diff
                ],
                ["---", *["---"] * len(names)],
            )
        )
    else:
        parts.append("_No differences: all runs share the same config._")
    if same:
        shared = ", ".join(f"`{k}`={md_cell(flats[0][k])}" for k in same)
        parts += ["", f"Shared: {shared}"]
    parts.append("")
    text = "\n".join(parts)

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _plot_comparison(runs, names, methods, out / "comparison.png")
        md = text + "\n![ACC per method per run](comparison.png)\n"
        atomic_write_bytes(out / "comparison.md", md.encode("utf-8"))
    return text


def _paired_across_runs(
    runs: Sequence[Mapping[str, Any]], names: Sequence[str], methods: Sequence[str]
) -> list[dict[str, Any]]:
    """For each method and each pair of runs that have it: the paired t-test on per-seed ACC."""
    tests = []
    for m in methods:
        have = [(n, r) for n, r in zip(names, runs, strict=True) if m in r["methods"]]
        for (na, ra), (nb, rb) in itertools.combinations(have, 2):
            a = seed_values(ra["methods"][m], ra.get("config", {}))
            b = seed_values(rb["methods"][m], rb.get("config", {}))
            test = compare_values(a, b)
            label_a, label_b = f"{method_label(m)} in `{na}`", f"{method_label(m)} in `{nb}`"
            tests.append(
                {
                    **test,
                    "a_label": label_a,
                    "b_label": label_b,
                    "verdict": verdict(test, f"`{na}`", f"`{nb}`"),
                }
            )
    return tests


def _plot_comparison(
    runs: Sequence[Mapping[str, Any]], names: Sequence[str], methods: Sequence[str], path: Path
) -> Path:
    """Grouped bars: ACC per method (groups) per run (bars)."""
    mpl = load_matplotlib()
    nr, nm = len(runs), len(methods)
    cmap = mpl.colormaps["cividis"]
    run_colors = [cmap(0.15 + 0.7 * i / max(nr - 1, 1)) for i in range(nr)]
    bw = 0.8 / nr
    with figure_style():
        fig = new_figure((min(max(4.5, 0.9 + nm * (0.35 * nr + 0.5)), 16.0), 4.2))
        ax = fig.subplots()
        x = np.arange(nm)
        for i, (name, r) in enumerate(zip(names, runs, strict=True)):
            v = np.array(
                [
                    num(r["methods"][m].get("average_accuracy")) if m in r["methods"] else math.nan
                    for m in methods
                ]
            )
            e = np.array(
                [
                    stat(r["methods"][m], "average_accuracy")[1] if m in r["methods"] else math.nan
                    for m in methods
                ]
            )
            bars = ax.bar(
                x - 0.4 + bw * (i + 0.5), np.nan_to_num(v), bw * 0.92, color=run_colors[i], label=name
            )
            if np.isfinite(e).any():  # a --seeds run: its 95 % CI
                ax.errorbar(
                    x - 0.4 + bw * (i + 0.5),
                    np.nan_to_num(v),
                    yerr=np.nan_to_num(e),
                    fmt="none",
                    ecolor="#333333",
                    capsize=2,
                    lw=0.8,
                )
            if nr * nm <= 30:
                bar_labels(ax, bars, list(v), 2, fontsize=7 if nr > 2 else 8)
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
