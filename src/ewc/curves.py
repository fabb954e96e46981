"""What a run records between evaluation points: the learning curves (accuracy of every task at
each point, task starts, the task loss and the penalty) and the batches since the last point."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ewc.deferred import added_value

__all__ = ["Curves", "SincePoint"]


@dataclass
class Curves:
    steps: list[int] = field(default_factory=list)
    accuracy: list[list[float]] = field(default_factory=list)
    task_starts: list[int] = field(default_factory=list)
    per_task: list[list[float]] = field(default_factory=list)
    # at each point: the mean task loss of the batches since the previous point and the penalty
    # (loss − task loss) of the last one; None where no batch came between (a task's start)
    task_loss: list[float | None] = field(default_factory=list)
    penalty: list[float | None] = field(default_factory=list)


class SincePoint:
    """The batches since the last evaluation point: their task losses summed on the device (no
    read per step) and the last one's losses, whose penalty is read only at the point."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.last: tuple[Tensor, Tensor] | None = None

    def add(self, loss: Tensor, task_loss: Tensor) -> None:
        self.sum.add_(task_loss.detach())
        self.n += 1
        self.last = (loss, task_loss)

    def next_batch(self) -> None:
        """Let go of the last batch's losses before the next batch's backward: an unread penalty
        still held then would have its value computed (its buffers are taken over)."""
        self.last = None

    def read(self) -> tuple[float | None, float | None]:
        """(mean task loss, last penalty), None for both without a batch; then starts afresh."""
        mean = float(self.sum) / self.n if self.n else None
        penalty = added_value(*self.last) if self.last is not None else None
        self.sum.zero_()
        self.n, self.last = 0, None
        return mean, penalty
