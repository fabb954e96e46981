"""Training jobs on workers that do not see ``--out`` (``--executor ray``: other machines).

A job of :func:`ewc.experiments.sequence.run_all` writes into ``--out`` when it runs in the local
pool: its checkpoint (``--save-state``), its progress after each task and its result when it ends
(``OUT/progress``). A worker on another machine cannot, so here the job runs with its checkpoint
in a temporary folder of the worker and no progress folder, and returns its result with the
checkpoint's bytes; this process writes both where the local pool's job would have (atomically),
as each job ends. So a run stopped and run again still skips the jobs that had ended (their
results are read back from ``OUT/progress``); a job that was running starts again from its
first task (its progress after each task stays on the worker, which may be gone).

The data must be on every worker: a registered dataset is found there as it is found here (the
package's ``mnist-10k`` always is); a ``--data FILE.npz`` must be at the same path, and a worker
whose file there differs from this one (SHA-256) refuses the job rather than train on other data.
"""

from __future__ import annotations

import json
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ewc.data.custom import file_sha256, is_npz_path
from ewc.executors import Executor
from ewc.experiments.common import write_json
from ewc.state import atomic_write_bytes

#: a job spec: (key, method, config, on validation, checkpoint path or None, progress folder or None
#: [, options]), as run_all's jobs are
Spec = tuple


def run_detached(
    executor: Executor,
    job: Callable[[Spec], dict[str, Any]],
    specs: list[Spec],
    jobs: int,
    *,
    cpus: int,
    for_workers: Callable[[Spec], Spec],
    files: Callable[[Spec], tuple[Path, Path]],
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``[job(spec) for spec in specs]`` on ``executor``, with the files written here (see the
    module docstring). ``files(spec)``: the (result, progress) files of a spec with a progress
    folder, as ``job`` names them. ``on_result(i, result)``, if given, is called as job ``i`` ends
    here (not for results already on disk)."""
    results: dict[int, dict[str, Any]] = {}
    todo = []
    for i, spec in enumerate(specs):
        save, progress = spec[4:6]
        finished = files(spec)[0] if progress is not None else None
        if finished is not None and finished.exists() and (save is None or Path(save).exists()):
            results[i] = json.loads(finished.read_text())
        else:
            todo.append(i)

    def keep(k: int, returned: tuple[dict[str, Any], bytes | None]) -> None:
        i = todo[k]
        res, checkpoint = returned
        save, progress = specs[i][4:6]
        if save is not None and checkpoint is not None:
            atomic_write_bytes(save, checkpoint)
        if progress is not None:
            finished, partial = files(specs[i])
            finished.parent.mkdir(parents=True, exist_ok=True)
            write_json(res, finished)
            partial.unlink(missing_ok=True)  # a local run's progress on the same job, now done
        results[i] = res
        if on_result is not None:
            on_result(i, res)

    calls = [(job, for_workers(specs[i]), _data_digest(specs[i])) for i in todo]
    executor.run(_detached_job, calls, jobs, cpus=cpus, on_result=keep)
    return [results[i] for i in range(len(specs))]


def _data_digest(spec: Spec) -> str | None:
    """The SHA-256 of the job's data file (``spec[0]`` is its data key, the data second), if any."""
    data = spec[0][1]
    return file_sha256(data) if is_npz_path(data) else None


def _detached_job(
    call: tuple[Callable[[Spec], dict[str, Any]], Spec, str | None],
) -> tuple[dict[str, Any], bytes | None]:
    """On a worker: the job with its checkpoint in a temporary folder, no progress folder, no
    shared prefix file and no deferred tests (files here: the worker trains the first task and
    tests the run itself, with the same results); its result and the checkpoint's bytes (None
    without ``--save-state``)."""
    job, spec, digest = call
    if digest is not None and Path(spec[0][1]).is_file() and file_sha256(spec[0][1]) != digest:
        raise ValueError(
            f"--data {spec[0][1]}: the file on {socket.gethostname()} differs from the run's (SHA-256 "
            f"{digest[:12]}...): every node needs the same file at that path"
        )
    save = spec[4]
    options = {**spec[6], "prefix": None, "defer_tests": None} if len(spec) > 6 and spec[6] else None
    with tempfile.TemporaryDirectory(prefix="ewc-job-") as tmp:
        local = Path(tmp, Path(save).name) if save is not None else None
        res = job((*spec[:4], local, None, *([options] if options else [])))
        return res, local.read_bytes() if local is not None else None
