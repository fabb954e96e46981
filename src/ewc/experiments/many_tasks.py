"""EWC against SGD with dropout as permuted tasks accumulate (the paper's Fig. 2C).

After each new task of a permuted sequence we take the average test accuracy over all tasks seen
so far, mean(R[i][:i+1]) of the accuracy matrix, for EWC and for SGD with dropout, plus plain
SGD as a reference. Both are tuned the way the paper did, on validation data only: the dropout
rate from a small grid for the dropout network, λ from a small grid for EWC; the choice
maximises the final average accuracy over all tasks on the validation parts.

Differences from the paper, kept small on purpose so the defaults run in minutes on 2 CPU cores:
the embedded 10k-image MNIST subset (with it, 7,200 training images per task), 2 epochs per
task, Adam (the repository's default; the paper used plain SGD), and a search over the hidden
dropout rate only (the paper also searched input dropout, learning rate, width and early
stopping). Flags scale it up (``--data mnist``, ``--epochs``, ``--hidden``, the grids).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ewc.checks import (
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    THREADS,
    Interval,
    Numbers,
    Registered,
    Sizes,
)
from ewc.config import validate
from ewc.data import DATASETS
from ewc.experiments.common import figure_style, finish, md_table, new_figure, param, setup_runtime
from ewc.experiments.sequence import choose_lam, run_all
from ewc.methods.regularizers import EWC_LAM_GRID
from ewc.report import method_color
from ewc.runtime import OPTIMIZERS
from ewc.train import TrainConfig

NAME = "many-tasks"
TITLE = "EWC vs SGD with dropout as permuted tasks accumulate (Fig. 2C)"
CLAIM = (
    "On a sequence of up to 10 permuted-MNIST tasks, the average accuracy over the tasks seen so far "
    "stays high for EWC, while SGD with dropout regularisation (hyper-parameters chosen on validation "
    "data) degrades as tasks accumulate (Fig. 2C)."
)

# Method keys in the results, their labels, and the method each one trains with.
LABELS = {"ewc": "EWC", "dropout": "SGD + dropout", "sgd": "SGD (no dropout)"}
BASE_METHOD = {"ewc": "ewc", "dropout": "sgd", "sgd": "sgd"}
RATE = Interval(float, 0, 1, closed="neither")  # a dropout rate


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "tasks": 3,
    "max_train_per_task": 300,
    "epochs": 2,
    "hidden": (32,),
    "lr": 3e-3,
    "dropout_grid": (0.2,),
    "lam_grid": (10.0, 1000.0),
    "fisher_samples": 200,
    "jobs": 1,
}


@dataclass
class Config:
    """The task sequence, the network, the training and the two validation grids."""

    data: str = param("mnist-10k", "dataset the permuted tasks are made from", check=Registered(DATASETS))
    tasks: int = param(10, "number of permuted tasks (the paper: 10)", check=POSITIVE_INT)
    max_train_per_task: int = param(
        0, "training images per task (0: all of the dataset's)", check=NON_NEGATIVE_INT
    )
    epochs: int = param(2, "epochs per task", check=POSITIVE_INT)
    batch_size: int = param(64, "mini-batch size", check=POSITIVE_INT)
    lr: float = param(1e-3, "learning rate", check=POSITIVE)
    optimizer: str = param("adam", "optimiser (fresh state per task)", choices=OPTIMIZERS)
    hidden: tuple[int, ...] = param((800, 800), "hidden layer sizes", check=Sizes())
    dropout_grid: tuple[float, ...] = param(
        (0.2, 0.5), "dropout rates searched on validation data", check=Numbers(RATE)
    )
    lam_grid: tuple[float, ...] = param(
        EWC_LAM_GRID, "EWC λ values searched on validation data", check=Numbers(POSITIVE)
    )
    fisher_samples: int = param(1000, "samples per task for EWC's Fisher", check=POSITIVE_INT)
    baseline: bool = param(True, "also train plain SGD (no dropout) as a reference")
    seed: int = param(0, "seed for data, permutations and initial weights", check=SEED)
    threads: int = param(1, "torch threads per process", check=THREADS)
    jobs: int = param(2, "training runs in parallel worker processes", check=POSITIVE_INT)

    def __post_init__(self) -> None:
        validate(self)
        self.hidden = tuple(self.hidden)
        self.lam_grid = tuple(float(lam) for lam in self.lam_grid)
        self.dropout_grid = tuple(float(p) for p in self.dropout_grid)


def average_so_far(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Average test accuracy over the tasks seen so far, after each task: mean(R[i][:i+1])."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def train_config(config: Any, **overrides: Any) -> TrainConfig:
    """The TrainConfig of an experiment config (its training fields), with ``overrides``.

    Learning curves are not needed here: one evaluation at each task's start and end, on few samples.
    """
    base = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name in {g.name for g in dataclasses.fields(config)}
    }
    return TrainConfig(**{**base, "eval_every": 10**9, "curve_samples": 50, "progress": False, **overrides})


def data_key(config: Any) -> tuple:
    """The task-sequence key of :func:`ewc.experiments.sequence.run_all`'s jobs (permuted tasks)."""
    return ("permuted", config.data, config.tasks, config.max_train_per_task or None, None)


def run_summary(res: dict[str, Any]) -> dict[str, Any]:
    """A run's record without its learning curves (not used here; they would bloat results.json)."""
    keys = ("accuracy_matrix", "average_accuracy", "bwt", "forgetting", "seconds", "train_seconds")
    return {k: res[k] for k in keys}


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """Search both methods' hyper-parameters on validation data, then the test runs; report."""
    start = time.perf_counter()
    setup_runtime(config.seed, config.threads)
    key = data_key(config)
    grids = {"dropout": list(config.dropout_grid), "ewc": list(config.lam_grid)}
    hyper = {"dropout": "dropout", "ewc": "lam"}

    # 1. the searches, on the validation parts only
    specs = [
        (key, BASE_METHOD[m], train_config(config, **{hyper[m]: v}), True)
        for m, grid in grids.items()
        for v in grid
    ]
    scores = iter(run_all(specs, config.jobs, out))
    selection = {
        m: choose_lam(grid, {v: next(scores)["average_accuracy"] for v in grid}) for m, grid in grids.items()
    }
    for m in grids:
        selection[m]["parameter"] = hyper[m]

    # 2. the test runs with the chosen values (and plain SGD)
    chosen = {m: {hyper[m]: selection[m]["chosen"]} for m in grids}
    if config.baseline:
        chosen["sgd"] = {}
    specs = [(key, BASE_METHOD[m], train_config(config, **kw), False) for m, kw in chosen.items()]
    methods = {}
    for (m, kw), res in zip(chosen.items(), run_all(specs, config.jobs, out), strict=True):
        methods[m] = {"label": LABELS[m], **kw, **run_summary(res)}
        methods[m]["average_so_far"] = average_so_far(res["accuracy_matrix"])
        methods[m]["first_task"] = [row[0] for row in res["accuracy_matrix"]]

    results = {"results": {"methods": methods, "selection": selection}}
    return finish(
        out,
        NAME,
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures={"many_tasks.png": _figure(methods)} if out is not None else {},
        findings=_findings(methods, selection),
        tables=_tables(methods, selection),
        seconds=time.perf_counter() - start,
    )


def pct(x: float) -> str:
    """An accuracy as a percentage with one decimal."""
    return f"{100 * x:.1f}%"


def _findings(methods: dict[str, Any], selection: dict[str, Any]) -> list[str]:
    """Sentences read off the measured numbers."""
    ewc, drop = methods["ewc"]["average_so_far"], methods["dropout"]["average_so_far"]
    T = len(ewc)
    p, lam = selection["dropout"]["chosen"], selection["ewc"]["chosen"]
    ref = f", plain SGD {pct(methods['sgd']['average_so_far'][-1])}" if "sgd" in methods else ""
    out = [
        f"After all {T} tasks the average test accuracy over the tasks is {pct(ewc[-1])} for EWC "
        f"(λ = {lam:g}) and {pct(drop[-1])} for SGD + dropout (rate {p:g}){ref}.",
        f"From 1 to {T} tasks the average over the tasks seen falls by {100 * (drop[0] - drop[-1]):.1f} pp "
        f"with dropout and by {100 * (ewc[0] - ewc[-1]):.1f} pp with EWC.",
    ]
    ewc_wins = ewc[-1] > drop[-1] and ewc[0] - ewc[-1] < drop[0] - drop[-1]
    if ewc_wins:
        ahead = sum(e > d for e, d in zip(ewc, drop, strict=True))
        out.append(
            f"As in the paper, dropout alone degrades more as tasks accumulate than EWC; EWC's average is "
            f"the higher one after {ahead} of the {T} tasks."
        )
    else:
        out.append("Unlike the paper, EWC does not stay ahead of dropout as tasks accumulate in this run.")
    if T > 1 and ewc[0] - ewc[-1] > 0.02:
        out.append(
            f"EWC does not stay at its single-task level though ({pct(ewc[0])} → {pct(ewc[-1])}); "
            "in the paper, trained on the full MNIST training set, it stays close to it."
        )
    if "sgd" in methods:
        gain = drop[-1] - methods["sgd"]["average_so_far"][-1]
        out.append(
            f"Dropout {'improves on' if gain > 0 else 'does not improve on'} plain SGD after {T} tasks "
            f"({100 * gain:+.1f} pp)."
        )
    for m, name in (("dropout", "dropout rate"), ("ewc", "λ")):
        s = selection[m]
        edge = (
            " (at the edge of the grid)"
            if len(s["grid"]) > 1 and s["chosen"] in (min(s["grid"]), max(s["grid"]))
            else ""
        )
        out.append(
            f"Validation search for {LABELS[m]}: {name} ∈ {{{', '.join(f'{v:g}' for v in s['grid'])}}}, "
            f"chosen {s['chosen']:g}{edge} (validation accuracy {pct(max(s['validation_acc']))})."
        )
    return out


def _tables(methods: dict[str, Any], selection: dict[str, Any]) -> list[str]:
    """The average over tasks seen per number of tasks, and the two searches."""
    T = len(methods["ewc"]["average_so_far"])
    names = list(methods)
    curve = md_table(
        ["Tasks seen", *(LABELS[m] for m in names)],
        [[str(i + 1), *(f"{methods[m]['average_so_far'][i]:.3f}" for m in names)] for i in range(T)],
    )
    search = md_table(
        ["Method", "Searched", "Value", "Validation ACC", "Chosen"],
        [
            [LABELS[m], s["parameter"], f"{v:g}", f"{a:.3f}", "✓" if v == s["chosen"] else ""]
            for m, s in selection.items()
            for v, a in zip(s["grid"], s["validation_acc"], strict=True)
        ],
        ["---", "---", "---:", "---:", ":---:"],
    )
    return [
        "## Average test accuracy over the tasks seen so far",
        curve,
        "## Hyper-parameter search (validation parts; final average accuracy over all tasks)",
        search,
    ]


def _figure(methods: dict[str, Any]) -> Any:
    """Left: average accuracy over the tasks seen vs number of tasks; right: the first task's accuracy."""
    with figure_style():
        fig = new_figure((9.0, 3.6))
        left, right = fig.subplots(1, 2)
        names = list(methods)
        x = list(range(1, len(methods["ewc"]["average_so_far"]) + 1))
        for m in names:
            colour = method_color(m, names)
            style = {
                "color": colour,
                "marker": "o",
                "ms": 3.5,
                "label": LABELS[m],
                "ls": ":" if m == "sgd" else "-",
            }
            left.plot(x, methods[m]["average_so_far"], **style)
            right.plot(x, methods[m]["first_task"], **style)
        left.set(xlabel="number of tasks", ylabel="average test accuracy over tasks seen")
        right.set(xlabel="number of tasks trained", ylabel="test accuracy on task 1")
        for ax in (left, right):
            ax.set_xticks(x)
            ax.grid(alpha=0.3)
        left.legend(loc="lower left")
        left.set_title("Fig. 2C: average over tasks seen")
        right.set_title("Retention of the first task")
    return fig
