"""Issue #16, item 8: command-line input that used to give a traceback, a message that does not say
what is wrong, or silent acceptance is one line ``ewc...: error: ...`` on stderr, exit code 2, and
no output directory left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ewc.cli import main

TINY = ["--tasks", "2", "--epochs", "1", "--max-train-per-task", "100", "--hidden", "8", "--quiet"]


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one line on stderr of a command that must fail with exit code 2."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("ewc") and ": error: " in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["run", "permuted", "--seed", "1e20"],
            "argument --seed: expected an integer, got '1e20'",
            id="seed-float",
        ),
        pytest.param(
            ["run", "permuted", "--epochs", "2.5"],
            "argument --epochs: expected an integer, got '2.5'",
            id="epochs",
        ),
        pytest.param(
            ["run", "permuted", "--seed", str(10**20)],
            "seed must be an integer in [0, 4294967295], got 1000",
            id="seed-huge",
        ),
        pytest.param(
            ["run", "permuted", "--seed", "-1"],
            "seed must be an integer in [0, 4294967295], got -1",
            id="seed-neg",
        ),
        pytest.param(
            ["stream", "--seed", str(10**20)], "seed must be an integer in [0, 4294967295]", id="stream-seed"
        ),
        pytest.param(
            ["experiment", "kl", "--seed", "-5"],
            "seed must be an integer in [0, 4294967295], got -5",
            id="kl-seed",
        ),
        pytest.param(
            ["run", "permuted", "--threads", str(10**6)],
            "threads must be an integer in [1, 1024] or None",
            id="threads-huge",
        ),
        pytest.param(
            ["run", "permuted", "--threads", "0"],
            "threads must be an integer in [1, 1024] or None, got 0",
            id="threads-0",
        ),
        pytest.param(
            ["stream", "--threads", "0"],
            "threads must be an integer in [1, 1024], got 0",
            id="stream-threads-0",
        ),
        pytest.param(
            ["run", "permuted", "--device", "foo"],
            "device must be a torch device such as cpu or cuda, got 'foo'",
            id="device",
        ),
        pytest.param(
            ["run", "permuted", "--optimizer", "adam", "--momentum", "0.9"],
            "momentum must be 0 with optimizer 'adam' (SGD's momentum has no effect on Adam), got 0.9",
            id="momentum",
        ),
        pytest.param(
            ["run", "permuted", "--methods", "sgd,si", "--select-lam", "1,10"],
            "--select-lam has no effect: none of the methods sgd, si takes λ from --lam or --l2-lam",
            id="select-lam",
        ),
        pytest.param(
            ["run", "permuted", "--methods", "ewc", "--select-l2-lam", "1,10"],
            "--select-l2-lam has no effect: none of the methods ewc takes λ from --l2-lam",
            id="select-l2-lam",
        ),
    ],
)
def test_bad_flags_are_one_line_and_leave_no_output(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    err = _error([*argv, "--out", str(out)], capsys)
    assert message in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", [["run", "permuted"], ["stream"], ["experiment", "kl"]])
def test_an_empty_out_is_refused(command: list[str], capsys: pytest.CaptureFixture) -> None:
    err = _error([*command, "--out", ""], capsys)
    assert "--out must name a directory, got ''" in err


def test_momentum_with_sgd_is_fine_and_zero_momentum_with_adam_too() -> None:
    from ewc.train import TrainConfig

    assert TrainConfig(optimizer="sgd", momentum=0.9).momentum == 0.9
    assert TrainConfig(optimizer="adam", momentum=0.0).optimizer == "adam"


@pytest.mark.parametrize("shape", [(0, 4), (0, 2, 2)])
def test_an_npz_with_no_rows(shape: tuple[int, ...], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "empty.npz"
    np.savez(f, x=np.zeros(shape), y=np.zeros(0, dtype=int))
    err = _error(["stream", "--csv", str(f), "--label-column", "y", "--out", str(tmp_path / "o")], capsys)
    assert f"{f}: no data rows" in err, err


def _record(path: Path, record: dict) -> Path:
    path.mkdir()
    (path / "results.json").write_text(json.dumps(record))
    return path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"experiment": "stream", "command": "ewc stream --tasks 3 --out OUT", "learners": []},
            "is an `ewc stream` run, not an `ewc run`: `ewc stream` wrote its report.md itself; "
            "to redraw it, run its command again: ewc stream --tasks 3 --out OUT",
        ),
        (
            {"experiment": "rl", "command": "ewc rl --visits 12 --out OUT", "runs": []},
            "is an `ewc rl` run, not an `ewc run`: `ewc rl` wrote its report.md itself; to redraw it, "
            "run its command again (it resumes from OUT/checkpoints): ewc rl --visits 12 --out OUT",
        ),
        (
            {"experiment": "kl", "command": "ewc experiment kl --out OUT", "results": {}},
            "is an `ewc experiment kl` run, not an `ewc run`",
        ),
        (
            {"rows": [], "scenarios": ["task", "class"], "runs": {}},
            "is an `ewc compare` run: report one scenario's run with `ewc report",
        ),
    ],
)
def test_report_on_another_kind_of_run_says_which(
    record: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _record(tmp_path / "run", record)
    err = _error(["report", str(run)], capsys)
    assert message in err, err
