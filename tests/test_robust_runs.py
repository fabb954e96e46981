"""Runs that survive what machines do to them: kills, busy and unwritable output folders, full
disks, changed settings, dead parents, Ctrl-C (issue #16). The heavy matrix (random kill times
for every command) is ``scripts/fault_matrix.py``; these are the fast cases."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import sigint_default
from test_contracts import CONFIG, tiny_tasks

import ewc
from ewc.methods import METHODS
from ewc.train import run_method

SRC = str(Path(ewc.__file__).resolve().parents[1])
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
RUN = ["run", "permuted", "--tasks", "3", "--methods", "sgd,ewc", "--epochs", "1"]
RUN += ["--max-train-per-task", "300", "--eval-every", "5", "--quiet"]


def ewc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from ewc.cli import main; sys.exit(main())", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(ewc_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen(
        ewc_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, preexec_fn=sigint_default
    )


def without_timings(obj: object) -> object:
    if isinstance(obj, dict):
        return {
            k: without_timings(v) for k, v in obj.items() if k not in ("seconds", "train_seconds", "created")
        }
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def wait_for(cond, timeout: float = 120.0) -> None:  # noqa: ANN001
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode not in (0, None), proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ewc: error: "), proc.stderr
    return lines[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(k) for k in out]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("whole") / "run"
    proc = run_cli(*RUN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return without_timings(json.loads((out / "results.json").read_text()))


# ------------------------------------------------------------------------- resume after a kill


class Killed(Exception):
    pass


def killed_before(name: str, task: int) -> object:
    """Method ``name`` (CONFIG's parameters) that raises Killed as task ``task`` begins."""
    from ewc.methods import make_method
    from ewc.train import method_params

    method = make_method(name, **method_params(name, CONFIG))
    original = method.before_task

    def before_task(i: int, t: object) -> None:
        if i == task:
            raise Killed
        original(i, t)

    method.before_task = before_task  # type: ignore[method-assign]
    return method


@pytest.mark.parametrize("name", METHODS)
def test_every_method_resumes_to_the_uninterrupted_result(name: str, tmp_path: Path) -> None:
    """Killed before its third task (progress saved after the second), run again: the same
    accuracy matrix, curves and metrics as a run that was never interrupted."""
    torch.set_num_threads(1)
    tasks = tiny_tasks(3)
    whole = without_timings(
        {k: v for k, v in run_method(tasks, name, CONFIG).items() if k not in ("model", "method")}
    )
    progress = tmp_path / "job.pt"
    with pytest.raises(Killed):
        run_method(tasks, killed_before(name, 2), CONFIG, progress=progress)
    assert progress.exists()
    resumed = run_method(tasks, name, CONFIG, progress=progress)
    got = without_timings({k: v for k, v in resumed.items() if k not in ("model", "method")})
    assert got == whole


def test_progress_of_other_settings_is_not_resumed(tmp_path: Path) -> None:
    import dataclasses

    tasks = tiny_tasks(2)
    progress = tmp_path / "job.pt"
    run_method(tasks, "ewc", CONFIG, progress=progress)
    other = dataclasses.replace(CONFIG, lr=CONFIG.lr * 2)
    fresh = run_method(tasks, "ewc", other)
    again = run_method(tasks, "ewc", other, progress=progress)
    assert without_timings(again["accuracy_matrix"]) == without_timings(fresh["accuracy_matrix"])


@pytest.mark.parametrize("command", ["run", "compare"])
def test_sigkill_mid_run_then_resume_gives_the_same_results(
    command: str, tmp_path: Path, uninterrupted: dict
) -> None:
    args = list(RUN)
    if command == "compare":
        args = ["compare", *RUN[1:], "--scenarios", "domain", "--no-search"]
    out = tmp_path / "run"
    proc = start_cli(*args, "--out", str(out))
    sub = out / "domain" if command == "compare" else out
    wait_for(lambda: any((sub / "progress").glob("*.pt")) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    again = run_cli(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    if command == "run":
        assert without_timings(json.loads((out / "results.json").read_text())) == uninterrupted
    else:
        whole = tmp_path / "whole"
        assert run_cli(*args, "--out", str(whole)).returncode == 0
        for name in ("results.json", "domain/results.json"):
            got = without_timings(json.loads((out / name).read_text()))
            want = without_timings(json.loads((whole / name).read_text()))
            got.pop("runs", None), want.pop("runs", None)
            assert got == want


def test_a_resume_with_other_settings_is_refused_or_restarted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out).mkdir()
    (out / "run.json").write_text(
        json.dumps(
            {"format": "ewc.run/1", "settings": {"command": "run", "tasks": 5, "sequence": "permuted"}}
        )
    )
    (out / "progress").mkdir()
    (out / "progress" / "old.pt").write_bytes(b"x")
    line = one_line_error(run_cli(*RUN, "--out", str(out)))
    assert "tasks: 5 → 3" in line and "--restart" in line
    assert (out / "progress" / "old.pt").exists()  # nothing touched
    proc = run_cli(*RUN, "--restart", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not (out / "progress" / "old.pt").exists()


# ----------------------------------------------------------------------------- --out ownership


@contextlib.contextmanager
def holder(out: Path) -> Iterator[subprocess.Popen]:
    code = (
        f"import sys, time; sys.path.insert(0, {SRC!r}); from ewc.outdir import claim; claim({str(out)!r}); "
    )
    code += "print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_into_a_locked_out_fails_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with holder(out) as proc:
        t0 = time.perf_counter()
        res = run_cli(*RUN, "--out", str(out))
        seconds = time.perf_counter() - t0
        line = one_line_error(res)
        assert f"pid {proc.pid}" in line and "in use" in line
        assert seconds < 1.0, seconds
    # the holder was killed (SIGKILL): the kernel dropped its lock, no stale lock remains
    from ewc.outdir import claim, release

    claim(out)
    release(out)


def test_out_is_checked_before_any_work(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "missing" / "deeper")
    for out in (a_file, a_file / "sub", dangling, ""):
        t0 = time.perf_counter()
        line = one_line_error(run_cli("experiment", "overlap", "--out", str(out)))
        assert "--out" in line
        assert time.perf_counter() - t0 < 30  # before any computing (the experiment takes minutes)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ro"
    path.mkdir()
    if ROOT:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.fail("chattr +i failed: cannot make a read-only folder as root here")
        yield path
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_read_only_out_is_one_line_before_any_work(read_only_dir: Path) -> None:
    t0 = time.perf_counter()
    line = one_line_error(run_cli(*RUN, "--out", str(read_only_dir)))
    assert str(read_only_dir) in line and ("EACCES" in line or "EPERM" in line)
    assert time.perf_counter() - t0 < 30
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.skipif(not ROOT or not shutil.which("mount"), reason="a tiny tmpfs needs root")
def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)]).returncode != 0:
        pytest.fail("mounting a tmpfs as root failed")
    try:
        out = disk / "run"
        line = one_line_error(run_cli(*RUN, "--save-state", "--out", str(out)))
        assert "ENOSPC" in line
        leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []
        for f in out.rglob("*.json"):
            json.loads(f.read_text())  # every JSON file there is whole
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------------- workers and signals


def test_workers_die_with_their_parent(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_cli(*RUN[:5], "sgd,ewc,l2", *RUN[6:], "--jobs", "2", "--out", str(out))
    wait_for(lambda: len(children(proc.pid)) >= 3 or proc.poll() is not None)  # 2 workers + tracker
    kids = children(proc.pid)
    assert proc.poll() is None and len(kids) >= 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(alive(k) for k in kids), timeout=5)


def test_sigint_stops_the_pool_promptly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_cli(*RUN[:5], "sgd,ewc,l2", *RUN[6:], "--jobs", "2", "--out", str(out))
    wait_for(lambda: len(children(proc.pid)) >= 3 or proc.poll() is not None)
    kids = children(proc.pid)
    proc.send_signal(signal.SIGINT)  # to the parent alone
    t0 = time.perf_counter()
    proc.wait(timeout=10)
    assert proc.returncode == 130
    assert time.perf_counter() - t0 < 5
    wait_for(lambda: not any(alive(k) for k in kids), timeout=5)


def test_stream_resumes_to_the_uninterrupted_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ewc stream`` killed mid-stream (after a save, before the next) resumes at its last save."""
    from ewc.experiments import stream as exp
    from ewc.stream import StreamLearner

    config = exp.Config(**exp.SMALLEST)
    whole = without_timings(exp.run(config, tmp_path / "whole"))
    monkeypatch.setattr(exp, "SAVE_EVERY", 7)
    calls = {"n": 0}
    original = StreamLearner.partial_fit

    def partial_fit(self: StreamLearner, *args: object, **kwargs: object) -> int:
        calls["n"] += 1
        if calls["n"] == 40:  # the first learner, after its fifth save
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StreamLearner, "partial_fit", partial_fit)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        exp.run(config, out)
    assert list((out / "progress").glob("*.pt"))
    monkeypatch.setattr(StreamLearner, "partial_fit", original)
    again = without_timings(exp.run(config, out))
    for record in (whole, again):
        record.pop("command", None)
    assert again == whole


@pytest.mark.parametrize(
    ("args", "saved", "expect"),
    [
        (["rl", "--steps-per-visit", "100"], {"steps_per_visit": 50}, "steps_per_visit: 50 → 100"),
        (["stream", "--tasks", "3", "--schedule", "0 1 2"], {"tasks": 4}, "tasks: 4 → 3"),
        (["compare", "permuted", "--lr", "0.5"], {"train": {"lr": 0.1}}, "train.lr: 0.1 → 0.5"),
    ],
)
def test_every_resumable_command_refuses_other_settings(
    args: list[str], saved: dict, expect: str, tmp_path: Path
) -> None:
    """The folder's record names the run's settings; a command with others is refused at once,
    naming each difference (ewc rl used to resume with another --steps-per-visit, exit 0)."""
    out = tmp_path / "run"
    out.mkdir()
    record = {"format": "ewc.run/1", "settings": {"command": args[0], **saved}}
    (out / "run.json").write_text(json.dumps(record))
    line = one_line_error(run_cli(*args, "--out", str(out)))
    assert expect in line


def test_an_experiment_with_a_sequence_inside_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ewc experiment many-tasks`` killed after some of its training jobs: run again, the jobs
    that finished are read back (not trained again) and the results are those of a whole run."""
    from ewc.experiments import jobs
    from ewc.experiments import many_tasks as exp

    config = exp.Config(**exp.SMALLEST)
    calls = {"n": 0, "die_at": 0}
    original = jobs.run_method

    def counted(*args: object, **kwargs: object) -> dict:
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(jobs, "run_method", counted)
    whole = without_timings(exp.run(config, str(tmp_path / "whole")))
    total = calls["n"]
    calls.update(n=0, die_at=3)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        exp.run(config, str(out))
    assert len(list((out / "progress").glob("*.json"))) == 2
    calls.update(n=0, die_at=0)
    again = without_timings(exp.run(config, str(out)))
    assert calls["n"] == total - 2  # the two finished jobs were read back, not trained again
    for record in (whole, again):
        record.pop("command", None)
    assert again == whole


def test_save_schedule_keeps_saving_to_its_share_of_the_time() -> None:
    """Saves are due while they cost at most ``share`` of the time since the previous one: a save
    that took 2 s is next due 20 s after it ended (share 0.1); cheap saves are due every time."""
    from ewc.checkpoint import SaveSchedule

    now = [0.0]
    schedule = SaveSchedule(share=0.1, clock=lambda: now[0])
    assert schedule.due()  # nothing saved yet

    def save(seconds: float) -> None:
        now[0] += seconds

    schedule.save(save, 2.0)  # ends at t = 2
    for t, due in [(2.0, False), (21.9, False), (22.0, True)]:
        now[0] = t
        assert schedule.due() is due, t
    schedule.save(save, 0.001)
    now[0] += 0.02
    assert schedule.due()


def test_a_run_saving_after_some_tasks_only_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress saved after the first task only (later saves not due), killed in the third: the
    resumed run redoes the second and ends with the uninterrupted run's numbers."""
    import ewc.checkpoint as checkpoint

    torch.set_num_threads(1)
    tasks = tiny_tasks(3)
    whole = without_timings(
        {k: v for k, v in run_method(tasks, "ewc", CONFIG).items() if k not in ("model", "method")}
    )
    progress = tmp_path / "job.pt"
    saved: list[int] = []
    original_due = checkpoint.SaveSchedule.due
    monkeypatch.setattr(checkpoint.SaveSchedule, "due", lambda self: self.last_end is None)
    original_save = checkpoint.save_progress

    def save(path: object, identity: str, model: object, method: object, loop: dict) -> None:
        saved.append(len(loop["matrix"]))
        original_save(path, identity, model, method, loop)

    monkeypatch.setattr("ewc.train.save_progress", save)
    with pytest.raises(Killed):
        run_method(tasks, killed_before("ewc", 2), CONFIG, progress=progress)
    assert saved == [1]  # after the first task only
    monkeypatch.setattr(checkpoint.SaveSchedule, "due", original_due)
    resumed = run_method(tasks, "ewc", CONFIG, progress=progress)
    assert saved[:2] == [1, 2]  # resumed after the first task: the second redone and saved
    got = without_timings({k: v for k, v in resumed.items() if k not in ("model", "method")})
    assert got == whole
