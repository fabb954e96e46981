"""Settings declared once: the constraint vocabulary, config validation and the generated CLI."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from ewc.checks import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Numbers,
    Options,
    Registered,
    Sizes,
    check,
)
from ewc.cli import build_parser, config_from
from ewc.experiments.compare import CompareConfig
from ewc.experiments.sequence import RunConfig, search_grids
from ewc.methods import METHOD_SPECS, METHODS
from ewc.train import TrainConfig, method_params


@pytest.mark.parametrize(
    ("value", "constraint", "message"),
    [
        (0, POSITIVE_INT, "x must be a positive integer, got 0"),
        (True, POSITIVE_INT, "x must be a positive integer, got True"),
        (2.0, POSITIVE_INT, "x must be a positive integer, got 2.0"),
        (-1, Interval(int, 0), "x must be a non-negative integer, got -1"),
        (1, Interval(int, 2), "x must be an integer >= 2, got 1"),
        (0.0, POSITIVE, "x must be a finite number > 0, got 0.0"),
        (float("nan"), NON_NEGATIVE, "x must be a finite number >= 0, got nan"),
        (1.0, Interval(float, 0, 1, closed="left"), "x must be a finite number in [0, 1), got 1.0"),
        (None, POSITIVE, "x must be a finite number > 0, got None"),
        ("c", Options(("a", "b")), "x must be one of a, b, got 'c'"),
        ((), Sizes(), "x must be positive integers, at least one, got ()"),
        ((1, 0), Sizes(), "x must be positive integers, at least one, got (1, 0)"),
        ((1.0, -2.0), Numbers(NON_NEGATIVE), "x must be a non-empty list, each a finite number >= 0"),
        ("z", Registered({"a": 1}), "x must be one of a, got 'z'"),
    ],
)
def test_one_wording_for_every_constraint(value: object, constraint: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        check(value, constraint, "x")
    assert str(err.value).startswith(message)


def test_constraints_accept_what_they_describe() -> None:
    assert check(np.int64(3), POSITIVE_INT, "x") == 3  # numpy integers are integers
    assert check(None, Interval(int, 1, allow_none=True), "x") is None
    assert check(1.0, Interval(float, 0, 1, closed="right"), "x") == 1.0
    assert check([0.0, 3.0], Numbers(NON_NEGATIVE), "x") == [0.0, 3.0]
    registry: dict[str, int] = {}
    constraint = Registered(registry)
    registry["late"] = 1  # registered after the constraint was made: still accepted
    assert check("late", constraint, "x") == "late"


def test_train_config_validates_every_declared_field() -> None:
    assert TrainConfig(hidden=()).hidden == ()  # no hidden layer: a linear model, as always
    for kwargs, message in [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": -1.0}, "lr must be a finite number > 0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam"),
        ({"dropout": 1.0}, "dropout must be a finite number in [0, 1)"),
        ({"gamma": 0.0}, "gamma must be a finite number in (0, 1]"),
        ({"fisher": "diag"}, "fisher must be one of exact, sample, empirical, batched"),
        ({"hidden": (4, 0)}, "hidden must be positive integers"),
        ({"model": "resnet-1000"}, "model must be one of mlp"),
        ({"threads": 0}, "threads must be an integer in [1, 1024] or None"),
    ]:
        with pytest.raises(
            ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ):
            TrainConfig(**kwargs)


def test_every_config_field_has_exactly_one_flag_with_its_default() -> None:
    parser = build_parser()
    for command, cls in (("run", RunConfig), ("compare", CompareConfig)):
        args = parser.parse_args([command, "permuted", "--out", "x"])
        config = config_from(args, cls)
        assert config == cls(sequence="permuted")  # every default comes from the declaration
        train_flags = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]
        for name in train_flags:
            if command == "compare" and name == "scenario":
                assert not hasattr(args, name)  # compare replaces it with --scenarios
                continue
            assert getattr(args, name) == getattr(TrainConfig(), name)


def test_every_setting_has_one_flag_and_every_flag_one_setting() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, cls in (("run", RunConfig), ("compare", CompareConfig)):
        # --out and --restart are the output folder's (ewc.outdir), not settings of the run
        dests = [a.dest for a in sub.choices[command]._actions if a.dest not in ("help", "out", "restart")]
        assert len(dests) == len(set(dests)), f"{command}: a setting has two flags"
        fields = {
            f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name != "train"
        }
        fields |= {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
        if command == "compare":
            fields.discard("scenario")
        assert set(dests) == fields, f"{command}: flags and settings differ"


def test_a_flag_reaches_the_method_through_its_spec() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["run", "split", "--tasks", "5", "--lam", "7", "--l2-lam", "0.5", "--gamma", "0.9", "--out", "x"]
    )
    train = config_from(args, RunConfig).training()
    assert method_params("ewc", train) == {
        "lam": 7.0,
        "gamma": 0.9,
        "fisher": "exact",
        "fisher_samples": 1000,
    }
    assert method_params("ewc+replay", train)["lam"] == 7.0
    assert method_params("l2", train) == {"lam": 0.5}
    assert method_params("l2", TrainConfig(lam=3.0)) == {"lam": 3.0}  # --l2-lam falls back to --lam
    assert method_params("mas", train) == {}  # MAS's λ is its own, not --lam


def test_select_lam_covers_every_method_whose_spec_takes_lam() -> None:
    takes = {m for m in METHODS if METHOD_SPECS[m].lam_setting}
    assert {"ewc", "online-ewc", "l2", "ewc+replay"} <= takes and "mas" not in takes
    grids = search_grids(list(METHODS), False, [1.0, 10.0], [0.1])
    assert set(grids) == takes
    assert grids["ewc+replay"] == [{"lam": 1.0}, {"lam": 10.0}]
    assert grids["l2"] == [{"lam": 0.1}]
    searched = search_grids(["ewc", "si"], True, None, None)
    assert searched["si"] == METHOD_SPECS["si"].combinations()


def test_set_and_quiet_reach_the_training_config() -> None:
    parser = build_parser()
    argv = [
        "run",
        "permuted",
        "--set",
        "lwf.alpha=2",
        "--set",
        "lwf.temperature=none",
        "--quiet",
        "--out",
        "x",
    ]
    train = config_from(parser.parse_args(argv), RunConfig).training()
    assert train.params == {"lwf": {"alpha": 2, "temperature": None}} and train.progress is False
