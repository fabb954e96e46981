"""One worker pool for independent, seeded jobs (training runs of ``ewc run``/``compare``/``rl``).

Each job runs in this process when there is one worker or one job, otherwise in a spawned worker
process (``spawn``: no forked torch state, the same start on every platform). Results come back in
the order of the specs, whatever order the workers finish in; the first failing job's exception is
raised in the caller. Jobs print their own progress (a worker's stdout is the caller's).

The pool decides nothing about threads: a job sets the torch threads its spec names
(:func:`ewc.runtime.torch_threads`), so it computes the same numbers in a worker as in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["run_jobs"]

S = TypeVar("S")
R = TypeVar("R")


def run_jobs(
    fn: Callable[[S], R],
    specs: Sequence[S],
    jobs: int,
    *,
    for_workers: Callable[[S], S] | None = None,
) -> list[R]:
    """``[fn(spec) for spec in specs]``, in ``jobs`` spawned worker processes when jobs > 1.

    ``fn`` must be a module-level function and the specs picklable (they cross process
    boundaries). ``for_workers``, if given, replaces each spec before it is sent to a worker (e.g.
    no progress bar); it must not change what a job computes. It is not applied on the in-process
    path, so ``jobs <= 1`` runs the specs exactly as given.
    """
    specs = list(specs)
    if jobs <= 1 or len(specs) <= 1:
        return [fn(s) for s in specs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if for_workers is not None:
        specs = [for_workers(s) for s in specs]
    with ProcessPoolExecutor(max_workers=min(jobs, len(specs)), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(fn, specs))
