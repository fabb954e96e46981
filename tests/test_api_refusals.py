"""Issue #16, item 8: inputs the library used to answer silently (or half-apply) are refused.

1. ``diagonal_fisher(model, [xb1, xb2])``: a list is a list of batches (the ``(X, y)`` pair is a
   tuple); a list that looks like ``[X, y]`` is an error, not a Fisher of the inputs alone.
2. Stream labels are checked before anything is counted: out of range of the model's outputs, or
   past the detector's ``max_classes``, is a ValueError and the learner / detector are unchanged.
3. A ``load_state_dict`` that fails leaves the object (and the model) exactly as it was.
4. Non-finite saved weights or statistics are refused, naming the key.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import same_state
from torch import nn

from ewc import EWC, diagonal_fisher
from ewc.checkpoint import load_checkpoint, save_checkpoint
from ewc.data import Task
from ewc.memory import Memory
from ewc.methods import make_method
from ewc.scenario import Scenario
from ewc.stream import StreamLearner
from ewc.taskid import TaskDetector


def _copied(state: Any) -> Any:
    """A deep copy, as a file written and read back would give it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _task(index: int, n: int = 24, d: int = 6, classes: int = 3, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed + index)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    e = x[:0], y[:0]
    return Task(f"t{index}", index, x, y, *e, *e, tuple(range(classes)))


def _trained(name: str, **params: Any) -> tuple[nn.Module, Any]:
    """A small model and a method of ``name`` after one task (so that it has state)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    method = make_method(name, **params)
    method.setup(model, Scenario.shared(3))
    task = _task(0)
    method.before_task(0, task)
    out = model(task.x_train)
    loss = method.loss(nn.functional.cross_entropy(out, task.y_train))
    loss.backward()
    method.after_backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    method.after_step()
    method.after_task(0, task)
    return model, method


# ---------------------------------------------------------------------------------------------
# 1. the Fisher's data contract
# ---------------------------------------------------------------------------------------------


def test_a_list_of_two_unlabelled_batches_is_two_batches() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    got = diagonal_fisher(model, [a, b])
    want = diagonal_fisher(model, torch.cat([a, b]))
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_the_pair_is_a_tuple_and_a_list_that_looks_like_one_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    pair = diagonal_fisher(model, (x, y), "empirical")
    one_batch = diagonal_fisher(model, [(x, y)], "empirical")
    for name in pair:
        torch.testing.assert_close(pair[name], one_batch[name])
    with pytest.raises(ValueError, match=r"a list is a list of batches.*\(X, y\) pair as a tuple"):
        diagonal_fisher(model, [x, y], "empirical")


def test_ewc_consolidates_on_every_batch_of_a_list() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    listed, whole = EWC(model, lam=1.0), EWC(model, lam=1.0)
    listed.consolidate([a, b])
    whole.consolidate(torch.cat([a, b]))
    for name, f in whole.precisions(0).items():
        torch.testing.assert_close(listed.precisions(0)[name], f)


# ---------------------------------------------------------------------------------------------
# 2. stream labels
# ---------------------------------------------------------------------------------------------


def _stream_learner(**kw: Any) -> StreamLearner:
    torch.manual_seed(0)
    return StreamLearner(nn.Linear(4, 3), "ewc", memory=20, **kw)


@pytest.mark.parametrize("label", [3, 5, 10**12, 2**40])
def test_a_label_past_the_model_outputs_changes_nothing(label: int) -> None:
    learner = _stream_learner()
    g = torch.Generator().manual_seed(0)
    learner.partial_fit(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    before = _copied(learner.state_dict())
    y = torch.randint(0, 3, (8,), generator=g)
    y[2] = label
    with pytest.raises(ValueError, match=rf"y must be class labels in \[0, 3\).*got {label}"):
        learner.partial_fit(torch.randn(8, 4, generator=g), y)
    assert same_state(_copied(learner.state_dict()), before)


def test_the_first_batch_of_a_stream_is_checked_too() -> None:
    learner = _stream_learner()
    before = _copied(learner.state_dict())
    with pytest.raises(ValueError, match=r"class labels in \[0, 3\)"):
        learner.partial_fit(torch.randn(8, 4), torch.full((8,), 7))
    assert same_state(_copied(learner.state_dict()), before)


def test_num_classes_must_match_the_model_outputs() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        StreamLearner(nn.Linear(4, 3), "sgd", num_classes=5).partial_fit(
            torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
        )


@pytest.mark.parametrize("label", [10**12, 2**40])
def test_a_huge_label_is_refused_before_the_detector_counts_the_batch(label: int) -> None:
    det = TaskDetector()
    det.update(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    before = _copied(det.state_dict())
    with pytest.raises(ValueError, match=r"labels must be class indices < max_classes"):
        det.update(torch.randn(8, 4), torch.full((8,), label))
    assert same_state(_copied(det.state_dict()), before)


def test_max_classes_is_a_setting_and_is_saved() -> None:
    det = TaskDetector(max_classes=4)
    det.update(torch.randn(8, 4), torch.full((8,), 3))
    with pytest.raises(ValueError, match=r"max_classes \(4\), got 4"):
        det.update(torch.randn(8, 4), torch.full((8,), 4))
    assert det.n_batches == 1
    other = TaskDetector()
    other.load_state_dict(_copied(det.state_dict()))
    assert other.max_classes == 4
    with pytest.raises(ValueError, match="max_classes must be a positive integer"):
        TaskDetector(max_classes=0)


# ---------------------------------------------------------------------------------------------
# 3. and 4. a failed load changes nothing; non-finite state is refused
# ---------------------------------------------------------------------------------------------


def _detector() -> TaskDetector:
    det = TaskDetector(proj_dim=8)
    g = torch.Generator().manual_seed(0)
    for shift in (0.0, 0.0, 5.0, 5.0):
        det.update(torch.randn(16, 6, generator=g) + shift, torch.randint(0, 3, (16,), generator=g))
    return det


def _detector_corrupt(kind: str, state: dict) -> dict:
    if kind == "sum shape":
        state["sum"] = state["sum"][:, :3]
    elif kind == "count length":
        state["count"] = state["count"][:1]
    elif kind == "labels rows":
        state["labels"] = state["labels"][:1]
    elif kind == "proj shape":
        state["proj"] = state["proj"][:, :4]
    elif kind == "counter":
        state["counters"]["current"] = 9
    elif kind == "counter type":
        state["counters"]["n_batches"] = "many"
    elif kind == "config":
        state["config"]["hazard"] = 2.0
    elif kind == "missing counter":
        del state["counters"]["tentative"]
    elif kind == "nan sum":
        state["sum"][0, 0] = math.nan
    elif kind == "inf sumsq":
        state["sumsq"][1, 2] = math.inf
    elif kind == "nan scale":
        state["scale"][0] = math.nan
    elif kind == "negative count":
        state["count"][0] = -1.0
    return state


@pytest.mark.parametrize(
    "kind",
    [
        "sum shape",
        "count length",
        "labels rows",
        "proj shape",
        "counter",
        "counter type",
        "config",
        "missing counter",
        "nan sum",
        "inf sumsq",
        "nan scale",
        "negative count",
    ],
)
def test_a_detector_state_that_does_not_fit_changes_nothing(kind: str) -> None:
    det = _detector()
    before = _copied(det.state_dict())
    state = _detector_corrupt(kind, _copied(_detector().state_dict()))
    with pytest.raises(ValueError, match="TaskDetector state"):
        det.load_state_dict(state)
    assert same_state(_copied(det.state_dict()), before)


def test_a_detector_state_names_the_non_finite_key() -> None:
    state = _detector_corrupt("nan sum", _copied(_detector().state_dict()))
    with pytest.raises(ValueError, match=r"TaskDetector state 'sum' must be finite"):
        TaskDetector().load_state_dict(state)


def _poison(t: torch.Tensor, value: float = math.nan) -> None:
    """Set the first element of ``t`` to ``value``, in place."""
    t.view(-1)[0] = value


def _corrupt_method(kind: str, state: dict) -> None:
    if kind == "ewc nan anchor":
        _poison(state["tasks"][0]["anchor"]["0.weight"])
    elif kind == "si nan omega":
        _poison(state["omega"]["2.bias"], math.inf)
    elif kind == "lwf nan old model":
        _poison(state["old_model"]["0.weight"])
    elif kind == "lwf old model shape":
        state["old_model"]["2.weight"] = torch.zeros(3, 7)
    elif kind == "lwf old model key":
        del state["old_model"]["2.bias"]
    elif kind == "lwf tasks_done":
        state["tasks_done"] = "one"
    elif kind == "replay current":
        state["current"] = "x"
    elif kind == "replay nan memory":
        _poison(state["memory"]["x"])
    elif kind == "compose second part":  # the first part fits (other anchors), the second does not
        for name, a in state["0:ewc"]["tasks"][0]["anchor"].items():
            state["0:ewc"]["tasks"][0]["anchor"][name] = a + 1
        state["1:replay"]["current"] = None
    elif kind == "compose nan memory":
        for name, a in state["0:ewc"]["tasks"][0]["anchor"].items():
            state["0:ewc"]["tasks"][0]["anchor"][name] = a + 1
        _poison(state["1:replay"]["memory"]["x"], math.inf)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("ewc", "ewc nan anchor", "anchor of '0.weight' must be finite"),
        ("si", "si nan omega", r"SI state 'omega'\['2.bias'\] must be finite"),
        ("lwf", "lwf nan old model", r"lwf state 'old_model'\['0.weight'\] must be finite"),
        ("lwf", "lwf old model shape", r"lwf state 'old_model'\['2.weight'\] must have shape \(3, 8\)"),
        ("lwf", "lwf old model key", r"lwf state 'old_model' is missing \['2.bias'\]"),
        ("lwf", "lwf tasks_done", "lwf state 'tasks_done' must be a non-negative integer"),
        ("replay", "replay current", "replay state 'current' must be a non-negative integer"),
        ("replay", "replay nan memory", r"memory state 'x' must be finite"),
        ("ewc+replay", "compose second part", "replay state 'current' must be a non-negative integer"),
        ("ewc+replay", "compose nan memory", r"memory state 'x' must be finite"),
    ],
)
def test_a_method_state_that_does_not_fit_changes_nothing(name: str, kind: str, message: str) -> None:
    _, method = _trained(name)
    _, source = _trained(name)
    state = _copied(source.state_dict())
    _corrupt_method(kind, state)
    before = _copied(method.state_dict())
    params = [p.detach().clone() for p in method.model.parameters()]
    with pytest.raises(ValueError, match=message):
        method.load_state_dict(state)
    assert same_state(_copied(method.state_dict()), before)
    assert all(torch.equal(p, q) for p, q in zip(method.model.parameters(), params, strict=True))


def test_a_memory_state_that_does_not_fit_changes_nothing() -> None:
    memory = Memory(10)
    memory.add(torch.randn(12, 3), torch.randint(0, 2, (12,)), 0)
    state = _copied(memory.state_dict())
    state["y"] = state["y"].float()
    before = _copied(memory.state_dict())
    with pytest.raises(ValueError, match="memory state 'y' must be an integer tensor"):
        memory.load_state_dict(state)
    assert same_state(_copied(memory.state_dict()), before)


def _fitted_learner(seed: int = 0) -> StreamLearner:
    torch.manual_seed(seed)
    learner = StreamLearner(nn.Linear(4, 3), "ewc", memory=20, detector=TaskDetector(proj_dim=4))
    g = torch.Generator().manual_seed(seed)
    for shift in (0.0, 0.0, 4.0, 4.0, 4.0):
        learner.partial_fit(torch.randn(8, 4, generator=g) + shift, torch.randint(0, 3, (8,), generator=g))
    return learner


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("model", r"StreamLearner state 'model'\['weight'\] must be finite"),
        ("detector", r"TaskDetector state 'sumsq' must be finite"),
        ("buffer", r"StreamLearner state 'buffer' must be finite"),
    ],
)
def test_a_stream_state_with_nan_is_refused_and_changes_nothing(where: str, message: str) -> None:
    learner = _fitted_learner()
    state = _copied(_fitted_learner(seed=1).state_dict())
    if where == "model":
        state["model"]["weight"][0, 0] = math.nan
    elif where == "detector":
        state["detector"]["sumsq"][0, 0] = math.inf
    else:
        state["buffer"][0][0, 0] = math.nan
    before = _copied(learner.state_dict())
    with pytest.raises(ValueError, match=message):
        learner.load_state_dict(state)
    assert same_state(_copied(learner.state_dict()), before)


def _checkpoint(tmp_path: Path, corrupt: Any) -> Path:
    """A checkpoint of a small MLP trained with EWC on one task, its weights passed to ``corrupt``."""
    from ewc.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", (6,), 3, hidden=(8,))
    method = make_method("ewc", lam=1.0)
    scenario = Scenario("domain", [(0, 1, 2)])
    method.setup(model, scenario)
    method.after_task(0, _task(0))
    save_checkpoint(
        tmp_path / "ck.pt",
        model,
        method,
        name="ewc",
        params={"lam": 1.0},
        scenario=scenario,
        architecture={"model": "mlp", "input_dim": 6, "input_shape": [6], "num_classes": 3, "hidden": [8]},
    )
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    corrupt(ck["model"])
    torch.save(ck, tmp_path / "ck.pt")
    return tmp_path / "ck.pt"


def _first_weight(state: dict[str, torch.Tensor]) -> str:
    return next(k for k in state if k.endswith("weight"))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: _poison(s[_first_weight(s)]), r"checkpoint .* 'model'\['.*weight'\] must be finite"),
        (
            lambda s: s.update({_first_weight(s): torch.zeros(2, 2)}),
            r"checkpoint .* 'model'\['.*'\] must have shape",
        ),
        (lambda s: s.pop(_first_weight(s)), r"checkpoint .* 'model' is missing"),
    ],
)
def test_a_checkpoint_whose_weights_do_not_fit_is_a_value_error(
    tmp_path: Path, corrupt: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_checkpoint(_checkpoint(tmp_path, corrupt))


def test_a_checkpoint_loads_when_it_fits(tmp_path: Path) -> None:
    model, method, scenario = load_checkpoint(_checkpoint(tmp_path, lambda s: None))
    assert method.name == "ewc" and scenario.num_outputs == 3


def _agent(game: str) -> Any:
    pytest.importorskip("minatar")
    from ewc.rl.config import DQNConfig
    from ewc.rl.dqn import Agent

    config = DQNConfig(
        replay_capacity=200, learning_starts=32, target_update=50, eps_decay_steps=100, ewc_min_steps=40
    )
    agent = Agent(DQNConfig(**{**config.__dict__, "hidden": 16, "conv_channels": 4}))
    agent.begin_visit(game)
    for _ in range(60):
        agent.step()
    agent.end_visit()
    return agent


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan weight", r"agent state 'qnet'\['fc.weight'\] must be finite"),
        ("weight shape", r"agent state 'target'\['fc.weight'\] must have shape"),
        ("replay dtype", r"replay state 'rewards' must be torch.float32"),
        ("set aside", r"PolicyEWC state 'set_aside'"),
        ("counters", "agent state does not fit"),
    ],
)
def test_an_agent_state_that_does_not_fit_changes_nothing(kind: str, message: str) -> None:
    agent, state = _agent("breakout"), _copied(_agent("asterix").state_dict())
    if kind == "nan weight":
        _poison(state["qnet"]["fc.weight"])
    elif kind == "weight shape":
        state["target"]["fc.weight"] = state["target"]["fc.weight"][:, :3]
    elif kind == "replay dtype":
        buffers = state["replay"]["buffers"]
        first = next(iter(buffers))
        buffers[first]["rewards"] = buffers[first]["rewards"].double()
    elif kind == "set aside":
        state["method"]["set_aside"] = {"0": {"anchor": {}, "fisher": {}}}
    else:
        del state["counters"]["episodes"]
    before = _copied(agent.state_dict())
    with pytest.raises(ValueError, match=message):
        agent.load_state_dict(state)
    assert same_state(_copied(agent.state_dict()), before)
