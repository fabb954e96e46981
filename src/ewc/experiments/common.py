"""What every analysis experiment shares: its config fields, run-time set-up and its outputs.

An experiment module (``ewc.experiments.<name>``) defines

- ``Config``: a dataclass whose fields are made with :func:`ewc.config.param` (a default, a help
  text, a constraint); the CLI turns each field into a flag (``hidden_size`` → ``--hidden-size``);
- ``run(config, out=None) -> dict``: computes and returns its record (:func:`finish`); with
  ``out`` it also writes ``results.json``, its PNG figure(s) and ``report.md`` there;
- ``TITLE`` (one line) and ``CLAIM`` (what the paper found, to put our result next to).

Results are plain JSON; figures are drawn from the results, never from hidden state.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ewc
from ewc import runtime
from ewc.config import command_line, config_dict, param
from ewc.outdir import make_dir
from ewc.report import figure_style, md_table, new_figure, save_figure
from ewc.state import atomic_write_bytes

__all__ = [
    "check_out_dir",
    "command_line",
    "config_dict",
    "figure_style",
    "fit_loglog",
    "md_table",
    "new_figure",
    "param",
    "save_figure",
    "setup_runtime",
    "write_json",
    "finish",
]


def check_out_dir(out: str | os.PathLike) -> Path:
    """The output directory of a library call, created if needed (:func:`ewc.outdir.make_dir`; the
    command line claims it first, with a lock and a write probe)."""
    return make_dir(out)


def setup_runtime(seed: int, threads: int | None) -> torch.Generator:
    """Threads and seeds for an experiment (:func:`ewc.runtime.setup_runtime`); return a seeded
    CPU generator for its data."""
    runtime.setup_runtime(seed, threads)
    return torch.Generator().manual_seed(seed)


def fit_loglog(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log x over the finite, positive points (NaN if < 2)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(xa) & np.isfinite(ya) & (xa > 0) & (ya > 0)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(xa[ok]), np.log(ya[ok]), 1)[0])


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temp file in the same directory, fsync, rename)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=True).encode("utf-8"))


def finish(
    out: str | os.PathLike | None,
    name: str,
    config: Any,
    results: dict[str, Any],
    *,
    title: str,
    claim: str,
    figures: dict[str, Any],
    findings: Sequence[str],
    tables: Sequence[str] = (),
    seconds: float | None = None,
    prefix: Sequence[str] = ("ewc", "experiment"),
) -> dict[str, Any]:
    """The experiment's record; with ``out``, also write it and its report there.

    The record (``results.json``) holds ``experiment``, ``config``, ``command``, ``versions``,
    ``created``, ``seconds`` and ``findings`` next to the experiment's own ``results``.
    ``findings`` are short sentences computed from the results (what we measured); ``claim`` is
    the paper's statement they are read against. ``figures`` maps a PNG file name to a
    matplotlib Figure; ``report.md`` embeds them below the findings and ``tables``. ``prefix``
    is the command the experiment runs under (``ewc experiment`` unless it has its own).
    """
    command = command_line(name, config, prefix)
    record = {
        "experiment": name,
        "config": config_dict(config),
        "command": command,
        "versions": {"ewc": ewc.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": seconds,
        "findings": list(findings),
        **results,
    }
    if out is None:
        return record
    out_dir = check_out_dir(out)
    write_json(record, out_dir / "results.json")
    for file_name, fig in figures.items():
        save_figure(fig, out_dir / file_name)
    lines = [f"# {title}", "", f"**The paper:** {claim}", "", "**Command:**", "", f"    {command}", ""]
    if seconds is not None:
        lines += [f"Wall time: {seconds:.1f} s.", ""]
    lines += ["## What we measured", ""] + [f"- {s}" for s in findings] + [""]
    for table in tables:
        lines += [table, ""]
    for file_name in figures:
        lines += [f"![{Path(file_name).stem}]({file_name})", ""]
    atomic_write_bytes(out_dir / "report.md", "\n".join(lines).encode("utf-8"))
    return record
