"""``--lam auto`` (issue #17, item 5): a method's strength chosen on the validation parts by
successive halving, with a "no λ helps" verdict, at about three times the cost of one run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ewc.cli import build_parser, config_from, main
from ewc.data import sequences
from ewc.experiments.jobs import build_tasks
from ewc.experiments.lam_search import (
    DEFAULT_BUDGET,
    MIN_GAIN,
    Rung,
    decide,
    flat,
    noise_margin,
    rung_training,
    schedule,
    search_auto,
    successive_halving,
)
from ewc.experiments.sequence import RunConfig, run_sequence, with_params
from ewc.methods import METHOD_SPECS
from ewc.report.search import summary_line
from ewc.train import TrainConfig, run_method

SMALL = TrainConfig(epochs=1, hidden=(32,), progress=False)
EWC_BRACKET = METHOD_SPECS["ewc"].bracket


def _cost(rungs: list[Rung], sizes: list[int], n_tasks: int) -> float:
    return sum(n * r.tasks / n_tasks * r.fraction for r, n in zip(rungs, sizes, strict=True))


@pytest.mark.parametrize("n_tasks", [2, 5, 10, 50])
def test_schedule_spends_the_budget_with_growing_rungs(n_tasks: int) -> None:
    rungs = schedule(n_tasks, 7)
    assert len(rungs) == 2  # 7 → 3 λ > 0 (η = 3), each rung with λ = 0 as well
    assert _cost(rungs, [8, 4], n_tasks) == pytest.approx(DEFAULT_BUDGET, rel=0.25)
    assert all(2 <= r.tasks <= n_tasks and 0 < r.fraction <= 1 for r in rungs)
    assert rungs[1].tasks * rungs[1].fraction > rungs[0].tasks * rungs[0].fraction
    assert rungs[-1].tasks == n_tasks  # the deciding rung learns the whole sequence


def test_a_rung_trains_the_fewest_epochs_that_give_its_steps() -> None:
    assert rung_training(0.27, 2) == pytest.approx((1, 0.54))  # one epoch over 54 % of the data
    assert rung_training(0.225, 5) == pytest.approx((2, 0.5625))
    assert rung_training(0.3, 1) == pytest.approx((1, 0.3))
    assert rung_training(1.0, 3) == (3, 1.0)


def _bump(peak: float, height: float = 0.3):
    """A validation-ACC curve over log λ with its best at ``peak`` (a little lower on small rungs)."""

    def evaluate(rung: Rung, lams: list[float]) -> list[dict]:
        out = []
        for lam in lams:
            x = math.log10(lam) if lam > 0 else -9.0
            acc = 0.6 + height * math.exp(-((x - math.log10(peak)) ** 2) / 2) - 0.02 * (1 - rung.fraction)
            out.append({"acc": acc, "steps": 10 * rung.tasks, "seconds": 0.1, "n_val": 2000})
        return out

    return evaluate


@pytest.mark.parametrize("peak", [3.0, 300.0, 3e4])
def test_successive_halving_finds_the_peak_of_a_known_curve(peak: float) -> None:
    record = successive_halving(EWC_BRACKET, 10, _bump(peak))
    assert record["verdict"] == "helps"
    assert abs(math.log10(record["lam"]) - math.log10(peak)) <= 0.5 + 1e-9  # the nearest decade
    assert [len(r["lams"]) for r in record["rungs"]] == [8, 4]
    assert all(r["lams"][0] == 0.0 for r in record["rungs"])  # λ = 0 runs in every rung
    assert record["cost"]["search_steps"] == sum(sum(r["steps"]) for r in record["rungs"])


def test_a_flat_curve_says_no_lam_helps_rather_than_an_extreme_value() -> None:
    def flat(rung: Rung, lams: list[float]) -> list[dict]:  # noise only; the largest λ is "best"
        return [
            {"acc": 0.2 + 0.001 * math.log10(1 + lam), "steps": 1, "seconds": 0.0, "n_val": 4000}
            for lam in lams
        ]

    record = successive_halving(EWC_BRACKET, 5, flat)
    assert record["best"] == max(EWC_BRACKET)
    assert record["verdict"] == "no λ helps" and record["lam"] == 0.0 and record["edge"] is None


def test_ties_on_a_rung_promote_the_larger_lam() -> None:
    """A short first rung where the weak strengths all score exactly what λ = 0 scores (as SI's
    small c do: docs/results.md): the tied values that go on are the larger ones, so the deciding
    rung sees a strength that acts, and finds the one that helps once there are more tasks."""

    def evaluate(rung: Rung, lams: list[float]) -> list[dict]:
        if rung.tasks < 5:  # rung 0: no strength up to 10³ changes anything yet
            accs = [0.8 if lam <= 1e3 else 0.7 for lam in lams]
        else:  # the deciding rung: 100 helps beyond noise
            accs = [0.8 + (0.05 if lam == 100.0 else 0.01 * (lam > 1)) for lam in lams]
        return [{"acc": a, "steps": 1, "seconds": 0.0, "n_val": 4000} for a in accs]

    record = successive_halving(EWC_BRACKET, 5, evaluate)
    assert record["rungs"][1]["lams"] == [0.0, 10.0, 100.0, 1000.0]  # not 0.1, 1, 10
    assert record["verdict"] == "helps" and record["lam"] == 100.0


def _rung(lams: list[float], accs: list[float], n: int = 1000) -> dict:
    return {"lams": lams, "validation_acc": accs, "n_val": n}


def test_noise_margin_and_verdict() -> None:
    assert noise_margin(0.5, 10**9) == MIN_GAIN
    assert noise_margin(0.8, 1600) == pytest.approx(2 * math.sqrt(0.16 / 1600))
    clear = decide([_rung([0.0, 10.0, 100.0], [0.5, 0.6, 0.6])])
    assert clear["verdict"] == "helps" and clear["lam"] == 10.0  # ties: the smaller λ
    early = _rung([0.0, 1.0, 10.0, 100.0], [0.5, 0.5, 0.56, 0.5])  # rung 0: 10 beat λ = 0
    within = decide([early, _rung([0.0, 10.0], [0.5, 0.495])])  # the last rung: within noise
    assert within["verdict"] == "helps (within noise)" and within["lam"] == 10.0
    never = decide([_rung([0.0, 1.0, 10.0], [0.56, 0.5, 0.55]), _rung([0.0, 10.0], [0.5, 0.495])])
    assert never["verdict"] == "no λ helps" and never["lam"] == 0.0  # λ = 0 never beaten
    worse = decide([early, _rung([0.0, 10.0, 100.0], [0.5, 0.45, 0.42])])  # beaten beyond noise
    assert worse["verdict"] == "no λ helps" and worse["lam"] == 0.0 and worse["best"] == 10.0
    hair = decide([_rung([0.0, 1.0, 10.0], [0.5, 0.5003, 0.3]), _rung([0.0, 1.0], [0.5, 0.5002])])
    assert hair["verdict"] == "no λ helps"  # beaten by less than a standard error: no evidence
    level = [_rung([0.0, 10.0], [0.5, 0.503], 10**6), _rung([0.0, 10.0], [0.5, 0.502], 10**6)]
    assert flat(level) and decide(level)["verdict"] == "no λ helps"  # nothing differs beyond noise
    assert not flat([early])


def test_the_summary_line_names_the_chosen_value_and_the_verdict() -> None:
    record = successive_halving(EWC_BRACKET, 5, _bump(300.0))
    assert summary_line("ewc", record).startswith("ewc: lam = 100 chosen by auto")
    within = {
        **record,
        **decide([_rung([0.0, 1.0, 10.0], [0.5, 0.5, 0.56]), _rung([0.0, 10.0], [0.5, 0.498])]),
    }
    assert "lam = 10 chosen by auto" in summary_line("ewc", within) and "within the noise" in summary_line(
        "ewc", within
    )
    none = {**record, **decide([_rung([0.0, 10.0], [0.5, 0.4]), _rung([0.0, 10.0], [0.5, 0.4])])}
    assert "no λ helps" in summary_line("ewc", none) and "run with lam = 0" in summary_line("ewc", none)


def test_auto_agrees_with_the_full_validation_grid_on_a_small_problem(tmp_path: Path) -> None:
    """The independent reference: every λ of the bracket (and 0) run in full on the validation parts
    (``--select-lam``); the λ auto chooses, at about a third of the grid's cost, scores near the
    grid's best there (and auto's record reaches results.json, report.md and search.png)."""
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
    assert record["cost"]["ratio_steps"] <= 1 + DEFAULT_BUDGET + 0.25
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


def test_the_search_never_reads_test_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test images poisoned: building them raises. The search runs; a test run does not."""
    source = sequences._Builder._source

    def poisoned(self, part: str):
        if part == "test":
            raise AssertionError("the test parts were read")
        return source(self, part)

    monkeypatch.setattr(sequences._Builder, "_source", poisoned)
    key = ("split", "mnist-10k", 3, 300, None)
    tasks, _ = build_tasks("split", "mnist-10k", 3, 0, 300, None)
    records = search_auto(key, tasks, {"ewc": "lam"}, with_params(SMALL, "ewc", {"lam": "auto"}), budget=0.5)
    assert records["ewc"]["rungs"] and records["ewc"]["chosen"] == {"lam": records["ewc"]["lam"]}
    with pytest.raises(AssertionError, match="test parts were read"):
        run_method(list(tasks), "ewc", SMALL)


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
    for rung in record["rungs"]:  # a rung's Fisher / importances: its fraction of the samples
        if method in full:
            name, samples = full[method]
            assert rung[name] == math.ceil(rung["fraction"] * samples)


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


def test_rungs_of_other_sizes_do_not_read_the_dataset_again(monkeypatch: pytest.MonkeyPatch) -> None:
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
