"""A run's model saved after each task instead of tested, and tested later: a ``--lam auto``
search trains three finalists in full but needs the test parts' accuracy matrix of the chosen
one only, so its runs save the weights (``run_method(..., defer_tests=FOLDER)``) and
:func:`evaluate_snapshots` measures the chosen run's matrix, baseline and metrics from them, the
same numbers the run would have measured itself (the same weights, evaluation code and threads)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ewc.checkpoint import build_from_record
from ewc.data import Task
from ewc.evaluation import accuracies, accuracy, test_parts
from ewc.metrics import summarize
from ewc.runtime import check_device, torch_threads
from ewc.scenario import Scenario
from ewc.state import atomic_save, check_model_state, safe_load

__all__ = ["has_snapshot", "save_snapshot", "evaluate_snapshots"]


def _path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / f"{name}.pt"


def save_snapshot(folder: str | os.PathLike, name: str, model: nn.Module) -> None:
    """The model's weights as ``FOLDER/NAME.pt`` (``init``, ``task-I``), written atomically but
    without fsync: scratch files, removed once tested; one that a power loss leaves unreadable
    makes its test fail with an error naming it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, _path(folder, name), durable=False)


def has_snapshot(folder: str | os.PathLike, name: str) -> bool:
    return _path(folder, name).exists()


def _load(model: nn.Module, folder: str | os.PathLike, name: str) -> None:
    path = _path(folder, name)
    if not path.exists():
        raise ValueError(
            f"{os.fspath(path)!r}: a deferred test's weights are missing (the run did not finish)"
        )
    state = safe_load(path)
    check_model_state(model, state, f"snapshot {os.fspath(path)!r}")
    model.load_state_dict(state)


def evaluate_snapshots(
    result: dict[str, Any],
    folder: str | os.PathLike,
    tasks: Sequence[Task],
    scenario: Scenario,
    *,
    threads: int | None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``result`` of a run with deferred tests (``run_method(..., defer_tests=folder)``) with its
    accuracy matrix on the test parts, its baseline and the metrics of a tested run
    (:func:`ewc.metrics.summarize` over its learning curves) filled in from the saved weights."""
    with torch_threads(threads):
        dev = check_device(device)
        model = build_from_record(dict(result["architecture"])).to(dev)
        shape = tuple(result["architecture"]["input_shape"])
        tests, _ = test_parts(tasks, dev, shape, tasks[0].x_train.dtype, 1)  # as the run read them
        _load(model, folder, "init")
        baseline = [accuracy(model, x, y, scenario=scenario, task=j) for j, (x, y) in enumerate(tests)]
        matrix = []
        for i in range(len(tasks)):
            _load(model, folder, f"task-{i}")
            matrix.append(accuracies(model, tests, scenario, i))
    out = {k: v for k, v in result.items() if k != "tests_deferred"}
    out.update(summarize(matrix, baseline, result["curves"]["per_task"]))
    out.update(accuracy_matrix=matrix, baseline_accuracy=baseline)
    return out
