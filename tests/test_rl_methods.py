"""The DQN agent runs any method that makes sense without labels (ewc.rl.method): l2, si, mas and
sgd beside the default policy EWC; the others are refused by DQNConfig."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

pytest.importorskip("minatar")

from rl_helpers import tiny_dqn  # noqa: E402

from ewc.methods import METHOD_SPECS, L2Method, MASMethod  # noqa: E402
from ewc.rl.agent import Agent, DQNConfig, PolicyEWC  # noqa: E402
from ewc.rl.config import AGENT_METHODS  # noqa: E402
from ewc.rl.consolidation import ContextVisit  # noqa: E402
from ewc.rl.env import GAMES  # noqa: E402
from ewc.rl.method import VisitSI  # noqa: E402
from ewc.rl.qnet import QNetwork, SharedView  # noqa: E402

torch.set_num_threads(1)

# the shared tiny agent, with its Fisher on 64 states and the default consolidation / detector timing
TINY = tiny_dqn(
    fisher_samples=64, ewc_min_steps=DQNConfig().ewc_min_steps, detect_every=DQNConfig().detect_every
)


def _visits(agent: Agent, plan: list[tuple[str, int]]) -> list[dict]:
    out = []
    for game, steps in plan:
        agent.begin_visit(game)
        for _ in range(steps):
            agent.step()
        out.append(agent.end_visit())
    return out


@pytest.mark.parametrize(
    ("method", "params", "cls"),
    [("l2", {"lam": 1.0}, L2Method), ("si", {"c": 1.0}, VisitSI), ("mas", {"max_samples": 32}, MASMethod)],
)
def test_agent_trains_with_a_registered_method(tmp_path, method: str, params: dict, cls: type) -> None:  # noqa: ANN001
    agent = Agent(replace(TINY, method=method, method_params=params))
    assert isinstance(agent.method, cls)
    shared = set(agent.qnet.shared_parameter_names())
    summaries = _visits(agent, [("breakout", 120), ("asterix", 120)])
    b, a = GAMES.index("breakout"), GAMES.index("asterix")
    assert [s["consolidated"] for s in summaries] == [[b], [a]]
    reg = agent.method.reg
    assert set(reg.precisions()) == shared  # gains and biases are never anchored
    agent.begin_visit("breakout")
    for _ in range(30):
        agent.step()
    assert agent.updates > 0 and float(agent.method.loss(torch.zeros(())).detach()) > 0

    path = tmp_path / "agent.pt"
    agent.save(path)
    loaded = Agent.load(path)
    obs = torch.stack([agent.replay.buffer(b).observations(8, torch.Generator().manual_seed(0))])[0]
    for ctx in (a, b):
        assert torch.equal(loaded.qnet(obs, ctx), agent.qnet(obs, ctx))
    assert torch.equal(loaded.method.reg.penalty(), agent.method.reg.penalty())
    if method == "l2":  # separate: one term per context, the returning one's dropped while it trains
        assert reg.keys == (a,) and loaded.method.reg.keys == (a,)


def test_sgd_runs_without_a_penalty() -> None:
    agent = Agent(replace(TINY, method="sgd"))
    summaries = _visits(agent, [("breakout", 100)])
    assert summaries[0]["consolidated"] == [GAMES.index("breakout")] and agent.updates > 0


@pytest.mark.parametrize("name", sorted(set(METHOD_SPECS) - set(AGENT_METHODS)))
def test_methods_needing_labels_or_heads_are_refused(name: str) -> None:
    pattern = rf"^method '{re.escape(name)}' cannot run in the DQN agent: \S"
    with pytest.raises(ValueError, match=pattern) as info:
        DQNConfig(method=name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method_params": {"lam": 1.0}}, "method 'ewc' takes its settings"),
        ({"method": "l2", "method_params": {"c": 1.0}}, "has no parameter"),
        ({"method": "si", "method_params": {"c": -1.0}}, "SI strength"),
        ({"method": "l2", "method_params": [1]}, "method_params must be a dict"),
    ],
)
def test_bad_method_settings_raise(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DQNConfig(**change)


def _visit(ctx: int, steps: int, states: torch.Tensor) -> ContextVisit:
    return ContextVisit(ctx, steps, len(states), lambda: states)


def test_policy_ewc_sets_aside_restores_and_forgets_a_retracted_context() -> None:
    torch.manual_seed(0)
    net = QNetwork(10, 6, num_tasks=3, conv_channels=4, hidden=8)
    method = PolicyEWC(lam=1.0, min_steps=10)
    method.setup(SharedView(net))
    states = torch.rand(16, 10, 10, 10).round()
    for ctx in (0, 1):
        visit = _visit(ctx, 10, states)
        method.after_task(ctx, visit)
        assert visit.outcome == ["consolidated"]
    method.forget_task(0)  # 0 returns: its term is set aside
    assert method.owners == [1] and set(method.set_aside) == {0}
    visit = _visit(0, 9, states)  # too short to re-consolidate: put back unchanged
    method.after_task(0, visit)
    assert visit.outcome == ["restored"] and method.owners == [1, 0] and not method.set_aside
    method.forget_task(0)
    method.forget_task(0)  # retracted while active: the set-aside term is discarded
    visit = _visit(0, 9, states)
    method.after_task(0, visit)
    assert visit.outcome == [] and method.owners == [1]


def test_visit_si_consolidates_once_per_visit_over_several_contexts() -> None:
    net = QNetwork(10, 6, num_tasks=3, conv_channels=4, hidden=8)
    method = VisitSI(c=1.0)
    method.setup(SharedView(net))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.rand(4, 10, 10, 10).round()
    method.before_task(0, None)
    method.before_task(1, None)  # a second context of the same visit shares the path integral
    for ctx in (0, 1):
        opt.zero_grad()
        net(x, ctx).square().mean().backward()
        method.after_backward()
        opt.step()
        method.after_step()
    method.after_task(0, None)
    method.after_task(1, None)
    assert method.reg.num_tasks == 1 and set(method.reg.precisions()) == set(net.shared_parameter_names())
