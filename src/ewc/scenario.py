"""The three continual-learning scenarios: which output units a task is read from, and how.

Following van de Ven, Tuytelaars & Tolias (2022), one sequence of tasks can be learned in three
ways, differing only in what the network is told and must answer:

- ``task`` (task-incremental): the task id is given; the output units of that task's classes
  are its head (a multi-headed network whose heads are slices of one output layer).
- ``domain`` (domain-incremental): no task id; one shared head of as many units as a task has
  classes, and a label is its position in the task's class list (for permuted MNIST: the digit).
- ``class`` (class-incremental): no task id; one head over every class seen so far, which must
  tell the tasks' classes apart too.

:meth:`Scenario.view` turns raw model outputs and global labels into the logits and targets of
the active head; the trainer uses it for the loss and for evaluation, methods for their own
extra losses (replay, distillation, GEM's memory gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

SCENARIOS: tuple[str, ...] = ("task", "domain", "class")


class Scenario:
    """Maps (outputs, global labels, task) to the active head's (logits, targets).

    ``task_classes[k]`` lists the global labels of task k, in order. ``seen`` (class-IL only) is
    the index of the last task whose classes are active (the task being trained, or for an
    evaluation after training task i on task j, ``max(i, j)``).
    """

    def __init__(self, kind: str, task_classes: Sequence[Sequence[int]]):
        if kind not in SCENARIOS and kind != "shared":
            raise ValueError(f"unknown scenario {kind!r}; expected one of {', '.join(SCENARIOS)}")
        classes = [tuple(int(c) for c in cs) for cs in task_classes]
        if not classes or any(not cs for cs in classes):
            raise ValueError("every task needs at least one class")
        if any(c < 0 for cs in classes for c in cs) or any(len(set(cs)) != len(cs) for cs in classes):
            raise ValueError(f"task classes must be distinct non-negative labels, got {classes}")
        self.kind = kind
        self.task_classes = classes
        self.num_classes = 1 + max(max(cs) for cs in classes)
        self.num_outputs = max(len(cs) for cs in classes) if kind == "domain" else self.num_classes
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @classmethod
    def shared(cls, num_classes: int | None = None) -> Scenario:
        """All outputs active for every task, labels as they are (a library default)."""
        s = cls("shared", [[0]])
        s.num_classes = s.num_outputs = num_classes or 0
        return s

    @classmethod
    def for_tasks(cls, kind: str | None, task_classes: Sequence[Sequence[int]]) -> Scenario:
        """``kind``, or the natural one when None: ``domain`` if all tasks share their classes
        (permuted, rotated), else ``class``."""
        if kind is None:
            same = all(tuple(c) == tuple(task_classes[0]) for c in task_classes)
            kind = "domain" if same else "class"
        return cls(kind, task_classes)

    def __repr__(self) -> str:
        return f"Scenario({self.kind!r}, tasks={len(self.task_classes)}, outputs={self.num_outputs})"

    def _index(self, task: int, seen: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """(columns of the active head, label → target lookup) for a task, cached per device."""
        if not 0 <= task < len(self.task_classes):
            raise ValueError(f"task index {task} out of range for {len(self.task_classes)} tasks")
        if self.kind == "class":
            seen = task if seen is None else max(seen, task)
            key: tuple = ("class", min(seen, len(self.task_classes) - 1), device)
        else:
            key = (self.kind, task, device)
        if key not in self._cache:
            lut = torch.full((self.num_classes,), -1, dtype=torch.long)
            if self.kind == "class":
                cols = sorted({c for cs in self.task_classes[: key[1] + 1] for c in cs})
                lut[cols] = torch.arange(len(cols))
            elif self.kind == "task":
                cols = list(self.task_classes[task])
                lut[cols] = torch.arange(len(cols))
            else:  # domain: a label is its position in the task's class list
                cols = list(range(self.num_outputs))
                lut[list(self.task_classes[task])] = torch.arange(len(self.task_classes[task]))
            self._cache[key] = (torch.tensor(cols, device=device), lut.to(device))
        return self._cache[key]

    def view(self, out: Tensor, y: Tensor, task: int, seen: int | None = None) -> tuple[Tensor, Tensor]:
        """The active head's logits ``[N, width]`` and targets (positions within that head)."""
        if self.kind == "shared":
            return out, y
        if out.dim() != 2 or out.shape[1] < self.num_outputs:
            raise ValueError(
                f"{self.kind}-incremental needs outputs of shape [N, >= {self.num_outputs}], "
                f"got {tuple(out.shape)}"
            )
        cols, lut = self._index(task, seen, out.device)
        if y.dtype != torch.long or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes)):
            raise ValueError(
                f"labels must be int64 in [0, {self.num_classes}), got {y.dtype} {tuple(y.shape)}"
            )
        target = lut[y]
        if y.numel() and int(target.min()) < 0:
            bad = sorted(set(y[target < 0].tolist()))[:5]
            raise ValueError(f"labels {bad} are not classes of task {task} in the {self.kind} scenario")
        logits = out[:, : self.num_outputs] if self.kind == "domain" else out.index_select(1, cols)
        return logits, target

    def head(self, out: Tensor, task: int, seen: int | None = None) -> Tensor:
        """The active head's logits alone (no labels needed), e.g. for distillation."""
        if self.kind == "shared":
            return out
        if self.kind == "domain":
            return out[:, : self.num_outputs]
        cols, _ = self._index(task, seen, out.device)
        return out.index_select(1, cols)

    def cross_entropy(self, out: Tensor, y: Tensor, task: int | Tensor, seen: int | None = None) -> Tensor:
        """Mean cross-entropy over the batch, each sample on its own task's head.

        ``task`` is one task index for the whole batch or a tensor of per-sample task indices
        (joint training and replay mix tasks in one batch).
        """
        if isinstance(task, int) or self.kind in ("shared", "class"):
            k = task if isinstance(task, int) else int(task.max())
            logits, target = self.view(out, y, k, seen if seen is not None else k)
            return F.cross_entropy(logits, target)
        if task.shape != y.shape:
            raise ValueError(f"per-sample task ids {tuple(task.shape)} do not match labels {tuple(y.shape)}")
        total = out.new_zeros(())
        for k in torch.unique(task).tolist():
            rows = (task == k).nonzero().squeeze(1)
            logits, target = self.view(out.index_select(0, rows), y.index_select(0, rows), int(k), seen)
            total = total + F.cross_entropy(logits, target, reduction="sum")
        return total / max(1, len(y))
