"""Every method in every scenario on one task sequence: the comparison users choose a method by.

For each scenario (task-, domain-, class-incremental; :mod:`ewc.scenario`) this runs the main job
(:func:`ewc.experiments.sequence.run_sequence`) with the same data, initial weights and data order,
each method's hyper-parameters chosen on the validation parts from its registered grid
(``METHOD_SPECS[name].grid``, listed in docs/methods.md), and gathers one table: ACC, forgetting,
BWT, FWT, wall time and the memory each method keeps between tasks. With ``seeds`` every scenario's
run is a ``--seeds`` run: each value is its mean ± 95 % CI over the seeds (the choices are made on
the first seed's validation parts).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewc.checks import Subset
from ewc.config import names_parser, param
from ewc.executors import Executor
from ewc.experiments.common import check_out_dir, write_json
from ewc.experiments.lam_search import DEFAULT_BUDGET
from ewc.experiments.sequence import RunConfig, methods_param, run_sequence, search_param
from ewc.experiments.tracked import as_tracking, log_compare, open_for
from ewc.report import figure_style, md_table, method_color, method_label, new_figure, save_figure
from ewc.report.values import fmt_ci, stat
from ewc.scenario import SCENARIOS
from ewc.state import atomic_write_bytes
from ewc.tracking import Logger
from ewc.train import TrainConfig


@dataclass
class CompareConfig(RunConfig):
    """``ewc compare``: ``ewc run``'s settings, every method by default, searched by default, once
    per scenario (``scenarios`` replaces the run's single ``--scenario``)."""

    methods: str = methods_param("all")
    search: bool = search_param(True)
    scenarios: tuple[str, ...] = param(
        SCENARIOS,
        "comma-separated scenarios to compare",
        type=names_parser(SCENARIOS),
        check=Subset(SCENARIOS),
    )
    train: TrainConfig = param(
        help="training settings", default_factory=TrainConfig, nested=True, skip=("scenario",)
    )


_COLUMNS = ("average_accuracy", "forgetting", "bwt", "fwt", "seconds", "memory_bytes")


def _fmt_params(params: dict[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k not in ("fisher", "fisher_samples", "batch_size")}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def _memory(n: int) -> str:
    return "0" if not n else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _csv_cell(x: float | None) -> str:
    return "" if x is None else repr(x)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per (scenario, method)."""
    header = ["scenario", "method", "ACC", "forgetting", "BWT", "FWT", "seconds", "memory", "chosen"]

    def cell(r: dict[str, Any], key: str, sign: str = "", digits: int = 3) -> str:
        half = r.get("ci95", {}).get(key)  # --seeds: the 95 % half-width
        return f"{r[key]:{sign}.{digits}f}" if half is None else fmt_ci(r[key], half, digits)

    body = [
        [
            r["scenario"],
            method_label(r["method"]),
            cell(r, "average_accuracy"),
            cell(r, "forgetting"),
            cell(r, "bwt", "+"),
            cell(r, "fwt", "+"),
            cell(r, "seconds", digits=1),
            _memory(r["memory_bytes"]),
            _fmt_params(r["chosen"]),
        ]
        for r in rows
    ]
    return md_table(header, body, ["---", "---"] + ["---:"] * 6 + ["---"])


def _plot(rows: list[dict[str, Any]], scenarios: list[str], methods: list[str], path: Path) -> None:
    """ACC per method, one panel per scenario (the figure of the comparison)."""
    with figure_style():
        fig = new_figure((3.2 * len(scenarios) + 1.0, 0.32 * len(methods) + 1.6))
        axes = fig.subplots(1, len(scenarios), sharey=True, squeeze=False)[0]
        for ax, sc in zip(axes, scenarios, strict=True):
            acc = {r["method"]: r for r in rows if r["scenario"] == sc}
            ys = list(range(len(methods)))[::-1]
            vals = [acc[m]["average_accuracy"] if m in acc else float("nan") for m in methods]
            half = [acc[m].get("ci95", {}).get("average_accuracy") if m in acc else None for m in methods]
            errs = [h if h is not None else 0.0 for h in half] if any(h is not None for h in half) else None
            ax.barh(ys, vals, color=[method_color(m, methods) for m in methods], xerr=errs, capsize=2)
            for y, v in zip(ys, vals, strict=True):
                ax.text(min(v, 1.0) + 0.01, y, f"{v:.2f}", va="center", fontsize=8)
            ax.set_yticks(ys, [method_label(m) for m in methods])
            ax.set_xlim(0, 1.12)
            ax.set_title(f"{sc}-incremental")
            ax.set_xlabel("ACC (test, after the last task)")
        save_figure(fig, path)


def run_compare(
    sequence: str,
    data: str,
    n_tasks: int,
    methods: list[str],
    scenarios: list[str],
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    lam_grid: list[float] | None = None,
    l2_lam_grid: list[float] | None = None,
    search: bool = True,
    auto_budget: float = DEFAULT_BUDGET,
    save_state: bool = False,
    max_train_per_task: int | None = None,
    data_root: str | None = None,
    jobs: int = 1,
    tracker: Logger | None = None,
    seeds: list[int] | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Run ``methods`` in each of ``scenarios``; write the runs, the table and the figure to ``out``
    (``tracker``: each scenario's run goes to a child, by ``ewc run``'s rules, then this record)."""
    if not scenarios:
        raise ValueError("no scenarios given")
    out_dir = check_out_dir(out)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    tracker = as_tracking(tracker)
    for sc in scenarios:
        child = tracker.child(sc)  # closed with the tracker if the scenario fails
        res = run_sequence(
            sequence,
            data,
            n_tasks,
            methods,
            dataclasses.replace(config, scenario=sc),
            out_dir / sc,
            lam_grid=lam_grid,
            l2_lam_grid=l2_lam_grid,
            search=search,
            auto_budget=auto_budget,
            save_state=save_state,
            max_train_per_task=max_train_per_task,
            data_root=data_root,
            jobs=jobs,
            tracker=child,
            seeds=seeds,
            executor=executor,
        )
        child.close()
        runs[sc] = {"selection": res["config"]["selection"], "run": str(Path(sc) / "results.json")}
        for m, r in res["methods"].items():
            row = {"scenario": sc, "method": m, **{k: r[k] for k in _COLUMNS}, "chosen": r["params"]}
            if seeds is not None:
                half = {k: stat(r, k)[1] for k in _COLUMNS}
                row.update(n=r["n"], ci95={k: h if math.isfinite(h) else None for k, h in half.items()})
            rows.append(row)
    table = comparison_table(rows)
    record = {
        "sequence": sequence,
        "dataset": data,
        "tasks": n_tasks,
        "methods": methods,
        "scenarios": scenarios,
        "search": search,
        **({} if seeds is None else {"seeds": list(seeds)}),
        "config": config.to_dict(),
        "rows": rows,
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }
    write_json(record, out_dir / "results.json")
    ci = [f"{k}_ci95" for k in _COLUMNS] if seeds is not None else []  # --seeds: means, then half-widths
    csv = ["scenario,method," + ",".join([*_COLUMNS, *ci])]
    csv += [
        f"{r['scenario']},{r['method']},"
        + ",".join([*(repr(r[k]) for k in _COLUMNS), *(_csv_cell(r["ci95"][k]) for k in _COLUMNS if ci)])
        for r in rows
    ]
    atomic_write_bytes(out_dir / "comparison.csv", ("\n".join(csv) + "\n").encode())
    _plot(rows, scenarios, methods, out_dir / "summary.png")
    md = [
        f"# {sequence} {data}: {n_tasks} tasks, {len(methods)} methods, {len(scenarios)} scenarios",
        "",
        "Test accuracy after the last task (ACC), max-based forgetting, backward and forward",
        "transfer, wall time per run and the bytes a method keeps between tasks. Hyper-parameters"
        + (" were chosen on the validation parts (`chosen`)." if search else " are the defaults."),
        "Each scenario's full report (curves, matrices) is in its sub-directory."
        + (
            f" Each value is the mean over seeds {', '.join(map(str, seeds))} ± the half-width of its 95 % "
            "confidence interval (Student's t); the paired tests are in each scenario's report.md."
            if seeds is not None
            else ""
        ),
        "",
        table,
        "",
        "![summary](summary.png)",
        "",
    ]
    atomic_write_bytes(out_dir / "comparison.md", "\n".join(md).encode())
    log_compare(tracker, record, out_dir)
    record["table"] = table
    return record


def run(config: CompareConfig, out: str | os.PathLike) -> dict[str, Any]:
    """``ewc compare``: :func:`run_compare` with the settings of ``config`` (and its trackers)."""
    with open_for("compare", config.track, out) as tracker:
        return run_compare(
            config.sequence,
            config.data,
            config.tasks,
            config.method_names(),
            list(config.scenarios),
            config.training(),
            out,
            tracker=tracker,
            **config.options(),
        )
