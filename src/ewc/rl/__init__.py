"""Continual reinforcement learning: a DQN agent with EWC over a sequence of MinAtar games.

``env`` (padded MinAtar games, full action set), ``qnet`` (Q-network with per-task gains and
biases), ``replay`` (per-task circular buffers), ``config`` (``DQNConfig``), ``consolidation``
(the policy Fisher EWC anchors with, ``PolicyEWC``), ``method`` (the ``Method`` an agent runs:
policy EWC, l2, si, mas or sgd), ``dqn`` (``Agent``), ``agent`` (every public name above,
and ``train_sequence``), ``protocol`` (schedule, normalised scores, forgetting, reference cache of
``ewc rl``) and ``perturb`` (the Fisher perturbation test). Needs the optional ``minatar`` package
(``pip install 'ewc[rl]'``, or ``pip install --no-deps minatar`` without its GUI dependencies).
See docs/rl.md.
"""

from ewc.rl.agent import Agent, DQNConfig, policy_fisher, td_targets, train_sequence
from ewc.rl.env import GAMES, Game, random_policy_score
from ewc.rl.qnet import QNetwork
from ewc.rl.replay import ReplayBuffer, TaskReplay

__all__ = [
    "GAMES",
    "Agent",
    "DQNConfig",
    "Game",
    "QNetwork",
    "ReplayBuffer",
    "TaskReplay",
    "policy_fisher",
    "random_policy_score",
    "td_targets",
    "train_sequence",
]
