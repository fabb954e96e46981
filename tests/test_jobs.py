"""--jobs does not change the numbers: every run uses its config's thread count wherever it runs,
and results.json records the threads each run used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ewc.checkpoint import load_checkpoint
from ewc.cli import main
from ewc.data import make_sequence
from ewc.runtime import DEFAULT_THREADS, run_threads, torch_threads
from ewc.train import TrainConfig, run_method

RUN = [
    "run",
    "permuted",
    "--methods",
    "sgd,ewc",
    "--tasks",
    "2",
    "--epochs",
    "1",
    "--max-train-per-task",
    "300",
    "--hidden",
    "64",
    "--batch-size",
    "64",
    "--eval-every",
    "2",
    "--curve-samples",
    "100",
    "--fisher-samples",
    "200",
    "--save-state",
    "--quiet",
]
TIMINGS = {"seconds", "train_seconds", "created"}


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.mark.parametrize("threads", [2])
def test_jobs_give_the_same_numbers_and_the_record_states_the_threads(tmp_path: Path, threads: int) -> None:
    """Two threads per run: the workers of --jobs 2 ran one thread each before, and 64-row matmuls
    with one and two threads differ in their last bits (the weights, then the accuracies)."""
    records, weights = {}, {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        assert main([*RUN, "--threads", str(threads), "--jobs", str(jobs), "--out", str(out)]) == 0
        records[jobs] = json.loads((out / "results.json").read_text())
        weights[jobs] = {
            m: load_checkpoint(out / "checkpoints" / f"{m}.pt")[0].state_dict() for m in ("sgd", "ewc")
        }
    one, two = records[1], records[2]
    assert (one["config"]["jobs"], two["config"]["jobs"]) == (1, 2)
    for record in (one, two):
        assert record["config"]["threads"] == threads
        assert [r["threads"] for r in record["methods"].values()] == [threads, threads]  # what ran
    one["config"]["jobs"] = two["config"]["jobs"]
    assert _without_timings(one) == _without_timings(two)
    for m in ("sgd", "ewc"):
        for name, tensor in weights[1][m].items():
            assert torch.equal(tensor, weights[2][m][name]), (m, name)


def test_the_default_is_one_thread_per_run_and_the_process_setting_is_restored() -> None:
    assert TrainConfig().threads == DEFAULT_THREADS == 1
    before = torch.get_num_threads()
    with torch_threads(3) as n:
        assert n == 3 == torch.get_num_threads()
    assert torch.get_num_threads() == before == run_threads(None)
    with pytest.raises(ValueError, match="threads must be a positive integer, got 0"):
        run_threads(0)
    tasks = make_sequence("mnist-10k", "permuted", 2, max_train_per_task=50, max_eval_per_task=20)
    config = TrainConfig(epochs=1, hidden=(8,), batch_size=25, curve_samples=10, threads=2)
    assert run_method(tasks, "sgd", config)["threads"] == 2
    assert torch.get_num_threads() == before
    assert run_method(tasks, "sgd", TrainConfig(epochs=1, hidden=(8,), threads=None))["threads"] == before


def test_parallel_jobs_tell_when_each_ends_unless_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Workers draw no bar: with --jobs 2 a line per finished job goes to stderr (its ACC as
    results.json has it); --quiet silences it."""
    loud = [a for a in RUN if a not in ("--quiet", "--save-state")]
    assert main([*loud, "--lam", "50", "--jobs", "2", "--out", str(tmp_path / "loud")]) == 0
    err = capfd.readouterr().err
    lines = sorted(line for line in err.splitlines() if line.startswith("["))
    record = json.loads((tmp_path / "loud" / "results.json").read_text())
    acc = {m: r["average_accuracy"] for m, r in record["methods"].items()}
    assert [line[:6] for line in lines] == ["[1/2] ", "[2/2] "]
    named = sorted(line.split("] ")[1].split(":")[0] for line in lines)
    assert named == ["ewc lam=50", "sgd"]  # a method's strength is named (SGD has none)
    for line in lines:
        method = line.split("] ")[1].split()[0].rstrip(":")
        assert f"ACC {acc[method]:.3f}, " in line and line.endswith(" s")
    assert main([*RUN, "--jobs", "2", "--out", str(tmp_path / "quiet")]) == 0
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("[")]
