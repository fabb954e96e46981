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
from ewc.methods.base import Batch, Method, check_number
from ewc.methods.registry import MethodSpec, decades, register
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
        self.reg.consolidate(key=self._key(index))

    def _key(self, index: int) -> int | None:
        """The task's index as its term's key; a task that ends again without ``forget_task``
        first (a loop that revisits tasks) adds one more term under the next free key, as it
        always did."""
        return None if self.reg.mode == "separate" and index in self.reg.keys else index

    def forget_task(self, index: int) -> None:
        """``separate``: drop the returning task's own term (if it has one); ``online``: nothing."""
        if self.reg.mode == "separate" and index in self.reg.keys:
            self.reg.drop(index)

    def set_strength(self, value: float) -> None:
        self.lam = check_number(value, f"{self.name} strength lam")
        self.reg.lam = self.lam

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
        self.reg.consolidate((task.x_train, task.y_train), key=self._key(index))


#: EWC's parameters and the run settings (``--lam``, ``--gamma``, ``--fisher``, ...) they come from
EWC_DEFAULTS: dict[str, Any] = {"lam": 100.0, "gamma": 1.0, "fisher": "exact", "fisher_samples": 1000}
EWC_RUN_PARAMS = {"lam": "lam", "gamma": "gamma", "fisher": "fisher", "fisher_samples": "fisher_samples"}
EWC_LAM_GRID = (30.0, 100.0, 300.0, 1000.0)
#: the decades ``--lam auto`` starts from (docs/methods.md, "λ chosen by a search")
EWC_BRACKET = decades(-1, 5)


def _ewc(mode: str) -> Any:
    def build(lam: float, gamma: float, fisher: str, fisher_samples: int | None) -> EWCMethod:
        return EWCMethod(lam, mode, gamma, fisher, fisher_samples)

    return build


register(
    MethodSpec(
        "l2",
        L2Method,
        {"lam": 100.0},
        {"lam": (0.01, 0.1, 1.0)},
        "isotropic anchor λ/2‖θ − θ*‖²",
        label="L2",
        color="#2ca02c",
        order=1,
        run_params={"lam": "l2_lam"},
        strength="lam",
        bracket=decades(-4, 2),
    )
)
register(
    MethodSpec(
        "ewc",
        _ewc("separate"),
        EWC_DEFAULTS,
        {"lam": EWC_LAM_GRID},
        "EWC, one penalty per task",
        label="EWC",
        color="#d62728",
        order=2,
        run_params=EWC_RUN_PARAMS,
        strength="lam",
        bracket=EWC_BRACKET,
    )
)
register(
    MethodSpec(
        "online-ewc",
        _ewc("online"),
        EWC_DEFAULTS,
        {"lam": EWC_LAM_GRID},
        "EWC merged into one penalty",
        label="Online EWC",
        color="#ff7f0e",
        order=3,
        run_params=EWC_RUN_PARAMS,
        strength="lam",
        bracket=EWC_BRACKET,
    )
)
