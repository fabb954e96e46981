"""The one place that decides threads, seeds and device for a run, and how optimisers are built."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ewc.checks import check_count


def setup_runtime(seed: int, threads: int | None = None, device: str = "cpu") -> torch.device:
    """Set torch's thread count (None: torch's choice) and global seed; return the checked device."""
    if threads is not None:
        torch.set_num_threads(check_count(threads, "threads"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as cpu or cuda, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    torch.manual_seed(seed)
    return dev


#: the optimisers a run or a stream learner can use (a fresh one per task in ``ewc run``)
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``) or ``adam`` over ``params``; momentum must be 0 for Adam."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
