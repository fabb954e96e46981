"""A task stream with unannounced switches, learned online with inferred task ids (``ewc stream``).

The tasks of a sequence (permuted or split) are replayed as a stream of mini-batches following a
``schedule`` of task indices (returns allowed); each segment lasts a random number of batches in
``[min_len, max_len]`` (:func:`ewc.taskid.make_stream`). Nobody tells the learner where a segment
ends: :class:`ewc.stream.StreamLearner` asks its :class:`ewc.taskid.TaskDetector` for every
batch's task id and consolidates (EWC: Fisher and anchor) when the inferred id changes.

Per batch we record the true id, the inferred id and the prequential accuracy (test-then-train:
the batch is predicted *before* ``partial_fit`` learns from it). At the end: the assignment metrics
(:func:`ewc.taskid.assignment_metrics`) and the accuracy on every task's test set. With
``baseline="sgd"`` the same stream is also learned by plain SGD (no consolidation) for comparison.

Not an ``ewc experiment``: it is its own subcommand, ``ewc stream``, with the same outputs
(``results.json``, ``timeline.png``, ``report.md``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ewc.data import DATASETS, load_dataset, make_sequence
from ewc.experiments.common import (
    check_out_dir,
    command_line,
    figure_style,
    finish,
    md_table,
    new_figure,
    param,
    setup_runtime,
)
from ewc.methods import METHODS
from ewc.stream import StreamLearner
from ewc.taskid import TaskDetector, assignment_metrics, make_stream
from ewc.train import make_mlp

__all__ = ["CLAIM", "TITLE", "Config", "command", "parse_schedule", "run"]

TITLE = "Continual learning on a stream with unannounced task switches (inferred task ids)"
CLAIM = (
    "The EWC paper's RL agent inferred the task context online (a Forget-Me-Not process) and "
    "consolidated with EWC at the inferred switches, so no task labels were needed."
)
SEQUENCE_KINDS = ("permuted", "split")
BASELINES = ("none", "sgd")
WINDOW = 10  # batches in the moving average of prequential accuracy


def parse_schedule(text: str | Any) -> tuple[int, ...]:
    """``"0 1 2 0"`` or ``"0,1,2,0"`` → ``(0, 1, 2, 0)``; a clear ``ValueError`` otherwise."""
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    if not parts:
        raise ValueError("--schedule is empty: give task indices, e.g. '0 1 2 0 3'")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--schedule must be integers separated by spaces or commas, got {text!r}") from None


@dataclass(frozen=True)
class Config:
    """The stream, the learner and the data."""

    data: str = param("mnist-10k", "dataset", choices=DATASETS)
    sequence: str = param("permuted", "how tasks are made from the dataset", choices=SEQUENCE_KINDS)
    tasks: int = param(5, "number of tasks in the sequence")
    schedule: tuple[int, ...] = param((0, 1, 2, 0, 3, 1, 4), "task index of each segment (returns allowed)")
    batch_size: int = param(32, "samples per stream batch")
    min_len: int = param(20, "shortest segment, in batches")
    max_len: int = param(60, "longest segment, in batches")
    method: str = param("ewc", "continual-learning method (registry name)", choices=METHODS)
    lr: float = param(0.003, "Adam learning rate of the learner")
    hidden: tuple[int, ...] = param((100,), "hidden layer sizes of the MLP")
    memory: int = param(500, "samples of a segment kept for its consolidation (Fisher)")
    seed: int = param(0, "seed of data, stream, initial weights")
    threads: int = param(2, "torch threads")
    max_train_per_task: int | None = param(None, "subsample each task's training part", type=int)
    baseline: str = param(
        "sgd", "also learn the same stream with this method ('none': skip)", choices=BASELINES
    )
    true_ids: bool = param(True, "also learn with the true task ids given (the control)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.data not in DATASETS:
            raise ValueError(f"--data must be one of {', '.join(DATASETS)}, got {self.data!r}")
        if self.sequence not in SEQUENCE_KINDS:
            raise ValueError(f"--sequence must be one of {', '.join(SEQUENCE_KINDS)}, got {self.sequence!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, got {self.tasks}")
        bad = [t for t in self.schedule if not 0 <= t < self.tasks]
        if bad:
            raise ValueError(
                f"--schedule names task(s) {', '.join(map(str, bad))}, but --tasks {self.tasks} gives "
                f"tasks 0..{self.tasks - 1}"
            )
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                f"need 1 <= --min-len <= --max-len (batches per segment), got {self.min_len}, {self.max_len}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"--hidden must be positive sizes, got {self.hidden}")
        if self.memory < 1:
            raise ValueError(f"--memory must be >= 1, got {self.memory}")
        if self.max_train_per_task is not None and self.max_train_per_task < self.batch_size:
            raise ValueError(
                f"--max-train-per-task ({self.max_train_per_task}) must be >= "
                f"--batch-size ({self.batch_size})"
            )


def command(config: Config) -> str:
    """The ``ewc stream`` command that reproduces ``config`` (only non-default flags)."""
    return command_line("stream", config, prefix=("ewc",))


def _accuracy(learner: StreamLearner, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((learner.predict(x) == y).float().mean())


def _learn(
    config: Config,
    method: str,
    tasks: list,
    batches: list,
    num_classes: int,
    true_ids: list[int] | None = None,
) -> dict[str, Any]:
    """One learner over the stream: its ids, prequential accuracy, final test accuracies.

    With ``true_ids`` the learner is given every batch's true task (the control); otherwise its
    detector infers them.
    """
    torch.manual_seed(config.seed)  # same initial weights for every method
    model = make_mlp(int(tasks[0].x_train[0].numel()), config.hidden, num_classes)
    learner = StreamLearner(
        model,
        method,
        TaskDetector(),
        memory=config.memory,
        optimizer="adam",
        lr=config.lr,
        num_classes=num_classes,
    )
    ids, correct = [], []
    for i, (x, y) in enumerate(batches):
        correct.append(_accuracy(learner, x, y))  # test, then train
        ids.append(learner.partial_fit(x, y, None if true_ids is None else true_ids[i]))
    learner.finish()
    table = learner.detector.loglik_table()  # empty when the ids were given
    loglik = [[None if math.isnan(v) else round(v, 3) for v in row] for row in table.tolist()]
    return {
        "method": method,
        "label": f"{method} (true ids)" if true_ids is not None else f"{method} (inferred ids)",
        "task_ids": "true" if true_ids is not None else "inferred",
        "ids": ids,
        "prequential": correct,
        "prequential_accuracy": float(np.mean(correct)),
        "test_accuracy": [_accuracy(learner, t.x_test, t.y_test) for t in tasks],
        "loglik": loglik,
        "consolidations": list(learner.consolidations),
    }


def _moving(values: list[float], window: int = WINDOW) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(len(v)):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def figure(results: dict[str, Any]) -> Any:
    """timeline.png: true vs inferred task; log-likelihoods per known task; prequential accuracy."""
    true_ids = results["true_ids"]
    main = results["learners"][0]
    match = results["assignment"]["matching"]  # true id -> inferred id
    inv = {int(v): int(k) for k, v in match.items()}
    xs = np.arange(len(true_ids))
    with figure_style():
        fig = new_figure((10, 8))
        ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True, height_ratios=[1, 1.4, 1])
        ax1.step(xs, true_ids, where="post", lw=3, alpha=0.4, color="black", label="true task")
        shown = [inv.get(i, np.nan) for i in main["ids"]]
        ax1.step(xs, shown, where="post", lw=1.2, color="C3", label="inferred (matched to true ids)")
        ax1.set_ylabel("task")
        ax1.set_yticks(sorted(set(true_ids)))
        ax1.legend(loc="upper left", fontsize=8)
        ax1.set_title("True vs inferred task over the stream")
        table = np.array([[np.nan if v is None else v for v in row] for row in main["loglik"]], dtype=float)
        if table.ndim == 2 and table.shape[1] > 0:
            for k in range(table.shape[1] - 1):
                ax2.plot(xs, table[:, k], lw=1, label=f"inferred task {k}")
            ax2.plot(xs, table[:, -1], lw=1, ls="--", color="grey", label="new task")
            finite = table[np.isfinite(table)]
            if finite.size:  # clip the first batches of young tasks so the bulk stays readable
                lo, hi = np.percentile(finite, 2), finite.max()
                ax2.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax2.set_ylabel("log p(batch | task)")
        ax2.legend(loc="lower left", fontsize=7, ncol=4)
        for r in results["learners"]:
            ax3.plot(xs, _moving(r["prequential"]), lw=1.2, label=r["label"])
        ax3.set_ylabel(f"prequential acc.\n(moving avg, {WINDOW})")
        ax3.set_xlabel("batch")
        ax3.set_ylim(0, 1.02)
        ax3.legend(loc="lower right", fontsize=8)
        for ax in (ax1, ax2, ax3):
            for i in range(1, len(true_ids)):
                if true_ids[i] != true_ids[i - 1]:
                    ax.axvline(i, color="grey", lw=0.5, ls=":")
    return fig


def findings(results: dict[str, Any]) -> list[str]:
    a = results["assignment"]
    out = [
        f"Task assignment accuracy {a['accuracy']:.4f} over {a['n_batches']} batches; {a['tasks_found']} "
        f"tasks found for {a['tasks_true']} true; mean/max detection delay {a['mean_delay']:.2f}/"
        f"{a['max_delay']} batches; {a['false_alarms_per_10k']:.2f} false alarms per 10 000 samples.",
    ]
    for r in results["learners"]:
        acc = r["test_accuracy"]
        out.append(
            f"{r['label']}: prequential accuracy {r['prequential_accuracy']:.4f}; final test accuracy "
            f"mean {np.mean(acc):.4f} (per task: {', '.join(f'{v:.3f}' for v in acc)})."
        )
    by_ids = {r["task_ids"]: r for r in results["learners"] if r["label"] != r["method"]}
    if "true" in by_ids:
        inferred, true = (float(np.mean(by_ids[k]["test_accuracy"])) for k in ("inferred", "true"))
        out.append(
            f"With inferred task ids the final mean test accuracy is {inferred / true:.1%} of that with "
            f"the true ids ({inferred:.4f} vs {true:.4f})."
        )
    return out


def tables(results: dict[str, Any]) -> list[str]:
    a = results["assignment"]
    t1 = md_table(
        ["assignment", "value"],
        [
            ["accuracy", f"{a['accuracy']:.4f}"],
            ["mean delay (batches)", f"{a['mean_delay']:.2f}"],
            ["max delay (batches)", str(a["max_delay"])],
            ["false alarms / 10k samples", f"{a['false_alarms_per_10k']:.2f}"],
            ["tasks found / true", f"{a['tasks_found']} / {a['tasks_true']}"],
            ["split tasks", str(a["split_tasks"])],
        ],
    )
    n = len(results["learners"][0]["test_accuracy"])
    t2 = md_table(
        ["method", "prequential", *[f"test task {i}" for i in range(n)], "test mean"],
        [
            [
                r["label"],
                f"{r['prequential_accuracy']:.4f}",
                *[f"{v:.3f}" for v in r["test_accuracy"]],
                f"{np.mean(r['test_accuracy']):.4f}",
            ]
            for r in results["learners"]
        ],
    )
    return [t1, t2]


def run(config: Config, out: str | Path | None = None) -> dict[str, Any]:
    """Build the stream, learn it (and the baseline), write results.json, timeline.png, report.md."""
    start = time.perf_counter()
    if out is not None:
        check_out_dir(out)
    setup_runtime(config.seed, config.threads)
    dataset = load_dataset(config.data)
    tasks = make_sequence(
        dataset, config.sequence, config.tasks, seed=config.seed, max_train_per_task=config.max_train_per_task
    )
    batches, true_ids = make_stream(
        tasks,
        config.schedule,
        batch_size=config.batch_size,
        seed=config.seed,
        min_len=config.min_len,
        max_len=config.max_len,
    )
    methods = [config.method] + ([config.baseline] if config.baseline not in ("none", config.method) else [])
    learners = [_learn(config, m, tasks, batches, dataset.num_classes) for m in methods]
    if len(learners) > 1:
        learners[1]["label"] = learners[1]["method"]  # the baseline
    if config.true_ids:
        learners.insert(1, _learn(config, config.method, tasks, batches, dataset.num_classes, true_ids))
    assignment = assignment_metrics(true_ids, learners[0]["ids"], batch_size=config.batch_size)
    results = {"true_ids": true_ids, "assignment": assignment, "learners": learners}
    seconds = time.perf_counter() - start
    return finish(
        out,
        "stream",
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures={"timeline.png": figure(results)} if out is not None else {},
        findings=findings(results),
        tables=tables(results),
        seconds=seconds,
        prefix=("ewc",),
    )
