"""ewc.stats: Student's t quantiles and tails, mean ± 95 % CI and the paired t-test, against
published values (t tables, Student's 1908 sleep data as analysed by R's t.test) and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ewc.stats import mean_ci, mean_ci_array, paired_t_test, t_quantile, t_two_sided_p

# t_{0.975, df} from a printed table of Student's t (two-sided 95 %), to the table's 3 decimals
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045, 120: 1.980}


@pytest.mark.parametrize(("df", "value"), sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df: int, value: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)  # symmetric


def test_t_quantile_limits() -> None:
    assert t_quantile(0.5, 3) == 0.0
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal quantile
    assert t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-12)  # Cauchy: tan(π/4)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            t_quantile(bad, 4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.975, 0)


def test_tail_and_quantile_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")  # scikit-learn (the test extra) brings scipy
    for df in (1, 2, 3, 4, 7, 19, 60, 500):
        for p in (0.6, 0.9, 0.975, 0.995, 0.9999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
        for t in (0.0, 0.3, 1.0, 2.5, 8.0, 40.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_two_sided_p_at_the_critical_value_is_five_percent() -> None:
    assert t_two_sided_p(2.7764451051977934, 4) == pytest.approx(0.05, rel=1e-9)
    assert t_two_sided_p(0.0, 4) == 1.0 and t_two_sided_p(math.inf, 4) == 0.0


def test_mean_ci_by_hand() -> None:
    # mean 0.92, sample sd 0.02, n 3: half-width t_{0.975,2} · 0.02 / √3 = 4.302653 · 0.011547 = 0.049683
    s = mean_ci([0.90, 0.92, None, 0.94])
    assert s["n"] == 3 and s["values"] == [0.90, 0.92, None, 0.94]
    assert s["mean"] == pytest.approx(0.92, abs=1e-15)
    assert s["ci95"] == pytest.approx(0.049683, abs=1e-6)
    one = mean_ci([0.5])
    assert one == {"mean": 0.5, "ci95": None, "n": 1, "values": [0.5]}
    assert mean_ci([None, float("nan")])["mean"] is None


def test_mean_ci_array_agrees_with_mean_ci_element_wise() -> None:
    rng = np.random.default_rng(0)
    stack = rng.uniform(size=(5, 3, 4))
    stack[2, 0, 1] = np.nan  # one missing value: n = 4 there
    stack[:, 2, 3] = np.nan  # none there
    stack[1:, 1, 2] = np.nan  # one value: no interval
    mean, half = mean_ci_array(stack)
    for i in range(3):
        for j in range(4):
            s = mean_ci([None if np.isnan(v) else float(v) for v in stack[:, i, j]])
            if s["mean"] is None:
                assert np.isnan(mean[i, j])
            else:
                assert mean[i, j] == pytest.approx(s["mean"], rel=1e-12)
            if s["ci95"] is None:
                assert np.isnan(half[i, j])
            else:
                assert half[i, j] == pytest.approx(s["ci95"], rel=1e-12)


def test_paired_t_test_on_students_sleep_data() -> None:
    """Cushny & Peebles' sleep data (Student 1908); R: t.test(extra ~ group, paired = TRUE) gives
    t = -4.0621, df = 9, p-value = 0.002833, 95 % CI of the mean difference (-2.4598858, -0.7001142)."""
    drug1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    r = paired_t_test(drug1, drug2)
    assert r["n"] == 10 and r["df"] == 9
    assert r["mean_diff"] == pytest.approx(-1.58, abs=1e-12)
    assert r["t"] == pytest.approx(-4.0621, abs=1e-4)
    assert r["p"] == pytest.approx(0.002833, abs=1e-6)
    assert r["mean_diff"] - r["ci95"] == pytest.approx(-2.4598858, abs=1e-6)
    assert r["mean_diff"] + r["ci95"] == pytest.approx(-0.7001142, abs=1e-6)
    swapped = paired_t_test(drug2, drug1)
    assert swapped["t"] == pytest.approx(-r["t"]) and swapped["p"] == pytest.approx(r["p"])


def test_paired_t_test_edge_cases() -> None:
    one = paired_t_test([0.9], [0.8])
    assert one["n"] == 1 and one["p"] is None and one["t"] is None and one["mean_diff"] == pytest.approx(0.1)
    same = paired_t_test([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert same["p"] == 1.0 and same["mean_diff"] == 0.0
    shifted = paired_t_test([1.0, 0.75, 0.5], [0.5, 0.25, 0.0])  # exactly the same difference each time
    assert shifted["p"] == 0.0 and shifted["t"] is None
    missing = paired_t_test([0.9, None, 0.7], [0.8, 0.7, float("nan")])  # only complete pairs count
    assert missing["n"] == 1
    with pytest.raises(ValueError, match="as many values"):
        paired_t_test([1.0, 2.0], [1.0])
