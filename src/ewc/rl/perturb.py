"""The Fisher perturbation test on a trained agent (issue #4, the EWC paper's Fig. 4C).

Perturb the agent's shared parameters by noise of a given L2 norm, either isotropic or shaped by
``1/√(F + ε)`` (F: the game context's normalised policy Fisher), and evaluate the game: if the
Fisher tells which directions matter, the shaped noise should hurt the agent far less.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ewc.rl.agent import DQNConfig
from ewc.rl.env import GAMES

__all__ = ["PERTURB_EVAL_SEED", "PERTURB_KINDS", "perturbation_test"]

PERTURB_EVAL_SEED = 12345  # the same evaluation episodes for every perturbation
PERTURB_KINDS = ("isotropic", "fisher")


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
) -> dict[str, Any]:
    """Perturb the checkpointed agent's shared parameters by noise of each norm in ``norms``,
    isotropic or shaped by 1/√(F + ``damping``), and evaluate ``game`` (``episodes`` episodes).

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
    scales = {"isotropic": torch.ones_like(f), "fisher": (f + damping).rsqrt()}

    def score() -> float:
        r = agent.evaluate(game, episodes, eval_epsilon, seed=PERTURB_EVAL_SEED)
        return float(r["mean_return"])

    base = score()
    scores: dict[str, list[list[float]]] = {k: [] for k in PERTURB_KINDS}
    quad: dict[str, list[float]] = {k: [] for k in PERTURB_KINDS}
    try:
        for r in norms:
            per = {k: [] for k in PERTURB_KINDS}
            fz = {k: [] for k in PERTURB_KINDS}
            for d in range(draws):
                g = torch.randn(
                    f.shape, generator=torch.Generator().manual_seed(1000 + d), dtype=torch.float64
                ).to(f.device)
                for kind in PERTURB_KINDS:
                    z = g * scales[kind]
                    z = z * (r / z.norm())
                    vector_to_parameters((theta + z).to(theta.dtype), params)
                    per[kind].append(score())
                    fz[kind].append(float((f * z * z).sum()))
            vector_to_parameters(theta, params)
            for kind in PERTURB_KINDS:
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
        "scores": {k: [float(np.mean(v)) for v in scores[k]] for k in PERTURB_KINDS},
        "scores_per_draw": scores,
        "fisher_quadratic": quad,  # mean Σ F z² (normalised Fisher) per norm: how much F "sees" the noise
    }
