"""GEM and A-GEM: the projections against hand and brute-force answers, and the methods' hooks."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.data import Task
from ewc.methods.base import Batch, Method
from ewc.methods.gem import AGEMMethod, GEMMethod, project_agem, project_gem
from ewc.scenario import Scenario

torch.set_num_threads(1)
D = torch.float64
CLASSES = [[0, 1], [2, 3], [4, 5]]


def brute_force_projection(g: Tensor, G: Tensor) -> Tensor:
    """The closest z to g with G z ≥ 0, by enumeration: the optimum is the projection of g onto
    {z : G_S z = 0} for its active set S, so try every S and keep the closest feasible one."""
    best, best_dist = None, float("inf")
    for r in range(len(G) + 1):
        for S in itertools.combinations(range(len(G)), r):
            A = G[list(S)]
            z = g - A.T @ torch.linalg.pinv(A @ A.T) @ (A @ g) if r else g.clone()
            if float((G @ z).min()) >= -1e-10 and float((z - g).norm()) < best_dist:
                best, best_dist = z, float((z - g).norm())
    assert best is not None
    return best


# ------------------------------------------------------------------------------- projections


@pytest.mark.parametrize(("margin", "expected"), [(0.0, [0.0, 1.0]), (0.5, [0.0, 1.0]), (2.0, [1.0, 1.0])])
def test_gem_one_constraint_by_hand(margin: float, expected: list[float]) -> None:
    # g = (−1, 1), g₁ = (1, 0): ⟨g, g₁⟩ = −1. Dual: min_{v ≥ γ} ½v² − v → v = max(γ, 1);
    # g̃ = g + v g₁ = (v − 1, 1).
    got = project_gem(torch.tensor([-1.0, 1.0]), torch.tensor([[1.0, 0.0]]), margin)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_gem_projection_is_the_closest_feasible_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(60):
        t, dim = 1 + trial % 4, 2 + trial % 5
        G = torch.randn(t, dim, generator=gen, dtype=D)
        g = torch.randn(dim, generator=gen, dtype=D)
        if float((G @ g).min()) >= 0:
            assert project_gem(g, G) is g  # nothing violated: unchanged
            continue
        checked += 1
        got = project_gem(g, G, 0.0)
        assert float((G @ got).min()) >= -1e-10  # every constraint holds
        torch.testing.assert_close(got, brute_force_projection(g, G), atol=1e-8, rtol=1e-8)
        # with a memory strength the constraints still hold
        assert float((G @ project_gem(g, G, 0.5)).min()) >= -1e-10
    assert checked > 30


def test_gem_keeps_dtype_and_checks_shapes() -> None:
    g, G = torch.tensor([-1.0, 1.0]), torch.tensor([[1.0, 0.0]])
    assert project_gem(g, G).dtype == torch.float32
    with pytest.raises(ValueError, match="need g"):
        project_gem(g, torch.ones(2, 3))


def test_agem_projection_by_hand() -> None:
    # ⟨g, r⟩ = −1 < 0: g̃ = g − (−1 / 1) r = (0, 1)
    torch.testing.assert_close(
        project_agem(torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 0.0])), torch.tensor([0.0, 1.0])
    )
    g = torch.tensor([1.0, 1.0])
    assert project_agem(g, torch.tensor([1.0, -0.5])) is g  # ⟨g, r⟩ ≥ 0: unchanged
    assert project_agem(g, torch.zeros(2)) is g
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        g, r = torch.randn(7, generator=gen, dtype=D), torch.randn(7, generator=gen, dtype=D)
        got = project_agem(g, r)
        assert float(got @ r) >= -1e-12
        if float(g @ r) < 0:  # one constraint: A-GEM's projection is GEM's exact one
            torch.testing.assert_close(got, brute_force_projection(g, r.unsqueeze(0)))


# ------------------------------------------------------------------------------------ methods


def make_task(index: int, n: int = 6) -> Task:
    gen = torch.Generator().manual_seed(index)
    x = torch.randn(n, 1, 2, 2, generator=gen)
    y = torch.tensor(CLASSES[index])[torch.arange(n) % 2]
    return Task(f"t{index}", index, x, y, x[:0], y[:0], x, y, tuple(CLASSES[index]))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6))


def flat_grad(loss: Tensor, model: nn.Module) -> Tensor:
    return torch.cat([d.reshape(-1) for d in torch.autograd.grad(loss, list(model.parameters()))]).double()


def hand_loss(model: nn.Module, kind: str, x: Tensor, y: Tensor, task: int, seen: int) -> Tensor:
    """Cross-entropy of one task's samples on the columns read by hand."""
    out = model(x)
    if kind == "domain":  # two shared units, the label's position in its task
        return F.cross_entropy(out[:, :2], y - 2 * task)
    assert kind == "class"  # every class of tasks 0..seen
    return F.cross_entropy(out[:, : 2 * (seen + 1)], y)


def prepared(method: Method, kind: str) -> tuple[nn.Module, Scenario, Tensor, Tensor]:
    """Tasks 0 and 1 finished, task 2 started; returns a batch of task 2 that conflicts with
    task 0: task 0's inputs with the other class of the pair."""
    model, scenario = make_model(), Scenario(kind, CLASSES)
    method.setup(model, scenario)
    for k in (0, 1):
        method.before_task(k, make_task(k))
        method.after_task(k, make_task(k))
    method.before_task(2, make_task(2))
    t0 = make_task(0)
    return model, scenario, t0.x_train, 5 - t0.y_train


def backward(method: Method, model: nn.Module, scenario: Scenario, x: Tensor, y: Tensor) -> Tensor:
    """The trainer's step up to the optimiser; returns the gradient before ``after_backward``."""
    out = model(x)
    loss = method.loss(F.cross_entropy(*scenario.view(out, y, 2)), Batch(x, y, out, 2))
    model.zero_grad()
    loss.backward()
    before = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    method.after_backward()
    return before


def grad_now(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def test_gem_method_projects_onto_the_memories_constraints() -> None:
    method = GEMMethod(capacity=100, memory_strength=0.0)
    model, scenario, x, y = prepared(method, "domain")
    weights = [p.detach().clone() for p in model.parameters()]
    g = backward(method, model, scenario, x, y)
    # independent: the current gradient and each past task's memory gradient, heads by hand
    torch.testing.assert_close(g, flat_grad(hand_loss(model, "domain", x, y, 2, 2), model))
    G = torch.stack(
        [
            flat_grad(hand_loss(model, "domain", t.x_train, t.y_train, k, 2), model)
            for k, t in enumerate([make_task(0), make_task(1)])
        ]
    )
    assert float((G @ g).min()) < 0  # the batch does conflict with a memory
    got = grad_now(model)
    assert float((G @ got).min()) >= -1e-6
    torch.testing.assert_close(got, brute_force_projection(g, G), atol=1e-5, rtol=1e-4)
    assert all(
        torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True)
    )  # only p.grad changes
    assert model.training


def test_gem_method_memory_strength() -> None:
    method = GEMMethod(capacity=100, memory_strength=0.5)
    model, scenario, x, y = prepared(method, "domain")
    g = backward(method, model, scenario, x, y)
    G = torch.stack(
        [
            flat_grad(hand_loss(model, "domain", t.x_train, t.y_train, k, 2), model)
            for k, t in enumerate([make_task(0), make_task(1)])
        ]
    )
    got = grad_now(model)
    assert float((G @ got).min()) >= -1e-6
    # g̃ − g = Gᵀ v with every v_k ≥ γ = 0.5
    v = torch.linalg.lstsq(G.T, (got - g).unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(G.T @ v, got - g, atol=1e-6, rtol=1e-5)
    assert float(v.min()) >= 0.5 - 1e-5


def test_gem_method_leaves_a_compatible_gradient_alone() -> None:
    method = GEMMethod(capacity=100)
    model, scenario = make_model(), Scenario("domain", CLASSES)
    method.setup(model, scenario)
    t0 = make_task(0)
    method.before_task(0, t0)
    method.after_task(0, t0)
    method.before_task(1, make_task(1))
    model.eval()
    out = model(t0.x_train)
    y = t0.y_train + 2  # task 1's labels at the same positions: the same gradient as the memory's
    loss = method.loss(F.cross_entropy(*scenario.view(out, y, 1)), Batch(t0.x_train, y, out, 1))
    model.zero_grad()
    loss.backward()
    before = [p.grad.clone() for p in model.parameters()]
    method.after_backward()
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))
    assert not model.training  # the trainer's mode is kept


def test_agem_method_projects_onto_the_average_memory_gradient() -> None:
    method = AGEMMethod(capacity=100, sample_size=50)  # larger than the memory: all 12 samples
    model, scenario, x, y = prepared(method, "class")
    g = backward(method, model, scenario, x, y)
    # g_ref: mean loss over the 12 stored samples (6 per task) in class-IL after task 2 started
    ref_loss = (
        sum(hand_loss(model, "class", make_task(k).x_train, make_task(k).y_train, k, 2) for k in (0, 1)) / 2
    )
    r = flat_grad(ref_loss, model)
    assert float(g @ r) < 0
    torch.testing.assert_close(grad_now(model), g - (g @ r) / (r @ r) * r, atol=1e-6, rtol=1e-5)
    assert abs(float(grad_now(model) @ r)) < 1e-6


def test_methods_do_nothing_without_memory() -> None:
    for method in (GEMMethod(capacity=10), AGEMMethod(capacity=10)):
        model, scenario = make_model(), Scenario("task", CLASSES)
        method.setup(model, scenario)
        t0 = make_task(0)
        method.before_task(0, t0)
        out = model(t0.x_train)
        F.cross_entropy(*scenario.view(out, t0.y_train, 0)).backward()
        before = [p.grad.clone() for p in model.parameters()]
        method.after_backward()
        assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [GEMMethod, AGEMMethod])
def test_state_round_trip(cls: type) -> None:
    a = cls(capacity=8, seed=2)
    prepared(a, "task")
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = cls(capacity=8, seed=2)
    b.setup(make_model(), Scenario("task", CLASSES))
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.current == 2 and b.memory.tasks() == [0, 1]
    torch.testing.assert_close(b.memory.get(), a.memory.get())
    assert b.memory_bytes() == a.memory_bytes() == 8 * (4 * 4 + 3 * 8)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (GEMMethod, {"memory_strength": -0.1}, "memory_strength"),
        (GEMMethod, {"memory_strength": float("nan")}, "memory_strength"),
        (GEMMethod, {"capacity": 0}, "capacity"),
        (GEMMethod, {"per": "batch"}, "balancing"),
        (AGEMMethod, {"sample_size": 0}, "sample_size"),
        (AGEMMethod, {"sample_size": 1.5}, "sample_size"),
        (AGEMMethod, {"policy": "fifo"}, "policy"),
    ],
)
def test_bad_arguments(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_gem_and_agem_through_the_trainer() -> None:
    from ewc.data import load_dataset, make_sequence
    from ewc.train import TrainConfig, run_method

    tasks = make_sequence(
        load_dataset("mnist-10k"), "split", 3, max_train_per_task=200, max_eval_per_task=100
    )
    config = TrainConfig(
        epochs=2, batch_size=20, lr=1e-2, optimizer="sgd", hidden=(32,), eval_every=1000,
        curve_samples=50, progress=False,
    )  # fmt: skip
    old = {}
    for method in (Method(), GEMMethod(capacity=120), AGEMMethod(capacity=120)):
        result = run_method(tasks, method, config, scenario="class")
        old[method.name] = sum(result["accuracy_matrix"][-1][:2]) / 2
        if method.name != "sgd":
            assert result["memory_bytes"] == 120 * (784 * 4 + 3 * 8)
    assert old["sgd"] < 0.1 and old["gem"] > old["sgd"] + 0.2
    assert old["agem"] >= old["sgd"]
