"""The constraints for collections, flags and unbounded limits (``ewc.checks``), as configs use them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ewc.checks import NON_NEGATIVE_INT, Boolean, Interval, Numbers, Subset, check
from ewc.rl.config import DQNConfig


def test_subset_takes_distinct_known_names() -> None:
    games = Subset(("breakout", "freeway", "asterix"))
    assert check(("freeway", "breakout"), games, "games") == ("freeway", "breakout")
    assert games.accepts(["asterix"])
    for bad in ((), ("breakout", "breakout"), ("pong",), "breakout", None, ([1],)):
        assert not games.accepts(bad)
    with pytest.raises(ValueError) as err:
        check(("breakout", "pong"), games, "games")
    assert str(err.value) == (
        "games must be distinct names from breakout, freeway, asterix, at least one, got ('breakout', 'pong')"
    )


def test_numbers_can_require_distinct_values() -> None:
    seeds = Numbers(NON_NEGATIVE_INT, distinct=True)
    assert seeds.accepts((0, 1, 2)) and seeds.accepts([np.int64(3)])
    assert not seeds.accepts((1, 1)) and not seeds.accepts((-1,)) and not seeds.accepts(())
    assert Numbers(NON_NEGATIVE_INT).accepts((1, 1))  # repeats only matter when asked
    assert seeds.message((1, 1), "seeds") == (
        "seeds must be a non-empty list of distinct values, each a non-negative integer, got (1, 1)"
    )


def test_boolean_refuses_what_only_compares_equal_to_a_bool() -> None:
    flag = Boolean()
    assert flag.accepts(True) and flag.accepts(False)
    assert not any(flag.accepts(v) for v in (1, 0, np.bool_(True), None, "yes"))
    assert Boolean(allow_none=True).accepts(None)
    assert flag.message(1, "double_dqn") == "double_dqn must be True or False, got 1"


def test_interval_admits_infinity_only_when_not_finite() -> None:
    clip = Interval(float, 0, closed="neither", finite=False)
    assert clip.accepts(math.inf) and clip.accepts(10.0)
    assert not any(clip.accepts(v) for v in (0.0, -math.inf, math.nan, True))
    assert not Interval(float, 0, closed="neither").accepts(math.inf)
    assert clip.describe() == "a number > 0"


def test_dqn_config_declares_its_checks() -> None:
    assert DQNConfig(grad_clip=math.inf).grad_clip == math.inf  # inf: no clipping
    with pytest.raises(ValueError, match=r"^double_dqn must be True or False, got 1$"):
        DQNConfig(double_dqn=1)
    with pytest.raises(ValueError, match=r"^detector_hazard must be a finite number in \(0, 1\), got 1.0$"):
        DQNConfig(detector_hazard=1.0)
    with pytest.raises(ValueError, match=r"^ewc_mode must be one of separate, online, got 'joint'$"):
        DQNConfig(ewc_mode="joint")
