"""``--lam auto`` (issue #17, item 5): a method's strength chosen on the validation parts by a
short screen and a final among full runs that share their first task, with a "no λ helps"
verdict, at less than three times the cost of one run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc.checkpoint import load_checkpoint
from ewc.cli import build_parser, config_from, main
from ewc.data import sequences
from ewc.experiments.jobs import build_tasks
from ewc.experiments.lam_search import (
    DEFAULT_BUDGET,
    MIN_GAIN,
    decide,
    noise_margin,
    screen_fraction,
    screen_training,
    search_auto,
    shortlist,
)
from ewc.experiments.sequence import RunConfig, run_sequence, with_params
from ewc.methods import METHOD_SPECS, make_method
from ewc.report.search import summary_line
from ewc.scenario import Scenario
from ewc.snapshots import evaluate_snapshots
from ewc.train import TrainConfig, run_method

SMALL = TrainConfig(epochs=1, hidden=(32,), progress=False)
EWC_BRACKET = METHOD_SPECS["ewc"].bracket
SEARCHED = [m for m, spec in METHOD_SPECS.items() if spec.bracket]


@pytest.mark.parametrize("n_tasks", [2, 5, 10, 50])
def test_the_search_costs_less_than_three_runs(n_tasks: int) -> None:
    """In task-lengths: the screen's budget (the first task once, then every value's second task at
    the screen's fraction) and the final (the first task once, three values on the other tasks)."""
    n = len(EWC_BRACKET)
    f = screen_fraction(n)
    assert f * (1 + n) == pytest.approx(DEFAULT_BUDGET)
    total = DEFAULT_BUDGET + 1 + 3 * (n_tasks - 1)
    assert total / n_tasks == pytest.approx(3 - (2 - DEFAULT_BUDGET) / n_tasks) and total / n_tasks < 3
    assert screen_fraction(1, 100.0) == 1.0  # never more than a task's steps
    with pytest.raises(ValueError, match="positive budget"):
        screen_fraction(7, 0.0)


def test_a_screen_run_trains_the_fewest_epochs_that_give_its_steps() -> None:
    assert screen_training(0.27, 2) == pytest.approx((1, 0.54))  # one epoch over 54 % of the data
    assert screen_training(0.225, 5) == pytest.approx((2, 0.5625))
    assert screen_training(0.3, 1) == pytest.approx((1, 0.3))
    assert screen_training(1.0, 3) == (3, 1.0)


def test_the_shortlist_takes_the_best_and_ties_go_to_the_larger() -> None:
    """A short screen where the weak strengths all score exactly what the others do (as SI's small
    c do: docs/results.md): the tied values that go on are the larger ones, the likelier to act."""
    assert shortlist([0.1, 1.0, 10.0, 100.0], [0.5, 0.7, 0.6, 0.65]) == [1.0, 100.0]
    assert shortlist([0.001, 0.01, 0.1, 1.0], [0.8, 0.8, 0.8, 0.8]) == [0.1, 1.0]
    assert shortlist([1.0, 10.0, 100.0], [0.8, 0.9, 0.8], k=1) == [10.0]


def _final(lams: list[float], accs: list[float], n: int = 1000) -> dict:
    return {"lams": lams, "validation_acc": accs, "n_val": n}


def test_noise_margin_and_verdict() -> None:
    assert noise_margin(0.5, 10**9) == MIN_GAIN
    assert noise_margin(0.8, 1600) == pytest.approx(2 * math.sqrt(0.16 / 1600))
    clear = decide(_final([0.0, 10.0, 100.0], [0.5, 0.6, 0.6]))
    assert clear["verdict"] == "helps" and clear["lam"] == 10.0  # ties: the smaller λ
    within = decide(_final([0.0, 10.0, 100.0], [0.5, 0.52, 0.4]))  # margin 2·√(.25/1000) = 0.032
    assert within["verdict"] == "no λ helps" and within["lam"] == 0.0 and within["best"] == 10.0
    worse = decide(_final([0.0, 10.0, 100.0], [0.5, 0.45, 0.42]))
    assert worse["verdict"] == "no λ helps" and worse["lam"] == 0.0
    big = decide(_final([0.0, 10.0], [0.5, 0.52], 10**6))  # beyond the margin (MIN_GAIN) on many samples
    assert big["verdict"] == "helps" and big["margin"] == MIN_GAIN


def test_the_summary_line_names_the_chosen_value_and_the_verdict() -> None:
    record = {"rungs": [{}], "edge": None, **decide(_final([0.0, 100.0, 1000.0], [0.5, 0.62, 0.6]))}
    assert summary_line("ewc", record).startswith("ewc: lam = 100 chosen by auto")
    none = {**record, **decide(_final([0.0, 10.0], [0.5, 0.4]))}
    assert "no λ helps" in summary_line("ewc", none) and "run with lam = 0" in summary_line("ewc", none)


def _grid(tasks: int = 3, n: int = 200, hidden: int = 16) -> tuple[tuple, TrainConfig]:
    key = ("permuted", "mnist-10k", tasks, n, None)
    # dropout: training draws from torch's global generator, whose state the shared file restores
    return key, TrainConfig(epochs=2, hidden=(hidden,), dropout=0.2, progress=False, threads=1)


@pytest.mark.parametrize("method", SEARCHED)
def test_a_run_from_the_shared_first_task_is_a_run_from_scratch(method: str, tmp_path: Path) -> None:
    """The reference: each strength's run from scratch. A run with another strength writes the
    state after its first task; a run that starts from it with its own strength gives the same
    accuracy matrix, curves and weights, and records the shared part; a run with other settings
    (here the learning rate) does not use the file."""
    key, config = _grid()
    strength, (a, b) = METHOD_SPECS[method].strength, METHOD_SPECS[method].bracket[-2:]
    tasks, _ = build_tasks(*key[:3], 0, key[3], None)
    prefix = tmp_path / "prefix.pt"
    first = run_method(tasks, method, with_params(config, method, {strength: a}), prefix=prefix)
    assert prefix.exists() and "prefix" not in first
    forked = run_method(tasks, method, with_params(config, method, {strength: b}), prefix=prefix)
    scratch = run_method(tasks, method, with_params(config, method, {strength: b}))
    assert forked["accuracy_matrix"] == scratch["accuracy_matrix"] != first["accuracy_matrix"]
    assert forked["curves"] == scratch["curves"]
    for p, q in zip(forked["model"].parameters(), scratch["model"].parameters(), strict=True):
        assert torch.equal(p, q)
    assert forked["prefix"]["steps"] == scratch["curves"]["task_starts"][1]
    other = run_method(
        tasks, method, with_params(dataclasses.replace(config, lr=2e-3), method, {strength: b}), prefix=prefix
    )
    assert "prefix" not in other


@pytest.mark.parametrize("method", ["ewc", "si"])
def test_deferred_tests_give_the_run_its_own_numbers(method: str, tmp_path: Path) -> None:
    """A run that saves its weights instead of testing them (here also started from a shared first
    task), tested afterwards by ``evaluate_snapshots``, has the accuracy matrix, baseline, metrics
    and curves of the same run tested as it went (the reference: a run from scratch)."""
    key, config = _grid(tasks=3)
    strength, (a, b) = METHOD_SPECS[method].strength, METHOD_SPECS[method].bracket[-2:]
    tasks, _ = build_tasks(*key[:3], 0, key[3], None)
    scenario = Scenario.for_tasks(None, [t.classes for t in tasks])
    prefix = tmp_path / "prefix.pt"
    for lam in (a, b):  # a writes the shared first task (and its own weights), b starts from it
        run = with_params(config, method, {strength: lam})
        res = run_method(tasks, method, run, prefix=prefix, defer_tests=tmp_path / str(lam))
        assert res["average_accuracy"] is None and res["accuracy_matrix"] == [[], [], []]
    saved = sorted(p.name for p in (tmp_path / str(b)).iterdir())
    assert "prefix" in res and saved == ["init.pt", "task-0.pt", "task-1.pt", "task-2.pt"]
    tested = evaluate_snapshots(res, tmp_path / str(b), tasks, scenario, threads=1)
    scratch = run_method(tasks, method, with_params(config, method, {strength: b}))
    for k in (
        "accuracy_matrix",
        "baseline_accuracy",
        "average_accuracy",
        "bwt",
        "fwt",
        "forgetting",
        "curves",
    ):
        assert tested[k] == scratch[k], k
    assert "tests_deferred" not in tested
    (tmp_path / str(b) / "task-1.pt").unlink()
    with pytest.raises(ValueError, match="a deferred test's weights are missing"):
        evaluate_snapshots(res, tmp_path / str(b), tasks, scenario, threads=1)


def test_a_prefix_needs_a_method_with_a_strength(tmp_path: Path) -> None:
    tasks, _ = build_tasks("permuted", "mnist-10k", 2, 0, 50, None)
    with pytest.raises(ValueError, match="sgd has no strength"):
        run_method(tasks, "sgd", SMALL, prefix=tmp_path / "p.pt")
    with pytest.raises(ValueError, match="registered method's name"):
        run_method(tasks, make_method("ewc", lam=1.0), SMALL, prefix=tmp_path / "p.pt")


def test_validation_scoring_reads_the_validation_parts() -> None:
    tasks, _ = build_tasks("permuted", "mnist-10k", 2, 0, 100, None)
    res = run_method(tasks, "sgd", SMALL, validation=True)
    on_val = run_method([t.validation() for t in tasks], "sgd", SMALL)
    assert res["validation_acc"] == on_val["average_accuracy"] != res["average_accuracy"]


def test_auto_agrees_with_the_full_validation_grid_on_a_small_problem(tmp_path: Path) -> None:
    """The independent reference: every λ of the bracket (and 0) run in full on the validation parts
    (``--select-lam``); the λ auto chooses, at about a third of the grid's cost, scores near the
    grid's best there; its test run is the run of that λ from scratch; its record reaches
    results.json, report.md and search.png."""
    kw = {"max_train_per_task": 1500}
    small = TrainConfig(epochs=3, hidden=(32,), progress=False)
    grid = [0.0, *EWC_BRACKET]
    ref = run_sequence("permuted", "mnist-10k", 3, ["ewc"], small, lam_grid=grid, report=False, **kw)
    val = dict(zip(grid, ref["config"]["selection"]["ewc"]["validation_acc"], strict=True))
    assert max(val.values()) - min(val.values()) > 0.1  # the choice matters here
    auto = with_params(small, "ewc", {"lam": "auto"})
    res = run_sequence("permuted", "mnist-10k", 3, ["ewc"], auto, tmp_path, **kw)
    record = res["config"]["selection"]["ewc"]
    assert val[record["lam"]] >= max(val.values()) - 0.02
    assert res["methods"]["ewc"]["params"]["lam"] == record["lam"] == res["methods"]["ewc"]["lam"]
    assert record["cost"]["ratio_steps"] <= 3.0
    final = record["rungs"][-1]
    assert final["stage"] == "final" and final["lams"][0] == 0.0 and len(final["lams"]) == 3
    assert final["validation_acc"] == [val[lam] for lam in final["lams"]]  # the grid's full runs
    scratch = run_sequence(
        "permuted", "mnist-10k", 3, ["ewc"], with_params(small, "ewc", record["chosen"]), **kw
    )
    assert res["methods"]["ewc"]["accuracy_matrix"] == scratch["methods"]["ewc"]["accuracy_matrix"]
    saved = json.loads((tmp_path / "results.json").read_text())["config"]["selection"]["ewc"]
    assert saved["rungs"] == record["rungs"] and saved["cost"] == record["cost"]
    report = (tmp_path / "report.md").read_text()
    assert "Strength chosen by a search" in report and record["verdict"] in report
    assert (tmp_path / "search.png").stat().st_size > 0


def _same_tasks(tmp_path: Path) -> str:
    """Rows of one feature: a permutation of one feature is the identity, so every task is the
    same task and nothing is forgotten; no strength can help."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 1)).astype(np.float32)
    xt = rng.normal(size=(200, 1)).astype(np.float32)
    path = tmp_path / "same.npz"
    np.savez(
        path,
        x_train=x,
        y_train=(x[:, 0] > 0).astype(np.int64),
        x_test=xt,
        y_test=(xt[:, 0] > 0).astype(np.int64),
    )
    return str(path)


def test_no_lam_helps_when_nothing_is_forgotten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _same_tasks(tmp_path)
    out = tmp_path / "run"
    argv = ["run", "permuted", "--data", data, "--tasks", "3", "--epochs", "1", "--hidden", "8", "--quiet"]
    assert main([*argv, "--methods", "ewc", "--lam", "auto", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())["config"]["selection"]["ewc"]
    assert record["verdict"] == "no λ helps" and record["lam"] == 0.0
    assert "ewc: no λ helps" in stdout and "run with lam = 0" in stdout
    assert "no λ helps" in (out / "report.md").read_text()


def test_the_choice_never_reads_test_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The final's runs are test runs, but their choice reads only the validation parts: with the
    test images replaced by noise, the search runs the same values, scores them the same on
    validation and chooses the same; only the test ACC it records changes."""
    key = ("split", "mnist-10k", 3, 300, None)
    auto = with_params(SMALL, "ewc", {"lam": "auto"})
    tasks, _ = build_tasks("split", "mnist-10k", 3, 0, 300, None)
    clean = search_auto(key, tasks, {"ewc": "lam"}, auto)["ewc"]
    source = sequences._Builder._source

    def noisy(self, part: str):
        x = source(self, part)
        if part == "test":
            x = np.random.default_rng(1).integers(0, 256, size=x.shape).astype(x.dtype)
        return x

    monkeypatch.setattr(sequences._Builder, "_source", noisy)
    from ewc.experiments import jobs

    jobs.clear_caches()
    tasks, _ = build_tasks("split", "mnist-10k", 3, 0, 300, None)
    poisoned = search_auto(key, tasks, {"ewc": "lam"}, auto)["ewc"]
    jobs.clear_caches()
    assert poisoned["chosen"] == clean["chosen"] and poisoned["verdict"] == clean["verdict"]
    for a, b in zip(poisoned["rungs"], clean["rungs"], strict=True):
        assert a["lams"] == b["lams"] and a["validation_acc"] == b["validation_acc"]
    assert poisoned["run"]["average_accuracy"] != clean["run"]["average_accuracy"]


def test_a_search_run_again_reads_its_kept_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run again with the same progress folder (after a kill past its end), the search trains
    nothing and gives the same record: the chosen run's result was kept tested, although the
    finalists' saved weights are gone."""
    key = ("permuted", "mnist-10k", 3, 200, None)
    tasks, _ = build_tasks("permuted", "mnist-10k", 3, 0, 200, None)
    auto = with_params(SMALL, "ewc", {"lam": "auto"})
    first = search_auto(key, tasks, {"ewc": "lam"}, auto, progress=tmp_path)["ewc"]
    assert not list(tmp_path.glob("tests-*"))  # the saved weights: removed once tested
    from ewc.experiments import jobs

    monkeypatch.setattr(jobs, "run_method", lambda *a, **k: pytest.fail("trained again"))
    again = search_auto(key, tasks, {"ewc": "lam"}, auto, progress=tmp_path)["ewc"]
    assert again["run"]["accuracy_matrix"] == first["run"]["accuracy_matrix"]
    assert again["rungs"] == first["rungs"] and again["chosen"] == first["chosen"]


def test_the_first_seed_uses_the_search_run_and_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--seeds`` the first seed's test run is the search's chosen run (no run twice: 7
    screen runs, 3 finalists, then seed 1 alone), the other seeds run the chosen value;
    ``--save-state`` keeps the chosen finalist's learner; run again, nothing trains."""
    from ewc.experiments import jobs

    calls = []
    real = jobs.run_method
    monkeypatch.setattr(jobs, "run_method", lambda *a, **k: calls.append(a[2].seed) or real(*a, **k))
    auto = with_params(dataclasses.replace(SMALL, epochs=2), "ewc", {"lam": "auto"})
    kw = {"max_train_per_task": 200, "report": False, "save_state": True}
    res = run_sequence("permuted", "mnist-10k", 2, ["ewc"], auto, tmp_path, seeds=[0, 1], **kw)
    assert calls == [0] * 10 + [1]
    calls.clear()
    again = run_sequence("permuted", "mnist-10k", 2, ["ewc"], auto, tmp_path, seeds=[0, 1], **kw)
    assert calls == [] and again["per_seed"] == res["per_seed"]
    record = res["config"]["selection"]["ewc"]
    lam = record["lam"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ewc-seed0.pt", "ewc-seed1.pt"]
    model, method, _ = load_checkpoint(tmp_path / "checkpoints" / "ewc-seed0.pt")
    assert method.lam == lam
    for seed in (0, 1):
        fixed = with_params(dataclasses.replace(SMALL, epochs=2, seed=seed), "ewc", {"lam": lam})
        alone = run_sequence("permuted", "mnist-10k", 2, ["ewc"], fixed, max_train_per_task=200, report=False)
        got = res["per_seed"][seed]["methods"]["ewc"]
        assert got["accuracy_matrix"] == alone["methods"]["ewc"]["accuracy_matrix"]


@pytest.mark.parametrize(
    ("flags", "method", "parameter"),
    [
        (["--methods", "ewc", "--lam", "auto"], "ewc", "lam"),
        (["--methods", "online-ewc", "--lam", "auto"], "online-ewc", "lam"),
        (["--methods", "l2", "--l2-lam", "auto"], "l2", "lam"),
        (["--methods", "si", "--set", "si.c=auto"], "si", "c"),
        (["--methods", "mas", "--set", "mas.lam=auto"], "mas", "lam"),
    ],
)
def test_every_penalty_method_searches_its_strength(tmp_path: Path, flags, method, parameter) -> None:
    parser = build_parser()
    tiny = ["--tasks", "2", "--epochs", "1", "--hidden", "16", "--fisher-samples", "100"]
    args = parser.parse_args(["run", "permuted", *flags, *tiny, "--out", str(tmp_path / "x")])
    config: RunConfig = config_from(args, RunConfig)
    res = run_sequence(
        "permuted", "mnist-10k", 2, [method], config.training(), tmp_path / method, max_train_per_task=120
    )
    record = res["config"]["selection"][method]
    assert record["parameter"] == parameter and record["chosen"] == {parameter: record["lam"]}
    assert res["methods"][method]["params"][parameter] == record["lam"]
    assert {"ratio_steps", "ratio_seconds", "final_steps"} <= set(record["cost"])
    full = {
        "ewc": ("fisher_samples", 100),
        "online-ewc": ("fisher_samples", 100),
        "mas": ("max_samples", 1000),
    }
    screen = record["rungs"][0]  # the screen's Fisher / importances: its fraction of the samples
    if method in full:
        name, samples = full[method]
        assert screen[name] == math.ceil(screen["fraction"] * samples)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lam", "banana"], "argument --lam: expected a number or 'auto', got 'banana'"),
        (["--methods", "sgd", "--lam", "auto"], "--lam auto has no effect"),
        (["--methods", "ewc", "--lam", "auto", "--select-lam", "1,10"], "both 'auto' and chosen from"),
        (["--methods", "lwf", "--set", "lwf.alpha=auto"], "lwf.alpha='auto': only a method's strength"),
        (["--methods", "ewc", "--set", "ewc.gamma=auto"], "its strength is lam"),
        (["--lam", "auto", "--auto-budget", "0"], "auto_budget must be"),
    ],
)
def test_bad_auto_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, flags, message) -> None:
    try:
        rc = main(["run", "permuted", *flags, "--out", str(tmp_path / "x")])
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_run_method_refuses_an_unresolved_auto() -> None:
    tasks, _ = build_tasks("permuted", "mnist-10k", 2, 0, 50, None)
    with pytest.raises(ValueError, match="chosen by ewc run's search"):
        run_method(list(tasks), "ewc", TrainConfig(lam="auto", progress=False))


def test_screens_of_other_sizes_do_not_read_the_dataset_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from ewc.experiments import jobs

    loads = []
    real = jobs.load_data
    monkeypatch.setattr(jobs, "load_data", lambda *a, **k: loads.append(a) or real(*a, **k))
    jobs.clear_caches()
    a, _ = build_tasks("permuted", "mnist-10k", 3, 0, 100, None)
    b, _ = build_tasks("permuted", "mnist-10k", 3, 0, 50, None)
    assert len(loads) == 1 and len(a[0].y_train) == 100 and len(b[0].y_train) == 50
    assert bool((a[0].y_val == b[0].y_val).all())  # the same validation parts at every size
    jobs.clear_caches()
    build_tasks("permuted", "mnist-10k", 3, 0, 50, None)
    assert len(loads) == 2


@pytest.mark.parametrize("method", ["ewc", "online-ewc", "l2", "si", "mas"])
def test_a_search_run_tests_only_after_the_last_task_with_the_same_acc(method: str) -> None:
    """... and skips the consolidation after the last task, which no later task uses (a third of
    the methods' per-task work in a 3-task run): the ACC is the full run's to the sample."""
    tasks, _ = build_tasks("permuted", "mnist-10k", 3, 0, 100, None)
    full = run_method(list(tasks), method, SMALL)
    final = run_method(list(tasks), method, dataclasses.replace(SMALL, final_only=True))
    assert final["average_accuracy"] == full["average_accuracy"]
    assert final["accuracy_matrix"] == [[], [], full["accuracy_matrix"][-1]]
    assert final["bwt"] is None and final["baseline_accuracy"] is None
    if method == "ewc":  # one term per consolidated task: two of the full run's three
        assert final["memory_bytes"] * 3 == full["memory_bytes"] * 2
