"""The Fisher-overlap experiment: the overlap measure by hand, and a tiny run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ewc.cli import main
from ewc.experiments import overlap as experiment
from ewc.experiments.overlap import Config, fisher_overlap, layer_fishers, run

torch.set_num_threads(1)

TINY = dict(experiment.SMALLEST)  # the smallest settings the experiment declares


def test_overlap_by_hand() -> None:
    f = torch.tensor([[0.3, 0.0], [1.2, 4.0]])
    assert fisher_overlap(f, f) == pytest.approx(1.0)
    assert fisher_overlap(f, 7.5 * f) == pytest.approx(1.0)  # only the shape counts (unit trace)
    assert fisher_overlap(torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 3.0])) == 0.0
    # [1, 0] and [1, 1] → unit trace [1, 0] and [½, ½]: d² = ½((1 − √½)² + ½) = 1 − √½
    assert fisher_overlap(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(math.sqrt(0.5))
    assert math.isnan(fisher_overlap(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="sizes"):
        fisher_overlap(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        fisher_overlap(torch.tensor([1.0, -1.0]), torch.ones(2))


def test_layer_fishers_group_weight_and_bias() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1, bias=False))
    fisher = {n: torch.full_like(p, float(i + 1)) for i, (n, p) in enumerate(model.named_parameters())}
    layers = layer_fishers(model, fisher)
    assert list(layers) == ["0", "2"]
    assert layers["0"].tolist() == [1.0] * 6 + [2.0] * 2 and layers["2"].tolist() == [3.0] * 2


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(patch_sizes=(0,)), "patch_sizes"),
        (dict(patch_sizes=(8, 8)), "distinct"),
        (dict(depth=0), "depth"),
        (dict(lr=-1.0), "lr"),
        (dict(lam=math.nan), "lam"),
        (dict(threads=0), "threads"),
    ],
)
def test_config_rejects_bad_values(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**bad)


def test_tiny_run_record() -> None:
    record = run(Config(**TINY))
    assert record["experiment"] == "overlap" and record["patch_sizes"] == [4, 20]
    assert len(record["layers"]) == 3 and record["layers"][-1].startswith("out")
    for size in ("4", "20"):
        o = record["overlap"][size]
        assert len(o["mean"]) == len(o["std"]) == 3 and len(o["runs"]) == 1
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in o["mean"])
        assert len(record["accuracy_after_both"][size][0]) == 2
    assert record["findings"] and all(isinstance(s, str) for s in record["findings"])


def test_cli_writes_report(tmp_path: Path) -> None:
    flags = []
    for name, value in TINY.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += ["--" + name.replace("_", "-"), text]
    assert main(["experiment", "overlap", *flags, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    for key in ("experiment", "config", "command", "findings", "layers", "patch_sizes", "overlap"):
        assert key in record
    assert record["config"]["patch_sizes"] == [4, 20] and "--patch-sizes 4,20" in record["command"]
    assert (tmp_path / "overlap.png").stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "![overlap](overlap.png)" in report and "What we measured" in report
