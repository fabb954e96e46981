"""The closed-form factor of the softmax Hessian used by the exact Fisher."""

import pytest
import torch

from ewc.fisher import softmax_hessian_factor


@pytest.mark.parametrize("classes", [2, 3, 10, 57])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0, 300.0])
def test_factor_reproduces_multinomial_covariance(classes: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(classes)
    p = torch.softmax(torch.randn(40, classes, generator=gen, dtype=torch.float64) * scale, -1)
    cols = softmax_hessian_factor(p)
    assert cols.shape == (classes - 1, 40, classes)  # rank C-1: one column fewer than C
    assert torch.isfinite(cols).all()
    got = torch.einsum("knc,knd->ncd", cols, cols)
    # diag(p) - p pᵀ with the diagonal p_c Σ_{j≠c} p_j (no cancellation in 1 - p_c when p_c ≈ 1)
    off = 1 - torch.eye(classes, dtype=p.dtype)
    rest = (p.unsqueeze(1) * off).sum(-1)
    want = torch.diag_embed(p * rest) - off * (p.unsqueeze(-1) * p.unsqueeze(-2))
    # absolute error relative to the largest entry of each sample's covariance
    err = (got - want).abs().amax(dim=(1, 2)) / want.abs().amax(dim=(1, 2)).clamp_min(1e-300)
    assert err.max() < 1e-9


def test_factor_of_one_hot_probabilities_is_zero() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    cols = softmax_hessian_factor(p)
    assert torch.equal(cols, torch.zeros_like(cols))
