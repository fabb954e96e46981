"""The one place that decides threads, seeds and device for a run."""

from __future__ import annotations

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
