"""ewc.executors: the local pool and a Ray cluster behind one interface (issue #17, item 6).

The Ray tests start a real local cluster (a head with no CPUs and two worker nodes of one CPU
each, separate raylets: ``ray.cluster_utils.Cluster``) once for the module, and check after it
is shut down that every process it started is gone. The last test kills a worker node in the
middle of a sweep.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import executor_jobs
import pytest
from conftest import sigint_default
from executor_jobs import square_after

import ewc
from ewc.checkpoint import load_checkpoint
from ewc.cli import main
from ewc.executors import EXECUTORS, ExecutorError, make_executor
from ewc.executors.local import LocalPool
from ewc.executors.ray_cluster import RayCluster, versions
from ewc.experiments import jobs, sequence
from ewc.train import TrainConfig

SRC = str(Path(ewc.__file__).resolve().parents[1])
SWEEP = ["run", "permuted", "--methods", "sgd,ewc,l2", "--tasks", "2", "--epochs", "1"]
SWEEP += ["--max-train-per-task", "300", "--hidden", "64", "--batch-size", "64", "--eval-every", "2"]
SWEEP += ["--curve-samples", "100", "--fisher-samples", "200", "--save-state", "--quiet"]
TIMINGS = {"seconds", "train_seconds", "created"}


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def wait_for(cond: Any, timeout: float) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            found.add(kid)
            todo.append(kid)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


# ----------------------------------------------------------------------------- what every one does


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A Ray cluster on this machine: a head without CPUs and two one-CPU worker nodes."""
    pytest.importorskip("ray", reason="the ray extra: pip install 'ewc[ray]'")
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(executor_jobs)  # Ray's workers cannot import tests/
    before = descendants(os.getpid())
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    session = Path(c.head_node.get_session_dir_path())
    try:
        c.workers = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        yield c
    finally:
        started = descendants(os.getpid()) - before
        ray.shutdown()
        c.shutdown()
        wait_for(lambda: not any(alive(p) for p in started), timeout=30)
        shutil.rmtree(session, ignore_errors=True)


@pytest.fixture(params=list(EXECUTORS))
def executor(request: pytest.FixtureRequest) -> Any:
    if request.param == "ray":
        return make_executor("ray", request.getfixturevalue("cluster").address)
    return make_executor(request.param)


def test_every_executor_keeps_spec_order_and_reports_each_job_once(executor: Any) -> None:
    specs = [(i, 0.2 * (3 - i)) for i in range(4)]  # the first is the slowest
    ended: list[tuple[int, int]] = []
    out = executor.run(square_after, specs, 2, on_result=lambda i, r: ended.append((i, r)))
    assert out == [0, 1, 4, 9]
    assert sorted(ended) == [(0, 0), (1, 1), (2, 4), (3, 9)]
    assert executor.run(square_after, [], 2) == []


def test_every_executor_raises_the_jobs_own_exception(executor: Any) -> None:
    with pytest.raises(ValueError, match="math domain error"):
        executor.run(math.sqrt, [4.0, -1.0, 9.0], 2)


def test_a_module_missing_on_the_workers_is_one_line(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "only_here.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # this process imports it; the workers cannot
    import only_here  # type: ignore[import-not-found]

    with pytest.raises(ExecutorError, match="No module named 'only_here' .every node needs ewc") as err:
        make_executor("ray", cluster.address).run(only_here.twice, [1], 1)
    assert "\n" not in str(err.value)


def test_only_the_local_pool_shares_files() -> None:
    assert make_executor("local").shares_files and not RayCluster("h:1").shares_files


# ----------------------------------------------------------------------------- settings and errors


def test_the_executor_is_checked_when_the_config_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=r"--ray-address HOST:PORT .* \$RAY_ADDRESS"):
        sequence.RunConfig(sequence="permuted", executor="ray")
    with pytest.raises(ValueError, match="no effect with --executor local"):
        sequence.RunConfig(sequence="permuted", ray_address="head:6379")
    with pytest.raises(ValueError, match="executor"):
        sequence.RunConfig(sequence="permuted", executor="dask")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert (
        sequence.RunConfig(sequence="permuted", executor="ray").options()["executor"].address == "head:6379"
    )
    assert RayCluster("other:1").address == "other:1"  # the flag wins over the variable


def test_a_missing_extra_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ValueError, match=r"--executor ray needs ray: pip install 'ewc\[ray\]'"):
        make_executor("ray", "head:6379")
    argv = [*SWEEP, "--executor", "ray", "--ray-address", "head:6379", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "ewc: error: --executor ray needs ray: pip install 'ewc[ray]'"
    assert not (tmp_path / "o").exists()  # refused before --out is made


def test_an_unreachable_cluster_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    argv = [*SWEEP, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"ewc: error: the Ray cluster at 127.0.0.1:{port} cannot be reached")
        and "\n" not in err
    )
    assert time.perf_counter() - t0 < 30  # not Ray's minutes of retries


def test_a_node_with_other_versions_refuses_the_job() -> None:
    from ewc.executors.ray_cluster import _call

    assert _call((math.sqrt, 4.0, versions())) == 2.0
    with pytest.raises(ExecutorError, match=r"other versions .* torch 0\.0 here"):
        _call((math.sqrt, 4.0, {**versions(), "torch": "0.0"}))


# ----------------------------------------------------------------------------- workers without --out


class Unshared(LocalPool):
    """The local pool run as if its workers did not see this file system (what Ray's may not):
    jobs go through ewc.experiments.detached. Counts the jobs it is sent."""

    shares_files = False
    sent = 0

    def run(self, fn: Any, specs: Any, jobs: int, **kwargs: Any) -> list[Any]:
        Unshared.sent += len(specs)
        return super().run(fn, specs, jobs, **kwargs)


def test_detached_jobs_write_the_same_files_and_resume(tmp_path: Path) -> None:
    config = TrainConfig(
        epochs=1, hidden=(16,), batch_size=50, eval_every=2, curve_samples=50, fisher_samples=100
    )
    args = ("permuted", "mnist-10k", 2, ["sgd", "ewc"], config)
    options = {"max_train_per_task": 200, "save_state": True, "report": False, "lam_grid": [1.0, 10.0]}
    shared = sequence.run_sequence(*args, tmp_path / "shared", **options)
    Unshared.sent = 0
    detached = sequence.run_sequence(*args, tmp_path / "detached", executor=Unshared(), **options)
    assert Unshared.sent == 4  # 2 λ on validation for ewc, then 2 test runs
    assert without_timings(detached) == without_timings(shared)
    for m in ("sgd", "ewc"):
        a, b = (tmp_path / d / "checkpoints" / f"{m}.pt" for d in ("shared", "detached"))
        assert a.read_bytes() == b.read_bytes()
    names = sorted(p.name for p in (tmp_path / "shared" / "progress").iterdir())
    assert sorted(p.name for p in (tmp_path / "detached" / "progress").iterdir()) == names
    # run again: every job is read back from OUT/progress, none is sent; a lost checkpoint is rerun
    (tmp_path / "detached" / "checkpoints" / "sgd.pt").unlink()
    again = sequence.run_sequence(*args, tmp_path / "detached", executor=Unshared(), **options)
    assert Unshared.sent == 5 and without_timings(again) == without_timings(shared)


def test_a_worker_with_another_data_file_refuses_the_job(tmp_path: Path) -> None:
    from ewc.experiments.detached import _detached_job

    data = tmp_path / "mine.npz"
    data.write_bytes(b"not the file the run was started with")
    spec = (("permuted", str(data), 2, None, None), "sgd", TrainConfig(), False, None, None)
    with pytest.raises(ValueError, match=r"mine\.npz: the file on .* differs from the run's"):
        _detached_job((jobs._job, spec, "0" * 64))


# ----------------------------------------------------------------------------- the acceptance run


def _running_job(raylet: int) -> bool:
    """Whether a worker process of this raylet is running a job (Ray titles it ``ray::_call``)."""
    return any(command_line(p).startswith("ray::_call") for p in descendants(raylet))


def _start_sweep(cluster: Any, out: Path) -> subprocess.Popen:
    """``ewc run`` of SWEEP on the cluster (address from $RAY_ADDRESS), two jobs at a time."""
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_ADDRESS": cluster.address}
    cmd = [sys.executable, "-c", "import sys; from ewc.cli import main; sys.exit(main())"]
    argv = [*SWEEP, "--jobs", "2", "--executor", "ray", "--out", str(out)]
    return subprocess.Popen(
        [*cmd, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=sigint_default,
    )


def _jobs_running() -> list[int]:
    """This process's descendants (the cluster's workers) running a job (titled ``ray::_call``)."""
    return [p for p in descendants(os.getpid()) if command_line(p).startswith("ray::_call")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_the_jobs_end_with_their_driver(cluster: Any, tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C cancels the running tasks (exit 130); a SIGKILL of the driver leaves Ray to end the
    tasks it owned: no job runs on for a driver that is gone."""
    proc = _start_sweep(cluster, tmp_path / "run")
    try:
        wait_for(lambda: _jobs_running() or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    wait_for(lambda: not _jobs_running(), timeout=10)


def test_ray_gives_the_local_results_when_a_worker_node_dies(cluster: Any, tmp_path: Path) -> None:
    """``--executor ray`` (address from $RAY_ADDRESS) gives results.json and checkpoints identical
    to ``--jobs 2``, although one of the two worker nodes is killed (SIGKILL, raylet and workers)
    while it runs a job: that job runs again on the other node. Runs last: the node stays dead."""
    local = tmp_path / "local"
    assert main([*SWEEP, "--jobs", "2", "--out", str(local)]) == 0
    out = tmp_path / "ray"
    proc = _start_sweep(cluster, out)
    try:
        victim = cluster.workers[0]
        raylet = victim.all_processes["raylet"][0].process.pid
        wait_for(lambda: _running_job(raylet) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[1]
        cluster.remove_node(victim, allow_graceful=False)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    record = json.loads((out / "results.json").read_text())
    assert without_timings(record) == without_timings(json.loads((local / "results.json").read_text()))
    for m in ("sgd", "ewc", "l2"):
        assert (out / "checkpoints" / f"{m}.pt").read_bytes() == (
            local / "checkpoints" / f"{m}.pt"
        ).read_bytes()
        load_checkpoint(out / "checkpoints" / f"{m}.pt")
    assert len(list((out / "progress").glob("*.json"))) == 3 and not list((out / "progress").glob("*.pt"))
