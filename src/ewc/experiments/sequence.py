"""The main job: a sequence of tasks (permuted / split / rotated) learned by several methods.

Builds the task sequence, runs every method from the same initial weights on the same data
order (:func:`ewc.train.run_method`), optionally chooses λ on the validation parts first, and
writes ``results.json`` plus the report (figures, CSV, Markdown) into the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ewc
from ewc.data import Task, load_dataset, make_sequence
from ewc.methods import METHODS
from ewc.train import TrainConfig, run_method

LAM_METHODS = ("ewc", "online-ewc", "l2")


def check_out_dir(out: str | os.PathLike) -> Path:
    """The output directory, created if needed; a clear error if it is a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def validation_tasks(tasks: list[Task]) -> list[Task]:
    """The same tasks with their validation parts in place of the test parts (for tuning)."""
    return [dataclasses.replace(t, x_test=t.x_val, y_test=t.y_val) for t in tasks]


def select_lam(tasks: list[Task], method: str, grid: list[float], config: TrainConfig) -> dict[str, Any]:
    """Run ``method`` for each λ in ``grid`` on the validation parts; the best ACC wins."""
    scores = {}
    val = validation_tasks(tasks)
    for lam in grid:
        cfg = dataclasses.replace(config, lam=lam, l2_lam=lam)
        scores[lam] = run_method(val, method, cfg)["average_accuracy"]
    best = max(grid, key=lambda lam: (scores[lam], -lam))
    return {"grid": grid, "validation_acc": [scores[lam] for lam in grid], "chosen": best}


def run_sequence(
    sequence: str,
    data: str,
    n_tasks: int,
    methods: list[str],
    config: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    lam_grid: list[float] | None = None,
    max_train_per_task: int | None = None,
    data_root: str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Run ``methods`` on an ``n_tasks`` ``sequence`` of ``data``; write results into ``out``."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    if not methods:
        raise ValueError("no methods given")
    out_dir = check_out_dir(out) if out is not None else None
    dataset = load_dataset(data, root=data_root)
    tasks = make_sequence(dataset, sequence, n_tasks, seed=config.seed, max_train_per_task=max_train_per_task)

    selection: dict[str, Any] = {}
    results: dict[str, Any] = {"methods": {}}
    for name in methods:
        cfg = config
        if lam_grid and name in LAM_METHODS:
            selection[name] = select_lam(tasks, name, lam_grid, config)
            cfg = dataclasses.replace(config, lam=selection[name]["chosen"], l2_lam=selection[name]["chosen"])
        res = run_method(tasks, name, cfg, num_classes=dataset.num_classes)
        res.pop("model")
        res.pop("method")
        if name in selection:
            res["lam"] = selection[name]["chosen"]
        results["methods"][name] = res

    results["config"] = {
        "dataset": data,
        "sequence": sequence,
        "tasks": n_tasks,
        "methods": methods,
        "max_train_per_task": max_train_per_task,
        "lam_grid": lam_grid,
        "lam_selection": selection,
        **config.to_dict(),
        "versions": {"ewc": ewc.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results["tasks"] = [
        {
            "name": t.name,
            "classes": list(t.classes),
            "n_train": len(t.x_train),
            "n_val": len(t.x_val),
            "n_test": len(t.x_test),
        }
        for t in tasks
    ]
    if out_dir is not None:
        write_json(results, out_dir / "results.json")
        if report:
            from ewc.report import write_report

            write_report(results, out_dir)
    return results


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temp file in the same directory, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
