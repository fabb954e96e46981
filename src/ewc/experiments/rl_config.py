"""The settings of ``ewc rl`` (:class:`Config`, one declared field per flag) and the agent
configuration each method runs with (:func:`dqn_config`); the run itself is :mod:`ewc.experiments.rl`.

The full protocol of issue #19 (all five MinAtar games, every game visited at least twice,
dqn / ewc / ewc-true-labels / online-ewc, five seeds) is :data:`FULL_PROTOCOL`, the flags
``ewc rl`` takes for it; the defaults are a smaller schedule that runs in under 40 minutes on
2 cores (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ewc.checks import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, Interval, Numbers, Subset
from ewc.config import validate
from ewc.experiments.common import command_line, param
from ewc.rl.agent import DQNConfig
from ewc.rl.env import GAMES
from ewc.rl.protocol import AGENTS
from ewc.tracking import parse_names, track_param

__all__ = ["FULL_PROTOCOL", "METHODS", "Config", "command", "dqn_config"]

METHODS = tuple(AGENTS)

# ---- defaults: sized so that the default run fits in 40 min on 2 cores (docs/results.md) ----------
DEFAULT_GAMES = ("breakout", "space_invaders")
DEFAULT_VISITS = 3
DEFAULT_STEPS_PER_VISIT = 50_000
DEFAULT_ORDER_SEED = 0
DEFAULT_METHODS = ("dqn", "ewc", "ewc-true-labels")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_JOBS = 2
DEFAULT_EVAL_EVERY = 25_000
DEFAULT_EVAL_EPISODES = 30
DEFAULT_EVAL_EPSILON = 0.05
DEFAULT_CHECKPOINT_EVERY = 25_000
DEFAULT_LAM = 10.0
DEFAULT_LR = 1e-4
DEFAULT_TRAIN_EVERY = 2
DEFAULT_LEARNING_STARTS = 5_000
DEFAULT_REPLAY_CAPACITY = 100_000
DEFAULT_HIDDEN = 128
DEFAULT_CONV_CHANNELS = 16
DEFAULT_FISHER_SAMPLES = 1_024
DEFAULT_DETECT_EVERY = 64
DEFAULT_PERTURB_EPISODES = 10
DEFAULT_PERTURB_NORMS = (0.3, 1.0, 3.0, 10.0, 30.0)
DEFAULT_PERTURB_DRAWS = 3
DEFAULT_PERTURB_DAMPING = 1e-3
# -------------------------------------------------------------------------------------------

NEVER = 10**18  # dqn's ewc_min_steps: λ = 0, so a consolidation would only cost time


def _names(values: Any) -> tuple[str, ...]:
    """``"a, b"`` or ``("a", " b")`` → ``("a", "b")`` (the flag's comma list, stripped)."""
    if isinstance(values, str):
        values = values.split(",")
    return tuple(str(v).strip() for v in values if str(v).strip())


@dataclass(frozen=True)
class Config:
    """The games and schedule, the methods and seeds, the DQN knobs, evaluation and the tests."""

    games: tuple[str, ...] = param(
        DEFAULT_GAMES, f"MinAtar games, from: {', '.join(GAMES)}", check=Subset(GAMES)
    )
    visits: int = param(
        DEFAULT_VISITS, "visits in the schedule (>= number of games; revisits after)", check=POSITIVE_INT
    )
    min_visits: int = param(
        1, "visits every game gets at least (2: every game returns at least once)", check=POSITIVE_INT
    )
    steps_per_visit: int = param(DEFAULT_STEPS_PER_VISIT, "env steps per visit", check=POSITIVE_INT)
    order_seed: int = param(
        DEFAULT_ORDER_SEED, "seed of the game order (one schedule for all runs)", check=SEED
    )
    methods: tuple[str, ...] = param(
        DEFAULT_METHODS, f"methods, from: {', '.join(METHODS)}", check=Subset(METHODS)
    )
    seeds: tuple[int, ...] = param(
        DEFAULT_SEEDS,
        "agent seeds (one run per method and seed)",
        check=Numbers(SEED, distinct=True),
    )
    reference_seed: int = param(
        0, "seed of the single-task reference agents (the same references for any --seeds)", check=SEED
    )
    jobs: int = param(
        DEFAULT_JOBS, "runs in parallel worker processes, one torch thread each", check=POSITIVE_INT
    )
    eval_every: int = param(
        DEFAULT_EVAL_EVERY, "env steps between evaluations of every game", check=POSITIVE_INT
    )
    eval_episodes: int = param(DEFAULT_EVAL_EPISODES, "episodes per game and evaluation", check=POSITIVE_INT)
    eval_epsilon: float = param(
        DEFAULT_EVAL_EPSILON, "ε of the evaluation policy", check=Interval(float, 0, 1)
    )
    checkpoint_every: int = param(
        DEFAULT_CHECKPOINT_EVERY, "env steps between checkpoints (and after each visit)", check=POSITIVE_INT
    )
    lam: float = param(
        DEFAULT_LAM, "EWC λ (the Fisher is normalised to mean 1 over shared parameters)", check=NON_NEGATIVE
    )
    online_gamma: float = param(
        1.0,
        "online-ewc: decay of the merged Fisher at each consolidation",
        check=Interval(float, 0, 1, closed="right"),
    )
    lr: float = param(DEFAULT_LR, "Adam learning rate", check=POSITIVE)
    train_every: int = param(DEFAULT_TRAIN_EVERY, "env steps per DQN update", check=POSITIVE_INT)
    learning_starts: int = param(
        DEFAULT_LEARNING_STARTS, "transitions in a context's replay before updates", check=NON_NEGATIVE_INT
    )
    eps_decay_steps: int | None = param(
        None,
        "steps of the ε decay, restarted every visit (None: steps_per_visit // 3)",
        type=int,
        check=Interval(int, 1, allow_none=True),
    )
    ewc_min_steps: int | None = param(
        None,
        "transitions in one visit before a context is consolidated (None: steps_per_visit // 2)",
        type=int,
        check=Interval(int, 0, allow_none=True),
    )
    replay_capacity: int = param(
        DEFAULT_REPLAY_CAPACITY, "replay transitions per task context", check=POSITIVE_INT
    )
    hidden: int = param(DEFAULT_HIDDEN, "hidden units of the Q-network", check=POSITIVE_INT)
    conv_channels: int = param(
        DEFAULT_CONV_CHANNELS, "filters of the Q-network's convolution", check=POSITIVE_INT
    )
    fisher_samples: int = param(
        DEFAULT_FISHER_SAMPLES, "replay states the Fisher is averaged over", check=POSITIVE_INT
    )
    detect_every: int = param(
        DEFAULT_DETECT_EVERY, "observations per task-detector block (ewc)", check=POSITIVE_INT
    )
    detector_hazard: float = param(
        DQNConfig.__dataclass_fields__["detector_hazard"].default,
        "ewc (inferred labels): the detector's prior probability of a task switch between two blocks",
        check=Interval(float, 0, 1, closed="neither"),
    )
    detector_kappa0: float = param(
        DQNConfig.__dataclass_fields__["detector_kappa0"].default,
        "ewc (inferred labels): the detector's prior precision of a game's mean block features",
        check=POSITIVE,
    )
    detector_var_floor: float = param(
        DQNConfig.__dataclass_fields__["detector_var_floor"].default,
        "ewc (inferred labels): the least variance of a block feature within a game",
        check=NON_NEGATIVE,
    )
    reference: str | None = param(
        None, 'JSON file {"game": reference score, ...}: use these instead of training references', type=str
    )
    cache: bool = param(True, "read and write computed reference scores in the user cache")
    perturb: bool = param(True, "run the Fisher perturbation test on the final agent")
    perturb_episodes: int = param(
        DEFAULT_PERTURB_EPISODES, "evaluation episodes per perturbation", check=POSITIVE_INT
    )
    perturb_norms: tuple[float, ...] = param(
        DEFAULT_PERTURB_NORMS, "L2 norms of the perturbations", check=Numbers(POSITIVE)
    )
    perturb_draws: int = param(DEFAULT_PERTURB_DRAWS, "noise draws per norm and kind", check=POSITIVE_INT)
    perturb_damping: float = param(
        DEFAULT_PERTURB_DAMPING, "ε in 1/√(F + ε) (the Fisher has mean 1)", check=POSITIVE
    )
    device: str = param("cpu", "where the networks train: cpu or cuda (one GPU shared by the --jobs runs)")
    track: tuple[str, ...] = track_param()

    def __post_init__(self) -> None:
        object.__setattr__(self, "games", _names(self.games))  # before the checks: "a,b" is a list
        object.__setattr__(self, "track", parse_names(self.track))
        object.__setattr__(self, "methods", _names(self.methods))
        validate(self)
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "perturb_norms", tuple(float(v) for v in self.perturb_norms))
        if self.visits < len(self.games):
            raise ValueError(
                f"--visits {self.visits} is fewer than the {len(self.games)} games: a game would never be "
                "trained (give --visits >= number of --games)"
            )
        if self.visits < len(self.games) * self.min_visits:
            raise ValueError(
                f"--visits {self.visits} cannot give each of the {len(self.games)} games --min-visits "
                f"{self.min_visits} (give --visits >= {len(self.games) * self.min_visits})"
            )
        if len(self.games) == 1 and self.visits > 1:
            raise ValueError(
                "with one game there can be only one visit (a visit never repeats the previous game)"
            )
        for method in self.methods:  # the agent's own checks (e.g. replay_capacity >= batch size)
            try:
                dqn_config(self, method, self.seeds[0])
            except ValueError as exc:
                raise ValueError(f"invalid DQN setting: {exc}") from None


#: the full protocol of issue #19, as ``ewc rl`` flags (docs/results.md has its cost and results)
FULL_PROTOCOL: dict[str, Any] = {
    "games": ("asterix", "breakout", "freeway", "seaquest", "space_invaders"),
    "visits": 10,
    "min_visits": 2,
    "methods": ("dqn", "ewc", "ewc-true-labels", "online-ewc"),
    "seeds": (0, 1, 2, 3, 4),
    # chosen on scripts/rl_detector_games.py's proxies before any five-game result of the ewc
    # (inferred labels) agent (docs/results.md, "Task inference across five games")
    "detector_hazard": 0.2,
    "detector_kappa0": 0.5,
    "detector_var_floor": 0.02,
}


def _detector_settings(config: Config) -> dict[str, float]:
    """The task detector's settings (the agent with inferred labels only)."""
    return {
        "detector_hazard": config.detector_hazard,
        "detector_kappa0": config.detector_kappa0,
        "detector_var_floor": config.detector_var_floor,
    }


def command(config: Config) -> str:
    """The ``ewc rl`` command that reproduces ``config`` (only non-default flags)."""
    return command_line("rl", config, prefix=("ewc",))


def dqn_config(config: Config, method: str, seed: int) -> DQNConfig:
    """The agent configuration of ``method`` (``dqn`` never consolidates: with λ = 0 a term would
    only cost time)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    agent = AGENTS[method]
    spv = config.steps_per_visit
    min_steps = spv // 2 if config.ewc_min_steps is None else config.ewc_min_steps
    return DQNConfig(
        lr=config.lr,
        replay_capacity=config.replay_capacity,
        learning_starts=config.learning_starts,
        train_every=config.train_every,
        eps_decay_steps=max(1, spv // 3) if config.eps_decay_steps is None else config.eps_decay_steps,
        ewc_lam=config.lam if agent.ewc else 0.0,
        ewc_mode=agent.mode,
        ewc_gamma=config.online_gamma if agent.mode == "online" else 1.0,
        ewc_min_steps=min_steps if agent.ewc else NEVER,
        fisher_samples=config.fisher_samples,
        detect_every=config.detect_every,
        # only the detector's agent gets it: the others (and the references) keep the default,
        # so their configs, cache keys and checkpoints do not depend on it
        **({} if agent.true_labels else _detector_settings(config)),
        true_task_labels=agent.true_labels,
        conv_channels=config.conv_channels,
        hidden=config.hidden,
        seed=seed,
        device=config.device,
    )
