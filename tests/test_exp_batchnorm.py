"""`ewc experiment batchnorm`: the Fisher and EWC's retention with and without BatchNorm (tiny configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ewc.cli import main
from ewc.data import load_dataset, make_sequence
from ewc.experiments import batchnorm
from ewc.experiments.batchnorm import Config, fisher_summary, own_statistics_accuracy, run, top_mass
from ewc.models import make_mlp

torch.set_num_threads(1)

TINY = dict(batchnorm.SMALLEST)  # the smallest settings the experiment declares


def test_top_mass() -> None:
    v = torch.tensor([1.0] * 99 + [99.0])
    assert top_mass(v) == pytest.approx(0.5)  # the top 1% is the one large value
    assert top_mass(torch.ones(10), 0.5) == pytest.approx(0.5)


def test_fisher_summary_layers() -> None:
    model = make_mlp(4, (3,), 2, batchnorm=True)
    fisher = {n: torch.full_like(p, 0.1) for n, p in model.named_parameters()}
    s = fisher_summary(fisher, model, bins=13)
    layers = {p["name"]: (p["layer"], p["kind"]) for p in s["params"]}
    assert layers == {
        "1.weight": ("linear 1", "weight"),
        "1.bias": ("linear 1", "bias"),
        "2.weight": ("BN 1", "weight"),
        "2.bias": ("BN 1", "bias"),
        "4.weight": ("output", "weight"),
        "4.bias": ("output", "bias"),
    }
    assert s["count"] == 12 + 3 + 3 + 3 + 6 + 2 and s["total"] == pytest.approx(0.1 * s["count"])
    assert sum(p["mass"] for p in s["params"]) == pytest.approx(1.0)
    assert all(len(p["hist"]) == 13 and sum(p["hist"]) == p["count"] for p in s["params"])
    assert len(s["edges"]) == 14


def test_own_statistics_leave_model_alone() -> None:
    tasks = make_sequence(load_dataset("mnist-10k"), "permuted", 2, seed=0, max_train_per_task=100)
    model = make_mlp(784, (8,), 10, batchnorm=True).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accs = own_statistics_accuracy(model, tasks)
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_run_record() -> None:
    record = run(Config(**TINY))
    res = record["results"]
    assert set(res["runs"]) == {"plain", "batchnorm"}
    for c, runs in res["runs"].items():
        assert set(runs) == {"sgd", "ewc_fixed", "ewc_chosen"}
        assert runs["ewc_chosen"]["lam"] == res["selection"][c]["chosen"]
        assert runs["ewc_fixed"]["lam"] == 100.0 and len(runs["ewc_fixed"]["accuracy_matrix"]) == 2
    assert len(res["runs"]["batchnorm"]["ewc_fixed"]["own_statistics_final"]) == 2
    names = {p["name"] for p in res["fisher"]["batchnorm"]["params"]}
    assert {"2.weight", "2.bias"} <= names and "2.weight" not in {
        p["name"] for p in res["fisher"]["plain"]["params"]
    }
    # robust even at this size: EWC forgets less than plain SGD without BatchNorm
    assert res["runs"]["plain"]["ewc_fixed"]["forgetting"] < res["runs"]["plain"]["sgd"]["forgetting"]
    assert len(record["findings"]) >= 5


def test_cli(tmp_path: Path) -> None:
    argv = ["experiment", "batchnorm", "--tasks", "2", "--max-train-per-task", "200", "--epochs", "1"]
    argv += ["--hidden", "16", "--lam-grid", "10,1000", "--fisher-samples", "100", "--jobs", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["experiment"] == "batchnorm" and record["config"]["lam_grid"] == [10.0, 1000.0]
    # --lam 0 (the default): the λ chosen without BatchNorm is the fixed λ of both networks
    res = record["results"]
    chosen = res["selection"]["plain"]["chosen"]
    assert res["runs"]["plain"]["ewc_fixed"]["lam"] == res["runs"]["batchnorm"]["ewc_fixed"]["lam"] == chosen
    assert {"runs", "selection", "fisher"} <= set(record["results"]) and {"findings", "command"} <= set(
        record
    )
    for png in ("fisher_hist.png", "retention.png"):
        assert (tmp_path / png).stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    assert batchnorm.TITLE in report and "retention.png" in report and "Top-1% share" in report


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tasks": 1}, "tasks"),
        ({"lam": -1.0}, "lam"),
        ({"lam_grid": (-1.0,)}, "lam_grid"),
        ({"bins": 0}, "bins"),
        ({"hidden": ()}, "hidden"),
    ],
)
def test_bad_config(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**kw)
