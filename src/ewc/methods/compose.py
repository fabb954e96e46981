"""Composition: one method made of several (e.g. EWC's penalty plus a replay memory).

For parts m_1, ..., m_n the objective is the task loss plus what each part adds to it,

    L = L_task + Σ_j (m_j.loss(L_task) − L_task),

so every part's term counts once, and the task loss once. Every hook is forwarded to every part
in order (gradient surgery such as GEM's projection therefore sees the gradient of the full
objective, and later parts see earlier parts' changes); ``train_data`` and ``epoch_size`` come
from the first part that overrides them. The state is namespaced per part and the memory is the
parts' total. Registry name ``ewc+replay``: ``Compose(EWCMethod(...), ReplayMethod(...))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ewc.data import Task
from ewc.methods.base import Batch, Method, check_state_keys
from ewc.scenario import Scenario

__all__ = ["Compose"]


class Compose(Method):
    """The parts' losses added up and their hooks called in order; ``name`` joins theirs by '+'."""

    def __init__(self, *methods: Method):
        if len(methods) < 2:
            raise ValueError(f"Compose needs at least two methods, got {len(methods)}")
        if any(not isinstance(m, Method) for m in methods):
            raise ValueError("Compose parts must be Method instances")
        if len({id(m) for m in methods}) != len(methods):
            raise ValueError("the same method object cannot be composed twice")
        rates = {m.dropout for m in methods if m.dropout is not None}
        if len(rates) > 1:
            raise ValueError(f"the parts ask for different dropout rates {sorted(rates)}")
        self.methods = tuple(methods)
        self.dropout = rates.pop() if rates else None
        self.name = "+".join(m.name for m in methods)

    def _first_overriding(self, hook: str) -> Method:
        """The first part whose class overrides ``hook``, else the first part."""
        for m in self.methods:
            if getattr(type(m), hook) is not getattr(Method, hook):
                return m
        return self.methods[0]

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        for m in self.methods:
            m.setup(model, self.scenario)

    def epoch_size(self, index: int, tasks: Sequence[Task]) -> int:
        return self._first_overriding("epoch_size").epoch_size(index, tasks)

    def train_data(self, index: int, tasks: Sequence[Task]) -> tuple[Tensor, ...]:
        return self._first_overriding("train_data").train_data(index, tasks)

    def before_task(self, index: int, task: Task) -> None:
        for m in self.methods:
            m.before_task(index, task)

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        total = task_loss
        for m in self.methods:
            total = total + (m.loss(task_loss, batch) - task_loss)
        return total

    def after_backward(self) -> None:
        for m in self.methods:
            m.after_backward()

    def after_step(self) -> None:
        for m in self.methods:
            m.after_step()

    def after_task(self, index: int, task: Task) -> None:
        for m in self.methods:
            m.after_task(index, task)

    def leave_task(self, index: int, task: Task) -> bool:
        return any([m.leave_task(index, task) for m in self.methods])  # every member hears it

    def forget_task(self, index: int) -> None:
        for m in self.methods:
            m.forget_task(index)

    def memory_bytes(self) -> int:
        return sum(m.memory_bytes() for m in self.methods)

    def set_strength(self, value: float) -> None:
        """The strength of the part that has one (EWC's λ in ``ewc+replay``)."""
        self._first_overriding("set_strength").set_strength(value)

    def _keys(self) -> list[str]:
        return [f"{i}:{m.name}" for i, m in enumerate(self.methods)]

    def state_dict(self) -> dict[str, Any]:
        return {key: m.state_dict() for key, m in zip(self._keys(), self.methods, strict=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Each part loads its own state; a part that refuses its state (changing nothing) puts
        the parts loaded before it back as they were, so nothing changes on error."""
        check_state_keys(state, set(self._keys()), self.name)
        done: list[tuple[Method, dict[str, Any]]] = []
        try:
            for key, m in zip(self._keys(), self.methods, strict=True):
                before = m.state_dict()
                m.load_state_dict(state[key])
                done.append((m, before))
        except Exception:
            for m, before in reversed(done):
                m.load_state_dict(before)
            raise
