"""A learner saved with its run comes back with the same predictions and the same method state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ewc.checkpoint import load_checkpoint
from ewc.cli import main
from ewc.data import load_dataset, make_sequence
from ewc.train import accuracy

TINY = [
    "--tasks",
    "2",
    "--epochs",
    "1",
    "--max-train-per-task",
    "150",
    "--hidden",
    "16",
    "--batch-size",
    "50",
]
TINY += ["--eval-every", "5", "--curve-samples", "20", "--fisher-samples", "50", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("method", ["ewc", "si", "lwf", "replay"])
def test_saved_learner_reloads_with_its_state(tmp_path: Path, method: str) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    argv = [
        "run",
        "split",
        "--scenario",
        "task",
        "--methods",
        method,
        "--save-state",
        "--set",
        "replay.capacity=40",
    ]
    argv = argv if method == "replay" else argv[:-2]
    assert main([*argv, "--out", str(out), *TINY]) == 0
    result = json.loads((out / "results.json").read_text())["methods"][method]
    model, learner, scenario = load_checkpoint(out / result["checkpoint"])
    assert scenario.kind == "task" and learner.name == method
    # the reloaded network scores exactly the last row of the accuracy matrix
    tasks = make_sequence(load_dataset("mnist-10k"), "split", 2, max_train_per_task=150)
    accs = [
        accuracy(model, t.x_test, t.y_test, scenario=scenario, task=j, seen=1) for j, t in enumerate(tasks)
    ]
    assert accs == pytest.approx(result["accuracy_matrix"][-1], abs=1e-12)
    # and the method's memory (anchors, importances, samples, frozen copy) came back
    assert learner.memory_bytes() == result["memory_bytes"] > 0
    if method in ("ewc", "si"):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        assert float(learner.loss(torch.zeros(()))) > 0  # the penalty is anchored


def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not an ewc checkpoint"):
        load_checkpoint(path)
