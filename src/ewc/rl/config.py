"""The agent's hyper-parameters (:class:`DQNConfig`) and the seeds derived from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ewc.checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Boolean,
    Interval,
)
from ewc.config import param, validate
from ewc.rl.env import GAMES

__all__ = ["DQNConfig", "derive_seed"]

UNIT = Interval(float, 0, 1)  # a discount or a probability
EWC_MODES = ("separate", "online")


@dataclass
class DQNConfig:
    """Hyper-parameters of :class:`Agent` (defaults: MinAtar DQN with Adam, see docs/rl.md)."""

    gamma: float = param(0.99, "discount", check=UNIT)
    lr: float = param(1e-4, "Adam learning rate", check=POSITIVE)
    adam_eps: float = param(
        3.125e-4, "Adam epsilon (the value Obando-Ceron & Castro 2021 use on MinAtar)", check=POSITIVE
    )
    batch_size: int = param(32, "transitions per update", check=POSITIVE_INT)
    replay_capacity: int = param(100_000, "transitions per task context", check=POSITIVE_INT)
    learning_starts: int = param(
        5_000, "transitions in the current context's buffer before updates", check=NON_NEGATIVE_INT
    )
    train_every: int = param(1, "env steps per update", check=POSITIVE_INT)
    target_update: int = param(1_000, "env steps between target-network copies", check=POSITIVE_INT)
    eps_start: float = param(1.0, "ε of the behaviour policy at the start of a visit", check=UNIT)
    eps_end: float = param(0.1, "ε at the end of its decay", check=UNIT)
    eps_decay_steps: int = param(
        100_000, "env steps of the ε decay, restarted whenever a game is visited", check=POSITIVE_INT
    )
    huber_delta: float = param(1.0, "δ of the Huber TD loss", check=POSITIVE)
    grad_clip: float = param(
        10.0,
        "max global gradient norm (inf: no clipping)",
        check=Interval(float, 0, closed="neither", finite=False),
    )
    double_dqn: bool = param(True, "double DQN targets", check=Boolean())
    ewc_lam: float = param(
        10.0, "λ with the Fisher normalised to mean 1 over shared parameters", check=NON_NEGATIVE
    )
    ewc_mode: str = param("separate", "one penalty per context, or one merged (online)", choices=EWC_MODES)
    ewc_gamma: float = param(1.0, "online-mode decay", check=Interval(float, 0, 1, closed="right"))
    ewc_min_steps: int = param(
        50_000, "a visit's context is consolidated only after this many transitions", check=NON_NEGATIVE_INT
    )
    fisher_temperature: float = param(1.0, "τ of the Boltzmann policy softmax(Q/τ)", check=POSITIVE)
    fisher_samples: int = param(1_024, "replay states the Fisher is averaged over", check=POSITIVE_INT)
    detect_every: int = param(64, "block length (observations) for the task detector", check=POSITIVE_INT)
    detector_temperature: float = param(
        1.0, "divides block log-likelihoods (one sample per block)", check=POSITIVE
    )
    detector_hazard: float = param(
        0.02,
        "prior probability of a task switch between two blocks",
        check=Interval(float, 0, 1, closed="neither"),
    )
    detector_kappa0: float = param(
        0.1, "prior precision of a task's mean features (see block_features)", check=POSITIVE
    )
    true_task_labels: bool = param(True, "context = game index; False: TaskDetector ids", check=Boolean())
    max_tasks: int = param(
        10, "task-context slots of the network (and the detector's cap)", check=POSITIVE_INT
    )
    conv_channels: int = param(16, "filters of the Q-network's convolution", check=POSITIVE_INT)
    hidden: int = param(128, "hidden units of the Q-network", check=POSITIVE_INT)
    sticky_action_prob: float = param(
        0.1,
        "probability that the game repeats the previous action (MinAtar's sticky actions)",
        check=Interval(float, 0, 1, closed="left"),
    )
    seed: int = param(0, "seed of the agent (networks, exploration, replay)", check=NON_NEGATIVE_INT)
    device: str = param(
        "cpu", "where the networks and updates run ('cuda': a GPU; replay stays in CPU memory)"
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.true_task_labels and self.max_tasks < len(GAMES):
            raise ValueError(
                f"true_task_labels needs max_tasks >= {len(GAMES)} (one slot per game), got {self.max_tasks}"
            )
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.replay_capacity < self.batch_size:
            raise ValueError(
                f"replay_capacity ({self.replay_capacity}) must be >= batch_size ({self.batch_size})"
            )


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (independent streams for episodes, evaluations, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
