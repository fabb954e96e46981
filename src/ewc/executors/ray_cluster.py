"""``--executor ray``: the jobs as tasks on a Ray cluster (optional extra: ``pip install 'ewc[ray]'``).

The cluster is ``--ray-address``, else ``$RAY_ADDRESS``: the head's ``HOST:PORT``, ``auto`` (the
cluster this machine belongs to) or ``local`` (start a Ray instance on this machine for this
process, which ends with it). With neither, the run is refused before any work: a run meant for
a cluster does not quietly train on the laptop. ``ray`` is imported only when jobs are sent.

Each job is one Ray task; it sets its own torch threads and seeds, so its numbers are those of
``--executor local`` on any node, and it reserves as many CPUs as it uses threads (Ray places it
where they are free). At most ``jobs`` tasks are in flight; a task whose worker process or node
dies is run again from its start, up to :data:`RETRIES` more times (same spec, same seeds: the
same numbers). A job that raises is not retried: its exception (type and message) is raised
here, and the tasks still running are cancelled, as on Ctrl-C.
Before it runs, a task checks that its node has the versions of ewc, torch and numpy that this
process has (else the numbers could differ): a node with others fails the run with one line.
Jobs must not rely on a shared file system: what they make comes back as their result. What the
workers print stays in each node's Ray logs (not streamed here: a failed job is one line here).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ewc.executors.base import ExecutorError, ExecutorSpec, register_executor

S = TypeVar("S")
R = TypeVar("R")

#: how many more times a task runs after its worker process or node died
RETRIES = 3
#: the distributions whose versions every node must share with this process
SAME_VERSIONS = ("ewc", "torch", "numpy")
#: seconds to wait for a cluster's head to accept a connection before refusing the run
CONNECT_TIMEOUT = 10.0
#: the variable Ray reads a cluster's address from
ADDRESS_VARIABLE = "RAY_ADDRESS"


def cluster_address(address: str | None) -> str:
    """``address``, else ``$RAY_ADDRESS``; a one-line ValueError naming both when neither is set."""
    chosen = address if address is not None else os.environ.get(ADDRESS_VARIABLE)
    if chosen is None or not chosen.strip():
        raise ValueError(
            f"--executor ray needs a cluster: give --ray-address HOST:PORT (or auto, or local to start "
            f"one here) or set ${ADDRESS_VARIABLE}"
        )
    return chosen.strip()


def versions() -> dict[str, str | None]:
    """This process's versions of :data:`SAME_VERSIONS` (None: not installed as a distribution)."""
    out: dict[str, str | None] = {}
    for name in SAME_VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError(EXECUTORS_RAY.missing()) from None
    return ray


def _check_reachable(address: str) -> None:
    """A one-line ExecutorError for a ``HOST:PORT`` that accepts no connection (``ray.init`` would
    retry for minutes); ``auto``, ``local`` and ``ray://`` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise ExecutorError(f"the Ray cluster at {address} cannot be reached: {err}") from None


def connect(address: str) -> Any:
    """The ``ray`` module, connected to the cluster at ``address`` (once it is seen to accept
    connections; a connection this process already has, e.g. its own ``ray.init``, is used)."""
    ray = _require_ray()
    _check_reachable(address)
    if ray.is_initialized():
        return ray
    local = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **local)
    except (ConnectionError, RuntimeError) as err:
        raise ExecutorError(f"cannot connect to the Ray cluster at {address}: {err}") from None
    return ray


def _call(task: tuple[Callable[[Any], Any], Any, dict[str, str | None]]) -> Any:
    """On a Ray worker: check the node's versions against the caller's, then run the job."""
    fn, spec, expected = task
    here = versions()
    if here != expected:
        differ = ", ".join(
            f"{k} {expected[k]} here, {here[k]} there" for k in expected if here[k] != expected[k]
        )
        raise ExecutorError(
            f"a Ray node ({socket.gethostname()}) has other versions than this process: {differ}"
        )
    return fn(spec)


class RayCluster:
    """Jobs as Ray tasks (see the module docstring); ``address`` as :func:`cluster_address` takes it."""

    name = "ray"
    shares_files = False

    def __init__(self, address: str | None = None):
        self.address = cluster_address(address)

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
        """The results in spec order, ``jobs`` tasks at a time, each reserving ``cpus`` CPUs."""
        specs = [for_workers(s) for s in specs] if for_workers is not None else list(specs)
        if not specs:
            return []
        ray = connect(self.address)
        task = ray.remote(_call).options(num_cpus=cpus, max_retries=RETRIES, retry_exceptions=False)
        expected = versions()
        results: dict[int, R] = {}
        running: dict[Any, int] = {}  # task → spec index
        waiting = deque(range(len(specs)))

        def start() -> None:
            i = waiting.popleft()
            running[task.remote((fn, specs[i], expected))] = i

        try:
            while waiting and len(running) < max(jobs, 1):
                start()
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i = running.pop(ref)
                results[i] = _result(ray, ref, i)
                if on_result is not None:
                    on_result(i, results[i])
                if waiting:  # one ended, the next starts
                    start()
        except BaseException:
            for ref in running:
                with contextlib.suppress(Exception):  # ended or lost already: nothing to stop
                    ray.cancel(ref, force=True)
            raise
        return [results[i] for i in range(len(specs))]


def _result(ray: Any, ref: Any, index: int) -> Any:
    """A task's value; its job's own exception when the job raised; an ExecutorError when the job
    could not start on its worker (a module it needs is missing there) or Ray lost it (its worker
    or node died more than :data:`RETRIES` times, the cluster is gone)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException) and not isinstance(cause, ImportError | ray.exceptions.RayError):
            raise cause from None
        why = _first_line(cause if cause is not None else err)
        hint = (
            " (every node needs ewc with the same extras, and the modules the run names: a --model "
            "module:factory)"
            if "No module named" in why
            else ""
        )
        raise ExecutorError(f"job {index} could not run on the Ray cluster: {why}{hint}") from None
    except ray.exceptions.RayError as err:
        raise ExecutorError(
            f"job {index} was lost on the Ray cluster ({type(err).__name__}: {_first_line(err)}; "
            f"tried {RETRIES + 1} times)"
        ) from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


EXECUTORS_RAY = register_executor(
    ExecutorSpec(
        "ray",
        RayCluster,
        "tasks on a Ray cluster (--ray-address), --jobs at a time, each reserving --threads CPUs; "
        "pip install 'ewc[ray]'",
        module="ray",
        extra="ray",
        address_flag="--ray-address",
    )
)
