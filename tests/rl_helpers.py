"""The small DQN agent configuration the RL tests share: updates start after 64 transitions, EWC
after 100 steps, a 32-unit network; a test passes ``tiny_dqn(field=value)`` to change a field."""

from __future__ import annotations

from typing import Any

from ewc.rl.agent import DQNConfig

TINY_FIELDS: dict[str, Any] = {
    "replay_capacity": 500,
    "learning_starts": 64,
    "target_update": 50,
    "eps_decay_steps": 200,
    "ewc_min_steps": 100,
    "fisher_samples": 128,
    "hidden": 32,
    "conv_channels": 8,
    "detect_every": 32,
    "seed": 3,
}


def tiny_dqn(**changes: Any) -> DQNConfig:
    """:data:`TINY_FIELDS` as a ``DQNConfig``, with ``changes`` applied."""
    return DQNConfig(**{**TINY_FIELDS, **changes})
