"""``--executor local`` (the default): :func:`ewc.pool.run_jobs`, spawned worker processes on this
machine that die with their parent; ``jobs`` of them, each job with its own torch threads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from ewc.executors.base import ExecutorSpec, register_executor
from ewc.pool import run_jobs

S = TypeVar("S")
R = TypeVar("R")


class LocalPool:
    """The local worker pool as an :class:`~ewc.executors.base.Executor` (one job, or ``jobs``
    = 1: in this process)."""

    name = "local"
    shares_files = True

    def __init__(self, address: str | None = None):
        if address is not None:
            raise ValueError("the local pool takes no cluster address")

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
        """:func:`ewc.pool.run_jobs` (``cpus`` is each job's own business here: ``jobs × cpus``
        cores are used)."""
        return run_jobs(fn, specs, jobs, for_workers=for_workers, on_result=on_result)


register_executor(ExecutorSpec("local", LocalPool, "--jobs worker processes on this machine"))
