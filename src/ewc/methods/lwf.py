"""Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2018): distil the previous model.

At the end of every task LwF keeps a frozen copy of the network (θ_old). While training task t it
adds, on the *current* inputs x, the distillation loss between the old and the current outputs on
the heads of the earlier tasks::

    L(θ) = L_t(θ) + α · Σ_h KD_T(z_h^old(x), z_h(x)),
    KD_T(a, b) = T² · KL(softmax(a / T) ‖ softmax(b / T))      (mean over the batch)

No old data is stored: the old model's responses to new inputs act as soft targets for the old
tasks. KL differs from the paper's cross-entropy form -Σ p_old log p_new only by the entropy of
p_old, a constant, so both have the same gradient; KL is used because it is zero when the models
agree. The T² keeps the gradient's scale independent of T (Hinton et al. 2015); Li & Hoiem use
T = 2 and α (their λ_o) = 1.

The heads h depend on the scenario (see :mod:`ewc.scenario`), with t tasks learned before:

- ``task``: one term per earlier task k < t on its own head (Li & Hoiem's multi-head sum);
- ``domain`` (and the library's ``shared``): one term on the shared head, since every task reads
  the same units (summing over k would count one identical term t times);
- ``class``: one term on the units of all classes of tasks 0..t-1, the classes the old model
  knew. This follows van de Ven, Tuytelaars & Tolias (2022, github.com/GMvandeVen/continual-
  learning), whose target is the old model's scores on ``active_classes`` up to task t-1; a sum
  over the nested heads "classes up to k" would weight the first tasks' classes repeatedly.

Unlike van de Ven's code, which weighs the new loss by 1/t and the distillation by 1 - 1/t, the
weight here is Li & Hoiem's plain α. The old model runs in eval mode (no dropout in its targets).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.checks import check_int
from ewc.data import Task
from ewc.methods.base import Batch, Method, check_number
from ewc.methods.registry import MethodSpec, register
from ewc.scenario import Scenario
from ewc.state import check_model_state


def distillation(old: Tensor, new: Tensor, temperature: float) -> Tensor:
    """T² · KL(softmax(old/T) ‖ softmax(new/T)), summed over units and averaged over rows."""
    log_p_old = F.log_softmax(old / temperature, dim=1)
    log_p_new = F.log_softmax(new / temperature, dim=1)
    kl = F.kl_div(log_p_new, log_p_old, log_target=True, reduction="batchmean")
    return temperature**2 * kl


class LwFMethod(Method):
    """Learning without Forgetting: α · KD_T between the previous model and this one on new inputs."""

    name = "lwf"

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        self.alpha = check_number(alpha, "lwf: alpha")
        self.temperature = check_number(temperature, "lwf: temperature", positive=True)
        self.old_model: nn.Module | None = None
        self.tasks_done = 0  # tasks the old model has learned

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        self.old_model, self.tasks_done = None, 0

    def heads(self) -> list[tuple[int, int | None]]:
        """(task, seen) of every head distilled: see the module docstring."""
        done = self.tasks_done
        if done == 0:
            return []
        if self.scenario.kind == "task":
            return [(k, None) for k in range(done)]
        return [(done - 1, None)]  # domain/shared: the one head; class: classes of tasks 0..t-1

    def distillation_loss(self, x: Tensor, out: Tensor) -> Tensor:
        """Σ_h KD_T(old head h, current head h) on inputs ``x`` whose current outputs are ``out``."""
        assert self.old_model is not None
        with torch.no_grad():
            old_out = self.old_model(x)
        terms = [
            distillation(
                self.scenario.head(old_out, k, seen), self.scenario.head(out, k, seen), self.temperature
            )
            for k, seen in self.heads()
        ]
        return torch.stack(terms).sum()

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        if self.old_model is None or self.alpha == 0:
            return task_loss
        if batch is None:
            raise ValueError("lwf needs the batch (its inputs and outputs) to distil the old model")
        return task_loss + self.alpha * self.distillation_loss(batch.x, batch.out)

    def after_task(self, index: int, task: Task) -> None:
        self.old_model = self._frozen_copy()
        self.tasks_done = index + 1

    def _frozen_copy(self) -> nn.Module:
        old = copy.deepcopy(self.model)
        old.eval()
        old.requires_grad_(False)
        return old

    def memory_bytes(self) -> int:
        if self.old_model is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.old_model.state_dict().values())

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks_done": self.tasks_done}
        if self.old_model is not None:
            state["old_model"] = {k: v.detach().clone() for k, v in self.old_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rebuild the old model from the current one's architecture (call after ``setup``); the
        state is checked first (keys, shapes, finite weights): nothing changes on error."""
        if (
            not isinstance(state, dict)
            or set(state) - {"tasks_done", "old_model"}
            or "tasks_done" not in state
        ):
            got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"lwf: expected keys tasks_done[, old_model], got {got}")
        tasks_done = check_int(state["tasks_done"], "lwf state 'tasks_done'", 0)
        if (tasks_done > 0) != ("old_model" in state):
            raise ValueError(f"lwf: tasks_done={tasks_done} does not match the presence of old_model")
        old = None
        if "old_model" in state:
            old = self._frozen_copy()
            check_model_state(old, state["old_model"], "lwf state 'old_model'")
            old.load_state_dict(state["old_model"])
        self.old_model, self.tasks_done = old, tasks_done


register(
    MethodSpec(
        "lwf",
        LwFMethod,
        {"alpha": 1.0, "temperature": 2.0},
        {"alpha": (0.5, 1.0, 2.0)},
        "Learning without Forgetting: distil the previous model's outputs",
        label="LwF",
        color="#e377c2",
        order=7,
    )
)
