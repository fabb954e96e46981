"""StreamLearner: continual learning on an unlabelled-task stream (mnist-10k, 3 permuted tasks)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ewc.data import load_dataset, make_sequence
from ewc.methods import Method, make_method
from ewc.stream import StreamLearner
from ewc.taskid import TaskDetector
from ewc.taskid_eval import make_stream

torch.set_num_threads(1)

SCHEDULE = [0, 1, 0, 2]


@pytest.fixture(scope="module")
def tasks():
    return make_sequence(load_dataset("mnist-10k"), "permuted", 3, seed=0)


@pytest.fixture(scope="module")
def stream(tasks):
    batches, true_ids = make_stream(tasks, SCHEDULE, batch_size=32, seed=0, min_len=15, max_len=25)
    return batches, true_ids


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def _learner(method="ewc", seed: int = 0, **params) -> StreamLearner:
    return StreamLearner(_model(seed), method, memory=300, lr=0.003, optimizer="adam", method_params=params)


class Spy(Method):
    """Records the hook calls the learner makes."""

    name = "spy"

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []

    def before_task(self, index, task):
        self.calls.append(("before", index, len(task.y_train)))

    def after_task(self, index, task):
        assert task.index == index and len(task.x_train) == len(task.y_train)
        assert len(task.x_val) == 0 and len(task.x_test) == 0
        self.calls.append(("after", index, len(task.y_train)))


def _switches(ids):
    return [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]


def test_ids_follow_detector_and_hooks_at_switches(stream):
    batches, true_ids = stream
    reference = TaskDetector()
    expected = [reference.update(x) for x, _ in batches]
    spy = Spy()
    learner = StreamLearner(_model(), spy, memory=100)
    ids = [learner.partial_fit(x, y) for x, y in batches]
    assert ids == expected == true_ids  # permuted tasks: the detector is exact on this stream
    # before_task at every start, after_task (on the last 100 samples) for every task left
    starts = [0, *_switches(ids)]
    befores = [(c[1]) for c in spy.calls if c[0] == "before"]
    afters = [(c[1], c[2]) for c in spy.calls if c[0] == "after"]
    assert befores == [ids[s] for s in starts]
    assert afters == [(ids[s - 1], 100) for s in _switches(ids)]
    assert learner.consolidations == [0, 1, 0]
    learner.finish()
    assert learner.consolidations == [0, 1, 0, 2]


def test_ewc_returning_task_replaces_its_own_term(stream):
    batches, true_ids = stream
    learner = _learner("ewc", lam=100.0)
    reg = learner.method.reg
    back = _switches(true_ids)[1]  # first batch of task 0's return
    for x, y in batches[:back]:
        learner.partial_fit(x, y)
    assert reg.keys == (0,)  # task 1 is still running; terms are keyed by their task
    anchor1 = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    # task 0 returns: task 1 is consolidated at its final parameters, task 0's own term dropped
    learner.partial_fit(*batches[back])
    assert reg.keys == (1,)
    kept = reg.anchors(1)
    assert all(torch.equal(kept[n], anchor1[n]) for n in anchor1)
    with torch.no_grad():
        assert float(reg.penalty()) > 0
    for x, y in batches[back + 1 :]:
        learner.partial_fit(x, y)
    # task 0 left again: re-consolidated at its new parameters, one term per task
    assert reg.keys == (1, 0) and reg.num_tasks == 2
    assert learner.consolidations == [0, 1, 0]


def test_state_saved_before_term_keys_resumes_with_its_owners(stream):
    """Old states: penalty terms keyed 0, 1, ... and the owners beside them in "owners"."""
    batches, true_ids = stream
    start = _switches(true_ids)[2] + 1  # task 2 began: the terms are owned by tasks 1 and 0, in order
    a = _learner("ewc", lam=100.0)
    for x, y in batches[:start]:
        a.partial_fit(x, y)
    assert a.method.reg.keys == (1, 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # a copy: the optimiser's state_dict shares a's tensors
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    state["method"] = {k: v for k, v in state["method"].items() if k != "keys"}
    state["owners"] = {"0": [1, 0]}
    b = _learner("ewc", lam=100.0, seed=1)
    b.load_state_dict(state)
    assert b.method.reg.keys == (1, 0)
    for x, y in batches[start:]:
        assert a.partial_fit(x, y) == b.partial_fit(x, y)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="separate-penalty parts"):
        _learner("ewc").load_state_dict({**state, "owners": {"0": [1, 0, 2]}})


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("online-ewc", {"lam": 100.0}),
        ("si", {"c": 1.0}),
        ("mas", {"lam": 10.0}),
        ("replay", {"capacity": 200}),
        ("ewc+replay", {"lam": 100.0, "capacity": 200}),
    ],
)
def test_methods_consolidate_and_learn(stream, tasks, method, params):
    batches, true_ids = stream
    learner = _learner(method, **params)
    hits = []
    for x, y in batches:
        pred = learner.predict(x) if learner.n_batches else None
        assert learner.partial_fit(x, y) == learner.detector.current
        if pred is not None:
            hits.append(float((pred == y).float().mean()))
    assert learner.consolidations == [0, 1, 0]
    parts = learner.method.methods if method == "ewc+replay" else (learner.method,)
    for part in parts:
        if hasattr(part, "reg"):
            expected = 2 if part.reg.mode == "separate" else 3  # separate: one term per task
            assert part.reg.num_tasks == expected
        if hasattr(part, "memory"):
            assert 0 < len(part.memory) <= 200
    # prequential accuracy over the second half of the stream: well above chance
    assert sum(hits[len(hits) // 2 :]) / len(hits[len(hits) // 2 :]) > 0.5
    for t in tasks:
        assert float((learner.predict(t.x_test) == t.y_test).float().mean()) > 0.3


@pytest.mark.parametrize("method", ["ewc+replay", "si"])
def test_state_round_trip_resumes_exactly(stream, tasks, method):
    batches, _ = stream
    half = len(batches) // 2
    a = _learner(method)
    for x, y in batches[:half]:
        a.partial_fit(x, y)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _learner(method, seed=1)  # another initialisation, fresh detector and method
    b.load_state_dict(torch.load(buf, weights_only=True))
    ids_a = [a.partial_fit(x, y) for x, y in batches[half:]]
    ids_b = [b.partial_fit(x, y) for x, y in batches[half:]]
    assert ids_a == ids_b
    assert a.consolidations == b.consolidations
    x = torch.cat([t.x_test[:200] for t in tasks])
    assert torch.equal(a.predict(x), b.predict(x))
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_predict_and_detector_predict_do_not_change_state(stream, tasks):
    batches, true_ids = stream
    learner = _learner("ewc")
    assert learner.detector.predict(batches[0][0]) == -1
    for x, y in batches:
        learner.partial_fit(x, y)
    det = learner.detector
    n, hist, counts = det.n_batches, len(det.history), det._count.clone()
    learner.model.train()
    for k, t in enumerate(tasks):
        assert learner.detector.predict(t.x_test[:64]) == k  # true task k got id k on this stream
        assert learner.predict(t.x_test[:10]).shape == (10,)
    assert learner.model.training
    assert det.n_batches == n and len(det.history) == hist and torch.equal(det._count, counts)


def test_retracted_tentative_task_is_not_consolidated(tasks):
    x0, y0 = tasks[0].x_train, tasks[0].y_train
    x2, y2 = tasks[2].x_train, tasks[2].y_train
    batches = [(x0[i : i + 32], y0[i : i + 32]) for i in range(0, 320, 32)]
    batches += [(x2[:32], y2[:32])]  # one odd batch: a tentative new id, then retracted
    batches += [(x0[i : i + 32], y0[i : i + 32]) for i in range(320, 480, 32)]
    learner = _learner("ewc")
    ids = [learner.partial_fit(x, y) for x, y in batches]
    assert ids[10] == 1 and set(ids[:10] + ids[11:]) == {0}
    assert learner.detector.retracted == 1
    assert learner.consolidations == [0]  # task 0 left for the odd batch; id 1 never consolidated
    assert learner.method.reg.keys == ()  # task 0 is back: its own term is dropped while it trains
    learner.finish()
    assert learner.consolidations == [0, 0] and learner.method.reg.keys == (0,)


def test_bad_input(stream):
    batches, _ = stream
    learner = _learner("ewc")
    x, y = batches[0]
    learner.partial_fit(x, y)
    state = learner.detector.n_batches
    with pytest.raises(ValueError, match="feature shape changed"):
        learner.partial_fit(x.reshape(len(x), -1)[:, :700], y)
    with pytest.raises(ValueError, match="empty batch"):
        learner.partial_fit(x[:0], y[:0])
    with pytest.raises(ValueError, match="one label per row of x"):
        learner.partial_fit(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        learner.partial_fit(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="empty batch"):
        learner.predict(x[:0])
    assert learner.detector.n_batches == state and learner.n_batches == 1
    with pytest.raises(ValueError, match="memory"):
        StreamLearner(_model(), "ewc", memory=0)
    with pytest.raises(ValueError, match="method_params"):
        StreamLearner(_model(), make_method("sgd"), method_params={"lam": 1.0})
    other = _learner("si")
    with pytest.raises(ValueError):
        other.load_state_dict(learner.state_dict())


def test_given_task_ids_are_the_control(stream):
    """With task_id given the learner follows it, never asks its detector, and equals a learner
    whose detector happens to infer the same ids (permuted: exact) step for step."""
    batches, true_ids = stream
    shifted = [t + 7 for t in true_ids]  # any ids work; inferred ones start at 0
    given, inferred = _learner("ewc"), _learner("ewc")
    ids = [given.partial_fit(x, y, task_id=t) for (x, y), t in zip(batches, shifted, strict=True)]
    assert ids == shifted and given.detector.n_batches == 0
    assert [inferred.partial_fit(x, y) for x, y in batches] == true_ids
    assert given.consolidations == [t + 7 for t in inferred.consolidations]
    for a, b in zip(given.model.parameters(), inferred.model.parameters(), strict=True):
        assert torch.equal(a, b)
    x, y = batches[0]
    with pytest.raises(ValueError, match="for every batch or for none"):
        given.partial_fit(x, y)
    with pytest.raises(ValueError, match="for every batch or for none"):
        inferred.partial_fit(x, y, task_id=0)
    with pytest.raises(ValueError, match="non-negative int"):
        _learner("ewc").partial_fit(x, y, task_id=-1)
    buffer = io.BytesIO()
    torch.save(given.state_dict(), buffer)
    buffer.seek(0)
    resumed = _learner("ewc")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    with pytest.raises(ValueError, match="for every batch or for none"):
        resumed.partial_fit(x, y)


def _copied(state: dict) -> dict:
    """A deep copy of a state, as a resumed run would read it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a, b) -> bool:
    """Equal nested dicts / lists / tensors (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _corrupt(kind: str, state: dict) -> dict:
    if kind == "model shape":
        state["model"]["3.weight"] = torch.zeros(10, 31)
    elif kind == "model key":
        state["model"]["9.weight"] = state["model"].pop("3.weight")
    elif kind == "optimizer groups":
        state["optimizer"]["param_groups"][0]["params"] = [0]
    elif kind == "method state":  # a negative Fisher, found by the penalty after the model loaded
        fisher = state["method"]["tasks"][0]["fisher"]
        fisher["1.weight"] = -torch.ones_like(fisher["1.weight"])
    elif kind == "detector state":
        del state["detector"]["counters"]["current"]
    elif kind == "buffer":
        x, y = state["buffer"]
        state["buffer"] = (x, y[:-1])
    elif kind == "counter":
        state["n_batches"] = None
    elif kind == "owners":
        state["owners"] = {"0": [5, 6, 7]}
    return state


@pytest.mark.parametrize(
    "kind",
    [
        "other method",
        "other method, old state",
        "model shape",
        "model key",
        "optimizer groups",
        "method state",
        "detector state",
        "buffer",
        "counter",
        "owners",
    ],
)
def test_failed_load_leaves_the_learner_unchanged(stream, kind: str) -> None:
    """Everything is checked before anything is loaded: a state that does not fit raises
    ValueError, and model, optimiser, penalty, detector and counters are exactly as before."""
    batches, true_ids = stream
    start = _switches(true_ids)[1] + 3  # two tasks consolidated, a third one training
    learner, source = _learner("ewc", lam=100.0), _learner("ewc", lam=100.0, seed=1)
    if kind.startswith("other method"):
        source = _learner("si", c=1.0)
    for x, y in batches[:start]:
        learner.partial_fit(x, y)
    for x, y in batches[: start + 2]:
        source.partial_fit(x, y)
    state = _copied(source.state_dict())
    if kind == "other method, old state":
        del state["method_name"]  # states saved before the name was recorded: the trial load tells
    state = _corrupt(kind, state)
    before = _copied(learner.state_dict())
    value = float(learner.method.reg.penalty().detach())
    params = [p.detach().clone() for p in learner.model.parameters()]
    with pytest.raises(ValueError):
        learner.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(learner.model.parameters(), params, strict=True))
    assert float(learner.method.reg.penalty().detach()) == value
    assert _same(learner.state_dict(), before)  # optimiser, penalty terms, detector, buffer, counters
    # and the learner goes on as if nothing happened: like one that never saw the bad state
    twin = _learner("ewc", lam=100.0)
    twin.load_state_dict(before)
    for x, y in batches[start : start + 3]:
        assert learner.partial_fit(x, y) == twin.partial_fit(x, y)
    assert all(
        torch.equal(p, q) for p, q in zip(learner.model.parameters(), twin.model.parameters(), strict=True)
    )
