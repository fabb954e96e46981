"""Statistics over seeds: Student's t distribution, mean ± 95 % confidence interval, paired t-test.

A multi-seed run (``ewc run --seeds``) reports each metric as its mean over the ``n`` seeds with
the half-width of the 95 % confidence interval of that mean, ``t_{0.975, n−1} · s / √n`` (``s``:
the sample standard deviation), and compares two methods (or two runs) by a paired t-test on
their per-seed values: the same seed gives both the same data, permutations and initial weights,
so the per-seed differences are what varies.

Plain ``math`` and numpy (scipy is not a dependency): the t distribution's tail is the
regularised incomplete beta function, ``P(|T| > t) = I_{ν/(ν+t²)}(ν/2, 1/2)``, evaluated by its
continued fraction (modified Lentz), and its quantile is found by bisection on that tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["LEVEL", "mean_ci", "mean_ci_array", "paired_t_test", "t_quantile", "t_two_sided_p"]

#: the confidence level of every interval and the significance level of every test (1 − LEVEL)
LEVEL = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (converges for x < (a+1)/(a+b+2))."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def _beta_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom (1.0 at t = 0, 0.0 at ±inf)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    return _beta_regularized(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (e.g. t_{0.975, 4} = 2.776)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    tail = 2.0 * min(p, 1.0 - p)  # the two-sided tail mass beyond |quantile|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):  # bisection: the tail decreases in t
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > tail else (lo, mid)
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


def _half_width(sd: float, n: int) -> float:
    return t_quantile(0.5 + LEVEL / 2.0, n - 1) * sd / math.sqrt(n)


def mean_ci(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "ci95", "n", "values"}`` of the finite ``values`` (None / NaN are left out of
    ``n``); ``ci95`` is the half-width of the 95 % t interval of the mean, None when n < 2; ``mean``
    is None when n = 0. ``values`` keeps the input (None for a missing one)."""
    kept = [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]
    finite = [v for v in kept if v is not None]
    n = len(finite)
    mean = math.fsum(finite) / n if n else None
    ci = None
    if n >= 2:
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))  # type: ignore[operator]
        ci = _half_width(sd, n)
    return {"mean": mean, "ci95": ci, "n": n, "values": kept}


def mean_ci_array(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise mean and 95 % half-width over axis 0 of ``stack`` (``[n, ...]``, NaN ignored;
    NaN where fewer than two finite values)."""
    x = np.asarray(stack, dtype=np.float64)
    ok = np.isfinite(x)
    n = ok.sum(axis=0)
    total = np.where(ok, x, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        sq = np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0)
        sd = np.sqrt(sq / np.maximum(n - 1, 1))
    quantiles = {int(k): t_quantile(0.5 + LEVEL / 2.0, int(k) - 1) for k in np.unique(n) if k >= 2}
    factor = np.vectorize(lambda k: quantiles.get(int(k), math.nan) / math.sqrt(max(int(k), 1)))(n)
    half = np.where(n >= 2, factor * sd, np.nan)
    return mean, half


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired t-test of ``a`` against ``b`` (same length; pair k: the same seed).

    Returns ``n`` (pairs with both values finite), ``mean_diff`` (mean of a − b), ``ci95`` (its
    95 % half-width), ``t``, ``df`` and the two-sided ``p``; ``t``/``p``/``ci95`` are None when
    n < 2 (no test is possible). Identical differences (zero spread) give p = 1 when they are all
    0 and p = 0 otherwise (t = ±inf is reported as None).
    """
    if len(a) != len(b):
        raise ValueError(f"a paired test needs as many values on each side, got {len(a)} and {len(b)}")
    diffs = [
        float(x) - float(y)
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))
    ]
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "mean_diff": math.fsum(diffs) / n if n else None}
    out.update(ci95=None, t=None, df=n - 1 if n >= 2 else None, p=None)
    if n < 2:
        return out
    mean = out["mean_diff"]
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    out["ci95"] = _half_width(sd, n)
    if sd == 0.0:
        out["p"] = 1.0 if mean == 0.0 else 0.0
        out["t"] = 0.0 if mean == 0.0 else None
        return out
    out["t"] = mean / (sd / math.sqrt(n))
    out["p"] = t_two_sided_p(out["t"], n - 1)
    return out
