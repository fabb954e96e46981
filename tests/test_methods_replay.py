"""Experience replay and method composition, against hand computations."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.data import Task
from ewc.memory import memory_loss
from ewc.methods.base import Batch, Method
from ewc.methods.compose import Compose
from ewc.methods.replay import ReplayMethod
from ewc.scenario import Scenario

torch.set_num_threads(1)

CLASSES = [[0, 1], [2, 3], [4, 5]]


def make_task(index: int, n: int = 6, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(100 * seed + index)
    x = torch.randn(n, 1, 2, 2, generator=gen)
    y = torch.tensor(CLASSES[index])[torch.arange(n) % 2]
    return Task(f"t{index}", index, x, y, x[:0], y[:0], x, y, tuple(CLASSES[index]))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6))


def step(method: Method, model: nn.Module, scenario: Scenario, x: Tensor, y: Tensor, task: int) -> Tensor:
    """One training step's method calls, in the trainer's order (without the optimiser)."""
    out = model(x)
    logits, target = scenario.view(out, y, task)
    loss = method.loss(F.cross_entropy(logits, target), Batch(x, y, out, task))
    model.zero_grad()
    loss.backward()
    method.after_backward()
    method.after_step()
    return loss


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------ replay


def hand_replay_loss(model: nn.Module, kind: str, x: Tensor, y: Tensor, tasks: Tensor, seen: int) -> Tensor:
    """Mean cross-entropy over samples, each read by hand from the columns of its head."""
    out = model(x)
    losses = []
    for n in range(len(y)):
        k, label = int(tasks[n]), int(y[n])
        if kind == "task":  # the two units of task k
            cols, target = CLASSES[k], CLASSES[k].index(label)
        elif kind == "class":  # every class of tasks 0..seen
            cols, target = list(range(2 * (seen + 1))), label
        else:  # domain: two shared units, the label's position in its task
            cols, target = [0, 1], CLASSES[k].index(label)
        losses.append(F.cross_entropy(out[n, cols].unsqueeze(0), torch.tensor([target])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["task", "class", "domain"])
def test_replay_loss_matches_hand_computation(kind: str) -> None:
    model = make_model()
    scenario = Scenario(kind, CLASSES)
    method = ReplayMethod(capacity=100, weight=0.5)
    method.setup(model, scenario)
    tasks = [make_task(k) for k in range(3)]
    for k in (0, 1):
        method.before_task(k, tasks[k])
        method.after_task(k, tasks[k])
    method.before_task(2, tasks[2])
    # replay batch = memory size: the whole memory, so the mean does not depend on the draw
    x, y = torch.randn(12, 1, 2, 2), torch.tensor([4, 5] * 6)
    out = model(x)
    task_loss = F.cross_entropy(*scenario.view(out, y, 2))
    got = method.loss(task_loss, Batch(x, y, out, 2))
    mx = torch.cat([tasks[0].x_train, tasks[1].x_train])
    my = torch.cat([tasks[0].y_train, tasks[1].y_train])
    mt = torch.tensor([0] * 6 + [1] * 6)
    expected = task_loss + 0.5 * hand_replay_loss(model, kind, mx, my, mt, seen=2)
    torch.testing.assert_close(got, expected)
    # and memory_loss on its own agrees with the hand version
    torch.testing.assert_close(
        memory_loss(model, scenario, mx, my, mt, 2), hand_replay_loss(model, kind, mx, my, mt, 2)
    )


def test_no_replay_before_the_first_task_ends() -> None:
    model = make_model()
    method = ReplayMethod(capacity=10)
    method.setup(model, Scenario("task", CLASSES))
    task_loss = torch.tensor(1.25)
    x = torch.randn(2, 1, 2, 2)
    assert method.loss(task_loss, Batch(x, torch.tensor([0, 1]), model(x), 0)) is task_loss


def test_replay_batch_size_and_memory_budget() -> None:
    model = make_model()
    sizes: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _o: sizes.append(len(inputs[0])))
    scenario = Scenario("class", CLASSES)
    method = ReplayMethod(capacity=4, policy="reservoir", replay_batch=3)
    method.setup(model, scenario)
    tasks = [make_task(k, n=10) for k in range(2)]
    method.before_task(0, tasks[0])
    method.after_task(0, tasks[0])
    assert len(method.memory) == 4 and method.memory.seen == 10  # the budget, not the task size
    assert method.memory_bytes() == method.memory.nbytes == 4 * (4 * 4 + 3 * 8)
    method.before_task(1, tasks[1])
    sizes.clear()
    step(method, model, scenario, tasks[1].x_train[:5], tasks[1].y_train[:5], 1)
    assert sizes == [5, 3]  # the current batch, then the replay batch
    method.replay_batch = None
    sizes.clear()
    step(method, model, scenario, tasks[1].x_train[:2], tasks[1].y_train[:2], 1)
    assert sizes == [2, 2]  # default: as many as the current batch


def test_replay_state_round_trip() -> None:
    scenario = Scenario("task", CLASSES)
    a = ReplayMethod(capacity=5, seed=3)
    a.setup(make_model(), scenario)
    for k in range(2):
        a.before_task(k, make_task(k))
        a.after_task(k, make_task(k))
    b = ReplayMethod(capacity=5, seed=3)
    b.setup(make_model(), scenario)
    b.load_state_dict(roundtrip(a.state_dict()))
    assert b.current == 1
    t2 = make_task(2)
    for m in (a, b):  # the same memory and the same next draw
        m.memory.add(t2.x_train, t2.y_train, 2)
    torch.testing.assert_close(a.memory.get(), b.memory.get())
    torch.testing.assert_close(a.memory.sample(3), b.memory.sample(3))
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"memory": a.state_dict()["memory"]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": 0}, "capacity"),
        ({"policy": "lru"}, "policy"),
        ({"replay_batch": 0}, "replay_batch"),
        ({"replay_batch": 2.0}, "replay_batch"),
        ({"weight": -1.0}, "weight"),
        ({"weight": float("inf")}, "weight"),
    ],
)
def test_replay_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ReplayMethod(**kwargs)


def test_replay_in_a_hand_training_loop() -> None:
    # A short hand loop with the hooks in the trainer's order: runs, keeps the budget, and
    # the memory only ever holds samples of finished tasks.
    model = make_model()
    scenario = Scenario("class", CLASSES)
    method = ReplayMethod(capacity=8, policy="balanced")
    method.setup(model, scenario)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for k in range(3):
        task = make_task(k, n=12)
        method.before_task(k, task)
        assert set(method.memory.tasks()) == set(range(k))
        for _ in range(3):
            out = model(task.x_train)
            loss = method.loss(
                F.cross_entropy(*scenario.view(out, task.y_train, k)),
                Batch(task.x_train, task.y_train, out, k),
            )
            opt.zero_grad()
            loss.backward()
            method.after_backward()
            opt.step()
            method.after_step()
        method.after_task(k, task)
        assert len(method.memory) <= 8
    assert [len(method.memory.get(k)[0]) for k in range(3)] == [3, 3, 2]


# ----------------------------------------------------------------------------------- compose


class Recorder(Method):
    """A part that adds ``scale · Σ w²`` plus a constant and logs every hook it receives."""

    def __init__(self, name: str, scale: float, const: float, log: list[str], dropout: float | None = None):
        self.name, self.scale, self.const, self.log = name, scale, const, log
        self.dropout = dropout
        self.count = 0

    def setup(self, model: nn.Module, scenario: Scenario | None = None) -> None:
        super().setup(model, scenario)
        self.log.append(f"{self.name}.setup:{self.scenario.kind}")

    def before_task(self, index: int, task: Task) -> None:
        self.log.append(f"{self.name}.before_task:{index}")

    def loss(self, task_loss: Tensor, batch: Batch | None = None) -> Tensor:
        self.log.append(f"{self.name}.loss")
        w = self.model[-1].weight
        return task_loss + self.scale * (w**2).sum() + self.const

    def after_backward(self) -> None:
        self.log.append(f"{self.name}.after_backward")

    def after_step(self) -> None:
        self.log.append(f"{self.name}.after_step")

    def after_task(self, index: int, task: Task) -> None:
        self.count += 1
        self.log.append(f"{self.name}.after_task:{index}")

    def memory_bytes(self) -> int:
        return 10 if self.name == "a" else 32

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "tensor": torch.full((2,), float(self.count))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


class Mixer(Method):
    """A part that trains on its own data (so Compose must take train_data/epoch_size from it)."""

    name = "mixer"

    def train_data(self, index: int, tasks: list[Task]) -> tuple[Tensor, ...]:
        return tasks[0].x_train, tasks[0].y_train, torch.zeros(len(tasks[0].y_train), dtype=torch.long)

    def epoch_size(self, index: int, tasks: list[Task]) -> int:
        return 3


def test_compose_loss_is_the_sum_of_the_parts_additions() -> None:
    model = make_model()
    log: list[str] = []
    a, b = Recorder("a", 2.0, 0.0, log), Recorder("b", 0.5, 3.0, log)
    both = Compose(a, b)
    both.setup(model, Scenario("task", CLASSES))
    task_loss = torch.tensor(0.75, requires_grad=True)
    got = both.loss(task_loss)
    w2 = float((model[-1].weight.detach() ** 2).sum())
    # the task loss once, then a's 2·Σw² and b's 0.5·Σw² + 3
    assert float(got.detach()) == pytest.approx(0.75 + 2.0 * w2 + 0.5 * w2 + 3.0, rel=1e-6)
    got.backward()
    assert float(task_loss.grad) == pytest.approx(1.0)  # the task loss counts once in the gradient
    assert both.name == "a+b" and both.memory_bytes() == 42


def test_compose_forwards_every_hook_to_every_part_in_order() -> None:
    model = make_model()
    log: list[str] = []
    both = Compose(Recorder("a", 1.0, 0.0, log), Recorder("b", 1.0, 0.0, log))
    scenario = Scenario("domain", CLASSES)
    both.setup(model, scenario)
    task = make_task(0)
    both.before_task(0, task)
    step(both, model, scenario, task.x_train, task.y_train, 0)
    both.after_task(0, task)
    hooks = ["setup:domain", "before_task:0", "loss", "after_backward", "after_step", "after_task:0"]
    assert log == [f"{part}.{hook}" for hook in hooks for part in ("a", "b")]


def test_compose_train_data_from_the_first_overriding_part() -> None:
    log: list[str] = []
    tasks = [make_task(k) for k in range(2)]
    mixed = Compose(Recorder("a", 1.0, 0.0, log), Mixer())
    data = mixed.train_data(1, tasks)
    assert len(data) == 3 and torch.equal(data[0], tasks[0].x_train) and mixed.epoch_size(1, tasks) == 3
    plain = Compose(Recorder("a", 1.0, 0.0, log), Recorder("b", 1.0, 0.0, log))
    assert plain.train_data(1, tasks)[0] is tasks[1].x_train and plain.epoch_size(1, tasks) == 6


def test_compose_state_round_trip_and_checks() -> None:
    log: list[str] = []
    a = Compose(Recorder("a", 1.0, 0.0, log), Recorder("b", 1.0, 0.0, log))
    a.methods[0].count, a.methods[1].count = 2, 5
    state = roundtrip(a.state_dict())
    assert sorted(state) == ["0:a", "1:b"]
    b = Compose(Recorder("a", 1.0, 0.0, log), Recorder("b", 1.0, 0.0, log))
    b.load_state_dict(state)
    assert [m.count for m in b.methods] == [2, 5]
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"0:a": state["0:a"]})


def test_compose_bad_arguments_and_dropout() -> None:
    log: list[str] = []
    with pytest.raises(ValueError, match="at least two"):
        Compose(Recorder("a", 1.0, 0.0, log))
    part = Recorder("a", 1.0, 0.0, log)
    with pytest.raises(ValueError, match="twice"):
        Compose(part, part)
    with pytest.raises(ValueError, match="Method"):
        Compose(part, "replay")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout"):
        Compose(Recorder("a", 1, 0, log, dropout=0.2), Recorder("b", 1, 0, log, dropout=0.5))
    assert Compose(Recorder("a", 1, 0, log), Recorder("b", 1, 0, log, dropout=0.5)).dropout == 0.5


def test_ewc_plus_replay_runs_in_a_hand_loop() -> None:
    from ewc.methods.regularizers import EWCMethod

    model = make_model()
    scenario = Scenario("task", CLASSES)
    method = Compose(EWCMethod(lam=10.0), ReplayMethod(capacity=6))
    assert method.name == "ewc+replay"
    method.setup(model, scenario)
    for k in range(2):
        task = make_task(k)
        method.before_task(k, task)
        loss = step(method, model, scenario, task.x_train, task.y_train, k)
        assert torch.isfinite(loss)
        method.after_task(k, task)
    assert method.memory_bytes() >= method.methods[1].memory_bytes() > 0
    state = roundtrip(method.state_dict())
    again = Compose(EWCMethod(lam=10.0), ReplayMethod(capacity=6))
    again.setup(model, scenario)
    again.load_state_dict(state)
    torch.testing.assert_close(again.methods[1].memory.get(), method.methods[1].memory.get())


# ------------------------------------------------------------------------------- end to end


def test_replay_and_ewc_plus_replay_through_the_trainer() -> None:
    from ewc.data import load_dataset, make_sequence
    from ewc.methods.regularizers import EWCMethod
    from ewc.train import TrainConfig, run_method

    tasks = make_sequence(
        load_dataset("mnist-10k"), "split", 3, max_train_per_task=200, max_eval_per_task=100
    )
    config = TrainConfig(
        epochs=2, batch_size=20, lr=1e-2, optimizer="sgd", hidden=(32,), eval_every=1000,
        curve_samples=50, fisher_samples=100, progress=False,
    )  # fmt: skip
    old = {}
    for method in (
        Method(),
        ReplayMethod(capacity=120),
        Compose(EWCMethod(lam=10.0), ReplayMethod(capacity=120)),
    ):
        result = run_method(tasks, method, config, scenario="class")
        old[method.name] = sum(result["accuracy_matrix"][-1][:2]) / 2
        if method.name != "sgd":  # 120 samples of 784 float32 + label, task, slot
            assert result["memory_bytes"] >= 120 * (784 * 4 + 3 * 8)
    # class-incremental fine-tuning forgets the old tasks entirely; rehearsal keeps some of them
    assert old["sgd"] < 0.1
    assert old["replay"] > old["sgd"] + 0.2 and old["ewc+replay"] > old["sgd"] + 0.2
