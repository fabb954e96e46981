"""The task-sequence loop: same start for every method, a complete accuracy matrix, curves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ewc.data import load_dataset, make_sequence
from ewc.train import Progress, TrainConfig, run_method


@pytest.fixture(scope="module")
def tasks() -> list:
    torch.set_num_threads(1)
    return make_sequence(load_dataset("mnist-10k"), "permuted", 3, seed=1, max_train_per_task=300)


def config(**kw: object) -> TrainConfig:
    base = dict(
        hidden=(32,),
        batch_size=50,
        lr=0.05,
        optimizer="sgd",
        epochs=1,
        eval_every=2,
        curve_samples=100,
        fisher_samples=200,
        progress=False,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_matrix_curves_and_metrics(tasks: list) -> None:
    res = run_method(tasks, "ewc", config(lam=10.0))
    R = res["accuracy_matrix"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert all(0.0 <= a <= 1.0 for row in R for a in row)
    assert res["average_accuracy"] == pytest.approx(sum(R[-1]) / 3)
    curves = res["curves"]
    steps_per_task = 300 // 50  # 6 mini-batches, evaluated at 0, 2, 4, 6
    assert curves["task_starts"] == [0, steps_per_task, 2 * steps_per_task]
    assert [len(c) for c in curves["per_task"]] == [4, 4, 4]
    assert len(curves["steps"]) == len(curves["accuracy"]) == 12
    assert all(len(a) == 3 for a in curves["accuracy"])
    assert res["train_seconds"] <= res["seconds"]
    assert len(res["baseline_accuracy"]) == 3 and res["fwt"] is not None and res["lca"] is not None


def test_methods_start_identically(tasks: list) -> None:
    """Same initial weights and data order: before any penalty acts, all methods agree exactly."""
    rows = {
        m: run_method(tasks, m, config(lam=10.0))["accuracy_matrix"][0] for m in ("sgd", "ewc", "l2", "joint")
    }
    assert rows["sgd"] == rows["ewc"] == rows["l2"] == rows["joint"]
    later = {m: run_method(tasks, m, config(lam=10.0))["accuracy_matrix"][1] for m in ("sgd", "ewc")}
    assert later["sgd"] != later["ewc"]  # from task 2 on the penalty acts


def test_ewc_forgets_less_than_sgd() -> None:
    tasks = make_sequence(load_dataset("mnist-10k"), "permuted", 3, seed=1, max_train_per_task=500)
    cfg = config(hidden=(64,), lr=3e-3, optimizer="adam", epochs=5, lam=100.0)
    sgd, ewc = run_method(tasks, "sgd", cfg), run_method(tasks, "ewc", cfg)
    assert sgd["forgetting"] > 0.02
    assert ewc["forgetting"] < 0.5 * sgd["forgetting"]


def test_divergence_is_a_clear_error(tasks: list) -> None:
    with pytest.raises(ValueError, match="diverged"):
        run_method(tasks, "ewc", config(lr=5.0, lam=1e6, epochs=2))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"dropout": 1.0}, "dropout"),
        ({"hidden": (0,)}, "hidden"),
    ],
)
def test_bad_config(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_unknown_method(tasks: list) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        run_method(tasks, "magic", config())


def test_batchnorm_option(tasks: list) -> None:
    """Linear → BatchNorm1d → ReLU [→ Dropout] per hidden layer; EWC's Fisher covers the BN affine."""
    from torch import nn

    from ewc.models import make_mlp

    kinds = [type(m) for m in make_mlp(784, (16, 8), 10, dropout=0.1, batchnorm=True)]
    block = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert kinds == [nn.Flatten, *block, *block, nn.Linear]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in make_mlp(784, (16,), 10))
    # 251 samples in batches of 50 leave a batch of one, which BatchNorm cannot train on: skipped
    odd = [dataclasses.replace(t, x_train=t.x_train[:251], y_train=t.y_train[:251]) for t in tasks]
    res = run_method(odd, "ewc", config(batchnorm=True, lam=10.0))
    fisher = res["method"].state_dict()["tasks"][0]["fisher"]
    assert fisher["2.weight"].shape == (32,) and float(fisher["2.weight"].sum()) > 0  # BN γ
    assert isinstance(res["model"][2], nn.BatchNorm1d)
    assert res["curves"]["task_starts"] == [0, 5, 10]  # 5 full batches per task, the single one skipped


def _split3() -> list:
    return make_sequence(load_dataset("mnist-10k"), "split", 3, max_train_per_task=300, max_eval_per_task=200)


_SCENARIO_CFG = dict(
    epochs=2, hidden=(32,), batch_size=32, eval_every=100, curve_samples=50, optimizer="sgd", lr=0.05
)


@pytest.mark.parametrize(("scenario", "width"), [("task", 6), ("domain", 2), ("class", 6)])
def test_scenario_sets_the_output_width(scenario: str, width: int) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=1, hidden=(8,), batch_size=100, eval_every=100, curve_samples=20, progress=False)
    res = run_method(_split3(), "sgd", cfg, scenario=scenario)
    assert res["model"][-1].out_features == width
    assert len(res["accuracy_matrix"]) == 3


def test_class_incremental_forgets_what_task_incremental_keeps() -> None:
    """The same SGD run read two ways: with the task id (task-IL) the first task's head still
    separates its two digits; without it (class-IL) the newest classes take every prediction."""
    torch.set_num_threads(1)
    tasks = _split3()
    cfg = TrainConfig(**_SCENARIO_CFG, progress=False)
    task_il = run_method(tasks, "sgd", cfg, scenario="task")["accuracy_matrix"]
    class_il = run_method(tasks, "sgd", cfg, scenario="class")["accuracy_matrix"]
    assert task_il[-1][0] > 0.8
    assert class_il[-1][0] < 0.1
    assert class_il[0][0] > 0.8  # it had learned the first task


def test_joint_trains_each_sample_on_its_own_head() -> None:
    """Joint training mixes tasks in a batch; in task-IL each sample needs its own task's head
    (a label of task 0 is not a class of task 2's head)."""
    torch.set_num_threads(1)
    res = run_method(_split3(), "joint", TrainConfig(**_SCENARIO_CFG, progress=False), scenario="task")
    assert min(res["accuracy_matrix"][-1]) > 0.8


def test_unknown_scenario_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="scenario must be one of task, domain, class or None, got 'nope'"):
        TrainConfig(scenario="nope")


def test_the_progress_bar_reads_its_info_only_when_it_draws(capsys) -> None:
    """Redrawn at most every `interval` seconds and at the end; `info` is called only then."""
    calls = []

    def info() -> str:
        calls.append(1)
        return "x"

    bar = Progress(5, "t", enabled=True, interval=3600.0)
    for _ in range(5):
        bar.update(1, info)
    assert len(calls) == 2  # the first step and the last


def test_the_loop_trains_on_the_penalty_without_computing_its_value(tasks: list, monkeypatch) -> None:
    """The NaN check looks at the loss without the penalty's value and only the evaluation points
    read it (curves.penalty), so a run computes the gradient at every step and the value once per
    point (at every step it would cost one more pass per step)."""
    import ewc.quadratic_eval as quadratic_eval

    values, added = [], []
    value, add = quadratic_eval.Evaluation.value, quadratic_eval.Evaluation.add_into_grads
    monkeypatch.setattr(quadratic_eval.Evaluation, "value", lambda self: values.append(1) or value(self))
    monkeypatch.setattr(
        quadratic_eval.Evaluation, "add_into_grads", lambda self, idx: added.append(1) or add(self, idx)
    )
    curves = run_method(tasks[:2], "online-ewc", config(lam=10.0))["curves"]
    assert len(added) == 300 // 50  # every step of the second task
    assert len(values) == 300 // 50 // 2  # its evaluation points (eval_every=2), no other step
    assert [p > 0 for p in curves["penalty"][-3:]] == [True] * 3
