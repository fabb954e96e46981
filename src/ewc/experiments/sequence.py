"""The main job: a sequence of tasks (permuted / split / rotated) learned by several methods.

Builds the task sequence, runs every method from the same initial weights on the same data
order (:func:`ewc.train.run_method`), optionally chooses λ on the validation parts first, and
writes ``results.json`` plus the report (figures, CSV, Markdown) into the output directory.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ewc
from ewc.checks import NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Constraint, Interval, Numbers, check
from ewc.config import param, parse_floats, parse_ints, parse_setting, validate
from ewc.data import DATASETS, SEQUENCES, check_sequence_data
from ewc.data.custom import DataChoice, data_record
from ewc.executors import Executor, executor_param, make_executor, ray_address_param
from ewc.experiments.common import check_out_dir, write_json
from ewc.experiments.jobs import (
    build_tasks,
    check_model_for_workers,
    run_all,
    task_records,
)
from ewc.experiments.lam_search import DEFAULT_BUDGET, check_auto, finish_cost, probe_config, search_auto
from ewc.experiments.tracked import log_sequence, open_for, sequence_files
from ewc.methods import METHOD_SPECS, make_method
from ewc.methods.registry import LAM_SETTINGS, combinations
from ewc.models import check_model, check_takes_dropout
from ewc.runtime import run_threads
from ewc.scenario import Scenario
from ewc.tracking import Logger, parse_names, track_param
from ewc.train import TrainConfig, method_params

DEFAULT_METHODS = "sgd,l2,ewc,online-ewc,joint"
#: the most tasks ``ewc run`` / ``ewc compare`` take: tasks² evaluations, a tasks × tasks matrix
MAX_TASKS = 1000


@dataclass(frozen=True)
class MethodList(Constraint):
    """Comma-separated registered method names, or ``all``."""

    def accepts(self, value: Any) -> bool:
        try:
            method_names(value)
        except (ValueError, AttributeError):
            return False
        return True

    def describe(self) -> str:
        return f"'all' or comma-separated names from {', '.join(METHOD_SPECS)}"

    def message(self, value: Any, what: str) -> str:
        """The one wording, naming the unknown methods."""
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else []
        unknown = [n for n in names if n and n != "all" and n not in METHOD_SPECS]
        return super().message(value, what) + (
            f" (unknown method(s): {', '.join(unknown)})" if unknown else ""
        )


def method_names(text: str) -> list[str]:
    """``"ewc,sgd"`` → ``["ewc", "sgd"]``; ``"all"`` → every registered method."""
    if text.strip() == "all":
        return list(METHOD_SPECS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHOD_SPECS]
    if not names or unknown:
        known = ", ".join(METHOD_SPECS)
        raise ValueError(f"unknown method(s) {', '.join(unknown) or repr(text)}; expected some of {known}")
    return names


def methods_param(default: str) -> Any:
    """The ``--methods`` field (``ewc run`` and ``ewc compare`` differ only in its default)."""
    return param(default, f"comma-separated, from: {', '.join(METHOD_SPECS)}, or 'all'", check=MethodList())


def search_param(default: bool) -> Any:
    """The ``--search`` field (``ewc compare`` searches by default)."""
    return param(
        default,
        "choose every method's hyper-parameters from its registered grid on the validation parts "
        "before the test run (see docs/methods.md)",
    )


@dataclass
class RunConfig:
    """``ewc run``: a task sequence learned by several methods (the flags are these fields and
    ``train``'s; each method's λ, γ and Fisher settings come from ``train`` through its spec)."""

    sequence: str = param(help="how tasks are made from the dataset", choices=SEQUENCES, positional=True)
    data: str = param(
        "mnist-10k",
        f"dataset: a registered name ({', '.join(DATASETS)}), or a .npz file with x_train, y_train, "
        "x_test, y_test (optional x_val, y_val; see docs/data.md)",
        check=DataChoice(),
        shown="mnist-10k, embedded in the package",
        metavar="NAME|FILE.npz",
    )
    data_root: str | None = param(
        None, "directory with the dataset files", type=str, shown="$EWC_DATA, cache, system"
    )
    tasks: int = param(
        10,
        f"number of tasks (at most {MAX_TASKS}: every task is tested after every task, so the time "
        "and the accuracy matrix grow as tasks²)",
        check=Interval(int, 1, MAX_TASKS),
    )
    methods: str = methods_param(DEFAULT_METHODS)
    select_lam: tuple[float, ...] | None = param(
        None,
        "choose λ of every method that takes --lam or --l2-lam from this comma-separated grid on the "
        "validation parts before the test run (e.g. 1,10,100,1000)",
        type=parse_floats,
        metavar="GRID",
        check=Numbers(NON_NEGATIVE, allow_none=True),
    )
    select_l2_lam: tuple[float, ...] | None = param(
        None,
        "grid for λ of the methods that take --l2-lam",
        type=parse_floats,
        metavar="GRID",
        check=Numbers(NON_NEGATIVE, allow_none=True),
        shown="the --select-lam grid",
    )
    search: bool = search_param(False)
    auto_budget: float = param(
        DEFAULT_BUDGET,
        "what the screen of an auto strength's search (--lam auto, --l2-lam auto, --set si.c=auto, "
        "--set mas.lam=auto) may cost, in task-lengths (one task trained in full); with its final among "
        "full runs the search costs 3 - (2 - budget)/T runs of a T-task sequence",
        check=POSITIVE,
    )
    seeds: tuple[int, ...] | None = param(
        None,
        "run every method once per seed (each seed its own permutations, validation split, data order and "
        "initial weights) and report the mean ± the 95-percent confidence interval over the seeds, with "
        "paired tests, e.g. 0,1,2,3,4; λ / --search choices are made once, on the first seed's validation "
        "parts",
        type=parse_ints,
        metavar="SEEDS",
        check=Numbers(SEED, distinct=True, allow_none=True),
        shown="one run, with --seed",
    )
    save_state: bool = param(
        False, "save each trained learner (weights, method state, scenario) as OUT/checkpoints/METHOD.pt"
    )
    set: list[tuple[str, str, Any]] = param(
        help="a method parameter, e.g. lwf.temperature=2 or replay.capacity=500 (repeatable)",
        default_factory=list,
        type=parse_setting,
        action="append",
        metavar="METHOD.PARAM=VALUE",
    )
    max_train_per_task: int | None = param(
        None, "subsample train parts", type=int, check=Interval(int, 1, allow_none=True)
    )
    jobs: int = param(
        1,
        "methods trained in parallel worker processes, each with --threads torch threads (the "
        "numbers do not depend on --jobs)",
        check=POSITIVE_INT,
    )
    executor: str = executor_param()
    ray_address: str | None = ray_address_param()
    quiet: bool = param(False, "no progress bar")
    track: tuple[str, ...] = track_param()
    train: TrainConfig = param(help="training settings", default_factory=TrainConfig, nested=True)

    def __post_init__(self) -> None:
        self.track = parse_names(self.track)
        validate(self)
        check_lam_grids(self.method_names(), self.select_lam, self.select_l2_lam)
        lam_grids = search_grids(self.method_names(), False, self.select_lam, self.select_l2_lam)
        check_auto(self.method_names(), self.training(), lam_grids)
        # the data and the model, before any work: a .npz file's headers and labels, one model built
        info = check_sequence_data(self.sequence, self.tasks, self.data)
        t = self.train
        options = {"hidden": t.hidden, "dropout": t.dropout, "batchnorm": t.batchnorm}
        check_model(t.model, info.task_shape, getattr(torch, info.task_dtype), info.num_classes, **options)
        check_seeds(self.seeds, self.train.seed)
        make_executor(self.executor, self.ray_address)  # checked now, connected when jobs run

    def method_names(self) -> list[str]:
        """The methods to run (``all``: every registered one)."""
        return method_names(self.methods)

    def training(self) -> TrainConfig:
        """The training settings with ``--set`` parameters and ``--quiet`` applied."""
        params: dict[str, dict[str, Any]] = {}
        for method, name, value in self.set:
            params.setdefault(method, {})[name] = value
        progress = False if self.quiet else self.train.progress
        return dataclasses.replace(self.train, params={**self.train.params, **params}, progress=progress)

    def options(self) -> dict[str, Any]:
        """The keyword options of :func:`run_sequence` that this config sets."""
        return {
            "lam_grid": self.select_lam,
            "l2_lam_grid": self.select_l2_lam,
            "search": self.search,
            "auto_budget": self.auto_budget,
            "save_state": self.save_state,
            "max_train_per_task": self.max_train_per_task,
            "data_root": self.data_root,
            "jobs": self.jobs,
            "seeds": self.seeds,
            "executor": make_executor(self.executor, self.ray_address),
        }


def run(config: RunConfig, out: str | os.PathLike | None) -> dict[str, Any]:
    """``ewc run``: :func:`run_sequence` with the settings of ``config`` (and its trackers)."""
    with open_for("run", config.track, out) as tracker:
        return run_sequence(
            config.sequence,
            config.data,
            config.tasks,
            config.method_names(),
            config.training(),
            out,
            tracker=tracker,
            **config.options(),
        )


def check_seeds(seeds: Sequence[int] | None, seed: int) -> None:
    """A ValueError for bad ``seeds`` or when ``--seed`` and ``--seeds`` disagree: with ``--seeds`` the
    first seed is the run's ``seed`` (it chooses λ); ``--seed`` may be left at its default or repeat it."""
    if seeds is None:
        return
    check(list(seeds), Numbers(SEED, distinct=True), "seeds")
    if seed not in (TrainConfig.__dataclass_fields__["seed"].default, seeds[0]):
        raise ValueError(
            f"--seed {seed} and --seeds {','.join(map(str, seeds))} disagree: give --seeds alone "
            "(every seed in it is run; the first also chooses λ)"
        )


def check_lam_grids(methods: list[str], lam_grid: Any, l2_lam_grid: Any) -> None:
    """A ValueError for a λ grid that none of ``methods`` would use (it used to be ignored): the
    ``--lam`` grid tunes the methods whose spec takes λ from ``--lam`` (and from ``--l2-lam`` when
    that has no grid of its own), the ``--l2-lam`` grid those that take it from ``--l2-lam``."""
    settings = {METHOD_SPECS[m].lam_setting for m in methods if m in METHOD_SPECS}
    for flag, grid, uses in (
        ("--select-lam", lam_grid, {"lam"} if l2_lam_grid else {"lam", "l2_lam"}),
        ("--select-l2-lam", l2_lam_grid, {"l2_lam"}),
    ):
        if grid and not uses & settings:
            takers = [m for m, spec in METHOD_SPECS.items() if spec.lam_setting in uses]
            source = " or ".join("--" + u.replace("_", "-") for u in LAM_SETTINGS if u in uses)
            raise ValueError(
                f"{flag} has no effect: none of the methods {', '.join(methods)} takes λ from {source} "
                f"(those that do: {', '.join(takers)})"
            )


def search_grids(
    methods: list[str], search: bool, lam_grid: list[float] | None, l2_lam_grid: list[float] | None
) -> dict[str, list[dict[str, Any]]]:
    """The validation grid of each method (a list of parameter dicts; methods without one omitted).

    ``lam_grid`` / ``l2_lam_grid`` apply to the methods whose spec takes λ from ``--lam`` /
    ``--l2-lam``; a missing grid falls back as its setting does (``l2_lam`` → ``lam``)."""
    given = {"lam": lam_grid, "l2_lam": l2_lam_grid}
    fallback = {f.name: f.metadata.get("fallback") for f in dataclasses.fields(TrainConfig)}
    lam_grids = {s: given[s] or given.get(fallback[s] or "") for s in LAM_SETTINGS}
    grids: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        spec = METHOD_SPECS[m]
        grid = dict(spec.grid) if search else {}
        lams = lam_grids.get(spec.lam_setting) if spec.lam_setting else None
        if lams:
            grid["lam"] = tuple(lams)
        if grid:
            grids[m] = combinations(grid)
    return grids


def with_params(config: TrainConfig, method: str, params: dict[str, Any]) -> TrainConfig:
    """``config`` with ``params`` set for ``method`` (on top of what it already sets)."""
    merged = {**config.params, method: {**config.params.get(method, {}), **params}}
    return dataclasses.replace(config, params=merged)


def choose_lam(grid: list[float], scores: dict[float, float]) -> dict[str, Any]:
    """The λ with the best validation ACC (ties: the smaller λ)."""
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
    l2_lam_grid: list[float] | None = None,
    search: bool = False,
    auto_budget: float = DEFAULT_BUDGET,
    save_state: bool = False,
    max_train_per_task: int | None = None,
    data_root: str | None = None,
    report: bool = True,
    jobs: int = 1,
    tracker: Logger | None = None,
    seeds: Sequence[int] | None = None,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Run ``methods`` on an ``n_tasks`` ``sequence`` of ``data``; write results into ``out``.

    With ``search``, every method's registered grid (``METHOD_SPECS[m].grid``) is searched on
    the validation parts first; ``lam_grid`` / ``l2_lam_grid`` set the λ grid of every method
    whose spec takes λ from ``--lam`` / ``--l2-lam`` (with or without ``search``). The chosen
    values are recorded in ``config.selection``. A method whose strength is ``auto`` (``--lam auto``,
    ``--set si.c=auto``) has it chosen by :func:`ewc.experiments.lam_search.search_auto` (a screen of
    ``auto_budget`` task-lengths, then full runs of λ = 0 and two finalists, about 3 runs in
    all); its curve, verdict and cost are recorded there too, and the chosen finalist's run is the
    method's test run (at the first seed with ``seeds``).
    ``save_state`` saves each trained learner (model, method state, scenario) under
    ``out/checkpoints/METHOD.pt``, loadable with :func:`ewc.checkpoint.load_checkpoint`.
    ``tracker`` (:mod:`ewc.tracking`) receives the record once it is written
    (:func:`ewc.experiments.tracked.log_sequence`).
    ``seeds``: every method's test run once per seed (``config.seed`` becomes the first, which
    chooses the hyper-parameters); the record keeps each seed's run under ``per_seed`` and the mean
    ± 95 % CI under ``methods`` (:mod:`ewc.report.seeds`); checkpoints are ``METHOD-seedS.pt``.
    ``executor`` (:func:`ewc.executors.make_executor`) runs the training jobs, ``jobs`` at a time.
    """
    unknown = [m for m in methods if m not in METHOD_SPECS]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHOD_SPECS)}"
        )
    if not methods:
        raise ValueError("no methods given")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    check_lam_grids(methods, lam_grid, l2_lam_grid)
    check_seeds(seeds, config.seed)
    if seeds is not None:
        config = dataclasses.replace(config, seed=int(seeds[0]))
    stray = sorted(set(config.params) - set(methods))
    if stray:
        raise ValueError(f"parameters given for method(s) not run: {', '.join(stray)}")
    autos = check_auto(methods, config, search_grids(methods, False, lam_grid, l2_lam_grid))
    for m in methods:  # bad parameters fail here, before any training
        if make_method(m, **method_params(m, probe_config(config, autos))).dropout is not None:
            check_takes_dropout(config.model, m)
    out_dir = check_out_dir(out) if out is not None else None
    config = dataclasses.replace(config, threads=run_threads(config.threads))  # the same in every worker
    check_model_for_workers(config, jobs)
    key = (sequence, data, n_tasks, max_train_per_task, data_root)
    tasks, _ = build_tasks(sequence, data, n_tasks, config.seed, max_train_per_task, data_root)

    # 1. hyper-parameters on the validation parts (never the test parts)
    grids = search_grids(methods, search, lam_grid, l2_lam_grid)
    grids = {m: g for m, g in grids.items() if m not in autos}  # auto replaces the --search grid
    specs = [(key, m, with_params(config, m, combo), True) for m, combos in grids.items() for combo in combos]
    progress = out_dir / "progress" if out_dir is not None else None
    specs = [(*spec, None, progress) for spec in specs]
    scores = iter(run_all(specs, jobs, executor=executor))
    selection: dict[str, Any] = {}
    for m, combos in grids.items():
        accs = [next(scores)["average_accuracy"] for _ in combos]
        best = max(range(len(combos)), key=lambda k: (accs[k], -k))  # ties: the first in grid order
        selection[m] = {"grid": combos, "validation_acc": accs, "chosen": combos[best]}
    form = "{m}.pt" if seeds is None else "{m}-seed{s}.pt"
    keep = out_dir / "checkpoints" if save_state and out_dir is not None else None
    if keep is not None:
        keep.mkdir(exist_ok=True)
    searched = search_auto(
        key,
        tasks,
        autos,
        config,
        budget=auto_budget,
        jobs=jobs,
        executor=executor,
        progress=progress,
        checkpoints=keep is not None,
    )
    # a searched method's test run at the first seed is the search's chosen run (nothing runs twice)
    chosen_runs = {m: record.pop("run") for m, record in searched.items() if "run" in record}
    chosen_files = {m: record.pop("checkpoint") for m, record in searched.items() if "checkpoint" in record}
    selection.update(searched)
    # 2. the test run of every method, with its chosen hyper-parameters
    configs = {m: with_params(config, m, selection[m]["chosen"]) for m in selection}
    configs = {m: configs.get(m, config) for m in methods}
    # (with --seeds: once per seed, the first seed's choices for all; checkpoints METHOD-seedS.pt)
    run_seeds = [int(s) for s in seeds] if seeds is not None else [config.seed]
    saves = {(m, s): Path("checkpoints", form.format(m=m, s=s)) for s in run_seeds for m in methods}
    if keep is not None:
        for m, file in chosen_files.items():  # (the search's own copy stays for a rerun)
            shutil.copyfile(file, out_dir / saves[(m, config.seed)])
    else:
        saves = dict.fromkeys(saves)
    todo = [(m, s) for m, s in saves if not (s == config.seed and m in chosen_runs)]
    specs = [
        (m, dataclasses.replace(configs[m], seed=s), saves[(m, s)] and out_dir / saves[(m, s)])
        for m, s in todo
    ]
    done = iter(run_all([(key, m, c, False, p, progress) for m, c, p in specs], jobs, executor=executor))
    runs = [chosen_runs[m] if (m, s) not in todo else next(done) for m, s in saves]
    per_seed = [
        {"seed": s, "tasks": task_records(sequence, data, n_tasks, s, max_train_per_task, data_root)}
        for s in run_seeds
    ]
    for ((m, s), path), res in zip(saves.items(), runs, strict=True):
        res["params"] = method_params(m, configs[m])
        if path is not None:
            res["checkpoint"] = path.as_posix()
        if "lam" in selection.get(m, {}).get("chosen", {}):
            res["lam"] = selection[m]["chosen"]["lam"]
        per_seed[run_seeds.index(s)].setdefault("methods", {})[m] = res
    finish_cost(selection, per_seed[0]["methods"])
    results: dict[str, Any] = {"methods": per_seed[0]["methods"]}
    if seeds is not None:
        from ewc.report.seeds import aggregate_seeds

        results["methods"] = aggregate_seeds(per_seed)

    results["config"] = {
        "dataset": data,
        "data": data_record(data),
        "sequence": sequence,
        "tasks": n_tasks,
        "methods": methods,
        "max_train_per_task": max_train_per_task,
        "lam_grid": lam_grid,
        "l2_lam_grid": l2_lam_grid,
        "search": search,
        "auto_budget": auto_budget,
        "selection": selection,
        "jobs": jobs,
        **({} if seeds is None else {"seeds": run_seeds}),
        **config.to_dict(),
        "scenario": Scenario.for_tasks(config.scenario, [t.classes for t in tasks]).kind,
        "versions": {"ewc": ewc.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results["tasks"] = per_seed[0]["tasks"]
    if seeds is not None:
        results["per_seed"] = per_seed
    paths = None
    if out_dir is not None:
        write_json(results, out_dir / "results.json")
        if report:
            from ewc.report import write_report

            paths = write_report(results, out_dir)
    log_sequence(tracker, results, sequence_files(out_dir, paths))
    return results
