"""The non-negative QP solver behind GEM: known answers, KKT conditions, brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from ewc.qp import nonneg_qp

torch.set_num_threads(1)
D = torch.float64


def objective(P: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> float:
    return float(0.5 * v @ P @ v + q @ v)


def assert_kkt(P: torch.Tensor, q: torch.Tensor, v: torch.Tensor, tol: float = 1e-9) -> None:
    """v ≥ 0, the gradient P v + q ≥ 0, and vᵢ (P v + q)ᵢ = 0 (relative to the data's size)."""
    scale = max(1.0, float(P.abs().max()), float(q.abs().max()))
    grad = P @ v + q
    assert float(v.min()) >= 0
    assert float(grad.min()) >= -tol * scale
    assert float((v * grad).abs().max()) <= tol * scale * max(1.0, float(v.abs().max()))


def brute_force(P: torch.Tensor, q: torch.Tensor) -> float:
    """Smallest objective over every support set S: v_S solves P_SS v_S = −q_S (least squares),
    kept only if it is feasible (v_S ≥ 0). The optimum is one of these points."""
    t = len(q)
    best = 0.0  # v = 0
    for r in range(1, t + 1):
        for S in itertools.combinations(range(t), r):
            idx = torch.tensor(S)
            v = torch.zeros(t, dtype=D)
            v[idx] = torch.linalg.pinv(P[idx][:, idx]) @ (-q[idx])
            if float(v.min()) >= -1e-12:
                best = min(best, objective(P, q, v.clamp(min=0)))
    return best


@pytest.mark.parametrize(
    ("p", "q", "expected"), [(2.0, -3.0, 1.5), (2.0, 3.0, 0.0), (0.5, -1.0, 2.0), (4.0, 0.0, 0.0)]
)
def test_one_constraint_closed_form(p: float, q: float, expected: float) -> None:
    # min ½ p v² + q v over v ≥ 0  →  v = max(0, −q / p)
    v = nonneg_qp(torch.tensor([[p]]), torch.tensor([q]))
    assert v.dtype == D and v.shape == (1,)
    assert float(v[0]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        # P = [[2, 1], [1, 2]]. Unconstrained optimum −P⁻¹q = (1, −1) is infeasible; with v₂ = 0:
        # v₁ = 1/2 and the gradient in v₂ is 1·½ + 1 = 3/2 ≥ 0, so (½, 0) is optimal.
        ([-1.0, 1.0], [0.5, 0.0]),
        # −P⁻¹q = ⅓·(1, 1) > 0: the unconstrained optimum is feasible.
        ([-1.0, -1.0], [1 / 3, 1 / 3]),
        # q ≥ 0: nothing to gain, v = 0.
        ([1.0, 1.0], [0.0, 0.0]),
        # symmetric to the first case
        ([1.0, -4.0], [0.0, 2.0]),
    ],
)
def test_two_constraints_hand_solved(q: list[float], expected: list[float]) -> None:
    P = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    v = nonneg_qp(P, torch.tensor(q))
    torch.testing.assert_close(v, torch.tensor(expected, dtype=D), atol=1e-12, rtol=0)


def test_singular_gram_matrix() -> None:
    # Two identical constraints (P = 11ᵀ): every v ≥ 0 with v₁ + v₂ = 1 is optimal, objective −½.
    P, q = torch.ones(2, 2), torch.tensor([-1.0, -1.0])
    v = nonneg_qp(P, q)
    assert float(v.sum()) == pytest.approx(1.0, abs=1e-12)
    assert objective(P.double(), q.double(), v) == pytest.approx(-0.5, abs=1e-12)
    assert_kkt(P.double(), q.double(), v)


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_random_cases_satisfy_kkt_and_match_brute_force(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    for trial in range(20):
        dim = [3, 6, 20][trial % 3]  # fewer, similar and more dimensions than constraints
        G = torch.randn(t, dim, generator=gen, dtype=D)
        if trial % 5 == 4 and t > 1:
            G[-1] = 2 * G[0]  # a dependent memory gradient
        g = torch.randn(dim, generator=gen, dtype=D)
        P, q = G @ G.T, G @ g
        v = nonneg_qp(P, q)
        assert_kkt(P, q, v)
        if t <= 5:
            assert objective(P, q, v) == pytest.approx(brute_force(P, q), abs=1e-9)


def test_empty_and_bad_inputs() -> None:
    assert nonneg_qp(torch.zeros(0, 0), torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        nonneg_qp(torch.eye(2), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        nonneg_qp(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        nonneg_qp(torch.tensor([[float("nan")]]), torch.zeros(1))
