"""One worker pool for independent, seeded jobs (training runs of ``ewc run``/``compare``/``rl``).

Each job runs in this process when there is one worker or one job, otherwise in a spawned worker
process (``spawn``: no forked torch state, the same start on every platform). Results come back in
the order of the specs, whatever order the workers finish in; the exception of the first job to
fail is raised in the caller. Jobs print their own progress (a worker's stdout is the caller's).

Workers never outlive the process that started them: on Linux the kernel kills a worker when its
parent dies (``PR_SET_PDEATHSIG``), and on every platform a watchdog thread in the worker ends it
within a second once its parent is gone (a SIGKILL of the parent gives it no chance to clean up,
and an orphan would keep writing into ``--out`` for whoever resumes). Ctrl-C (or any exception) in
the parent cancels the jobs not started and terminates the running workers at once instead of
waiting for them to finish.

The pool decides nothing about threads: a job sets the torch threads its spec names
(:func:`ewc.runtime.torch_threads`), so it computes the same numbers in a worker as in this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["run_jobs"]

S = TypeVar("S")
R = TypeVar("R")

WATCHDOG_SECONDS = 0.5  # how often a worker checks that its parent is alive


def run_jobs(
    fn: Callable[[S], R],
    specs: Sequence[S],
    jobs: int,
    *,
    for_workers: Callable[[S], S] | None = None,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[fn(spec) for spec in specs]``, in ``jobs`` spawned worker processes when jobs > 1.

    ``fn`` must be a module-level function and the specs picklable (they cross process
    boundaries). ``for_workers``, if given, replaces each spec before it is sent to a worker (e.g.
    no progress bar); it must not change what a job computes. It is not applied on the in-process
    path, so ``jobs <= 1`` runs the specs exactly as given. ``on_result(i, result)``, if given, is
    called in this process as each job ends (in the order they end), before the list is returned.
    """
    specs = list(specs)
    done = on_result or (lambda i, r: None)
    if jobs <= 1 or len(specs) <= 1:
        results = []
        for i, s in enumerate(specs):
            results.append(fn(s))
            done(i, results[-1])
        return results
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if for_workers is not None:
        specs = [for_workers(s) for s in specs]
    pool = ProcessPoolExecutor(
        max_workers=min(jobs, len(specs)),
        mp_context=mp.get_context("spawn"),
        initializer=_tie_to_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = {pool.submit(fn, s): i for i, s in enumerate(specs)}
        ended: dict[int, R] = {}
        for future in as_completed(futures):
            i = futures[future]
            ended[i] = future.result()
            done(i, ended[i])
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return [ended[i] for i in range(len(specs))]


def _stop(pool: object) -> None:
    """Cancel the pending jobs and terminate the running workers now (not after their jobs)."""
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[attr-defined]
    for p in workers:
        with contextlib.suppress(Exception):
            p.terminate()
    for p in workers:
        with contextlib.suppress(Exception):
            p.join(timeout=5)


def _tie_to_parent(parent: int) -> None:
    """In a worker: die with the parent (kernel signal where there is one, and a watchdog), and
    leave Ctrl-C to the parent, which stops the pool (the terminal sends SIGINT to the group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="ewc-parent-watchdog", daemon=True).start()
