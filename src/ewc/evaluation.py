"""Evaluation in the task-sequence loop: accuracy on a task's head, and the test parts read per
evaluation (a lazy task sequence's built into one reused buffer, memory bounded by its cache)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ewc.data import Task, TaskSequence
from ewc.metrics import accuracy_from_counts, reduce_counts
from ewc.runtime import release_freed_memory
from ewc.scenario import Scenario

__all__ = ["LazyTestParts", "TestReader", "accuracies", "accuracy", "test_parts"]


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 1000,
    scenario: Scenario | None = None,
    task: int = 0,
    seen: int | None = None,
) -> float:
    """Top-1 accuracy in eval mode (the model's training flag is restored).

    With a ``scenario``, the prediction is the argmax over the active head of ``task`` (with
    the classes of tasks up to ``seen`` in class-incremental learning).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(device))
        target = y[i : i + batch_size].to(device)
        if scenario is not None:
            out, target = scenario.view(out, target, task, seen)
        correct += int((out.argmax(-1) == target).sum())
    model.train(was)
    correct, total = reduce_counts(correct, len(x))  # summed over ranks under torch.distributed
    return accuracy_from_counts(correct, total) if total else 0.0


def accuracies(
    model: nn.Module, parts: list[tuple[Tensor, Tensor]], scenario: Scenario, current: int
) -> list[float]:
    """Accuracy on every task's (x, y) while training task ``current`` (class-IL: the classes of
    tasks up to max(current, j) are active when evaluating task j)."""
    accs = []
    for j, (x, y) in enumerate(parts):
        accs.append(accuracy(model, x, y, scenario=scenario, task=j, seen=max(current, j)))
    return accs


#: test parts built (not kept by the sequence) between two releases of freed heap memory
RELEASE_EVERY = 32


class TestReader:
    """Reads a lazy sequence's test parts for evaluation: a part the sequence does not keep is
    built into one buffer that every read reuses, so evaluating every task after every task
    allocates no part per evaluation; and every ``RELEASE_EVERY`` such builds the freed heap
    memory is given back (runtime.release_freed_memory: the evaluations' activations, freed T²
    times between small long-lived records, fragmented glibc's heap until a 1000-task run held
    6 GB). A part read is valid until the next read."""

    def __init__(
        self, tasks: TaskSequence, device: torch.device, input_shape: tuple[int, ...], dtype: torch.dtype
    ):
        self.tasks, self.device, self.input_shape, self.dtype = tasks, device, input_shape, dtype
        self.buffer: Tensor | None = None
        self.builds = 0

    def read(self, j: int, rows: int | None = None) -> tuple[Tensor, Tensor]:
        y = self.tasks[j].y_test
        shape = (len(y), *self.input_shape)
        if self.buffer is None or tuple(self.buffer.shape) != shape:
            self.buffer = torch.empty(shape, dtype=self.dtype)
        x = self.tasks.read(j, "test", out=self.buffer)
        if x is self.buffer:  # built now, not kept
            self.builds += 1
            if self.builds % RELEASE_EVERY == 0:
                release_freed_memory()
        return x[:rows].to(self.device), y[:rows].to(self.device)


class LazyTestParts(Sequence[tuple[Tensor, Tensor]]):
    """Every task's test part ``(x, y)`` (its first ``rows``), read when indexed (one at a time)."""

    def __init__(self, reader: TestReader, rows: int | None):
        self.reader, self.rows = reader, rows

    def __len__(self) -> int:
        return len(self.reader.tasks)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            raise TypeError("test parts are read one at a time (a read reuses the last one's buffer)")
        return self.reader.read(j, self.rows)


def test_parts(
    tasks: Sequence[Task], device: torch.device, input_shape: tuple[int, ...], dtype: torch.dtype, rows: int
) -> tuple[Sequence[tuple[Tensor, Tensor]], Sequence[tuple[Tensor, Tensor]]]:
    """The test parts evaluated after every task, and their first ``rows`` (the curves): a lazy
    sequence's are read when evaluated (memory bounded by its cache, not by the number of tasks);
    a list's are moved to the device once."""
    if isinstance(tasks, TaskSequence):
        reader = TestReader(tasks, device, input_shape, dtype)
        return LazyTestParts(reader, None), LazyTestParts(reader, rows)
    tests = [(t.x_test.to(device), t.y_test.to(device)) for t in tasks]
    return tests, [(x[:rows], y[:rows]) for x, y in tests]
