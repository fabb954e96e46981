"""`ewc stream`: a tiny permuted stream through the CLI, its outputs, and clear input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
        (["--tasks", "0", "--schedule", "0"], "tasks must be a positive integer"),
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


def _regime_csv(path: Path, seed: int = 0, regime_column: bool = True) -> Path:
    """Three regimes (shifted Gaussian inputs, regime-specific linear labels), schedule A B A C,
    rows written in shuffled order with a timestamp column, five rows with a missing value."""
    rng = np.random.default_rng(seed)
    d, classes = 12, 3
    means = {r: rng.normal(0, 3, d) for r in "ABC"}
    weights = {r: rng.normal(0, 1, (d, classes)) for r in "ABC"}
    rows = []
    for regime in "ABAC":
        x = rng.normal(0, 1, (320, d)) + means[regime]
        y = ((x - means[regime]) @ weights[regime]).argmax(1)
        rows += [(x[i], f"c{y[i]}", regime) for i in range(len(x))]
    lines = ["t," + ",".join(f"f{j}" for j in range(d)) + ",label" + (",regime" if regime_column else "")]
    for t in rng.permutation(len(rows)):
        x, y, regime = rows[t]
        cells = [f"{v:.4f}" for v in x]
        if t % 250 == 7:
            cells[3] = ""  # a missing value: the row is dropped and counted
        lines.append(f"{t}," + ",".join(cells) + f",{y}" + (f",{regime}" if regime_column else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


CSV_FLAGS = ["--label-column", "label", "--timestamp-column", "t", "--hidden", "16", "--threads", "1"]


def test_csv_stream_with_task_column(tmp_path: Path) -> None:
    f = _regime_csv(tmp_path / "regimes.csv")
    out = tmp_path / "run"
    assert main(["stream", "--csv", str(f), *CSV_FLAGS, "--task-column", "regime", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    src = record["source"]
    assert src["rows"] == 1280 - 6 and src["rows_dropped"] == 6 and src["reordered_by_time"]
    assert src["features"] == 12 and src["classes"] == ["c0", "c1", "c2"] and src["tasks"] == ["A", "B", "C"]
    assert record["tests"] == ["task A", "task B", "task C"]
    a = record["assignment"]
    assert a["tasks_true"] == 3 and a["tasks_found"] == 3 and a["accuracy"] > 0.95
    assert [r["label"] for r in record["learners"]] == ["ewc (inferred ids)", "ewc (true ids)", "sgd"]
    main_learner = record["learners"][0]
    assert (
        len(main_learner["ids"]) == len(record["true_ids"]) == -(-(src["rows"] - src["rows_held_out"]) // 32)
    )
    assert (out / "timeline.png").stat().st_size > 0 and "task A" in (out / "report.md").read_text()


def test_csv_stream_without_task_column_and_npz(tmp_path: Path) -> None:
    f = _regime_csv(tmp_path / "regimes.csv", regime_column=False)
    out = tmp_path / "run"
    assert main(["stream", "--csv", str(f), *CSV_FLAGS, "--test-fraction", "0.1", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["assignment"] is None and record["true_ids"] is None
    assert record["tests"] == ["all held-out rows"]
    assert [r["label"] for r in record["learners"]] == ["ewc (inferred ids)", "sgd"]
    assert record["learners"][0]["tasks_found"] == 3
    x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    out2 = tmp_path / "npz"
    assert (
        main(
            [
                "stream",
                "--npz",
                str(tmp_path / "s.npz"),
                "--label-column",
                "y",
                "--threads",
                "1",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert json.loads((out2 / "results.json").read_text())["source"]["features"] == 5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label-column", "y"], "only apply with --csv"),
        (["--csv", "{f}"], "--csv needs --label-column"),
        (["--csv", "{f}", "--label-column", "price"], "no label column 'price'; the columns are t, f0"),
        (
            ["--csv", "{f}", "--label-column", "label", "--test-fraction", "1"],
            "test_fraction must be a finite",
        ),
        (
            ["--csv", "{f}", "--label-column", "label", "--task-column", "regime", "--nan-policy", "raise"],
            "non-finite",
        ),
        (["--csv", "{f}", "--label-column", "label"], "feature column 'regime', row 1: 'A' is not a number"),
    ],
)
def test_bad_csv_flags_are_exit_2(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    f = _regime_csv(tmp_path / "regimes.csv")
    flags = [v.replace("{f}", str(f)) for v in flags]
    assert main(["stream", *flags, "--threads", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ewc: error:") and message in err, err
