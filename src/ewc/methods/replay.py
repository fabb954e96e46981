"""Experience replay: rehearse stored samples of earlier tasks alongside the current one.

Each step's objective is

    L = L_task(batch) + w · (1/|M_b|) Σ_{(x, y, k) ∈ M_b} ℓ(f_k(x), y),

where M_b is a batch drawn uniformly from the memory (as many samples as the current batch, or
``replay_batch``), f_k is the head of the sample's own task k as the scenario defines it (the
task's head in task-IL, the shared head in domain-IL, every class seen so far in class-IL) and ℓ
is the cross-entropy. This is "experience replay" / "tiny episodic memories" (Chaudhry et al.
2019, arXiv:1902.10486; Rolnick et al. NeurIPS 2019) with the current and replayed losses kept
as two visible terms; w = 1 weighs both batches equally.

The memory (:class:`ewc.memory.Memory`) is filled at the end of each task with that task's
training samples, each offered once, so during task i it holds samples of tasks 0..i-1 only and
never more than ``capacity`` of them (the budget the user set).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ewc.checks import check_count, check_int
from ewc.data import Task
from ewc.memory import Memory, memory_loss
from ewc.methods.base import Batch, Method, check_number, check_state_keys
from ewc.methods.registry import MethodSpec, register
from ewc.scenario import Scenario

__all__ = ["EpisodicMethod", "ReplayMethod"]


class EpisodicMethod(Method):
    """A method with an episodic memory of past tasks' samples, filled at the end of each task."""

    def __init__(self, capacity: int, policy: str, per: str, seed: int):
        self.memory = Memory(capacity, policy, per, seed)  # validates the memory's arguments
        self.current = 0

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        m = self.memory
        self.memory = Memory(m.capacity, m.policy, m.per, m.seed)  # a fresh memory per run
        self.current = 0

    def before_task(self, index: int, task: Task) -> None:
        self.current = index

    def after_task(self, index: int, task: Task) -> None:
        self.memory.add(task.x_train, task.y_train, index)
        self.memory.to(self._device())

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def memory_bytes(self) -> int:
        return self.memory.nbytes

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(state, {"memory", "current"}, self.name)
        current = check_int(state["current"], f"{self.name} state 'current'", 0)
        self.memory.load_state_dict(state["memory"])  # checks it all before it changes anything
        self.current = current


class ReplayMethod(EpisodicMethod):
    """Experience replay: the task loss plus ``weight`` × the loss on a batch from the memory."""

    name = "replay"

    def __init__(
        self,
        capacity: int = 1000,
        policy: str = "reservoir",
        per: str = "task",
        replay_batch: int | None = None,
        weight: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(capacity, policy, per, seed)
        self.replay_batch = check_count(replay_batch, "replay_batch", allow_none=True)
        self.weight = check_number(weight, "weight")

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        if len(self.memory) == 0:
            return task_loss
        if batch is None:
            raise ValueError("replay needs the batch (its task index and device)")
        x, y, task = self.memory.sample(self.replay_batch or len(batch.y))
        device = batch.x.device
        replay = memory_loss(
            self.model, self.scenario, x.to(device), y.to(device), task.to(device), batch.task
        )
        return task_loss + self.weight * replay


#: the bounded memory's parameters, shared by every method that keeps one
MEMORY_DEFAULTS: dict[str, Any] = {"capacity": 1000, "policy": "balanced", "per": "task", "seed": 0}
#: replay's own parameters on top of the memory's
REPLAY_DEFAULTS: dict[str, Any] = {
    **MEMORY_DEFAULTS,
    "policy": "reservoir",
    "replay_batch": None,
    "weight": 1.0,
}

register(
    MethodSpec(
        "replay",
        ReplayMethod,
        REPLAY_DEFAULTS,
        {"weight": (0.5, 1.0, 2.0)},
        "experience replay from a bounded memory",
        label="Replay",
        color="#bcbd22",
        order=8,
    )
)
