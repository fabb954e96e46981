"""The task-sequence loop: train tasks one after another, evaluate every task as we go.

For each method the loop starts from the same initial weights (seeded) and visits the same data
in the same order, so methods differ only in the method. After each task it measures test
accuracy on *every* task (a row of the accuracy matrix R[i][j]); during training it measures a
fixed test subset of every task every ``eval_every`` mini-batches (the curves of the paper's
Fig. 2A, and the learning-curve area), and records with each such point the mean task loss of the
mini-batches since the previous point and the penalty (what the method adds to the task loss) of
the last one: read at the evaluation cadence, since a penalty's value is computed only when read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from ewc.checkpoint import SaveSchedule, load_progress, save_progress
from ewc.checks import MAX_THREADS, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Interval, OrWord, Sizes
from ewc.config import param, parse_strength, validate
from ewc.curves import Curves, SincePoint
from ewc.data import Task, validation_tasks
from ewc.deferred import known_part
from ewc.evaluation import accuracies, accuracy, test_parts
from ewc.fisher import FISHER_MODES
from ewc.methods import AUTO, METHOD_SPECS, Batch, Method, make_method
from ewc.methods.regularizers import EWC_DEFAULTS
from ewc.metrics import summarize
from ewc.models import (
    MLP_HIDDEN,
    MODELS,
    ModelChoice,
    ModelFactory,
    build_model,
    check_outputs,
    check_takes_dropout,
    model_name,
    model_options,
)
from ewc.progress_bar import Progress
from ewc.runtime import (
    DEFAULT_THREADS,
    OPTIMIZERS,
    check_device,
    check_optimizer,
    make_optimizer,
    setup_runtime,
    torch_threads,
)
from ewc.scenario import SCENARIOS, Scenario
from ewc.snapshots import has_snapshot, save_snapshot
from ewc.state import json_digest


@dataclass
class TrainConfig:
    """Everything that defines a run besides the data and the methods (each field declared once:
    its default, help and constraint; ``ewc run`` / ``ewc compare`` flags are generated from it)."""

    epochs: int = param(5, "epochs per task", check=POSITIVE_INT)
    batch_size: int = param(64, "mini-batch size", check=POSITIVE_INT)
    lr: float = param(1e-3, "learning rate", check=POSITIVE)
    optimizer: str = param("adam", "optimiser, fresh state per task", choices=OPTIMIZERS)
    momentum: float = param(0.0, "SGD momentum", check=NON_NEGATIVE)
    model: str | ModelFactory = param(
        "mlp",
        f"network: a registered name ({', '.join(MODELS)}; see docs/models.md) or MODULE:FACTORY, a "
        "function importable from sys.path or the working directory, called as FACTORY(input_shape, "
        "num_outputs) (in Python also the factory itself)",
        check=ModelChoice(),
        metavar="NAME|MODULE:FACTORY",
    )
    hidden: tuple[int, ...] = param(
        MLP_HIDDEN,
        "hidden sizes of the mlp, e.g. 400,400 (none: a linear model)",
        check=Sizes(allow_empty=True),
    )
    dropout: float = param(
        0.0, "dropout after each hidden layer (mlp, cnn)", check=Interval(float, 0, 1, closed="left")
    )
    batchnorm: bool = param(False, "BatchNorm after each hidden layer (the BatchNorm experiment)", cli=False)
    scenario: str | None = param(
        None,
        "task-, domain- or class-incremental: which outputs a task is trained and tested on",
        choices=SCENARIOS,
        shown="domain when the tasks share their classes, as in permuted; class otherwise",
    )
    lam: float | str = param(
        EWC_DEFAULTS["lam"],
        "EWC strength λ (penalty λ/2·ΣF(θ−θ*)²), or auto: chosen on the validation parts by a search "
        "costing about 3 runs, its chosen run included (ewc run / ewc compare; docs/methods.md)",
        type=parse_strength,
        check=OrWord(NON_NEGATIVE, AUTO),
        metavar="LAM|auto",
    )
    l2_lam: float | str | None = param(
        None,
        "L2 strength, or auto",
        type=parse_strength,
        check=OrWord(Interval(float, 0, allow_none=True), AUTO),
        fallback="lam",
        shown="--lam",
        metavar="LAM|auto",
    )
    gamma: float = param(
        EWC_DEFAULTS["gamma"], "online EWC decay γ in (0, 1]", check=Interval(float, 0, 1, closed="right")
    )
    fisher: str = param(EWC_DEFAULTS["fisher"], "Fisher mode", choices=FISHER_MODES)
    fisher_samples: int | None = param(
        EWC_DEFAULTS["fisher_samples"],
        "samples per task for the Fisher",
        type=int,
        check=Interval(int, 1, allow_none=True),
    )
    eval_every: int = param(50, "mini-batches between evaluations of every task", check=POSITIVE_INT)
    curve_samples: int = param(500, "test samples per task used for the curves", check=POSITIVE_INT)
    params: dict[str, dict[str, Any]] = param(
        help="method → its parameters (--set METHOD.PARAM=VALUE)", default_factory=dict, cli=False
    )
    seed: int = param(0, "seed for data, permutations and initial weights", check=SEED)
    device: str = param("cpu", "cpu or cuda")
    threads: int | None = param(
        DEFAULT_THREADS,
        "torch threads of each training run, also in each --jobs worker (the numbers depend on it, "
        "not on --jobs); None in the library: the calling process's setting",
        type=int,
        check=Interval(int, 1, MAX_THREADS, allow_none=True),
    )
    progress: bool | None = param(None, "a bar on a terminal (None), always, or never", cli=False)
    final_only: bool = param(
        False,
        "test the tasks only after the last one (ACC alone: no earlier rows of the matrix, no baseline) "
        "and skip the method's consolidation after the last task (no later task needs it); "
        "the runs of a λ search, which are scored by ACC",
        cli=False,
    )

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        validate(self)
        check_optimizer(self.optimizer, self.momentum)
        check_device(self.device)
        self._check_architecture()

    def _check_architecture(self) -> None:
        """A ValueError for an architecture setting changed from its default that the model does
        not take (it would be silently ignored: ``--hidden`` with ``--model cnn``)."""
        changed = [
            f.name for f in fields(self) if f.name in ARCHITECTURE and getattr(self, f.name) != f.default
        ]
        ignored = sorted(set(changed) - set(model_options(self.model, **dict.fromkeys(changed))))
        if ignored:
            takes = sorted(model_options(self.model, **dict.fromkeys(ARCHITECTURE)))
            raise ValueError(
                f"model {model_name(self.model)!r} does not take {', '.join(ignored)} (of the architecture "
                f"settings it takes: {', '.join(takes) or 'none'})"
            )

    def setting(self, name: str) -> Any:
        """A run setting by name; a None setting declared with ``fallback`` reads that one."""
        value, fallback = getattr(self, name), self.fallback(name)
        return getattr(self, fallback) if value is None and fallback else value

    def fallback(self, name: str) -> str | None:
        """The setting a None setting ``name`` reads instead (its field's ``fallback``), if any."""
        return {f.name: f.metadata.get("fallback") for f in fields(self)}.get(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["model"] = model_name(self.model)  # a factory given in Python: its module:name
        return d


#: the TrainConfig settings offered to every model factory (each takes those it declares)
ARCHITECTURE = ("hidden", "dropout", "batchnorm")


def method_params(name: str, config: TrainConfig) -> dict[str, Any]:
    """The parameters a registered method is built with: the run settings its spec declares
    (``run_params``: EWC's λ, γ and Fisher settings, L2's λ), then ``config.params[name]``."""
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHOD_SPECS)}")
    run = METHOD_SPECS[name].run_params
    params = {param_name: config.setting(setting) for param_name, setting in run.items()}
    return {**params, **config.params.get(name, {})}


def run_method(
    tasks: Sequence[Task],
    method: str | Method,
    config: TrainConfig,
    scenario: str | Scenario | None = None,
    *,
    progress: str | os.PathLike | None = None,
    prefix: str | os.PathLike | None = None,
    validation: bool = False,
    defer_tests: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``method`` on ``tasks`` in order; return its accuracy matrix, curves and metrics.

    ``progress``: a file where the run is saved after a task (atomically; after every task unless
    saving grows costly, see :class:`~ewc.checkpoint.SaveSchedule`) and resumed from when it
    exists and was written by the same run (same method, settings and tasks): a run killed
    mid-task restarts from the last saved task and ends with the results of an uninterrupted run.

    ``scenario`` (``task`` / ``domain`` / ``class``, default ``config.scenario``, else the
    natural one: domain-incremental when all tasks share their classes, class-incremental
    otherwise) decides the output layer's width and which outputs each task is trained and
    evaluated on. R[i][j] is evaluated after task i on task j's head (class-IL: the classes of
    tasks 0..max(i, j)). The run uses ``config.threads`` torch threads (recorded as ``threads``;
    the process's setting is restored afterwards).

    ``prefix``: a file holding the run's state after its first task, shared by the runs that
    differ from this one only in the method's strength (a registered method named by ``method``):
    the strength acts through a penalty on what earlier tasks learned, so nothing of the first
    task depends on it. A run that finds the file (written by such a run) starts from it with its
    own strength (``Method.set_strength``) and records the shared part's steps and seconds under
    ``prefix``; a run that does not writes it after its first task. Either way the results are
    those of a run from scratch (``tests/test_lam_search.py``). ``validation``: also score the
    trained model on every task's validation part (``validation_acc``: their mean accuracy).
    ``defer_tests``: a folder where the model is saved before the first task and after each task
    instead of being tested (the accuracy matrix's rows are empty and ACC is None until
    :func:`ewc.snapshots.evaluate_snapshots` tests them; the learning curves are drawn as usual).
    """
    with torch_threads(config.threads) as threads:
        out = _train(tasks, method, config, scenario, progress, prefix, validation, defer_tests)
    out["threads"] = threads
    return out


def _train(
    tasks: Sequence[Task],
    method: str | Method,
    config: TrainConfig,
    scenario: str | Scenario | None,
    progress: str | os.PathLike | None,
    prefix: str | os.PathLike | None = None,
    validation: bool = False,
    defer_tests: str | os.PathLike | None = None,
) -> dict[str, Any]:
    if not tasks:
        raise ValueError("no tasks to train on")
    if defer_tests is not None and config.final_only:
        raise ValueError("a run that tests only after the last task (final_only) has no tests to defer")
    if prefix is not None and not (isinstance(method, str) and METHOD_SPECS.get(method, None)):
        raise ValueError(f"a shared prefix needs a registered method's name, got {method!r}")
    if prefix is not None and not METHOD_SPECS[method].strength:
        raise ValueError(f"{method} has no strength: runs of it have no prefix to share")
    name = method if isinstance(method, str) else None
    if not isinstance(scenario, Scenario):
        scenario = Scenario.for_tasks(scenario or config.scenario, [t.classes for t in tasks])
    device = setup_runtime(config.seed, None, config.device)  # threads: set by run_method
    if isinstance(method, str):
        params = method_params(method, config)
        auto = [k for k, v in params.items() if v == AUTO]
        if auto:
            raise ValueError(
                f"{method}: {', '.join(auto)}={AUTO!r} is chosen by ewc run's search (run_sequence), "
                "not by run_method: give a number"
            )
        method = make_method(method, **params)
    first = tasks[0].x_train
    input_shape, input_dtype, probe = tuple(first.shape[1:]), first.dtype, first[:2].clone()
    input_dim = math.prod(input_shape)
    del first  # the task's training part is built again when it is trained
    dropout = config.dropout if method.dropout is None else method.dropout
    options = model_options(config.model, hidden=config.hidden, dropout=dropout, batchnorm=config.batchnorm)
    if method.dropout is not None:
        check_takes_dropout(config.model, method.name)
    torch.manual_seed(config.seed)  # the same initial weights for every method
    model = build_model(config.model, input_shape, scenario.num_outputs, **options).to(device)
    method.setup(model, scenario)

    tests, subsets = test_parts(tasks, device, input_shape, input_dtype, config.curve_samples)
    check_outputs(model, probe.to(device), scenario.num_outputs, model_name(config.model))
    if defer_tests is not None:
        save_snapshot(defer_tests, "init", model)
    baseline = None
    curves = Curves()
    matrix: list[list[float]] = []
    step = 0
    eval_seconds = 0.0
    since = SincePoint(device)

    def evaluate(k: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        accs = accuracies(model, subsets, scenario, k)
        curves.steps.append(step)
        curves.accuracy.append(accs)
        curves.per_task[k].append(accs[k])
        task_loss, penalty = since.read()
        curves.task_loss.append(task_loss)
        curves.penalty.append(penalty)
        eval_seconds += time.perf_counter() - t0

    deferred = ":tests deferred" if defer_tests is not None else ""  # rows [] to be tested later
    identity = _identity(method.name, config, scenario, tasks) + deferred
    done = load_progress(progress, identity, model, method) if progress is not None else None
    shared = _shared_identity(name, config, scenario, tasks) + deferred if prefix is not None else None
    forked = done.get("prefix") if done is not None else None
    if done is None and shared is not None:
        done = load_progress(prefix, shared, model, method)
        if done is not None:  # the first task as the run that wrote the file learned it
            method.set_strength(method_params(name, config)[METHOD_SPECS[name].strength])
            forked = {"steps": done["step"], "seconds": done["seconds"]}
    if done is not None:
        matrix, step, eval_seconds = done["matrix"], done["step"], done["eval_seconds"]
        baseline, curves = done["baseline"], Curves(**done["curves"])
        last = f"task-{len(matrix) - 1}"  # a shared first task's weights: saved by another run
        if defer_tests is not None and matrix and not has_snapshot(defer_tests, last):
            save_snapshot(defer_tests, last, model)
    elif not config.final_only and defer_tests is None:  # the untrained model (still its initial weights)
        baseline = [accuracy(model, x, y, scenario=scenario, task=j) for j, (x, y) in enumerate(tests)]
    sizes = [method.epoch_size(i, tasks) for i in range(len(tasks))]
    total = sum(config.epochs * math.ceil(n / config.batch_size) for n in sizes[len(matrix) :])
    bar = Progress(total, method.name, config.progress)
    start = time.perf_counter() - (done["seconds"] if done is not None else 0.0)
    schedule = SaveSchedule()
    for i, task in enumerate(tasks):
        if i < len(matrix):
            continue  # resumed: learned before the kill
        method.before_task(i, task)
        data = method.train_data(i, tasks)  # (x, y), or (x, y, per-sample task ids)
        x, y = data[0], data[1]
        ids = data[2] if len(data) > 2 else None
        opt = _optimizer(config, model)  # fresh optimiser state per task
        gen = torch.Generator().manual_seed(config.seed * 10_007 + i)  # same order for every method
        curves.task_starts.append(step)
        curves.per_task.append([])
        evaluate(i)
        model.train()
        task_step = 0  # evaluation points are spaced from each task's start
        size = min(method.epoch_size(i, tasks), len(x))
        for _ in range(config.epochs):
            order = torch.randperm(len(x), generator=gen)[:size]
            for b in range(0, size, config.batch_size):
                idx = order[b : b + config.batch_size]
                if config.batchnorm and len(idx) < 2:
                    continue  # BatchNorm has no batch statistics for a single sample
                since.next_batch()
                xb, yb = x[idx].to(device), y[idx].to(device)
                out = model(xb)
                which = i if ids is None else ids[idx].to(device)
                task_loss = scenario.cross_entropy(out, yb, which, seen=i)
                loss = method.loss(task_loss, Batch(xb, yb, out, i))
                # without a penalty's value, which is computed only when read (a penalty that
                # overflows reaches the task loss through the parameters a step later)
                if not torch.isfinite(known_part(loss)):
                    raise ValueError(
                        f"{method.name}: training diverged on task {i + 1} at step {step} "
                        f"(loss {loss.item()}); "
                        f"lower the learning rate (lr={config.lr}) or the penalty strength (lam={config.lam})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                method.after_backward()
                opt.step()
                method.after_step()
                since.add(loss, task_loss)
                step += 1
                task_step += 1
                if task_step % config.eval_every == 0:
                    evaluate(i)
                    model.train()
                if bar.enabled:
                    bar.update(1, lambda i=i, loss=loss: f"task {i + 1}/{len(tasks)} loss {loss.item():.3f}")
        if curves.steps[-1] != step:
            evaluate(i)
        model.eval()
        del data, x, y, ids  # the task's training data: not held while the next task's is built
        if not (config.final_only and i == len(tasks) - 1):  # a search run: nothing follows it
            method.after_task(i, task)
        t0 = time.perf_counter()
        final_only = config.final_only and i < len(tasks) - 1
        if defer_tests is not None:
            save_snapshot(defer_tests, f"task-{i}", model)
        untested = final_only or defer_tests is not None
        matrix.append([] if untested else accuracies(model, tests, scenario, i))  # [] : not tested
        eval_seconds += time.perf_counter() - t0
        share = shared is not None and i == 0 and len(tasks) > 1 and not os.path.exists(prefix)
        # (none after the last task: the run ends here and its caller keeps the result)
        save = progress is not None and i < len(tasks) - 1 and schedule.due()
        if share or save:
            loop = {"matrix": matrix, "step": step, "eval_seconds": eval_seconds, "baseline": baseline}
            loop.update(curves=asdict(curves), seconds=time.perf_counter() - start, prefix=forked)
            if share:  # the state every strength shares: no penalty acted yet
                save_progress(prefix, shared, model, method, {**loop, "prefix": None})
            if save:
                schedule.save(save_progress, progress, identity, model, method, loop)
    bar.close()
    seconds = time.perf_counter() - start

    out: dict[str, Any] = {"accuracy_matrix": matrix}
    if config.final_only:  # ACC and the last row; the metrics that need the matrix are None
        last = matrix[-1]
        out.update(average_accuracy=sum(last) / len(last), final_accuracies=last, bwt=None, fwt=None)
        out.update(forgetting=None, lca=None)
    elif defer_tests is not None:  # ewc.snapshots.evaluate_snapshots fills these in
        out.update(
            average_accuracy=None, final_accuracies=None, bwt=None, fwt=None, forgetting=None, lca=None
        )
        out["tests_deferred"] = os.fspath(defer_tests)
    else:
        out.update(summarize(matrix, baseline, curves.per_task))
    out.update(
        {
            "seconds": seconds,
            "train_seconds": seconds - eval_seconds,
            "baseline_accuracy": baseline,
            "scenario": scenario.kind,
            "architecture": {
                "model": model_name(config.model),
                "input_shape": list(input_shape),
                "input_dim": input_dim,
                "num_classes": scenario.num_outputs,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            },
            "memory_bytes": method.memory_bytes(),
            "curves": asdict(curves),
        }
    )
    if forked is not None:
        out["prefix"] = forked
    if validation:  # the trained model on every task's validation part
        parts, _ = test_parts(validation_tasks(tasks), device, input_shape, input_dtype, config.curve_samples)
        accs = accuracies(model, parts, scenario, len(tasks) - 1)
        out["validation_acc"] = sum(accs) / len(accs)
    out["model"] = model
    out["method"] = method
    return out


def _identity(name: str, config: TrainConfig, scenario: Scenario, tasks: Sequence[Task]) -> str:
    """A digest of what a run's results depend on: the method and its parameters, the settings,
    the scenario, the number of tasks and the first task's name and first rows (a dataset or
    sequence of its own changes them; the other tasks are not read, so lazy ones stay unmade)."""
    settings = {k: v for k, v in config.to_dict().items() if k != "progress"}
    head = [name, method_params(name, config) if name in METHOD_SPECS else None]
    head += [settings, scenario.kind, [list(c) for c in scenario.task_classes]]
    first = tasks[0]
    parts = (first.x_train, first.y_train)
    rows = [[tuple(p.shape), str(p.dtype), p[:16].detach().cpu().tolist()] for p in parts]
    return json_digest([head, len(tasks), first.name, rows])


def _shared_identity(name: str, config: TrainConfig, scenario: Scenario, tasks: Sequence[Task]) -> str:
    """:func:`_identity` of a run with its method's strength masked: the same for every strength
    (the identity of the state after the first task, which no strength changes)."""
    strength = METHOD_SPECS[name].strength
    masked = {**config.params, name: {**config.params.get(name, {}), strength: AUTO}}
    fields_ = {}
    setting = METHOD_SPECS[name].run_params.get(strength)
    while setting:  # the run setting it may come from, and the one that setting falls back to
        fields_[setting] = AUTO
        setting = config.fallback(setting)
    return "prefix:" + _identity(name, replace(config, params=masked, **fields_), scenario, tasks)


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return make_optimizer(config.optimizer, params, config.lr, config.momentum)
