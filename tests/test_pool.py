"""ewc.pool.run_jobs: results in spec order, the in-process path, worker processes, errors surface."""

from __future__ import annotations

import math
import os
import time

import pytest

from ewc.pool import run_jobs


def _square_with_pid(spec: tuple[int, float]) -> tuple[int, int]:
    """(spec's value squared, this process's id); sleeps first so that later specs finish first."""
    x, delay = spec
    time.sleep(delay)
    return x * x, os.getpid()


def _halve_delay(spec: tuple[int, float]) -> tuple[int, float]:
    return spec[0], spec[1] / 2


def test_in_process_when_one_job_or_one_spec() -> None:
    seen: list[int] = []

    def fn(x: int) -> int:  # a closure: could not be sent to a worker, so this proves in-process
        seen.append(x)
        return -x

    assert run_jobs(fn, [3, 1, 2], 1) == [-3, -1, -2] and seen == [3, 1, 2]
    assert run_jobs(fn, [7], 4) == [-7]
    assert run_jobs(fn, [], 4) == []
    # for_workers is only for specs sent to workers: the in-process path runs them as given
    assert run_jobs(fn, [5], 4, for_workers=lambda s: s + 100) == [-5]


def test_workers_keep_the_order_of_the_specs() -> None:
    specs = [(i, 0.1 * (3 - i)) for i in range(4)]  # the first spec is the slowest
    calls: list[tuple[int, float]] = []

    def prepare(spec: tuple[int, float]) -> tuple[int, float]:
        calls.append(spec)
        return _halve_delay(spec)

    out = run_jobs(_square_with_pid, specs, 2, for_workers=prepare)
    assert [v for v, _ in out] == [0, 1, 4, 9]
    assert calls == specs
    pids = {p for _, p in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_exception_in_a_job_reaches_the_caller(jobs: int) -> None:
    with pytest.raises(ValueError, match="math domain error"):
        run_jobs(math.sqrt, [4.0, -1.0, 9.0], jobs)
