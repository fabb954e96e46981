"""`ewc experiment many-tasks`: EWC vs SGD + dropout as tasks accumulate (tiny configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ewc.cli import main
from ewc.experiments import many_tasks
from ewc.experiments.many_tasks import Config, average_so_far, run

torch.set_num_threads(1)

TINY = dict(many_tasks.SMALLEST)  # the smallest settings the experiment declares


def test_average_so_far() -> None:
    R = [[0.9, 0.1, 0.1], [0.7, 0.8, 0.2], [0.5, 0.6, 1.0]]
    assert average_so_far(R) == pytest.approx([0.9, 0.75, 0.7])


def test_run_record() -> None:
    record = run(Config(**TINY, baseline=True))
    methods, selection = record["results"]["methods"], record["results"]["selection"]
    assert set(methods) == {"ewc", "dropout", "sgd"}
    for m in methods.values():
        R = m["accuracy_matrix"]
        assert len(R) == 3 and m["average_so_far"] == pytest.approx(average_so_far(R))
        assert m["first_task"] == [row[0] for row in R]
    assert selection["ewc"]["grid"] == [10.0, 1000.0] and selection["ewc"]["chosen"] in (10.0, 1000.0)
    assert methods["ewc"]["lam"] == selection["ewc"]["chosen"] and methods["dropout"]["dropout"] == 0.2
    assert len(selection["ewc"]["validation_acc"]) == 2
    # the same first task for every method (same initial weights and data order), before dropout acts
    assert methods["ewc"]["first_task"][0] == methods["sgd"]["first_task"][0]
    # robust even at this size: EWC keeps the first task better than plain SGD
    assert methods["ewc"]["first_task"][-1] > methods["sgd"]["first_task"][-1]
    assert any("EWC" in f for f in record["findings"])


def test_cli(tmp_path: Path) -> None:
    argv = ["experiment", "many-tasks", "--tasks", "2", "--max-train-per-task", "200", "--epochs", "1"]
    argv += ["--hidden", "16", "--dropout-grid", "0.5", "--lam-grid", "100", "--fisher-samples", "100"]
    argv += ["--jobs", "1", "--no-baseline", "--out", str(tmp_path)]
    assert main(argv) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["experiment"] == "many-tasks" and record["config"]["tasks"] == 2
    assert set(record["results"]["methods"]) == {"ewc", "dropout"}
    assert len(record["results"]["methods"]["ewc"]["average_so_far"]) == 2
    assert {"findings", "command", "seconds", "versions"} <= set(record)
    assert (tmp_path / "many_tasks.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert many_tasks.TITLE in report and "many_tasks.png" in report and "Validation ACC" in report


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tasks": 0}, "tasks"),
        ({"dropout_grid": (1.0,)}, "dropout_grid"),
        ({"lam_grid": ()}, "lam_grid"),
        ({"max_train_per_task": -1}, "max_train_per_task"),
        ({"jobs": 0}, "jobs"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_bad_config(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**kw)
