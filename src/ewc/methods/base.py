"""The method interface: what the task-sequence trainer calls, and nothing else.

A method is its state plus a few hooks. The trainer owns the model, the optimiser and the data
order; a method only says what data a task trains on, what is added to the loss, how a gradient
is changed before the step, and what it remembers when a task ends. One training step is::

    out = model(x)
    logits, target = scenario.view(out, y, task)      # the scenario's active outputs
    loss = method.loss(cross_entropy(logits, target), Batch(x, y, out, task))
    optimizer.zero_grad(); loss.backward()
    method.after_backward()                            # e.g. GEM / A-GEM project p.grad
    optimizer.step()
    method.after_step()                                # e.g. SI accumulates its path integral

Keeping every method's loss visible in ``loss`` and its update visible in ``after_backward`` is
the point. Methods that need the model on other data (replay, LwF, GEM) call ``self.model`` and
``self.scenario`` themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ewc.checks import NON_NEGATIVE, POSITIVE, check
from ewc.data import Task
from ewc.methods.registry import MethodSpec, register
from ewc.scenario import Scenario


def check_number(value: Any, what: str, *, positive: bool = False) -> float:
    """A finite float >= 0 (> 0 if ``positive``), else a ValueError naming ``what``."""
    return float(check(value, POSITIVE if positive else NON_NEGATIVE, what))


def check_state_keys(state: Any, expected: set[str], who: str) -> None:
    """A ValueError naming ``who`` unless ``state`` is a mapping with exactly the ``expected`` keys."""
    if not isinstance(state, Mapping) or set(state) != expected:
        got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{who} state must have keys {sorted(expected)}, got {got}")


@dataclass
class Batch:
    """One training mini-batch as the method sees it: inputs, global labels, raw model outputs
    (all output units, before the scenario's selection) and the index of the task being trained."""

    x: Tensor
    y: Tensor
    out: Tensor
    task: int


class Method:
    """Plain fine-tuning (SGD): no memory, no penalty. Subclasses override the hooks they need."""

    name = "sgd"
    #: dropout rate the trainer builds the model with (None: the run's setting)
    dropout: float | None = None

    def epoch_size(self, index: int, tasks: Sequence[Task]) -> int:
        """Samples per epoch; the trainer draws them afresh from ``train_data`` every epoch."""
        return len(tasks[index].y_train)

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        """Bind to the model (and the scenario that maps outputs to tasks) once, before task 0."""
        self.model = model
        self.scenario = scenario if scenario is not None else Scenario.shared()

    def train_data(self, index: int, tasks: Sequence[Task]) -> tuple[Tensor, ...]:
        """The (x, y) a task trains on: by default that task's training part only.

        A method that mixes tasks returns (x, y, task ids) so that each sample is trained on its
        own task's head."""
        task = tasks[index]
        return task.x_train, task.y_train

    def before_task(self, index: int, task: Task) -> None:
        """Called before the first update on a task."""

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        """The objective minimised on a batch, given the task's own loss (and the batch)."""
        return task_loss

    def after_backward(self) -> None:
        """Called after ``loss.backward()`` and before the optimiser step (gradient surgery)."""

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. path integrals over the parameter updates)."""

    def after_task(self, index: int, task: Task) -> None:
        """Called after the last update on a task (consolidation goes here)."""

    def leave_task(self, index: int, task: Task) -> bool:
        """Called when training switches away from task ``index`` before its ``after_task`` (a
        context inferred for part of an RL visit). True when the method put back what
        ``forget_task`` took; ``forget_task`` then comes again if the task becomes active again.
        Nothing by default (False)."""
        return False

    def forget_task(self, index: int) -> None:
        """Called when task ``index``, already ended once, starts training again (a stream's
        returning task), before ``before_task``: drop what the method keeps of that task alone
        that would pull it back to its old solution. No-op by default."""

    def memory_bytes(self) -> int:
        """Bytes this method keeps between tasks (anchors, importances, samples); 0 for none."""
        return 0

    def set_strength(self, value: float) -> None:
        """Set the strength of the method's penalty (``MethodSpec.strength``: EWC's λ, SI's c) in place,
        keeping the rest of its state: a ``--lam auto`` search starts runs that differ only in the
        strength from one state saved after the first task, before any penalty acted. A
        ValueError for a method without one."""
        raise ValueError(f"{self.name} has no strength to set")

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

    def train_data(self, index: int, tasks: Sequence[Task]) -> tuple[Tensor, Tensor, Tensor]:
        """The union of tasks 0..index, with each sample's task id (for task-specific heads).

        The union is filled one task at a time (a lazy sequence builds each task's images then), so
        at most one task's images exist besides it; the same values as ``torch.cat``."""
        seen = tasks[: index + 1]
        ids = torch.cat([torch.full((len(t.y_train),), k, dtype=torch.long) for k, t in enumerate(seen)])
        first = seen[0].x_train
        x = first.new_empty((len(ids), *first.shape[1:]))
        start = 0
        for k, t in enumerate(seen):
            part = first if k == 0 else t.x_train
            x[start : start + len(part)] = part
            start += len(part)
        return x, torch.cat([t.y_train for t in seen]), ids

    def epoch_size(self, index: int, tasks: Sequence[Task]) -> int:
        if self.budget == "task":
            return len(tasks[index].y_train)
        return sum(len(t.y_train) for t in tasks[: index + 1])


register(
    MethodSpec(
        "sgd",
        Method,
        help="fine-tuning: no memory, no penalty (the lower bound)",
        label="SGD",
        color="#1f77b4",
        order=0,
    )
)
register(
    MethodSpec(
        "joint",
        lambda: Joint("task"),
        help="all tasks so far, as many updates as the others",
        label="Joint",
        color="#3a3a3a",
        order=12,
    )
)
register(
    MethodSpec(
        "joint-cumulative",
        lambda: Joint("all"),
        help="all tasks so far, every epoch over all",
        label="Joint (cumulative)",
        color="#000000",
        order=13,
    )
)
