"""The method interface: what the task-sequence trainer calls, and nothing else.

A method is its state plus a few hooks. The trainer owns the model, the optimiser and the data
order; a method only says what data a task trains on, what is added to the loss, and what it
remembers when a task ends. Keeping every method's loss visible in ``loss`` is the point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ewc.data import Task


class Method:
    """Plain fine-tuning (SGD): no memory, no penalty. Subclasses override the hooks they need."""

    name = "sgd"

    def epoch_size(self, index: int, tasks: list[Task]) -> int:
        """Samples per epoch; the trainer draws them afresh from ``train_data`` every epoch."""
        return len(tasks[index].x_train)

    def setup(self, model: nn.Module) -> None:
        """Bind to the model once, before the first task."""
        self.model = model

    def train_data(self, index: int, tasks: list[Task]) -> tuple[Tensor, Tensor]:
        """The (x, y) a task trains on: by default that task's training part only."""
        task = tasks[index]
        return task.x_train, task.y_train

    def before_task(self, index: int, task: Task) -> None:
        """Called before the first update on a task."""

    def loss(self, task_loss: Tensor) -> Tensor:
        """The objective minimised on a batch, given the task's own loss."""
        return task_loss

    def after_task(self, index: int, task: Task) -> None:
        """Called after the last update on a task (consolidation goes here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} has no state, got keys {sorted(state)}")


class Joint(Method):
    """Upper bound: at task i train on the union of tasks 0..i (all data seen so far).

    ``budget="task"`` (``joint``): every epoch draws as many samples from the union as task i
    has, so joint training costs the same number of updates as every other method (the
    "offline" upper bound of van de Ven et al. 2020). ``budget="all"`` (``joint-cumulative``):
    every epoch passes over the whole union, i + 1 times the updates at task i.
    """

    def __init__(self, budget: str = "task"):
        if budget not in ("task", "all"):
            raise ValueError(f"unknown joint budget {budget!r}; expected 'task' or 'all'")
        self.budget = budget
        self.name = "joint" if budget == "task" else "joint-cumulative"

    def train_data(self, index: int, tasks: list[Task]) -> tuple[Tensor, Tensor]:
        seen = tasks[: index + 1]
        return torch.cat([t.x_train for t in seen]), torch.cat([t.y_train for t in seen])

    def epoch_size(self, index: int, tasks: list[Task]) -> int:
        if self.budget == "task":
            return len(tasks[index].x_train)
        return sum(len(t.x_train) for t in tasks[: index + 1])
