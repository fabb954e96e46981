"""The KL experiment: the Fisher tools against independent computations, small-step theorem, outputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ewc.cli import main
from ewc.experiments import kl
from ewc.fisher import diagonal_fisher
from ewc.models import make_mlp

torch.set_num_threads(1)
# torch's forward-mode AD registers its decompositions with torch.jit.script on first use
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

TINY = dict(kl.SMALLEST)  # the smallest settings the experiment declares


def _tiny_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = make_mlp(5, (4,), 3).double().eval()
    x = torch.randn(20, 5, dtype=torch.float64)
    return model, kl.flat_params(model), x


def test_full_fisher_is_the_hessian_of_the_kl() -> None:
    """F = ∇²_θ E_x KL(p_θ* ‖ p_θ) at θ = θ*: the theorem the experiment rests on, by autograd."""
    model, theta, x = _tiny_model()
    logp0 = F.log_softmax(kl.logits_at(model, theta, x), dim=-1)

    def kl_of(th: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(kl.logits_at(model, th, x), dim=-1)
        return (logp0.exp() * (logp0 - logp)).sum(-1).mean()

    hessian = torch.func.hessian(kl_of)(theta)
    fisher = kl.full_fisher(model, theta, x, chunk=7)
    torch.testing.assert_close(fisher, hessian, rtol=1e-9, atol=1e-12)


def test_fisher_quadratic_and_diagonal_agree_with_the_formed_fisher() -> None:
    model, theta, x = _tiny_model()
    fisher = kl.full_fisher(model, theta, x)
    d = torch.randn(theta.numel(), dtype=torch.float64)
    assert kl.fisher_quadratic(model, theta, d, x) == pytest.approx(float(d @ fisher @ d), rel=1e-10)
    diag = torch.cat([f.reshape(-1) for f in diagonal_fisher(model, x, mode="exact").values()])
    torch.testing.assert_close(fisher.diagonal(), diag, rtol=1e-10, atol=1e-14)


def test_small_steps_match_the_kl_to_second_order() -> None:
    r = kl.run(kl.Config(**TINY, seed=1))["results"]
    assert set(r["models"]) == {"mlp", "small"}
    for m in r["models"].values():
        assert "top eigenvector" in m["directions"] or m["model"] == "mlp"
        for e in m["directions"].values():
            assert e["small_step_ratio_full"] == pytest.approx(1.0, abs=0.03)
            assert len(e["kl"]) == len(r["steps"]) == TINY["steps"]
    small = r["models"]["small"]
    assert small["diag_vs_full_max_rel_diff"] < 1e-10
    assert small["jvp_vs_formed_max_rel_diff"] < 1e-10


def test_cli_writes_results_figures_report(tmp_path) -> None:
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(["experiment", "kl", *flags, "--seed", "2", "--out", str(out)]) == 0
    for name in ("results.json", "kl.png", "ratio.png", "report.md"):
        assert (out / name).is_file(), name
    record = json.loads((out / "results.json").read_text())
    assert record["experiment"] == "kl" and record["config"]["seed"] == 2
    res = record["results"]
    assert {"steps", "band", "models"} <= set(res)
    entry = res["models"]["small"]["directions"]["gradient"]
    for key in (
        "kl",
        "quad_full",
        "quad_diag",
        "ratio_full",
        "ratio_diag",
        "small_step_ratio_full",
        "small_step_ratio_diag",
        "holds_full",
        "holds_diag",
        "accurate_full",
        "kl_growth_at_end",
    ):
        assert key in entry, key
    assert record["findings"]
    assert "kl.png" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "bad",
    [
        {"hidden": 0},
        {"pool": 3},
        {"train_samples": 9000},
        {"fisher_samples": 9000},
        {"step_min": 0.0},
        {"step_min": 10.0, "step_max": 1.0},
        {"band": 1.0},
        {"tolerance": 1.5},
        {"threads": 0},
    ],
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        kl.Config(**bad)
