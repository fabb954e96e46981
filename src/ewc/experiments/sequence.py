"""The main job: a sequence of tasks (permuted / split / rotated) learned by several methods.

Builds the task sequence, runs every method from the same initial weights on the same data
order (:func:`ewc.train.run_method`), optionally chooses λ on the validation parts first, and
writes ``results.json`` plus the report (figures, CSV, Markdown) into the output directory.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any

import torch

import ewc
from ewc.data import Task, load_dataset, make_sequence
from ewc.experiments.common import check_out_dir, write_json
from ewc.methods import METHOD_SPECS, METHODS, Method, MethodSpec, make_method
from ewc.scenario import Scenario
from ewc.train import TrainConfig, method_params, run_method

LAM_METHODS = ("ewc", "online-ewc", "l2")


def search_grids(
    methods: list[str], search: bool, lam_grid: list[float] | None, l2_lam_grid: list[float] | None
) -> dict[str, list[dict[str, Any]]]:
    """The validation grid of each method (a list of parameter dicts; methods without one omitted)."""
    grids: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        grid = dict(METHOD_SPECS[m].grid) if search else {}
        lams = (l2_lam_grid or lam_grid) if m == "l2" else lam_grid if m in LAM_METHODS else None
        if lams:
            grid["lam"] = tuple(lams)
        if grid:
            grids[m] = MethodSpec(Method, grid=grid).combinations()
    return grids


def with_params(config: TrainConfig, method: str, params: dict[str, Any]) -> TrainConfig:
    """``config`` with ``params`` set for ``method`` (on top of what it already sets)."""
    merged = {**config.params, method: {**config.params.get(method, {}), **params}}
    return dataclasses.replace(config, params=merged)


def validation_tasks(tasks: list[Task]) -> list[Task]:
    """The same tasks with their validation parts in place of the test parts (for tuning)."""
    return [dataclasses.replace(t, x_test=t.x_val, y_test=t.y_val) for t in tasks]


def _choose(grid: list[float], scores: dict[float, float]) -> dict[str, Any]:
    """The λ with the best validation ACC (ties: the smaller λ)."""
    best = max(grid, key=lambda lam: (scores[lam], -lam))
    return {"grid": grid, "validation_acc": [scores[lam] for lam in grid], "chosen": best}


def _job(spec: tuple) -> dict[str, Any]:
    """One training run, in this process or a worker: (data key, method, config, on_validation
    [, checkpoint path]); with a path, the trained learner is saved there (ewc.checkpoint)."""
    (sequence, data, n_tasks, max_train, data_root), method, config, on_val, *save = spec
    tasks, _ = _tasks(sequence, data, n_tasks, config.seed, max_train, data_root)
    res = run_method(validation_tasks(tasks) if on_val else tasks, method, config)
    model, learner = res.pop("model"), res.pop("method")
    if save and save[0] is not None:
        from ewc.checkpoint import save_checkpoint

        params, arch = method_params(method, config), res["architecture"]
        save_checkpoint(
            save[0], model, learner, name=method, params=params, scenario=learner.scenario, architecture=arch
        )
    return res


_TASK_CACHE: dict[tuple, tuple[list[Task], int]] = {}


def _tasks(
    sequence: str, data: str, n_tasks: int, seed: int, max_train: int | None, data_root: str | None
) -> tuple[list[Task], int]:
    """The task sequence and the number of classes (built once per process)."""
    key = (sequence, data, n_tasks, seed, max_train, data_root)
    if key not in _TASK_CACHE:
        _TASK_CACHE.clear()
        dataset = load_dataset(data, root=data_root)
        tasks = make_sequence(dataset, sequence, n_tasks, seed=seed, max_train_per_task=max_train)
        _TASK_CACHE[key] = (tasks, dataset.num_classes)
    return _TASK_CACHE[key]


def _run_all(specs: list[tuple], jobs: int) -> list[dict[str, Any]]:
    """Run independent training jobs, in parallel worker processes when ``jobs`` > 1.

    On CPU each worker runs one torch thread, so that ``jobs`` processes use ``jobs`` cores
    without oversubscribing them. Every run is seeded: with the same thread count (e.g.
    ``--threads 1``) the results do not depend on ``jobs``.
    """
    if jobs <= 1 or len(specs) <= 1:
        return [_job(s) for s in specs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    specs = [(k, m, dataclasses.replace(c, threads=1, progress=False), *rest) for k, m, c, *rest in specs]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_job, specs))


def run_sequence(
    sequence: str,
    data: str,
    n_tasks: int,
    methods: list[str],
    config: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    lam_grid: list[float] | None = None,
    l2_lam_grid: list[float] | None = None,
    search: bool = False,
    save_state: bool = False,
    max_train_per_task: int | None = None,
    data_root: str | None = None,
    report: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run ``methods`` on an ``n_tasks`` ``sequence`` of ``data``; write results into ``out``.

    With ``search``, every method's registered grid (``METHOD_SPECS[m].grid``) is searched on
    the validation parts first; ``lam_grid`` / ``l2_lam_grid`` set the λ grid of EWC / L2
    (with or without ``search``). The chosen values are recorded in ``config.selection``.
    ``save_state`` saves each trained learner (model, method state, scenario) under
    ``out/checkpoints/METHOD.pt``, loadable with :func:`ewc.checkpoint.load_checkpoint`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    if not methods:
        raise ValueError("no methods given")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    stray = sorted(set(config.params) - set(methods))
    if stray:
        raise ValueError(f"parameters given for method(s) not run: {', '.join(stray)}")
    for m in methods:  # bad parameters fail here, before any training
        make_method(m, **method_params(m, config))
    out_dir = check_out_dir(out) if out is not None else None
    key = (sequence, data, n_tasks, max_train_per_task, data_root)
    tasks, _ = _tasks(sequence, data, n_tasks, config.seed, max_train_per_task, data_root)

    # 1. hyper-parameters on the validation parts (never the test parts)
    grids = search_grids(methods, search, lam_grid, l2_lam_grid)
    specs = [(key, m, with_params(config, m, combo), True) for m, combos in grids.items() for combo in combos]
    scores = iter(_run_all(specs, jobs))
    selection: dict[str, Any] = {}
    for m, combos in grids.items():
        accs = [next(scores)["average_accuracy"] for _ in combos]
        best = max(range(len(combos)), key=lambda k: (accs[k], -k))  # ties: the first in grid order
        selection[m] = {"grid": combos, "validation_acc": accs, "chosen": combos[best]}
    # 2. the test run of every method, with its chosen hyper-parameters
    configs = {m: with_params(config, m, selection[m]["chosen"]) for m in selection}
    configs = {m: configs.get(m, config) for m in methods}
    saves = {m: None for m in methods}
    if save_state and out_dir is not None:
        (out_dir / "checkpoints").mkdir(exist_ok=True)
        saves = {m: out_dir / "checkpoints" / f"{m}.pt" for m in methods}
    runs = _run_all([(key, m, configs[m], False, saves[m]) for m in methods], jobs)
    results: dict[str, Any] = {"methods": {}}
    for m, res in zip(methods, runs, strict=True):
        res["params"] = method_params(m, configs[m])
        if saves[m] is not None:
            res["checkpoint"] = f"checkpoints/{m}.pt"
        if m in selection and "lam" in selection[m]["chosen"]:
            res["lam"] = selection[m]["chosen"]["lam"]
        results["methods"][m] = res

    results["config"] = {
        "dataset": data,
        "sequence": sequence,
        "tasks": n_tasks,
        "methods": methods,
        "max_train_per_task": max_train_per_task,
        "lam_grid": lam_grid,
        "l2_lam_grid": l2_lam_grid,
        "search": search,
        "selection": selection,
        "jobs": jobs,
        **config.to_dict(),
        "scenario": Scenario.for_tasks(config.scenario, [t.classes for t in tasks]).kind,
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
