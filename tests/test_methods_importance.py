"""SI and MAS against hand computations, and MAS's per-sample importances against a naive loop."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc.data import Task
from ewc.fisher import diagonal_importance
from ewc.methods.base import Batch
from ewc.methods.importance import MASMethod, SIMethod
from ewc.scenario import Scenario

torch.set_num_threads(1)


def make_task(x: torch.Tensor, y: torch.Tensor, index: int = 0, classes: tuple[int, ...] = (0, 1)) -> Task:
    return Task(f"t{index}", index, x, y, x[:0], y[:0], x[:0], y[:0], classes)


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------- MAS importances (the engine)


def reference_mas(model: nn.Module, x: torch.Tensor, head=lambda o: o) -> dict[str, torch.Tensor]:
    """1/N Σ_n |∂‖f(x_n)‖²/∂θ|, one sample at a time with plain autograd."""
    named = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in named.items()}
    model.eval()
    for i in range(len(x)):
        s = head(model(x[i : i + 1])).square().sum()
        grads = torch.autograd.grad(s, list(named.values()), allow_unused=True)
        for n, g in zip(named, grads, strict=True):
            if g is not None:
                acc[n] += g.abs()
    return {n: a / len(x) for n, a in acc.items()}


class Twice(nn.Module):
    """A Linear used twice per sample (its parameters get two contributions) and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.norm(self.a(x))))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(8, 4)
    )


@pytest.mark.parametrize(
    ("build", "shape"), [(mlp, (5,)), (cnn, (1, 6, 6)), (Twice, (4,))], ids=["mlp", "cnn", "shared"]
)
@pytest.mark.parametrize("head", [None, [0, 2]], ids=["all", "head"])
@pytest.mark.parametrize("parts", [False, True], ids=["whole", "parts"])
def test_diagonal_importance_matches_per_sample_loop(build, shape, head, parts, monkeypatch) -> None:
    import ewc.fisher as fisher_module

    if parts:  # batches split into parts of one sample (ewc.fisher.ACTIVATION_BYTES)
        monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", 1)
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(11, *shape, dtype=torch.float64)
    cols = None if head is None else torch.tensor(head)
    fn = None if cols is None else (lambda o: o.index_select(1, cols))
    got = diagonal_importance(model, x, "mas", output_fn=fn, batch_size=4)
    ref = reference_mas(model, x, (lambda o: o) if fn is None else fn)
    assert set(got) == set(ref)
    for n in ref:
        err = (got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-300)
        assert err < 1e-6, (n, float(err))


def test_diagonal_importance_options_and_errors() -> None:
    model = mlp().double()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.zeros(10, dtype=torch.long)
    first = diagonal_importance(model, x, max_samples=3)
    ref = reference_mas(model, x[:3])
    assert all(torch.allclose(first[n], ref[n], rtol=1e-10, atol=0) for n in ref)
    with_labels = diagonal_importance(model, (x, y))  # labels are ignored
    plain = diagonal_importance(model, x)
    assert all(torch.equal(with_labels[n], plain[n]) for n in plain)
    with pytest.raises(ValueError, match="importance kind"):
        diagonal_importance(model, x, "fisher")
    with pytest.raises(ValueError, match="max_samples"):
        diagonal_importance(model, x, max_samples=0)
    with pytest.raises(ValueError, match="output_fn"):
        diagonal_importance(model, x, output_fn=lambda o: o.sum())


# -------------------------------------------------------------------------------------- SI


class Scalar(nn.Module):
    """One parameter θ; the model's "output" is θ itself (losses are written by hand)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([value], dtype=torch.float64))


def run_path(method: SIMethod, model: Scalar, a: float, t: float, path: list[float], index: int) -> None:
    """Train on ½·a·(θ − t)² by moving θ through ``path`` by hand (any "optimiser" will do)."""
    task = make_task(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), index)
    method.before_task(index, task)
    for target in path:
        task_loss = 0.5 * a * (model.theta - t).square().sum()
        loss = method.loss(task_loss)
        model.theta.grad = None
        loss.backward()
        method.after_backward()
        with torch.no_grad():
            model.theta.fill_(target)
        method.after_step()
    method.after_task(index, task)


def test_si_path_integral_importance_penalty_and_gradient() -> None:
    c, xi = 0.7, 0.1
    model = Scalar(2.0)
    si = SIMethod(c=c, xi=xi)
    si.setup(model)
    assert si.memory_bytes() == 0 and si.importance() == {}

    # Task 1: L = ½·3·(θ − 1)², θ: 2 → 1.5 → 1.2 → 1.3; gradient 3(θ − 1) at each start point.
    path1 = [1.5, 1.2, 1.3]
    run_path(si, model, 3.0, 1.0, path1, 0)
    omega1 = -(3 * (2.0 - 1) * (1.5 - 2.0) + 3 * (1.5 - 1) * (1.2 - 1.5) + 3 * (1.2 - 1) * (1.3 - 1.2))
    big1 = omega1 / ((1.3 - 2.0) ** 2 + xi)
    assert si.importance()["theta"].item() == pytest.approx(big1, rel=1e-12)
    assert si.omega["theta"].item() == 0.0  # reset for the next task
    assert si.memory_bytes() == 2 * 8  # Ω and θ*, one float64 each

    # The penalty at θ = 1.3 + 0.5: c·Ω·(θ − θ*)², its gradient 2c·Ω·(θ − θ*).
    with torch.no_grad():
        model.theta.fill_(1.8)
    pen = si.loss(torch.zeros(()))
    assert pen.item() == pytest.approx(c * big1 * 0.5**2, rel=1e-12)
    model.theta.grad = None
    pen.backward()
    assert model.theta.grad.item() == pytest.approx(2 * c * big1 * 0.5, rel=1e-12)

    # Task 2: L = ½·2·(θ + 1)² from θ = 1.8; ω uses the task gradient 2(θ + 1) only, not the penalty's.
    path2 = [1.0, 0.4]
    run_path(si, model, 2.0, -1.0, path2, 1)
    omega2 = -(2 * (1.8 + 1) * (1.0 - 1.8) + 2 * (1.0 + 1) * (0.4 - 1.0))
    big2 = omega2 / ((0.4 - 1.8) ** 2 + xi)
    assert si.importance()["theta"].item() == pytest.approx(big1 + big2, rel=1e-12)
    anchor = si.state_dict()["penalty"]["tasks"][0]["anchor"]["theta"]
    assert anchor.item() == 0.4


def test_si_negative_path_integral_is_clipped() -> None:
    model = Scalar(0.0)
    si = SIMethod(c=1.0)
    si.setup(model)
    run_path(si, model, 1.0, 0.0, [1.0], 0)  # gradient 0 at θ = 0: ω = 0, Ω = 0
    run_path(si, model, 1.0, 0.0, [2.0], 1)  # uphill from θ = 1: ω = −1·1 < 0, clipped
    assert si.importance()["theta"].item() == 0.0


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def test_si_with_sgd_momentum_matches_independent_path_integral() -> None:
    """Two tasks with SGD + momentum; ω of task 2 recomputed from the task loss's own gradient."""
    torch.manual_seed(1)
    model = small_mlp().double()
    si = SIMethod(c=0.5, xi=0.1)
    si.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    names = [n for n, _ in model.named_parameters()]
    ref_big = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for index in range(2):
        x = torch.randn(16, 3, dtype=torch.float64)
        y = torch.randint(0, 2, (16,))
        task = make_task(x, y, index)
        si.before_task(index, task)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        ref_omega = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for step in range(6):
            xb, yb = x[step::6], y[step::6]
            out = model(xb)
            task_loss = F.cross_entropy(out, yb)
            g_task = torch.autograd.grad(task_loss, list(model.parameters()), retain_graph=True)
            before = [p.detach().clone() for p in model.parameters()]
            loss = si.loss(task_loss, Batch(xb, yb, out, index))
            opt.zero_grad()
            loss.backward()
            si.after_backward()
            opt.step()
            si.after_step()
            for n, g, b, p in zip(names, g_task, before, model.parameters(), strict=True):
                ref_omega[n] -= g * (p.detach() - b)
        for n, p in model.named_parameters():
            assert torch.allclose(si.omega[n], ref_omega[n], rtol=1e-9, atol=1e-15), n
            ref_big[n] += ref_omega[n].clamp_min(0) / ((p.detach() - start[n]).square() + 0.1)
        si.after_task(index, task)
    got = si.importance()
    assert all(torch.allclose(got[n], ref_big[n], rtol=1e-12, atol=0) for n in names)


def test_si_state_round_trip_and_validation() -> None:
    torch.manual_seed(2)
    model = small_mlp()
    si = SIMethod(c=0.3, xi=0.2)
    si.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for index in range(2):
        si.before_task(index, make_task(x, y, index))
        for _ in range(3):
            opt.zero_grad()
            si.loss(F.cross_entropy(model(x), y)).backward()
            si.after_backward()
            opt.step()
            si.after_step()
        if index == 0:
            si.after_task(index, make_task(x, y, index))
    state = round_trip(si.state_dict())  # mid-task: ω and the start parameters travel too

    other = SIMethod()  # defaults, replaced by the state's c and ξ
    other.setup(model)
    other.load_state_dict(state)
    assert (other.c, other.xi) == (0.3, 0.2)
    assert torch.equal(other.loss(torch.zeros(())), si.loss(torch.zeros(())))
    for n in si.omega:
        assert torch.equal(other.omega[n], si.omega[n])
    si.after_task(1, make_task(x, y, 1))
    other.after_task(1, make_task(x, y, 1))
    assert all(torch.equal(other.importance()[n], si.importance()[n]) for n in si.importance())

    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"c": 1.0})
    for bad in ({"c": -1.0}, {"c": math.nan}, {"c": True}, {"xi": 0.0}, {"xi": -0.1}, {"c": "1"}):
        with pytest.raises(ValueError):
            SIMethod(**bad)


# ------------------------------------------------------------------------------------- MAS


def test_mas_accumulates_head_importances_and_penalises() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    scenario = Scenario("task", [[0, 1], [2, 3]])
    lam = 2.5
    mas = MASMethod(lam=lam, batch_size=5)
    mas.setup(model, scenario)
    xs = [torch.randn(9, 3, dtype=torch.float64) for _ in range(2)]
    ys = [torch.tensor([0, 1] * 4 + [0]), torch.tensor([2, 3] * 4 + [2])]

    mas.after_task(0, make_task(xs[0], ys[0], 0, (0, 1)))
    ref0 = reference_mas(model, xs[0], lambda o: o[:, [0, 1]])
    assert mas.memory_bytes() == 2 * sum(p.numel() * 8 for p in model.parameters())
    # The head of task 0 does not read units 2, 3: their rows get no importance.
    assert torch.equal(mas.importance()["2.weight"][2:], torch.zeros(2, 6, dtype=torch.float64))

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    anchor1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mas.after_task(1, make_task(xs[1], ys[1], 1, (2, 3)))
    ref1 = reference_mas(model, xs[1], lambda o: o[:, [2, 3]])
    omega = mas.importance()
    for n in ref0:
        assert torch.allclose(omega[n], ref0[n] + ref1[n], rtol=1e-10, atol=1e-300), n

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    by_hand = sum((omega[n] * (p.detach() - anchor1[n]).square()).sum() for n, p in model.named_parameters())
    assert mas.loss(torch.zeros((), dtype=torch.float64)).item() == pytest.approx(
        lam / 2 * by_hand.item(), rel=1e-10
    )


def test_mas_state_round_trip_and_validation() -> None:
    torch.manual_seed(4)
    model = small_mlp()
    mas = MASMethod(lam=3.0, max_samples=5, batch_size=2)
    mas.setup(model)
    mas.after_task(0, make_task(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)))
    with torch.no_grad():
        model[0].weight.add_(0.1)
    other = MASMethod()
    other.setup(model)
    other.load_state_dict(round_trip(mas.state_dict()))
    assert (other.lam, other.max_samples, other.batch_size) == (3.0, 5, 2)
    assert torch.equal(other.loss(torch.zeros(())), mas.loss(torch.zeros(())))
    assert other.memory_bytes() == mas.memory_bytes() > 0
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"lam": 1.0})
    for bad in ({"lam": -1.0}, {"lam": math.inf}, {"max_samples": 0}, {"batch_size": 1.5}):
        with pytest.raises(ValueError):
            MASMethod(**bad)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize(
    ("make", "scenario"), [(lambda: SIMethod(c=1.0), "class"), (lambda: MASMethod(), "task")]
)
def test_run_method_end_to_end(make, scenario: str) -> None:
    from ewc.data import load_dataset, make_sequence
    from ewc.train import TrainConfig, run_method

    method = make()
    tasks = make_sequence(
        load_dataset("mnist-10k"), "split", 3, max_train_per_task=200, max_eval_per_task=100
    )
    config = TrainConfig(epochs=1, batch_size=50, hidden=(16,), lr=1e-2, fisher_samples=None, progress=False)
    result = run_method(tasks, method, config, scenario=scenario)
    matrix = result["accuracy_matrix"]
    assert len(matrix) == 3 and all(0.0 <= a <= 1.0 for row in matrix for a in row)
    assert method.reg.num_tasks == 3
    omega = method.importance()
    assert all(bool((w >= 0).all()) for w in omega.values()) and any(
        bool((w > 0).any()) for w in omega.values()
    )
    params = sum(p.numel() * p.element_size() for p in method.model.parameters())
    assert method.memory_bytes() == 2 * params
