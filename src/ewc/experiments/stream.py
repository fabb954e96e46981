"""A task stream with unannounced switches, learned online with inferred task ids (``ewc stream``).

The tasks of a sequence (permuted or split) are replayed as a stream of mini-batches following a
``schedule`` of task indices (returns allowed); each segment lasts a random number of batches in
``[min_len, max_len]`` (:func:`ewc.taskid_eval.make_stream`). Nobody tells the learner where a segment
ends: :class:`ewc.stream.StreamLearner` asks its :class:`ewc.taskid.TaskDetector` for every
batch's task id and consolidates (EWC: Fisher and anchor) when the inferred id changes.

Per batch we record the true id, the inferred id and the prequential accuracy (test-then-train:
the batch is predicted *before* ``partial_fit`` learns from it). At the end: the assignment metrics
(:func:`ewc.taskid_eval.assignment_metrics`) and the accuracy on every task's test set. With
``baseline="sgd"`` the same stream is also learned by plain SGD (no consolidation) for comparison.

Not an ``ewc experiment``: it is its own subcommand, ``ewc stream``, with the same outputs
(``results.json``, ``timeline.png``, ``report.md``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ewc.checks import POSITIVE, POSITIVE_INT, SEED, THREADS, Interval, Registered, Sizes
from ewc.config import validate
from ewc.data import DATASETS, check_task_count, load_dataset, make_sequence
from ewc.data.tabular import NAN_POLICIES, Table, load_table
from ewc.experiments.common import (
    check_out_dir,
    command_line,
    finish,
    param,
    setup_runtime,
    write_json,
)
from ewc.experiments.stream_report import figure, findings, tables
from ewc.experiments.tracked import log_stream, open_for
from ewc.methods import METHOD_SPECS
from ewc.models import make_mlp
from ewc.state import atomic_save, json_digest, safe_load
from ewc.stream import StreamLearner
from ewc.taskid import TaskDetector
from ewc.taskid_eval import assignment_metrics, make_stream
from ewc.tracking import parse_names, track_param

__all__ = ["CLAIM", "TITLE", "Config", "command", "parse_schedule", "run"]

TITLE = "Continual learning on a stream with unannounced task switches (inferred task ids)"
CLAIM = (
    "The EWC paper's RL agent inferred the task context online (a Forget-Me-Not process) and "
    "consolidated with EWC at the inferred switches, so no task labels were needed."
)
SEQUENCE_KINDS = ("permuted", "split")
BASELINES = ("none", "sgd")
SAVE_EVERY = 100  # batches between saves of a learner's progress (with --out)


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


_OWN = "your own data: stream the rows of a CSV or .npz file instead of --data/--sequence/--schedule"


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "tasks": 3,
    "schedule": (0, 1, 0, 2),
    "hidden": (16,),
    "min_len": 8,
    "max_len": 12,
    "max_train_per_task": 300,
    "threads": 1,
}


@dataclass(frozen=True)
class Config:
    """The stream, the learner and the data."""

    data: str = param("mnist-10k", "dataset", check=Registered(DATASETS))
    sequence: str = param("permuted", "how tasks are made from the dataset", choices=SEQUENCE_KINDS)
    tasks: int = param(5, "number of tasks in the sequence", check=POSITIVE_INT)
    schedule: tuple[int, ...] = param(
        (0, 1, 2, 0, 3, 1, 4),
        "task index of each segment, space or comma separated (returns allowed)",
        type=str,  # parsed (spaces or commas) and checked by the config: one clear message
        shown="'0 1 2 0 3 1 4'",
    )
    batch_size: int = param(32, "samples per stream batch", check=POSITIVE_INT)
    min_len: int = param(20, "shortest segment, in batches", check=POSITIVE_INT)
    max_len: int = param(60, "longest segment, in batches", check=POSITIVE_INT)
    method: str = param("ewc", "continual-learning method (registry name)", check=Registered(METHOD_SPECS))
    lr: float = param(0.003, "Adam learning rate of the learner", check=POSITIVE)
    hidden: tuple[int, ...] = param((100,), "hidden layer sizes of the MLP", check=Sizes())
    memory: int = param(500, "samples of a segment kept for its consolidation (Fisher)", check=POSITIVE_INT)
    seed: int = param(0, "seed of data, stream, initial weights", check=SEED)
    threads: int = param(2, "torch threads", check=THREADS)
    max_train_per_task: int | None = param(
        None, "subsample each task's training part", type=int, check=Interval(int, 1, allow_none=True)
    )
    baseline: str = param(
        "sgd", "also learn the same stream with this method ('none': skip)", choices=BASELINES
    )
    true_ids: bool = param(True, "also learn with the true task ids given (the control)")
    csv: str | None = param(
        None,
        "a CSV (or .npz) file to stream instead of --data",
        type=str,
        aliases=("--npz",),
        metavar="FILE",
        group=_OWN,
    )
    label_column: str | None = param(
        None, "the label column (npz: array) of --csv", type=str, metavar="NAME", group=_OWN
    )
    timestamp_column: str | None = param(
        None, "optional time column of --csv (rows sorted by it)", type=str, metavar="NAME", group=_OWN
    )
    task_column: str | None = param(
        None, "optional true-task column of --csv (evaluation only)", type=str, metavar="NAME", group=_OWN
    )
    test_fraction: float = param(
        0.2,
        "--csv rows held out (seeded) for the final test accuracy",
        group=_OWN,
        check=Interval(float, 0, 1, closed="left"),
    )
    standardize: bool = param(False, "--csv: scale features by the first 1000 stream rows", group=_OWN)
    nan_policy: str = param(
        "drop", "--csv rows with missing features: drop (count) or raise", choices=NAN_POLICIES, group=_OWN
    )
    track: tuple[str, ...] = track_param()

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        object.__setattr__(self, "track", parse_names(self.track))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        validate(self)
        if self.csv is None:
            check_task_count(self.sequence, self.tasks, self.data, DATASETS[self.data].num_classes)
        bad = [t for t in self.schedule if not 0 <= t < self.tasks]
        if bad:
            raise ValueError(
                f"--schedule names task(s) {', '.join(map(str, bad))}, but --tasks {self.tasks} gives "
                f"tasks 0..{self.tasks - 1}"
            )
        if self.min_len > self.max_len:
            raise ValueError(
                f"need 1 <= --min-len <= --max-len (batches per segment), got {self.min_len}, {self.max_len}"
            )
        if self.csv is not None and self.label_column is None:
            raise ValueError("--csv needs --label-column NAME (the column with the class labels)")
        if self.csv is None and any(
            v is not None for v in (self.label_column, self.timestamp_column, self.task_column)
        ):
            raise ValueError("--label-column, --timestamp-column and --task-column only apply with --csv")
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


@dataclass
class Stream:
    """What the learners see and are tested on: batches, true ids (if known), test sets."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]
    true_ids: list[int] | None  # true task of every batch, or None (a table without task column)
    tests: list[tuple[str, torch.Tensor, torch.Tensor]]  # (name, x, y) per test set
    in_dim: int
    num_classes: int
    source: dict[str, Any]  # what was read, for the record


def sequence_stream(config: Config) -> Stream:
    """The tasks of a sequence (permuted / split) replayed along ``config.schedule``; tested on
    the tasks the schedule names (only those are built: memory grows with the tasks streamed,
    not with ``--tasks``)."""
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
    tests = [(f"task {k}", tasks[k].x_test, tasks[k].y_test) for k in sorted(set(config.schedule))]
    source = {"data": config.data, "sequence": config.sequence, "tasks": config.tasks}
    return Stream(batches, true_ids, tests, math.prod(dataset.image_shape), dataset.num_classes, source)


WARMUP_ROWS = 1000  # rows whose feature statistics scale a table's features


def table_stream(config: Config) -> Stream:
    """A user's CSV / .npz rows in order (``ewc.data.tabular``), a seeded test fraction held out.

    Features are used as they are, or (``standardize``) scaled by the mean and standard deviation
    of the first ``WARMUP_ROWS`` stream rows (a stream cannot look ahead). Off by default: a
    feature nearly constant early (an image border pixel) would be blown up later, which
    measurably hurt task identification on a digits CSV (assignment 0.53 instead of 1.00); turn it
    on for features of very different scales. A batch's true id is its rows' majority task.
    """
    assert config.csv is not None and config.label_column is not None
    table: Table = load_table(
        config.csv,
        config.label_column,
        timestamp_column=config.timestamp_column,
        task_column=config.task_column,
        nan_policy=config.nan_policy,
    )
    n = table.x.shape[0]
    held = np.random.default_rng(config.seed).random(n) < config.test_fraction
    train = np.flatnonzero(~held)
    if len(train) == 0:
        raise ValueError(f"{config.csv}: no rows left to stream after holding out --test-fraction")
    x, y = table.x, table.y
    if config.standardize:
        head = x[train[:WARMUP_ROWS]]
        sd = head.std(0) if len(head) > 1 else torch.ones(x.shape[1])
        x = (x - head.mean(0)) / torch.where(sd > 1e-8, sd, torch.ones_like(sd))
    batches, true_ids = [], [] if table.task is not None else None
    for lo in range(0, len(train), config.batch_size):
        rows = torch.from_numpy(train[lo : lo + config.batch_size])
        batches.append((x[rows], y[rows]))
        if true_ids is not None and table.task is not None:
            true_ids.append(int(np.bincount([table.task[int(r)] for r in rows]).argmax()))
    test = torch.from_numpy(np.flatnonzero(held))
    if table.task is not None:
        task = torch.tensor(table.task)
        tests = [
            (f"task {name}", x[test[task[test] == k]], y[test[task[test] == k]])
            for k, name in enumerate(table.task_names)
        ]
    else:
        tests = [("all held-out rows", x[test], y[test])]
    source = {
        "csv": str(config.csv),
        "rows": n,
        "rows_dropped": table.n_dropped,
        "rows_held_out": int(held.sum()),
        "features": len(table.features),
        "classes": list(table.classes),
        "reordered_by_time": table.reordered,
        "tasks": list(table.task_names) if table.task is not None else None,
    }
    return Stream(batches, true_ids, tests, x.shape[1], table.num_classes, source)


def _learn(
    config: Config,
    method: str,
    stream: Stream,
    true_ids: list[int] | None = None,
    progress: Path | None = None,
) -> dict[str, Any]:
    """One learner over the stream: its ids, prequential accuracy, final test accuracies.

    With ``true_ids`` the learner is given every batch's true task (the control); otherwise its
    detector infers them. With a ``progress`` folder the learner is saved there every
    :data:`SAVE_EVERY` batches (state, record so far, torch's random state) and its result when
    it ends, under a name derived from all settings: the same command after a kill resumes at
    the last save and ends with the results of an uninterrupted run.
    """
    tag = _tag(config, method, true_ids is not None)
    if progress is not None and (progress / f"{tag}.json").exists():
        return json.loads((progress / f"{tag}.json").read_text())
    num_classes, batches = stream.num_classes, stream.batches
    torch.manual_seed(config.seed)  # same initial weights for every method
    model = make_mlp(stream.in_dim, config.hidden, num_classes)
    learner = StreamLearner(
        model,
        method,
        TaskDetector(),
        memory=config.memory,
        optimizer="adam",
        lr=config.lr,
        num_classes=num_classes,
    )
    ids: list[int] = []
    correct: list[float] = []
    partial = progress / f"{tag}.pt" if progress is not None else None
    if partial is not None and partial.exists():
        saved = safe_load(partial)
        learner.load_state_dict(saved["learner"])
        ids, correct = list(saved["ids"]), list(saved["correct"])
        torch.set_rng_state(saved["rng"])
    for i, (x, y) in enumerate(batches):
        if i < len(ids):
            continue  # resumed: learned before the kill
        correct.append(_accuracy(learner, x, y))  # test, then train
        ids.append(learner.partial_fit(x, y, None if true_ids is None else true_ids[i]))
        if partial is not None and (i + 1) % SAVE_EVERY == 0:
            state = {"learner": learner.state_dict(), "ids": ids, "correct": correct}
            atomic_save({**state, "rng": torch.get_rng_state()}, partial)
    learner.finish()
    table = learner.detector.loglik_table()  # empty when the ids were given
    loglik = [[None if math.isnan(v) else round(v, 3) for v in row] for row in table.tolist()]
    result = {
        "method": method,
        "label": f"{method} (true ids)" if true_ids is not None else f"{method} (inferred ids)",
        "task_ids": "true" if true_ids is not None else "inferred",
        "ids": ids,
        "prequential": correct,
        "prequential_accuracy": float(np.mean(correct)),
        "test_accuracy": [_accuracy(learner, x, y) if len(y) else None for _, x, y in stream.tests],
        "loglik": loglik,
        "consolidations": list(learner.consolidations),
        "tasks_found": learner.detector.num_tasks,
        "rows_dropped_by_detector": learner.detector.n_dropped,
    }
    if progress is not None and partial is not None:
        write_json(result, progress / f"{tag}.json")
        partial.unlink(missing_ok=True)
    return result


def _tag(config: Config, method: str, given_ids: bool) -> str:
    """A learner's progress file name: its method, ids kind and a digest of every setting (but
    the trackers, which change no number)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "track"}
    digest = json_digest([settings, method, given_ids])
    return f"{method}-{'true' if given_ids else 'inferred'}-{digest[:16]}"


def run(config: Config, out: str | Path | None = None) -> dict[str, Any]:
    """Build the stream, learn it (and the baseline), write results.json, timeline.png, report.md;
    then send the record to the trackers of ``config.track``."""
    with open_for("stream", config.track, out) as tracker:
        record = _run(config, out)
        log_stream(tracker, record, Path(out) if out is not None else None)
        return record


def _run(config: Config, out: str | Path | None) -> dict[str, Any]:
    start = time.perf_counter()
    if out is not None:
        check_out_dir(out)
    setup_runtime(config.seed, config.threads)
    stream = table_stream(config) if config.csv is not None else sequence_stream(config)
    true_ids = stream.true_ids
    methods = [config.method] + ([config.baseline] if config.baseline not in ("none", config.method) else [])
    progress = Path(out) / "progress" if out is not None else None
    if progress is not None:
        progress.mkdir(exist_ok=True)
    learners = [_learn(config, m, stream, progress=progress) for m in methods]
    if len(learners) > 1:
        learners[1]["label"] = learners[1]["method"]  # the baseline
    if config.true_ids and true_ids is not None:
        learners.insert(1, _learn(config, config.method, stream, true_ids, progress=progress))
    assignment = (
        None
        if true_ids is None
        else assignment_metrics(true_ids, learners[0]["ids"], batch_size=config.batch_size)
    )
    results = {
        "source": stream.source,
        "tests": [name for name, _, _ in stream.tests],
        "true_ids": true_ids,
        "assignment": assignment,
        "learners": learners,
    }
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
