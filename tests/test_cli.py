"""The command line: a tiny end-to-end run, help texts, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ewc.cli import build_parser, main

TINY = [
    "--tasks",
    "2",
    "--epochs",
    "1",
    "--max-train-per-task",
    "200",
    "--hidden",
    "16",
    "--batch-size",
    "50",
    "--eval-every",
    "2",
    "--curve-samples",
    "50",
    "--fisher-samples",
    "100",
    "--threads",
    "1",
    "--quiet",
]


def test_run_writes_results_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["run", "permuted", "--methods", "sgd,ewc,joint", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"sgd", "ewc", "joint"}
    for r in results["methods"].values():
        for key in (
            "accuracy_matrix",
            "average_accuracy",
            "bwt",
            "fwt",
            "forgetting",
            "lca",
            "seconds",
            "curves",
        ):
            assert key in r
        assert len(r["accuracy_matrix"]) == 2
    assert results["config"]["tasks"] == 2 and results["config"]["hidden"] == [16]
    for name in ("metrics.csv", "curves.png", "matrix.png", "summary.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "report.md" in capsys.readouterr().out
    # redraw from the saved JSON alone
    (out / "curves.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "curves.png").exists()


def test_select_lam_on_validation(tmp_path: Path) -> None:
    out = tmp_path / "sel"
    assert (
        main(["run", "permuted", "--methods", "ewc", "--select-lam", "1,10", "--out", str(out), *TINY]) == 0
    )
    cfg = json.loads((out / "results.json").read_text())["config"]
    sel = cfg["selection"]["ewc"]
    assert sel["grid"] == [{"lam": 1.0}, {"lam": 10.0}] and len(sel["validation_acc"]) == 2
    best = max(range(2), key=lambda k: (sel["validation_acc"][k], -k))
    assert sel["chosen"] == sel["grid"][best]
    method = json.loads((out / "results.json").read_text())["methods"]["ewc"]
    assert method["lam"] == sel["chosen"]["lam"] == method["params"]["lam"]


def test_search_and_set_choose_and_fix_method_parameters(tmp_path: Path) -> None:
    out = tmp_path / "search"
    argv = ["run", "permuted", "--methods", "dropout,lwf", "--search", "--set", "lwf.temperature=3"]
    assert main([*argv, "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    sel = results["config"]["selection"]
    assert [c["rate"] for c in sel["dropout"]["grid"]] == [0.2, 0.5]
    assert [c["alpha"] for c in sel["lwf"]["grid"]] == [0.5, 1.0, 2.0]
    lwf = results["methods"]["lwf"]["params"]
    assert lwf["temperature"] == 3 and lwf["alpha"] == sel["lwf"]["chosen"]["alpha"]


def test_set_rejects_unknown_parameters(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = str(tmp_path / "x")  # --out is claimed (made) before the run checks the parameters
    assert main(["run", "permuted", "--methods", "lwf", "--set", "lwf.nope=1", "--out", out, *TINY]) == 2
    assert "has no parameter(s) nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "permuted", "--set", "garbage", "--out", out, *TINY])


def test_help_is_complete(capsys: pytest.CaptureFixture) -> None:
    for argv in (["--help"], ["run", "--help"], ["report", "--help"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--hidden",
        "--lam",
        "--gamma",
        "--fisher",
        "--seed",
        "--device",
        "--select-lam",
        "--methods",
        "--data",
    ):
        assert flag in text


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["run", "permuted", "--methods", "sgd", "--out", str(a_file), *TINY]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["run", "permuted", "--methods", "sgd,magic", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["run", "permuted", "--data", "cifar", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "data must be one of mnist-10k" in err and "or a path to a .npz file, got 'cifar'" in err
    assert not (tmp_path / "o").exists()  # refused before --out is made
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "results.json" in capsys.readouterr().err


def test_parallel_jobs_give_the_same_results(tmp_path: Path) -> None:
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        assert (
            main(["run", "permuted", "--methods", "sgd,ewc", "--out", str(out), "--jobs", str(jobs), *TINY])
            == 0
        )
        saved = json.loads((out / "results.json").read_text())
        assert saved["config"]["jobs"] == jobs
        runs[jobs] = saved["methods"]
    for m in ("sgd", "ewc"):
        assert runs[1][m]["accuracy_matrix"] == runs[2][m]["accuracy_matrix"]


def test_compare_writes_one_table_over_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "split", "--methods", "sgd,replay", "--scenarios", "task,class", "--no-search"]
    tiny = [a for a in TINY if a != "--quiet"] + ["--quiet"]
    assert main([*argv, "--out", str(out), *tiny]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(r["scenario"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {("task", "sgd"), ("task", "replay"), ("class", "sgd"), ("class", "replay")}
    assert rows[("class", "replay")]["memory_bytes"] > 0 == rows[("class", "sgd")]["memory_bytes"]
    for name in ("comparison.md", "comparison.csv", "summary.png", "task/results.json", "class/report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "| class | Replay |" in (out / "comparison.md").read_text()


def test_compare_rejects_unknown_scenarios() -> None:
    with pytest.raises(SystemExit):
        main(["compare", "split", "--scenarios", "task,nope", "--out", "x"])
