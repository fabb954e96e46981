"""LwF (distillation from the previous model) and SGD+dropout, against hand computations.

The reference KD below is plain Python over lists of floats, written from the definition
T² · Σ_i p_i log(p_i / q_i), p = softmax(old / T), q = softmax(new / T), averaged over rows.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc.methods.base import Batch, Method
from ewc.methods.dropout import DropoutMethod
from ewc.methods.lwf import LwFMethod, distillation
from ewc.scenario import Scenario

torch.set_num_threads(1)

SPLIT = [(0, 1), (2, 3), (4, 5)]


def softmax(zs: list[float], temperature: float) -> list[float]:
    es = [math.exp(z / temperature) for z in zs]
    return [e / sum(es) for e in es]


def kd_by_hand(old: list[list[float]], new: list[list[float]], temperature: float) -> float:
    total = 0.0
    for a, b in zip(old, new, strict=True):
        p, q = softmax(a, temperature), softmax(b, temperature)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return temperature**2 * total / len(old)


def columns(rows: torch.Tensor, cols: list[int]) -> list[list[float]]:
    return [[float(r[c]) for c in cols] for r in rows]


def linear(width: int, seed: int = 0) -> nn.Linear:
    """A tiny model whose outputs on the unit inputs e_j are its weight columns plus the bias."""
    torch.manual_seed(seed)
    return nn.Linear(3, width)


X = torch.eye(3)  # three inputs: row j of the output is W[:, j] + b


def bind(method: LwFMethod, model: nn.Module, kind: str | None) -> LwFMethod:
    method.setup(model, None if kind is None else Scenario(kind, SPLIT))
    return method


def perturb(model: nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def batch_for(model: nn.Module, task: int) -> Batch:
    return Batch(X, torch.zeros(len(X), dtype=torch.long), model(X), task)


# ---------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_lwf_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        LwFMethod(alpha=alpha)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_lwf_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        LwFMethod(temperature=temperature)


def test_lwf_defaults():
    m = LwFMethod()
    assert (m.name, m.alpha, m.temperature, m.dropout) == ("lwf", 1.0, 2.0, None)


# ---------------------------------------------------------------------------------------------
# Zero distillation when nothing changed
# ---------------------------------------------------------------------------------------------


def test_first_task_is_plain_training():
    model = linear(6)
    m = bind(LwFMethod(), model, "class")
    task_loss = torch.tensor(0.7)
    assert m.loss(task_loss, batch_for(model, 0)) is task_loss
    assert m.memory_bytes() == 0


@pytest.mark.parametrize("kind", ["task", "domain", "class", None])
def test_unchanged_model_adds_nothing_and_no_gradient(kind):
    model = linear(2 if kind == "domain" else 6)
    m = bind(LwFMethod(alpha=3.0, temperature=2.0), model, kind)
    m.after_task(0, None)
    m.after_task(1, None)
    batch = batch_for(model, 2)
    task_loss = torch.tensor(0.7)
    loss = m.loss(task_loss, batch)
    assert loss.item() == pytest.approx(0.7, abs=1e-7)
    loss.backward()  # KL is at its minimum: the distillation gradient vanishes
    for p in model.parameters():
        assert p.grad is not None and p.grad.abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# Hand-computed distillation on each scenario's heads
# ---------------------------------------------------------------------------------------------


def _after_two_tasks(kind: str, width: int, alpha: float, temperature: float):
    model = linear(width)
    m = bind(LwFMethod(alpha=alpha, temperature=temperature), model, kind)
    m.after_task(0, None)
    perturb(model, seed=1)
    m.after_task(1, None)  # the old model is the one after task 1
    with torch.no_grad():
        old = model(X).clone()
    perturb(model, seed=2)
    out = model(X)
    loss = m.loss(torch.tensor(0.25), Batch(X, torch.zeros(3, dtype=torch.long), out, 2))
    return loss.item(), old, out.detach()


def test_task_il_sums_one_term_per_old_head():
    loss, old, new = _after_two_tasks("task", 6, alpha=0.5, temperature=2.0)
    kd0 = kd_by_hand(columns(old, [0, 1]), columns(new, [0, 1]), 2.0)
    kd1 = kd_by_hand(columns(old, [2, 3]), columns(new, [2, 3]), 2.0)
    assert kd0 > 1e-3 and kd1 > 1e-3
    assert loss == pytest.approx(0.25 + 0.5 * (kd0 + kd1), rel=1e-5)


def test_class_il_distils_the_classes_the_old_model_knew():
    loss, old, new = _after_two_tasks("class", 6, alpha=2.0, temperature=3.0)
    kd = kd_by_hand(columns(old, [0, 1, 2, 3]), columns(new, [0, 1, 2, 3]), 3.0)
    assert loss == pytest.approx(0.25 + 2.0 * kd, rel=1e-5)


def test_domain_il_distils_the_shared_head_once():
    loss, old, new = _after_two_tasks("domain", 2, alpha=1.0, temperature=2.0)
    kd = kd_by_hand(columns(old, [0, 1]), columns(new, [0, 1]), 2.0)
    assert loss == pytest.approx(0.25 + kd, rel=1e-5)


def test_class_il_ignores_the_new_tasks_units():
    """Only units 0..3 (tasks 0 and 1) enter the term: changing units 4, 5 changes nothing."""
    model = linear(6)
    m = bind(LwFMethod(), model, "class")
    m.after_task(0, None)
    m.after_task(1, None)
    with torch.no_grad():
        model.weight[4:].add_(5.0)
        model.bias[4:].sub_(3.0)
    assert m.loss(torch.tensor(0.0), batch_for(model, 2)).item() == pytest.approx(0.0, abs=1e-7)


def test_given_logits_by_hand():
    """A 2-unit linear model with hand-set weights: the logits are read off the weights."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # old logits: (1, 0), (0, 0)
    m = bind(LwFMethod(alpha=1.0, temperature=2.0), model, "domain")
    m.after_task(0, None)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 2.0]]))  # new logits: (0, 0), (0, 2)
    x = torch.eye(2)
    loss = m.loss(torch.tensor(0.0), Batch(x, torch.zeros(2, dtype=torch.long), model(x), 1)).item()
    # T = 2: row 1: p = softmax(0.5, 0) = (σ(.5), 1-σ(.5)), q = (½, ½);
    #        row 2: p = (½, ½), q = softmax(0, 1) = (1-σ(1), σ(1))
    s5, s1 = 1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(-1.0))
    row1 = s5 * math.log(s5 / 0.5) + (1 - s5) * math.log((1 - s5) / 0.5)
    row2 = 0.5 * math.log(0.5 / (1 - s1)) + 0.5 * math.log(0.5 / s1)
    assert loss == pytest.approx(4 * (row1 + row2) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------


def test_temperature_scaling():
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    for t in (0.5, 2.0, 4.0):
        # T² KL at temperature T is T² times the T = 1 value on logits divided by T
        assert distillation(a, b, t).item() == pytest.approx(t**2 * distillation(a / t, b / t, 1.0).item())
        assert distillation(a, b, t).item() == pytest.approx(kd_by_hand(a.tolist(), b.tolist(), t))
    # high T: T² KL → Σ_i ((a_i - ā) - (b_i - b̄))² / (2K) (Hinton et al. 2015); without the T² it → 0
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    limit = ((ac - bc) ** 2).sum(1).mean().item() / (2 * 4)
    assert distillation(a, b, 1000.0).item() == pytest.approx(limit, rel=1e-2)


def test_distillation_gradient_matches_the_soft_target_rule():
    """d/dz_new of T² KL = T (q - p) / N: the gradient scale stays O(1) in T."""
    old, new = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    t = 3.0
    distillation(old, new, t).backward()
    p, q = softmax([2.0, 0.0, -1.0], t), softmax([0.0, 1.0, 0.0], t)
    expected = [t * (qi - pi) for pi, qi in zip(p, q, strict=True)]
    assert new.grad[0].tolist() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# The old model: frozen, eval mode, the right size; state round trip
# ---------------------------------------------------------------------------------------------


def test_old_model_is_a_frozen_eval_copy():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 6))
    m = bind(LwFMethod(), model, "class")
    m.after_task(0, None)
    old = m.old_model
    assert old is not model and not old.training
    assert all(not p.requires_grad for p in old.parameters())
    before = old(X).clone()
    perturb(model)
    assert torch.equal(old(X), before)  # a copy, and deterministic (dropout off)
    model.train()
    loss = m.loss(torch.tensor(0.0), batch_for(model, 1))
    loss.backward()
    assert all(p.grad is None for p in old.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_memory_bytes_is_the_copy():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 6))
    m = bind(LwFMethod(), model, "task")
    m.after_task(0, None)
    # float32 weights and biases (12+4, 4+4 BatchNorm affine, 24+6), BatchNorm running mean/var (4+4),
    # and its int64 num_batches_tracked
    assert m.memory_bytes() == 4 * (16 + 8 + 30 + 8) + 8
    m.after_task(1, None)  # only the latest copy is kept
    assert m.memory_bytes() == 4 * (16 + 8 + 30 + 8) + 8


def test_state_dict_round_trip_through_weights_only_load():
    model = linear(6, seed=0)
    m = bind(LwFMethod(alpha=0.5, temperature=3.0), model, "task")
    m.after_task(0, None)
    perturb(model)
    m.after_task(1, None)
    perturb(model, seed=5)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = linear(6, seed=9)
    fresh.load_state_dict(model.state_dict())  # same current weights, different old model so far
    m2 = bind(LwFMethod(alpha=0.5, temperature=3.0), fresh, "task")
    m2.load_state_dict(state)
    assert m2.tasks_done == 2 and m2.memory_bytes() == m.memory_bytes()
    assert m2.old_model is not fresh
    a = m.loss(torch.tensor(0.0), batch_for(model, 2)).item()
    b = m2.loss(torch.tensor(0.0), batch_for(fresh, 2)).item()
    assert a > 0 and a == pytest.approx(b, rel=1e-6)


def test_state_dict_before_any_task_and_bad_states():
    model = linear(6)
    m = bind(LwFMethod(), model, "class")
    assert m.state_dict() == {"tasks_done": 0}
    m.load_state_dict({"tasks_done": 0})
    assert m.old_model is None
    with pytest.raises(ValueError):
        m.load_state_dict({"tasks_done": 1})  # no old model
    with pytest.raises(ValueError):
        m.load_state_dict({"tasks_done": 0, "anchor": torch.zeros(1)})
    with pytest.raises(ValueError):
        m.load_state_dict({})


def test_state_dict_is_a_copy():
    model = linear(6)
    m = bind(LwFMethod(), model, "class")
    m.after_task(0, None)
    state = m.state_dict()
    for v in state["old_model"].values():
        v.zero_()
    assert m.old_model.weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# A small training loop calling the hooks in the trainer's order
# ---------------------------------------------------------------------------------------------


def _train(method: Method, scenario: Scenario, tasks, steps: int = 30) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, scenario.num_outputs))
    method.setup(model, scenario)
    for i, (x, y) in enumerate(tasks):
        method.before_task(i, None)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        model.train()
        for _ in range(steps):
            out = model(x)
            logits, target = scenario.view(out, y, i)
            loss = method.loss(F.cross_entropy(logits, target), Batch(x, y, out, i))
            opt.zero_grad()
            loss.backward()
            method.after_backward()
            opt.step()
            method.after_step()
        model.eval()
        method.after_task(i, None)
    return model


def _toy_tasks():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for k, (a, b) in enumerate(SPLIT[:2]):
        x = torch.randn(40, 4, generator=g) + 2.0 * torch.eye(4)[k]
        y = torch.where(x[:, 2 + k % 2] > 0, a, b)
        tasks.append((x, y))
    return tasks


@pytest.mark.parametrize("kind", ["task", "domain", "class"])
def test_lwf_keeps_old_responses_closer_than_sgd(kind):
    """After task 2, LwF's outputs on task 1's head moved less than plain SGD's did."""
    tasks = _toy_tasks()
    scenario = Scenario(kind, SPLIT[:2])
    ref = _train(Method(), scenario, tasks[:1])
    with torch.no_grad():
        before = scenario.head(ref(tasks[1][0]), 0)

    def drift(method: Method) -> float:
        model = _train(method, scenario, tasks)
        with torch.no_grad():
            return (
                (F.log_softmax(scenario.head(model(tasks[1][0]), 0), 1) - F.log_softmax(before, 1))
                .abs()
                .mean()
                .item()
            )

    assert drift(LwFMethod(alpha=1.0)) < 0.5 * drift(Method())


# ---------------------------------------------------------------------------------------------
# SGD + dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_method_is_sgd_with_a_rate():
    m = DropoutMethod()
    assert (m.name, m.dropout) == ("dropout", 0.5)
    assert DropoutMethod(0.0).dropout == 0.0 and DropoutMethod(0.2).dropout == 0.2
    model = linear(6)
    m.setup(model, Scenario("class", SPLIT))
    task_loss = torch.tensor(1.5)
    assert m.loss(task_loss, batch_for(model, 0)) is task_loss
    m.after_task(0, None)
    assert m.memory_bytes() == 0 and m.state_dict() == {}
    m.load_state_dict({})
    assert Method.dropout is None  # the class attribute of the base is untouched


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_dropout_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match="rate"):
        DropoutMethod(rate)


# ---------------------------------------------------------------------------------------------
# End to end through the trainer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_tasks():
    from ewc.data import load_dataset, make_sequence

    return make_sequence(load_dataset("mnist-10k"), "split", 2, max_train_per_task=200, max_eval_per_task=100)


def _config(**kw):
    from ewc.train import TrainConfig

    return TrainConfig(epochs=1, batch_size=50, hidden=(32,), lr=1e-3, eval_every=4, curve_samples=50, **kw)


@pytest.mark.parametrize("kind", ["task", "domain", "class"])
def test_lwf_through_the_trainer(split_tasks, kind):
    from ewc.train import run_method

    method = LwFMethod(alpha=1.0, temperature=2.0)
    result = run_method(split_tasks, method, _config(), scenario=kind)
    matrix = result["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert method.tasks_done == 2 and method.old_model is not None
    assert method.memory_bytes() == sum(p.numel() * 4 for p in result["model"].parameters())
    width = 2 if kind == "domain" else 4
    assert result["model"][-1].out_features == width


def test_dropout_through_the_trainer(split_tasks):
    from ewc.train import run_method

    result = run_method(split_tasks, DropoutMethod(0.3), _config(dropout=0.0), scenario="task")
    drops = [m for m in result["model"].modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    plain = run_method(split_tasks, Method(), _config(dropout=0.0), scenario="task")
    assert not any(isinstance(m, nn.Dropout) for m in plain["model"].modules())
