"""`ewc stream`: a tiny permuted stream through the CLI, its outputs, and clear input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ewc.cli import main
from ewc.experiments.stream import Config, parse_schedule

torch.set_num_threads(1)

TINY = [
    "stream",
    "--tasks",
    "3",
    "--schedule",
    "0 1 0 2",
    "--hidden",
    "16",
    "--min-len",
    "8",
    "--max-len",
    "12",
    "--max-train-per-task",
    "300",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("stream") / "run"
    return main([*TINY, "--out", str(out)]), out


def test_tiny_stream_writes_results_figure_and_report(tiny_run: tuple[int, Path]) -> None:
    rc, out = tiny_run
    assert rc == 0
    assert (out / "timeline.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "ewc stream" in report and "![timeline](timeline.png)" in report
    record = json.loads((out / "results.json").read_text())
    for key in (
        "experiment",
        "config",
        "command",
        "seconds",
        "findings",
        "true_ids",
        "assignment",
        "learners",
    ):
        assert key in record
    assert record["command"].startswith("ewc stream ")
    assert record["config"]["schedule"] == [0, 1, 0, 2]
    a = record["assignment"]
    for key in ("accuracy", "mean_delay", "max_delay", "false_alarms_per_10k", "tasks_found", "tasks_true"):
        assert key in a
    assert a["accuracy"] > 0.9
    assert a["tasks_true"] == 3 and a["tasks_found"] == 3
    n = len(record["true_ids"])
    assert n == a["n_batches"]
    assert [r["method"] for r in record["learners"]] == ["ewc", "ewc", "sgd"]
    assert [r["task_ids"] for r in record["learners"]] == ["inferred", "true", "inferred"]
    assert record["learners"][1]["ids"] == record["true_ids"]  # the control is given the true ids
    assert record["learners"][1]["loglik"] == []  # ... and never asks its detector
    for r in record["learners"]:
        assert len(r["ids"]) == len(r["prequential"]) == n
        assert len(r["loglik"]) == (0 if r["task_ids"] == "true" else n)
        assert all(0.0 <= v <= 1.0 for v in r["prequential"])
        assert len(r["test_accuracy"]) == 3
        assert all(0.0 <= v <= 1.0 for v in r["test_accuracy"])
    # prequential: the very first batch is predicted by the untrained network (about chance)
    assert record["learners"][0]["prequential"][0] < 0.5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "3", "--schedule", "0 1 3"], "--schedule names task(s) 3"),
        (["--schedule", "0 x 1"], "integers separated by spaces or commas"),
        (["--schedule", " "], "--schedule is empty"),
        (["--min-len", "10", "--max-len", "5"], "--min-len <= --max-len"),
        (["--tasks", "0", "--schedule", "0"], "--tasks must be >= 1"),
    ],
)
def test_bad_input_is_exit_2_with_a_clear_message(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["stream", *flags, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ewc: error:") and message in err
    assert not (tmp_path / "x" / "results.json").exists()


def test_schedule_parses_spaces_and_commas() -> None:
    assert parse_schedule("0 1, 2,0") == (0, 1, 2, 0)
    assert Config(schedule="2 0", tasks=3).schedule == (2, 0)


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main([*TINY, "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
