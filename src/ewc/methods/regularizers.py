"""Methods that add a quadratic anchor penalty: L2 (F ≡ 1), EWC (separate) and online EWC.

Each task's term is keyed by the task's index. In ``separate`` mode a task owns at most one term:
:meth:`~L2Method.forget_task` drops it when the task returns (so it does not pull the task back to
its old solution while it learns more of itself) and ``after_task`` consolidates it afresh; ending
a task that still owns a term is an error. ``online`` merges every task into one term, from which
one task's share cannot be removed: there ``forget_task`` does nothing and a returning task's
re-consolidation merges again.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ewc.data import Task
from ewc.methods.base import Batch, Method
from ewc.penalty import EWC, L2
from ewc.scenario import Scenario


class L2Method(Method):
    """The paper's isotropic baseline: λ/2 Σ_k ‖θ − θ*_k‖²."""

    name = "l2"

    def __init__(self, lam: float, mode: str = "separate"):
        self.lam, self.mode = lam, mode

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        self.reg = L2(model, lam=self.lam, mode=self.mode)

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        return task_loss + self.reg.penalty()

    def memory_bytes(self) -> int:
        """Anchors and importances kept between tasks."""
        return self.reg.memory_bytes()

    def after_task(self, index: int, task: Task) -> None:
        self.reg.consolidate(key=index)

    def forget_task(self, index: int) -> None:
        """``separate``: drop the returning task's own term (if it has one); ``online``: nothing."""
        if self.reg.mode == "separate" and index in self.reg.keys:
            self.reg.drop(index)

    def state_dict(self) -> dict[str, Any]:
        return self.reg.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reg.load_state_dict(state)


class EWCMethod(L2Method):
    """Elastic Weight Consolidation: λ/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)², Fisher on the task's data."""

    name = "ewc"

    def __init__(
        self,
        lam: float,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher: str = "exact",
        fisher_samples: int | None = None,
        batch_size: int = 256,
    ):
        super().__init__(lam, mode)
        self.gamma, self.fisher, self.fisher_samples, self.batch_size = (
            gamma,
            fisher,
            fisher_samples,
            batch_size,
        )
        if mode == "online":
            self.name = "online-ewc"

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        Method.setup(self, model, scenario)
        self.reg = EWC(
            model,
            lam=self.lam,
            mode=self.mode,
            gamma=self.gamma,
            fisher=self.fisher,
            max_samples=self.fisher_samples,
            batch_size=self.batch_size,
        )

    def after_task(self, index: int, task: Task) -> None:
        self.reg.consolidate((task.x_train, task.y_train), key=index)
