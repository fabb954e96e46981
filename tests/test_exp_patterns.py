"""The random-patterns experiment: exact theory, the paper's qualitative facts at tiny size, the outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ewc.cli import main
from ewc.experiments import patterns

torch.set_num_threads(1)

TINY = dict(patterns.SMALLEST)  # the smallest settings the experiment declares


def test_theory_matches_closed_forms() -> None:
    """SGD with step 1/N: SNR = (1−1/N)^(t−1)/sqrt(1−(1−1/N)^t); EWC with λ = 1: signal N/(N+t−1)."""
    config = patterns.Config(n_inputs=20, load=5.0)
    ts = patterns.grid(config)
    n = config.n_inputs
    sgd = patterns.theory(patterns.steps("sgd", config), n, ts)
    expected = (1 - 1 / n) ** (ts - 1) / np.sqrt(1 - (1 - 1 / n) ** ts)
    np.testing.assert_allclose(sgd["first"], expected, rtol=1e-10)
    ewc = patterns.theory(patterns.steps("ewc", config), n, ts)
    # λ = 1: every pattern seen has the same signal N/(N+t−1), so the same SNR
    for t, row in zip(ts, ewc["per_pattern"], strict=True):
        assert len(row) == t
        np.testing.assert_allclose(row, row[0], rtol=1e-10)
    assert ewc["first"][0] == pytest.approx(math.sqrt(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_facts_at_tiny_size(seed: int) -> None:
    r = patterns.run(patterns.Config(**TINY, seed=seed))["results"]
    sgd, ewc = r["methods"]["sgd"], r["methods"]["ewc"]
    # early regime: both on a power law of slope ≈ −0.5 (EWC within 0.03 of it over seeds 0-19)
    assert abs(ewc["slope_early"] + 0.5) < 0.06
    assert abs(sgd["slope_early"] + 0.5) < 0.12
    # late regime: SGD falls much faster than EWC, which stays near −0.5
    assert sgd["slope_late"] < ewc["slope_late"] - 0.5
    assert abs(ewc["slope_late"] + 0.5) < 0.15
    # EWC holds more memories at once than SGD, and more of them just beyond capacity (t ≈ 2N)
    assert ewc["peak_retained_per_n"] > 2 * sgd["peak_retained_per_n"]
    ts = np.asarray(r["patterns_seen"])
    i = int(np.argmin(np.abs(ts - 2 * TINY["n_inputs"])))
    assert ewc["retained_fraction"][i] > sgd["retained_fraction"][i] + 0.3
    # the simulation agrees with the exact expectations
    assert max(sgd["max_z_theory"], ewc["max_z_theory"]) < 4.5


def test_cli_writes_results_figures_report(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["experiment", "patterns", "--n-inputs", "16", "--load", "4", "--draws", "200", "--seed", "3"]
    assert main([*args, "--out", str(out)]) == 0
    for name in ("results.json", "snr.png", "retained.png", "report.md"):
        assert (out / name).is_file(), name
    record = json.loads((out / "results.json").read_text())
    assert record["experiment"] == "patterns"
    assert record["config"]["n_inputs"] == 16 and record["config"]["seed"] == 3
    res = record["results"]
    assert res["capacity"] == 16 and res["patterns"] == 64
    for key in ("n_inputs", "load", "patterns_seen", "early_range", "late_range", "methods"):
        assert key in res
    for m in ("sgd", "ewc"):
        r = res["methods"][m]
        for key in (
            "snr",
            "snr_se",
            "snr_theory",
            "retained_fraction",
            "retained_count",
            "slope_early",
            "slope_late",
            "exp_rate_late",
            "peak_retained_per_n",
        ):
            assert key in r, (m, key)
        assert len(r["snr"]) == len(res["patterns_seen"])
    assert record["findings"] and "--n-inputs 16" in record["command"]
    assert "snr.png" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "bad",
    [
        {"n_inputs": 0},
        {"n_inputs": 2},
        {"draws": -1},
        {"load": 0.0},
        {"lam": -1.0},
        {"sgd_step": 2.5},
        {"threshold": 0.0},
        {"late_start": 20.0},
        {"threads": 0},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        patterns.Config(**bad)


def test_cli_reports_bad_values(tmp_path, capsys) -> None:
    assert main(["experiment", "patterns", "--draws", "0", "--out", str(tmp_path)]) == 2
    assert "draws" in capsys.readouterr().err
