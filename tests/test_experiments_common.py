"""The contract every analysis experiment follows, and the shared output helpers."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ewc.cli import build_parser, main
from ewc.experiments import EXPERIMENTS, get_experiment
from ewc.experiments.common import command_line, finish, fit_loglog, new_figure, param


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_module_follows_the_contract(name: str) -> None:
    module = get_experiment(name)
    assert isinstance(module.TITLE, str) and module.TITLE
    assert isinstance(module.CLAIM, str) and module.CLAIM
    assert callable(module.run)
    config = module.Config()
    for f in dataclasses.fields(config):
        assert f.metadata.get("help"), f"{name}: field {f.name} has no help text"
        assert f.name not in ("out",), f"{name}: 'out' is the CLI's own flag"
    assert {"seed", "threads"} <= {f.name for f in dataclasses.fields(config)}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_flag_round_trips_through_the_parser(name: str) -> None:
    """command_line() of a config with every field changed parses back to the same config."""
    module = get_experiment(name)
    base = module.Config()
    changed = {}
    for f in dataclasses.fields(base):
        v = f.default
        if isinstance(v, bool):
            changed[f.name] = not v
        elif isinstance(v, int) and f.name != "threads":
            changed[f.name] = v + 1
        elif isinstance(v, float):
            changed[f.name] = v * 0.5 if v else 0.25
    try:
        config = dataclasses.replace(base, **changed)
    except ValueError:  # some combinations are invalid on purpose; fall back to the seed alone
        config = dataclasses.replace(base, seed=base.seed + 1)
    argv = command_line(name, config).split()[1:-2] + ["--out", "x"]
    args = build_parser().parse_args(argv)
    parsed = module.Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(base)})
    assert parsed == config


def test_experiment_help_lists_every_experiment(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out


def test_unknown_experiment_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        get_experiment("nope")
    with pytest.raises(SystemExit) as exc:
        main(["experiment", "nope", "--out", "x"])
    assert exc.value.code == 2


def test_fit_loglog_recovers_a_power_law() -> None:
    x = np.arange(1, 200, dtype=float)
    assert fit_loglog(x, 3.0 * x**-0.5) == pytest.approx(-0.5, abs=1e-9)
    assert math.isnan(fit_loglog([1.0], [1.0]))
    # non-positive and non-finite points are ignored, not fitted
    assert fit_loglog([1, 2, 4, 8], [1, 0.5, math.nan, 0.125]) == pytest.approx(-1.0)


@dataclasses.dataclass
class _Cfg:
    seed: int = param(0, "seed")
    sizes: tuple[int, ...] = param((1, 2), "sizes")
    flag: bool = param(False, "a switch")


def test_finish_writes_record_report_and_figures(tmp_path: Path) -> None:
    fig = new_figure((3, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    record = finish(
        tmp_path / "o",
        "demo",
        _Cfg(seed=3, flag=True),
        {"values": [1.0, 2.0]},
        title="Demo",
        claim="a claim",
        figures={"demo.png": fig},
        findings=["value one is 1.0"],
        seconds=1.5,
    )
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["config"] == {"seed": 3, "sizes": [1, 2], "flag": True}
    assert saved["command"] == "ewc experiment demo --seed 3 --flag --out OUT"
    assert saved["values"] == [1.0, 2.0] and saved["findings"] == ["value one is 1.0"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "a claim" in report and "value one is 1.0" in report and "![demo](demo.png)" in report
    assert (tmp_path / "o" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    # without an output directory nothing is written
    quiet = finish(None, "demo", _Cfg(), {}, title="t", claim="c", figures={}, findings=[])
    assert quiet["config"]["seed"] == 0


def test_finish_refuses_a_file_as_out(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        finish(target, "demo", _Cfg(), {}, title="t", claim="c", figures={}, findings=[])
