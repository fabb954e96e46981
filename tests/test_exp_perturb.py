"""The Fisher perturbation test: the three noises, the drop-norm interpolation, and tiny runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc.cli import main
from ewc.experiments import perturb as experiment
from ewc.experiments.perturb import KINDS, Config, draw, noise_scales, norm_at_drop, null_space_mask, run

torch.set_num_threads(1)

TINY = dict(experiment.SMALLEST)  # the smallest settings the experiment declares


def test_null_space_holds_the_smallest_fisher_mass() -> None:
    f = torch.tensor([5.0, 0.0, 0.5, 94.0, 0.4, 0.1])  # sum 100
    assert null_space_mask(f, 0.012).tolist() == [False, True, True, False, True, True]
    assert null_space_mask(f, 0.007).tolist() == [False, True, False, False, True, True]
    assert null_space_mask(f, 0.0001).tolist() == [False, True, False, False, False, False]


def test_noise_shapes_and_norms() -> None:
    f = torch.tensor([4.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(noise_scales(f, "isotropic", damping=0.1, null_mass=0.01), torch.ones(4))
    eps = 0.1 * f.mean()
    expect = torch.stack([(4 + eps).rsqrt(), (1 + eps).rsqrt(), eps.rsqrt(), eps.rsqrt()])
    torch.testing.assert_close(noise_scales(f, "fisher", damping=0.1, null_mass=0.01), expect)
    assert noise_scales(f, "null", damping=0.1, null_mass=0.01).tolist() == [0.0, 0.0, 1.0, 1.0]
    gen = torch.Generator().manual_seed(0)
    for kind in KINDS:
        z = draw(noise_scales(f, kind, damping=0.1, null_mass=0.01), 2.5, gen)
        assert z.norm().item() == pytest.approx(2.5)
    assert draw(torch.tensor([0.0, 1.0, 0.0]), 3.0, gen)[[0, 2]].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="kind"):
        noise_scales(f, "gaussian", damping=0.1, null_mass=0.01)


def test_norm_at_drop_interpolates_in_log_norm() -> None:
    norms = [1.0, 10.0, 100.0]
    assert norm_at_drop(norms, [0.9, 0.85, 0.7], 0.9, 0.1) == pytest.approx(10 ** (1 + 1 / 3))
    assert norm_at_drop(norms, [0.7, 0.6, 0.5], 0.9, 0.1) == 1.0
    assert norm_at_drop(norms, [0.9, 0.9, 0.85], 0.9, 0.1) is None


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(norm_min=5.0, norm_max=5.0), "norm_min"),
        (dict(norms=1), "norms"),
        (dict(null_mass=1.0), "null_mass"),
        (dict(damping=0.0), "damping"),
        (dict(hidden=(0,)), "hidden"),
        (dict(draws=0), "draws"),
    ],
)
def test_config_rejects_bad_values(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config(**bad)


@pytest.mark.parametrize("seed", [0, 1])
def test_fisher_noise_hurts_no_more_than_isotropic_noise(seed: int) -> None:
    """On average over the norms (robust at this size over 20 seeds: margin >= 0.1 on every one)."""
    record = run(Config(**TINY, seed=seed))
    kinds = record["kinds"]
    assert set(kinds) == set(KINDS) and len(record["norms"]) == 5
    for v in kinds.values():
        assert np.shape(v["accuracy"]) == np.shape(v["kl"]) == np.shape(v["predicted_kl"]) == (5, 3)
    assert np.mean(kinds["fisher"]["mean_accuracy"]) >= np.mean(kinds["isotropic"]["mean_accuracy"])
    assert kinds["null"]["parameters_with_noise"] < record["parameters"]
    assert set(record["norm_at_drop"]) == set(KINDS)


def test_cli_writes_report(tmp_path: Path) -> None:
    flags = []
    for name, value in TINY.items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += ["--" + name.replace("_", "-"), text]
    assert main(["experiment", "perturb", *flags, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "results.json").read_text())
    for key in ("experiment", "config", "command", "findings", "norms", "baseline", "kinds", "norm_at_drop"):
        assert key in record
    assert record["config"]["hidden"] == [32] and math.isfinite(record["baseline"]["loss"])
    assert (tmp_path / "perturb.png").stat().st_size > 0
    assert "![perturb](perturb.png)" in (tmp_path / "report.md").read_text()
