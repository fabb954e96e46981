"""The one interface of where jobs run, its registry, and the settings that choose an executor.

An :class:`Executor` runs ``[fn(spec) for spec in specs]`` with at most ``jobs`` jobs at once and
returns the results in the order of the specs, whatever order the jobs end in; ``on_result(i,
result)`` is called in the caller's process as each job ends, so that the caller can keep what
is done while the others run. The first failing job's exception is raised in the caller (its own
type and message, wherever it ran), and the jobs still running are stopped.

``shares_files`` says whether the jobs see the caller's file system: the local pool's workers do
(they write their progress into ``--out`` themselves); a cluster's workers may be on other
machines, so their jobs must return everything they make and the caller writes it.

Executors declare themselves in :data:`EXECUTORS` (:func:`register_executor`) with the optional
extra that installs their library; the library is imported only when an executor is made
(:func:`make_executor`), and a missing one is a one-line error naming what to install.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

__all__ = ["EXECUTORS", "Executor", "ExecutorError", "ExecutorSpec", "make_executor", "register_executor"]

S = TypeVar("S")
R = TypeVar("R")


class Executor(Protocol):
    """Where a command's independent, seeded jobs run (see the module docstring)."""

    name: str
    shares_files: bool

    def run(
        self,
        fn: Callable[[S], R],
        specs: Sequence[S],
        jobs: int,
        *,
        cpus: int = 1,
        for_workers: Callable[[S], S] | None = None,
        on_result: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        """The results of ``fn`` on every spec, in spec order. ``cpus``: the torch threads each job
        sets for itself (a cluster reserves that many cores per job; the numbers never depend on
        where a job runs). ``for_workers`` replaces a spec sent to another process (e.g. no
        progress bar) and must not change what it computes. ``fn`` must be a module-level function
        and the specs picklable."""
        ...


class ExecutorError(RuntimeError):
    """An executor could not run the jobs (a cluster unreachable, a worker lost too often)."""


@dataclass(frozen=True)
class ExecutorSpec:
    """An executor: ``make(address)`` builds it (``address``: where its cluster is, None where
    it has none); ``module`` is the library it needs, installed by ``pip install 'ewc[EXTRA]'``."""

    name: str
    make: Callable[[str | None], Executor]
    help: str
    module: str | None = None
    extra: str | None = None
    address_flag: str | None = None  # the flag naming its cluster, if it has one

    def installed(self) -> bool:
        """Whether the library is there (found, not imported: importing ray takes seconds)."""
        if self.module is None or sys.modules.get(self.module) is not None:
            return True
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def missing(self) -> str:
        """The one-line error of an executor whose library is not installed."""
        return f"--executor {self.name} needs {self.module}: pip install 'ewc[{self.extra}]'"


#: name → executor; each module of ``ewc.executors`` registers its own
EXECUTORS: dict[str, ExecutorSpec] = {}


def register_executor(spec: ExecutorSpec) -> ExecutorSpec:
    EXECUTORS[spec.name] = spec
    return spec


def make_executor(name: str = "local", address: str | None = None) -> Executor:
    """The executor ``name`` at ``address``; a one-line ValueError for an unknown name, a missing
    library, an address it cannot use (none where it needs one; one where it takes none: it
    would be ignored). Nothing is started or connected until jobs are run."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; expected one of {', '.join(EXECUTORS)}")
    spec = EXECUTORS[name]
    if not spec.installed():
        raise ValueError(spec.missing())
    if address is not None and spec.address_flag is None:
        flags = ", ".join(
            f"{s.address_flag} with --executor {n}" for n, s in EXECUTORS.items() if s.address_flag
        )
        raise ValueError(f"a cluster address has no effect with --executor {name} (it is for: {flags})")
    return spec.make(address)
