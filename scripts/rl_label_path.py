"""Does the inferred-label agent train like the true-label one when its labels are right? (issue #19)

The full protocol's ``ewc`` agent (detector settings of ``FULL_PROTOCOL``) and ``ewc-true-labels``
agent differ in more than the labels: the inferred agent stores a transition only once its block
of ``detect_every`` steps is labelled, and makes no update before a visit's first block is. This
script trains three agents of the same seed on the same visits: ``ewc-true-labels``, ``ewc`` with
its detector, and ``ewc`` with a stand-in detector that returns each game's order of first
appearance (the right context, never retracted). It prints the contexts, the update counts and
the largest difference of each inferred agent's shared weights to the true-label agent's, per
layer, and whether the two inferred agents' weights are identical.

    PYTHONPATH=src python scripts/rl_label_path.py --seed 0 --steps 6000 --games freeway
"""

from __future__ import annotations

import argparse

import torch

from ewc.experiments.rl_config import FULL_PROTOCOL, Config, dqn_config
from ewc.rl.dqn import Agent


class RightLabels:
    """Stands in for the agent's ``TaskDetector``: the current game's order of first appearance."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.order = agent, []
        self.retracted = self.cap_hits = 0
        self.history: list[dict] = []

    @property
    def num_tasks(self) -> int:
        return len(self.order)

    def update(self, block: torch.Tensor) -> int:
        if self.agent.game_name not in self.order:
            self.order.append(self.agent.game_name)
        return self.order.index(self.agent.game_name)

    def predict(self, block: torch.Tensor) -> int:
        name = self.agent.game_name
        return self.order.index(name) if name in self.order else 0


def train(agent: Agent, games: list[str], steps: int) -> dict[str, list[str]]:
    """Each game in turn for ``steps`` env steps; the contexts each visit used."""
    contexts = {}
    for game in games:
        agent.begin_visit(game)
        for _ in range(steps):
            agent.step()
        contexts[game] = list(agent.end_visit()["contexts"])
    return contexts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=6000, help="env steps per visit")
    p.add_argument("--games", default="freeway", help="visits in order, comma separated")
    a = p.parse_args()
    torch.set_num_threads(1)
    games = a.games.split(",")
    config = Config(
        **{k: FULL_PROTOCOL[k] for k in ("detector_hazard", "detector_kappa0", "detector_var_floor")}
    )
    true = Agent(dqn_config(config, "ewc-true-labels", a.seed))
    agents = {
        "detector": Agent(dqn_config(config, "ewc", a.seed)),
        "right labels": Agent(dqn_config(config, "ewc", a.seed)),
    }
    agents["right labels"].detector = RightLabels(agents["right labels"])
    print(f"ewc-true-labels: contexts {train(true, games, a.steps)}, {true.updates} updates")
    # the shared layers only: the task rows differ by construction (true labels train the row of
    # the game's index in GAMES, inferred ones the row of the order in which games appeared)
    reference = {k: v for k, v in true.qnet.state_dict().items() if not k.startswith("task_")}
    for name, agent in agents.items():
        contexts = train(agent, games, a.steps)
        worst: dict[str, float] = {}
        for key, value in agent.qnet.state_dict().items():
            if key not in reference:
                continue
            kind = key.split(".")[0]
            worst[kind] = max(worst.get(kind, 0.0), float((value - reference[key]).abs().max()))
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        print(
            f"ewc with {name}: contexts {contexts}, {agent.updates} updates; "
            f"max |shared weight - true-label agent's|: {diffs}"
        )
    wa, wb = (agents[k].qnet.state_dict() for k in agents)
    same = all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"ewc with detector vs ewc with right labels: {'identical' if same else 'different'} weights")


if __name__ == "__main__":
    main()
