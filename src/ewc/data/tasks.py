"""Tasks, and sequences of tasks built when they are read (memory grows with the tasks used).

A :class:`Task` holds its labels and, for its images (``x_train``, ``x_val``, ``x_test``), either
a tensor or a function that builds the tensor on each read. :func:`ewc.data.make_sequence`
returns a :class:`TaskSequence`: ``len`` is the number of tasks, ``tasks[k]`` builds task ``k``
(its permutation or angle comes from the seed and ``k`` alone), and the images a task is read for
are built then; the validation and test parts (read again at every evaluation) are kept in a
:class:`PartCache` of bounded size, training parts are built on each read (a run holds the
current task's). A sequence of 100 000 permuted tasks costs nothing until a task is read; a run
keeps what it holds plus at most the cache.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

__all__ = ["CACHE_BYTES", "PartCache", "Task", "TaskSequence", "validation_tasks"]

#: default bound on the images a sequence keeps built (the validation and test parts of the first
#: 29 tasks of full-size mnist-10k; the parts after those are built on every read)
CACHE_BYTES = 256 * 2**20


class _Images:
    """A Task's image field: the tensor given, or a zero-argument function called on every read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> torch.Tensor:
        if obj is None:
            raise AttributeError(self.name)  # a required dataclass field: no class-level default
        value = obj.__dict__[self.slot]
        return value if isinstance(value, torch.Tensor) else value()

    def __set__(self, obj: Any, value: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        if not isinstance(value, torch.Tensor) and not callable(value):
            raise ValueError(f"{self.name} must be a tensor or a function that builds one, got {value!r}")
        obj.__dict__[self.slot] = value


@dataclass(frozen=True, eq=False)
class Task:
    """One task: inputs ``[n, *input_shape]`` and int64 global class labels.

    Inputs built by :func:`ewc.data.make_sequence` are float32 (images ``[n, C, H, W]`` in
    [0, 1] from uint8 pixels; float features as they are) or int64 (token ids); a task made by
    hand may hold any tensors its model takes. ``classes`` are the (global) labels the task draws
    from; ``transform`` describes the input transform (kind, seed, permutation or angle, class
    group); ``indices`` are the rows of the dataset used for train (into its train split), val
    (into its train split, or its own validation split when it has one) and test (into its test
    split).

    An image field may be given as a function of no arguments instead of a tensor: reading the
    field then calls it (the tasks of :func:`ewc.data.make_sequence` are built this way, so a task
    costs memory only for the parts that are read). ``dataclasses.replace`` reads every field,
    so it returns a task with tensors; :meth:`validation` keeps unbuilt parts unbuilt.
    """

    name: str
    index: int
    x_train: torch.Tensor = _Images()  # type: ignore[assignment]
    y_train: torch.Tensor = field(repr=False)
    x_val: torch.Tensor = _Images()  # type: ignore[assignment]
    y_val: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = _Images()  # type: ignore[assignment]
    y_test: torch.Tensor = field(repr=False)
    classes: tuple[int, ...]
    transform: dict[str, Any] = field(default_factory=dict, repr=False)
    indices: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        extra = {k: v for k, v in self.transform.items() if k != "permutation"}
        return (
            f"Task(name={self.name!r}, index={self.index}, train={len(self.y_train)}, "
            f"val={len(self.y_val)}, test={len(self.y_test)}, classes={self.classes}, transform={extra})"
        )

    def validation(self) -> Task:
        """The same task with its validation part in place of its test part (for tuning)."""
        raw = self.__dict__
        return Task(
            self.name,
            self.index,
            raw["_x_train"],
            self.y_train,
            raw["_x_val"],
            self.y_val,
            raw["_x_val"],
            self.y_val,
            self.classes,
            self.transform,
            self.indices,
        )


class PartCache:
    """Built tensors by key, kept until they add up to ``max_bytes``; after that, none more.

    ``get(key, build)`` returns the kept tensor or calls ``build()`` and keeps the result if it
    still fits. Nothing is dropped: parts read in cycles (a run tests every task after every task)
    then hit on the kept ones, where least-recently-used eviction would drop every part just
    before it is read again; and kept memory does not churn (evicting and rebuilding parts of 6 MB
    between small allocations fragmented glibc's heap: a 1000-task run grew to 4.8 GB). The same
    key always gives equal values (``build`` is deterministic), so a part not kept is rebuilt
    identically.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"cache_bytes must be a non-negative integer, got {max_bytes!r}")
        self.max_bytes, self.bytes = max_bytes, 0
        self._kept: dict[Hashable, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._kept

    def room(self, nbytes: int) -> bool:
        """Whether a tensor of ``nbytes`` would still be kept."""
        return self.bytes + nbytes <= self.max_bytes

    def get(self, key: Hashable, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        value = build()
        size = value.element_size() * value.nelement()
        if self.bytes + size <= self.max_bytes:
            self._kept[key] = value
            self.bytes += size
        return value

    def clear(self) -> None:
        self._kept.clear()
        self.bytes = 0


class TaskSequence(Sequence[Task]):
    """``n_tasks`` tasks, task ``k`` built by ``build(k)`` each time it is read.

    Indexing (negative indices and slices too) and iteration work as on a list; nothing is kept
    here besides what ``build`` keeps: :func:`ewc.data.make_sequence`'s builder keeps images in
    ``cache`` (a :class:`PartCache`). :meth:`validation` is the same sequence with validation
    parts as test parts. :meth:`read` reads one part of one task, into a buffer the caller reuses
    if ``reader`` (``reader(k, part, out)``) can build into one.
    """

    def __init__(
        self,
        n_tasks: int,
        build: Callable[[int], Task],
        *,
        cache: PartCache | None = None,
        reader: Callable[[int, str, torch.Tensor | None], torch.Tensor] | None = None,
        validation: bool = False,
    ):
        self._n, self._build, self._reader, self._validation = n_tasks, build, reader, validation
        self.cache = cache

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, k: int) -> Task: ...

    @overload
    def __getitem__(self, k: slice) -> list[Task]: ...

    def __getitem__(self, k: int | slice) -> Task | list[Task]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self._n))]
        task = self._build(self._index(k))
        return task.validation() if self._validation else task

    def validation(self) -> TaskSequence:
        """The same tasks with their validation parts in place of the test parts (for tuning)."""
        return TaskSequence(self._n, self._build, cache=self.cache, reader=self._reader, validation=True)

    def read(self, k: int, part: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Task ``k``'s images of ``part`` (``train``, ``val`` or ``test``), the values of
        ``self[k].x_<part>``. A part that is built on this read is written into ``out`` when
        ``out`` has its shape and dtype: a caller that reads part after part (a run evaluating
        every task) reuses one buffer instead of allocating one per read. A kept part is returned
        as it is; so is a built part when ``out`` is None or does not fit (then it is new)."""
        if part not in ("train", "val", "test"):
            raise ValueError(f"part must be one of train, val, test, got {part!r}")
        if self._validation and part == "test":
            part = "val"
        i = self._index(k)
        if self._reader is None:
            return getattr(self._build(i), f"x_{part}")
        return self._reader(i, part, out)

    def _index(self, k: int) -> int:
        i = operator.index(k)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"task index {k} is out of range for {self._n} tasks")
        return i

    def __repr__(self) -> str:
        return f"TaskSequence({self._n} tasks{', validation parts as test' if self._validation else ''})"


def validation_tasks(tasks: Sequence[Task]) -> Sequence[Task]:
    """The same tasks with their validation parts in place of the test parts (for tuning)."""
    if isinstance(tasks, TaskSequence):
        return tasks.validation()  # still built when read
    return [t.validation() for t in tasks]
