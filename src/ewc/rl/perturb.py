"""The Fisher perturbation test on a trained agent (issue #4, the EWC paper's Fig. 4C).

Perturb the agent's shared parameters by noise of a given L2 norm, isotropic, shaped by
``1/√(F + ε)`` (F: the game context's normalised policy Fisher), or confined to the Fisher's
(near-)null space (the parameters whose normalised Fisher is below ``null_threshold``), and
evaluate the game: if the Fisher tells which directions matter, the shaped and the null-space
noise should hurt the agent far less than isotropic noise of the same norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ewc.rl.agent import DQNConfig
from ewc.rl.env import GAMES

__all__ = ["NULL_THRESHOLD", "PERTURB_EVAL_SEED", "PERTURB_KINDS", "perturbation_test"]

PERTURB_EVAL_SEED = 12345  # the same evaluation episodes for every perturbation
PERTURB_KINDS = ("isotropic", "fisher", "null")
NULL_THRESHOLD = 1e-3  # normalised Fisher (mean 1) below this: the parameter is in the null space


@torch.no_grad()
def perturbation_test(
    dqn: DQNConfig,
    checkpoint: Path,
    game: str,
    record: dict[str, Any],
    *,
    fisher_samples: int,
    episodes: int,
    eval_epsilon: float,
    norms: Sequence[float],
    draws: int,
    damping: float,
    null_threshold: float = NULL_THRESHOLD,
) -> dict[str, Any]:
    """Perturb the checkpointed agent's shared parameters by noise of each norm in ``norms``,
    isotropic, shaped by 1/√(F + ``damping``), or on the parameters with F < ``null_threshold``
    only, and evaluate ``game`` (``episodes`` episodes).

    ``record`` is the run's train_sequence record (with inferred labels, the context the agent used
    most on the game in its final evaluation is the one perturbed and whose Fisher is taken, over
    ``fisher_samples`` replay states). Every point uses the same evaluation episodes; draw ``d``
    uses the same Gaussian ``g`` for both kinds (only its shaping differs).
    """
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from ewc.rl.agent import Agent, policy_fisher
    from ewc.state import safe_load

    saved = safe_load(checkpoint)
    agent = Agent(dqn)
    agent.load_state_dict(saved["agent"])
    if dqn.true_task_labels:
        ctx = GAMES.index(game)
    else:  # the context the agent used most when playing the game in its final evaluation
        counts = record["evaluations"][-1]["contexts"][game]
        ctx = int(max(counts, key=lambda k: counts[k]))
    if agent.replay.size(ctx) == 0:
        raise ValueError(f"context {ctx} of {game} has no replay states for its Fisher")
    gen = torch.Generator().manual_seed(dqn.seed)
    states = agent.replay.buffer(ctx).observations(fisher_samples, gen)
    with torch.enable_grad():
        fisher = policy_fisher(agent.qnet, states, ctx, dqn.fisher_temperature)
    named = dict(agent.qnet.named_parameters())
    names = agent.qnet.shared_parameter_names()
    params = [named[n] for n in names]
    f = torch.cat([fisher[n].reshape(-1) for n in names]).double()
    theta = parameters_to_vector(params).detach().clone()
    null = f < null_threshold
    scales = {
        "isotropic": torch.ones_like(f),
        "fisher": (f + damping).rsqrt(),
        "null": null.to(f.dtype),
    }
    kinds = [k for k in PERTURB_KINDS if k != "null" or bool(null.any())]

    def score() -> float:
        r = agent.evaluate(game, episodes, eval_epsilon, seed=PERTURB_EVAL_SEED)
        return float(r["mean_return"])

    base = score()
    scores: dict[str, list[list[float]]] = {k: [] for k in kinds}
    quad: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for r in norms:
            per: dict[str, list[float]] = {k: [] for k in kinds}
            fz: dict[str, list[float]] = {k: [] for k in kinds}
            for d in range(draws):
                g = torch.randn(
                    f.shape, generator=torch.Generator().manual_seed(1000 + d), dtype=torch.float64
                ).to(f.device)
                for kind in kinds:
                    z = g * scales[kind]
                    z = z * (r / z.norm())
                    vector_to_parameters((theta + z).to(theta.dtype), params)
                    per[kind].append(score())
                    fz[kind].append(float((f * z * z).sum()))
            vector_to_parameters(theta, params)
            for kind in kinds:
                scores[kind].append(per[kind])
                quad[kind].append(float(np.mean(fz[kind])))
    finally:
        vector_to_parameters(theta, params)
    return {
        "game": game,
        "context": ctx,
        "episodes": episodes,
        "draws": draws,
        "damping": damping,
        "norms": list(norms),
        "shared_parameters": int(f.numel()),
        "shared_norm": float(theta.norm()),
        "unperturbed": base,
        "null_threshold": null_threshold,
        "null_parameters": int(null.sum()),
        "scores": {k: [float(np.mean(v)) for v in scores[k]] if k in kinds else None for k in PERTURB_KINDS},
        "scores_per_draw": scores,
        # mean Σ F z² (normalised Fisher) per norm: how much F "sees" the noise
        "fisher_quadratic": {k: quad.get(k) for k in PERTURB_KINDS},
    }
