"""Figures, CSV and Markdown report for a continual-learning run, drawn from ``results.json`` only.

A run's ``results.json`` (see :func:`load_results` for the schema) holds everything needed to
redraw its report, so a saved run can be re-plotted or compared with others without re-training::

    from ewc.report import load_results, write_report, compare_runs
    write_report(load_results("runs/permuted"), "runs/permuted/report")
    print(compare_runs(["runs/permuted", "runs/permuted-lam1000"], out_dir="runs/compare"))

or from the shell: ``ewc report RUN_DIR`` and ``ewc report RUN_DIR RUN_DIR ... [--out DIR]``.

The modules: ``checks`` (load and validate results.json), ``style`` (matplotlib style, method
labels and colours), ``values`` (numbers in and out), ``tables`` (metrics.csv, Markdown,
report.md), ``figures`` (curves, matrix, summary), ``compare`` (several runs) and ``seeds`` (a
``--seeds`` run: mean ± 95 % CI over seeds, paired tests).  Every file
is written to a temporary file then renamed, so an interrupted report never leaves a
half-written file behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ewc.report.checks import RESULTS_FILE, load_results, validate_results
from ewc.report.compare import compare_runs
from ewc.report.figures import plot_curves, plot_matrix, plot_summary
from ewc.report.search import plot_search
from ewc.report.seeds import is_multi_seed, seeds_csv
from ewc.report.style import DPI, figure_style, method_color, method_label, new_figure, save_figure
from ewc.report.tables import md_table, metrics_csv, report_md
from ewc.state import atomic_write_bytes

__all__ = [
    "DPI",
    "RESULTS_FILE",
    "compare_runs",
    "figure_style",
    "load_results",
    "md_table",
    "method_color",
    "method_label",
    "new_figure",
    "save_figure",
    "validate_results",
    "write_report",
]


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically; return ``path``."""
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``metrics.csv``, ``curves.png``, ``matrix.png``, ``summary.png`` and ``report.md``
    (and ``seeds.csv``, every seed's metrics, for a ``--seeds`` run; ``search.png``, the curve of
    an ``auto`` strength's search).

    ``results`` is the parsed ``results.json`` of a run (see :func:`load_results`).  Returns the
    written paths under the keys ``metrics``, ``curves``, ``matrix``, ``summary``, ``report`` (and
    ``seeds``, ``search``).
    """
    validate_results(results, "results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": _write_text(out / "metrics.csv", metrics_csv(results)),
        "curves": plot_curves(results, out / "curves.png"),
        "matrix": plot_matrix(results, out / "matrix.png"),
        "summary": plot_summary(results, out / "summary.png"),
    }
    search = plot_search(results, out / "search.png")  # an auto strength's search curve
    if search is not None:
        paths["search"] = search
    if is_multi_seed(results):
        paths["seeds"] = _write_text(out / "seeds.csv", seeds_csv(results))
    paths["report"] = _write_text(out / "report.md", report_md(results))
    return paths
