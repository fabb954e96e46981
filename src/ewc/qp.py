"""An exact solver for the small non-negative quadratic programs of GEM.

GEM's dual problem (Lopez-Paz & Ranzato 2017, Eq. 13) is

    min_v ½ vᵀ P v + qᵀ v   subject to v ≥ 0,      P = G Gᵀ (t × t, PSD),  q = G g,

with t the number of past tasks. Because P is a Gram matrix this is the non-negative least
squares problem min_{v ≥ 0} ½ ‖Gᵀ v + g‖², so Lawson & Hanson's active-set NNLS algorithm
(Solving Least Squares Problems, 1974, ch. 23) solves it exactly in finitely many steps, working
on the t × t Gram matrix only. It needs nothing but torch, runs in float64 on the CPU (t is tiny)
and copes with a singular P (repeated or linearly dependent memory gradients): an unconstrained
sub-problem is solved in the least-squares sense.

The solution satisfies the KKT conditions v ≥ 0, ∇ = P v + q ≥ 0 and vᵢ ∇ᵢ = 0, up to a
tolerance relative to the size of P and q.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nonneg_qp"]


def nonneg_qp(P: Tensor, q: Tensor, max_iter: int | None = None) -> Tensor:
    """argmin_{v ≥ 0} ½ vᵀPv + qᵀv for a symmetric positive semi-definite ``P`` (float64, CPU).

    Lawson–Hanson: grow the set of positive ("passive") coordinates one at a time, always the one
    whose negative gradient is largest, solve the unconstrained problem on it, and step back
    along the segment whenever that solution leaves the feasible set.
    """
    if P.dim() != 2 or P.shape[0] != P.shape[1] or q.shape != (P.shape[0],):
        raise ValueError(
            f"need P of shape [t, t] and q of shape [t], got {tuple(P.shape)} and {tuple(q.shape)}"
        )
    P = P.detach().to("cpu", torch.float64)
    q = q.detach().to("cpu", torch.float64)
    if not (torch.isfinite(P).all() and torch.isfinite(q).all()):
        raise ValueError("P and q must be finite")
    t = len(q)
    v = torch.zeros(t, dtype=torch.float64)
    if t == 0:
        return v
    P = 0.5 * (P + P.T)
    scale = max(float(P.abs().max()), float(q.abs().max()), torch.finfo(torch.float64).tiny)
    tol = 1e-10 * t * scale
    passive = torch.zeros(t, dtype=torch.bool)
    blocked = torch.zeros(t, dtype=torch.bool)  # coordinates that could not enter at this v
    max_iter = 10 * t + 10 if max_iter is None else max_iter
    for _ in range(max_iter):
        w = -(P @ v + q)  # negative gradient: how much each coordinate wants to grow
        candidates = torch.where(passive | blocked, torch.full_like(w, -torch.inf), w)
        j = int(candidates.argmax())
        if float(candidates[j]) <= tol:
            return v
        passive[j] = True
        z = _solve_passive(P, q, passive)
        if float(z[j]) <= 0:
            # j is (numerically) dependent on the passive set: entering it cannot lower the
            # objective (Lawson & Hanson's test); try the next candidate at the same v.
            passive[j], blocked[j] = False, True
            continue
        blocked[:] = False
        while not bool((z[passive] > 0).all()):
            # Step from v towards z until the first passive coordinate reaches zero; drop it.
            leaving = passive & (z <= 0)
            alpha = float((v[leaving] / (v[leaving] - z[leaving])).min())
            v = v + alpha * (z - v)
            passive &= v > tol
            v = torch.where(passive, v, torch.zeros_like(v))
            z = _solve_passive(P, q, passive)
        v = z
    raise RuntimeError(f"nonneg_qp did not converge in {max_iter} iterations")


def _solve_passive(P: Tensor, q: Tensor, passive: Tensor) -> Tensor:
    """argmin over v with vᵢ = 0 outside ``passive`` of ½ vᵀPv + qᵀv (least-squares if singular)."""
    idx = passive.nonzero().flatten()
    z = torch.zeros_like(q)
    if len(idx) == 0:
        return z
    A = P[idx][:, idx]
    b = -q[idx]
    z[idx] = torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    return z
