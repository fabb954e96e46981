"""The agent's hyper-parameters (:class:`DQNConfig`), the methods it can run, and derived seeds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from ewc.checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Boolean,
    Interval,
)
from ewc.config import default_of, param, validate
from ewc.methods import METHOD_SPECS, make_method
from ewc.rl.env import GAMES

__all__ = [
    "AGENT_METHODS",
    "LATER_FIELDS",
    "REFUSED",
    "DQNConfig",
    "config_key",
    "derive_seed",
    "saved_config",
]

UNIT = Interval(float, 0, 1)  # a discount or a probability
EWC_MODES = ("separate", "online")

#: the methods the agent runs: ``ewc`` is the paper's policy EWC (:class:`ewc.rl.consolidation.PolicyEWC`,
#: set by the ``ewc_*`` / ``fisher_*`` fields); the others are the registered methods of that name
AGENT_METHODS = ("ewc", "sgd", "l2", "si", "mas")
#: why a registered method cannot run in the agent (any other one not in AGENT_METHODS: ``_OTHER``)
REFUSED = {
    "online-ewc": "the agent's EWC is method='ewc' (policy Fisher on replay states); set ewc_mode='online'",
    "dropout": "it sets the model's dropout rate and the Q-network has no dropout",
    "lwf": "it distils earlier tasks' output heads on labelled batches; the agent has one Q head, no labels",
    "replay": "it replays labelled samples through a classification loss",
    "ewc+replay": "it replays labelled samples through a classification loss",
    "gem": "it constrains gradients with labelled samples of earlier tasks",
    "agem": "it constrains gradients with labelled samples of earlier tasks",
    "joint": "it trains on the labelled data of every task so far",
    "joint-cumulative": "it trains on the labelled data of every task so far",
}
_OTHER = "it needs labelled data or output heads, which the DQN agent does not have"
#: fields added after agent checkpoints and reference caches were first written, at the value that
#: gives the earlier code's behaviour (a saved config without them reads as these)
LATER_FIELDS = ("method", "method_params", "detector_var_floor")


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
    detector_var_floor: float = param(
        1e-3, "least variance of a block feature within a task (see block_features)", check=NON_NEGATIVE
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
    seed: int = param(0, "seed of the agent (networks, exploration, replay)", check=SEED)
    device: str = param(
        "cpu", "where the networks and updates run ('cuda': a GPU; replay stays in CPU memory)"
    )
    method: str = param(
        "ewc", f"continual-learning method: {', '.join(AGENT_METHODS)} ('ewc': the policy EWC above)"
    )
    method_params: dict[str, Any] = param(
        help="parameters of a registered method (make_method); empty for 'ewc'", default_factory=dict
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
        self._check_method()

    def _check_method(self) -> None:
        """The method runs in the agent and its parameters build it (a one-line ValueError if not)."""
        name, params = self.method, self.method_params
        if name in REFUSED or (name in METHOD_SPECS and name not in AGENT_METHODS):
            raise ValueError(f"method {name!r} cannot run in the DQN agent: {REFUSED.get(name, _OTHER)}")
        if name not in AGENT_METHODS:
            raise ValueError(f"unknown method {name!r}; the DQN agent runs {', '.join(AGENT_METHODS)}")
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise ValueError(f"method_params must be a dict of parameter names, got {params!r}")
        if name == "ewc":
            if params:
                raise ValueError(
                    "method 'ewc' takes its settings from the ewc_*/fisher_* fields, not method_params"
                )
        else:
            make_method(name, **params)  # unknown parameters or bad values fail here


def saved_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict saved by any version (a checkpoint's, a record's) as ``asdict`` of today's
    :class:`DQNConfig` gives it: the :data:`LATER_FIELDS` it lacks take their defaults."""
    later = {f.name: default_of(f) for f in fields(DQNConfig) if f.name in LATER_FIELDS}
    return {**later, **saved}


def config_key(config: DQNConfig) -> dict[str, Any]:
    """``asdict(config)`` without the :data:`LATER_FIELDS` that are at their defaults, so that keys
    hashed from it (the reference cache) stay those of the earlier code for the same settings."""
    d = asdict(config)
    later = {f.name: default_of(f) for f in fields(DQNConfig) if f.name in LATER_FIELDS}
    return {k: v for k, v in d.items() if not (k in later and v == later[k])}


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (independent streams for episodes, evaluations, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
