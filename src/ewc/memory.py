"""A bounded memory of past training samples, shared by experience replay, GEM and A-GEM.

The memory holds at most ``capacity`` samples (x, global label y, task index) and decides which
ones to keep with one of two policies:

- ``reservoir``: Vitter's Algorithm R over the whole stream of offered samples. The n-th sample
  (0-based) is kept with probability capacity / (n + 1) and then evicts a uniformly chosen
  stored one, so after N offers every one of them is stored with the same probability
  min(1, capacity / N) whatever the order or the task it came from.
- ``balanced``: an equal share of the capacity per group (``per="task"`` or ``per="class"``),
  each group filled by its own reservoir. When a new group arrives the shares are recomputed
  (capacity // groups, the remainder going to the oldest groups) and every older group drops
  uniformly chosen samples down to its new share, so each group keeps a uniform subset of its
  own samples.

Every random choice comes from the memory's own seeded ``torch.Generator``, whose state is part
of :meth:`Memory.state_dict`. Storage is allocated at the first :meth:`Memory.add` (the budget
the user set, ``capacity`` samples) and :attr:`Memory.nbytes` reports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewc.checks import check_int
from ewc.scenario import Scenario
from ewc.state import check_finite_state

__all__ = ["FORMAT", "PER", "POLICIES", "Memory", "memory_loss"]

FORMAT = "ewc.memory/1"
POLICIES = ("reservoir", "balanced")
PER = ("task", "class")


class Memory:
    """At most ``capacity`` stored samples, chosen by ``policy`` (see the module docstring)."""

    def __init__(self, capacity: int, policy: str = "reservoir", per: str = "task", seed: int = 0):
        self.capacity = check_int(capacity, "capacity", 1)
        if policy not in POLICIES:
            raise ValueError(f"unknown memory policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if per not in PER:
            raise ValueError(f"unknown balancing {per!r}; expected one of {', '.join(PER)}")
        self.policy, self.per = policy, per
        self.seed = check_int(seed, "seed", 0)
        self.generator = torch.Generator().manual_seed(seed)
        self._keys: list[int] = []  # group keys (0 / task / class) in order of first appearance
        self._seen: list[int] = []  # samples offered to each group so far
        # Storage, allocated at the first add: sample tensors and the group of each slot (-1: free).
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._task: Tensor | None = None
        self._slot: Tensor | None = None

    def __repr__(self) -> str:
        return f"Memory({len(self)}/{self.capacity}, policy={self.policy!r}, per={self.per!r})"

    def __len__(self) -> int:
        return 0 if self._slot is None else int((self._slot >= 0).sum())

    @property
    def seen(self) -> int:
        """Samples offered so far."""
        return sum(self._seen)

    @property
    def nbytes(self) -> int:
        """Bytes of the storage: ``capacity`` × (x, label, task, slot bookkeeping); 0 before any add."""
        held = (self._x, self._y, self._task, self._slot)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def to(self, device: torch.device | str) -> Memory:
        """Move the stored samples to ``device`` (later adds are moved there too)."""
        if self._x is not None:
            self._x, self._y, self._task, self._slot = (
                t.to(device) for t in (self._x, self._y, self._task, self._slot)
            )
        return self

    # -- adding -----------------------------------------------------------------------------

    def add(self, x: Tensor, y: Tensor, task: int | Tensor) -> None:
        """Offer samples (in this order) to the memory; ``task`` is one index or one per sample."""
        if x.dim() < 1 or y.dim() != 1 or len(x) != len(y):
            raise ValueError(
                f"x and y must hold the same number of samples, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if y.dtype != torch.long:
            raise ValueError(f"labels must be int64, got {y.dtype}")
        tasks = torch.as_tensor(task, dtype=torch.long)
        if tasks.dim() == 0:
            tasks = tasks.expand(len(y))
        if tasks.shape != y.shape:
            raise ValueError(f"task must be an int or one index per sample, got shape {tuple(tasks.shape)}")
        if len(y) and (int(y.min()) < 0 or int(tasks.min()) < 0):
            raise ValueError("labels and task indices must be >= 0")
        if self._x is None:
            self._allocate(x)
        assert self._x is not None and self._y is not None and self._task is not None
        if x.shape[1:] != self._x.shape[1:] or x.dtype != self._x.dtype:
            raise ValueError(
                f"samples of shape {tuple(x.shape[1:])} and {x.dtype} do not match the stored "
                f"{tuple(self._x.shape[1:])} and {self._x.dtype}"
            )
        device = self._x.device
        x, y, tasks = x.to(device), y.to(device), tasks.to(device)
        if self.policy == "reservoir":
            keys = torch.zeros_like(y)
        else:
            keys = tasks if self.per == "task" else y
        # Groups in order of first appearance (rows already in stream order within a group).
        unique, inverse = torch.unique(keys, return_inverse=True)
        first = torch.full((len(unique),), len(keys), dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(len(keys), device=device), reduce="amin")
        for u in first.argsort().tolist():
            key = int(unique[u])
            if key not in self._keys:
                self._new_group(key)
            rows = (inverse == u).nonzero().flatten()
            self._insert(self._keys.index(key), rows, x, y, tasks)

    def _allocate(self, x: Tensor) -> None:
        n = self.capacity
        self._x = torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        self._y = torch.zeros(n, dtype=torch.long, device=x.device)
        self._task = torch.zeros(n, dtype=torch.long, device=x.device)
        self._slot = torch.full((n,), -1, dtype=torch.long, device=x.device)

    def share(self, group: int) -> int:
        """Capacity of group ``group`` (its position among the groups seen so far)."""
        count = len(self._keys)
        return self.capacity // count + int(group < self.capacity % count)

    def _slots(self, group: int) -> Tensor:
        assert self._slot is not None
        return (self._slot == group).nonzero().flatten()

    def _new_group(self, key: int) -> None:
        """Register a group; older groups drop uniformly chosen samples down to their new share.

        Shares never grow when a group is added, and a uniform subset of a uniform subset is
        uniform, so every group's reservoir stays a uniform sample of its own stream."""
        assert self._slot is not None
        self._keys.append(key)
        self._seen.append(0)
        for group in range(len(self._keys) - 1):
            slots = self._slots(group)
            excess = len(slots) - self.share(group)
            if excess > 0:
                drop = torch.randperm(len(slots), generator=self.generator)[:excess]
                self._slot[slots[drop.to(slots.device)]] = -1

    def _insert(self, group: int, rows: Tensor, x: Tensor, y: Tensor, tasks: Tensor) -> None:
        """Algorithm R for one group: fill its free share, then keep the sample at stream position
        n with probability share / (n + 1), evicting a uniformly chosen one of the group's."""
        assert self._slot is not None
        share, n, m = self.share(group), self._seen[group], len(rows)
        slots = self._slots(group)
        fill = min(m, share - len(slots))  # free room only while nothing was ever dropped: n == len(slots)
        if fill > 0:
            target = (self._slot < 0).nonzero().flatten()[:fill]
            self._write(target, rows[:fill], x, y, tasks, group)
            slots = self._slots(group)
        rest = rows[max(fill, 0) :]
        if len(rest) and share > 0:
            position = torch.arange(n + max(fill, 0), n + m, dtype=torch.float64) + 1
            draw = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * position).long()
            kept = (draw < share).nonzero().flatten().tolist()
            last: dict[int, int] = {}  # a slot replaced twice keeps the later sample, as in the loop
            for k in kept:
                last[int(draw[k])] = k
            if last:
                where = torch.tensor(list(last), dtype=torch.long, device=slots.device)
                which = torch.tensor(list(last.values()), dtype=torch.long, device=rest.device)
                self._write(slots[where], rest[which], x, y, tasks, group)
        self._seen[group] = n + m

    def _write(self, target: Tensor, rows: Tensor, x: Tensor, y: Tensor, tasks: Tensor, group: int) -> None:
        assert (
            self._x is not None and self._y is not None and self._task is not None and self._slot is not None
        )
        self._x[target] = x[rows]
        self._y[target] = y[rows]
        self._task[target] = tasks[rows]
        self._slot[target] = group

    # -- reading ----------------------------------------------------------------------------

    def tasks(self) -> list[int]:
        """Task indices with at least one stored sample, ascending."""
        if self._task is None or self._slot is None:
            return []
        return sorted(set(self._task[self._slot >= 0].tolist()))

    def get(self, task: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """All stored (x, y, task) — or those of one task — in storage order."""
        if self._x is None or self._y is None or self._task is None or self._slot is None:
            raise ValueError("the memory is empty")
        mask = self._slot >= 0
        if task is not None:
            mask &= self._task == task
        return self._x[mask], self._y[mask], self._task[mask]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``min(n, len(self))`` stored samples drawn uniformly without replacement, as (x, y, task).

        Draws from ``generator`` (a CPU generator), by default the memory's own."""
        check_int(n, "n", 1)
        x, y, task = self.get()
        pick = torch.randperm(len(y), generator=generator or self.generator)[:n].to(y.device)
        return x[pick], y[pick], task[pick]

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Config, group counters, storage tensors (None before the first add) and generator state."""
        return {
            "format": FORMAT,
            "capacity": self.capacity,
            "policy": self.policy,
            "per": self.per,
            "keys": list(self._keys),
            "seen": list(self._seen),
            "x": self._x,
            "y": self._y,
            "task": self._task,
            "slot": self._slot,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` saved by a memory with the same capacity, policy and per."""
        expected = {
            "format",
            "capacity",
            "policy",
            "per",
            "keys",
            "seen",
            "x",
            "y",
            "task",
            "slot",
            "generator",
        }
        if not isinstance(state, Mapping) or set(state) != expected:
            got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"memory state must have keys {sorted(expected)}, got {got}")
        if state["format"] != FORMAT:
            raise ValueError(f"unsupported memory state format {state['format']!r}; expected {FORMAT!r}")
        config = (state["capacity"], state["policy"], state["per"])
        if config != (self.capacity, self.policy, self.per):
            raise ValueError(
                f"state is for a memory {config}, this one is {(self.capacity, self.policy, self.per)}"
            )
        keys, seen = list(state["keys"]), list(state["seen"])
        if len(keys) != len(seen) or (self.policy == "reservoir" and len(keys) > 1):
            raise ValueError(f"inconsistent memory groups {keys} / counts {seen}")
        tensors = [state[k] for k in ("x", "y", "task", "slot")]
        if any(t is None for t in tensors):
            if any(t is not None for t in tensors) or keys:
                raise ValueError("memory state has partial storage")
            x = y = task = slot = None
        else:
            for name, t in zip(("x", "y", "task", "slot"), tensors, strict=True):
                if not isinstance(t, Tensor) or t.ndim == 0 or len(t) != self.capacity:
                    raise ValueError(f"memory state {name!r} must be a tensor of {self.capacity} slots")
                if name != "x" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                    raise ValueError(f"memory state {name!r} must be an integer tensor, got {t.dtype}")
            check_finite_state(tensors[0], "memory state 'x'")
            x, y, task, slot = (t.clone() for t in tensors)
            if slot.numel() and int(slot.max()) >= len(keys):
                raise ValueError("memory slots refer to unknown groups")
        generator = torch.Generator()
        try:
            generator.set_state(state["generator"])
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"memory state 'generator' is not a generator state ({err})") from None
        self._keys, self._seen = [int(k) for k in keys], [int(s) for s in seen]
        self._x, self._y, self._task, self._slot = x, y, task, slot
        self.generator = generator


def memory_loss(
    model: nn.Module, scenario: Scenario, x: Tensor, y: Tensor, task: Tensor, seen: int | None = None
) -> Tensor:
    """Mean cross-entropy of ``model`` on stored samples, each read from its own task's head;
    ``seen`` is the task being trained (class-incremental: every class seen so far is active)."""
    return scenario.cross_entropy(model(x), y, task, seen)
