"""Two tasks through EWCTrainer under ``torchrun --nproc-per-node 2`` (gloo, CPU); run by
tests/test_integrations_distributed.py, which checks what each rank writes to ``OUT/rank{r}.pt``.

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 THIS_FILE OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_integration_transformers import (
    PENALTY_LOG_NAME,
    EWCTrainer,
    V,
    arguments,
    language,
    params,
    tiny_lm,
)

from ewc import EWC


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = tiny_lm()
    reg = EWC(model, lam=50.0, fisher="empirical", batch_size=3)
    a, b = language(1, 10, n=10, seed=1), language(10, V, seed=2)
    EWCTrainer(
        model=model,
        args=arguments(out / "a", max_steps=2, ddp_find_unused_parameters=False),
        train_dataset=a,
        ewc=reg,
    ).train()
    assert dist.is_initialized() and dist.get_world_size() == 2
    theta_a = params(model)
    task_b = EWCTrainer(
        model=model,
        args=arguments(
            out / "b", max_steps=2, save_strategy="steps", save_steps=2, ddp_find_unused_parameters=False
        ),
        train_dataset=b,
        ewc=reg,
    )
    fisher = task_b.consolidate(a)  # the Fisher on task A, through the task-B trainer's collator
    task_b.train()
    logged = [h[PENALTY_LOG_NAME] for h in task_b.state.log_history if "loss" in h]
    record = {
        "theta_a": theta_a,
        "fisher": fisher,
        "state": reg.state_dict(),
        "theta_end": params(model),
        "penalty": reg.penalty().item(),
        "logged": logged,
    }
    torch.save(record, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
