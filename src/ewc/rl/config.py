"""The agent's hyper-parameters (:class:`DQNConfig`) and the seeds derived from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ewc.rl.env import GAMES

__all__ = ["DQNConfig", "derive_seed"]


@dataclass
class DQNConfig:
    """Hyper-parameters of :class:`Agent` (defaults: MinAtar DQN with Adam, see docs/rl.md)."""

    gamma: float = 0.99  # discount
    lr: float = 1e-4  # Adam learning rate
    adam_eps: float = 3.125e-4  # Adam epsilon (the value Obando-Ceron & Castro 2021 use on MinAtar)
    batch_size: int = 32
    replay_capacity: int = 100_000  # transitions per task context
    learning_starts: int = 5_000  # transitions in the current context's buffer before updates
    train_every: int = 1  # env steps per update
    target_update: int = 1_000  # env steps between target-network copies
    eps_start: float = 1.0
    eps_end: float = 0.1
    eps_decay_steps: int = 100_000  # per visit: the schedule restarts whenever a game is visited
    huber_delta: float = 1.0
    grad_clip: float = 10.0  # max global gradient norm (inf: no clipping)
    double_dqn: bool = True
    ewc_lam: float = 10.0  # λ with the Fisher normalised to mean 1 over shared parameters
    ewc_mode: str = "separate"  # or "online"
    ewc_gamma: float = 1.0  # online-mode decay
    ewc_min_steps: int = 50_000  # a visit's context is consolidated only after this many transitions
    fisher_temperature: float = 1.0  # τ of the Boltzmann policy softmax(Q/τ)
    fisher_samples: int = 1_024  # replay states the Fisher is averaged over
    detect_every: int = 64  # block length (observations) for the task detector
    detector_temperature: float = 1.0  # divides block log-likelihoods (one sample per block)
    detector_hazard: float = 0.02  # prior probability of a task switch between two blocks
    detector_kappa0: float = 0.1  # prior precision of a task's mean features (see block_features)
    true_task_labels: bool = True  # context = game index; False: TaskDetector ids
    max_tasks: int = 10  # task-context slots of the network (and the detector's cap)
    conv_channels: int = 16
    hidden: int = 128
    sticky_action_prob: float = 0.1
    seed: int = 0
    device: str = "cpu"  # where the networks and updates run ("cuda": a GPU; replay stays in CPU memory)

    def __post_init__(self) -> None:
        def number(name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
                left, right = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {v!r}")

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        number("gamma", 0.0, 1.0)
        number("lr", 0.0, math.inf, lo_open=True, hi_open=True)
        number("adam_eps", 0.0, math.inf, lo_open=True, hi_open=True)
        for name in (
            "batch_size",
            "replay_capacity",
            "train_every",
            "target_update",
            "eps_decay_steps",
            "fisher_samples",
            "detect_every",
            "max_tasks",
            "conv_channels",
            "hidden",
        ):
            integer(name, 1)
        for name in ("learning_starts", "ewc_min_steps", "seed"):
            integer(name, 0)
        number("eps_start", 0.0, 1.0)
        number("eps_end", 0.0, 1.0)
        number("huber_delta", 0.0, math.inf, lo_open=True, hi_open=True)
        number("grad_clip", 0.0, math.inf, lo_open=True)
        number("ewc_lam", 0.0, math.inf, hi_open=True)
        number("ewc_gamma", 0.0, 1.0, lo_open=True)
        number("fisher_temperature", 0.0, math.inf, lo_open=True, hi_open=True)
        number("sticky_action_prob", 0.0, 1.0, hi_open=True)
        number("detector_temperature", 0.0, math.inf, lo_open=True, hi_open=True)
        number("detector_hazard", 0.0, 1.0, lo_open=True, hi_open=True)
        number("detector_kappa0", 0.0, math.inf, lo_open=True, hi_open=True)
        if self.ewc_mode not in ("separate", "online"):
            raise ValueError(f"ewc_mode must be 'separate' or 'online', got {self.ewc_mode!r}")
        for name in ("double_dqn", "true_task_labels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
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
