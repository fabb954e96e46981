"""EWC + replay: EWC's penalty and a replay memory composed (the blog's memory + constrained update)."""

from __future__ import annotations

from ewc.methods.compose import Compose
from ewc.methods.registry import MethodSpec, register
from ewc.methods.regularizers import EWC_BRACKET, EWC_DEFAULTS, EWC_LAM_GRID, EWC_RUN_PARAMS, EWCMethod
from ewc.methods.replay import REPLAY_DEFAULTS, ReplayMethod


def ewc_replay(
    lam: float,
    gamma: float,
    fisher: str,
    fisher_samples: int | None,
    capacity: int,
    policy: str,
    per: str,
    replay_batch: int | None,
    weight: float,
    seed: int,
) -> Compose:
    """EWC (one penalty per task) composed with experience replay from a bounded memory."""
    return Compose(
        EWCMethod(lam, "separate", gamma, fisher, fisher_samples),
        ReplayMethod(
            capacity=capacity, policy=policy, per=per, replay_batch=replay_batch, weight=weight, seed=seed
        ),
    )


register(
    MethodSpec(
        "ewc+replay",
        ewc_replay,
        {**EWC_DEFAULTS, **REPLAY_DEFAULTS},
        {"lam": EWC_LAM_GRID},
        "EWC and replay composed (Compose)",
        label="EWC + replay",
        color="#98df8a",
        order=11,
        run_params=EWC_RUN_PARAMS,
        strength="lam",
        bracket=EWC_BRACKET,
    )
)
