"""The one place that decides threads, seeds and device for a run, and how optimisers are built
(and where freed heap memory is given back to the OS).

Threads: a training run uses the thread count its config names (``TrainConfig.threads``, 1 by
default), in this process or in a ``--jobs`` worker alike. The count must not depend on where a
run happens: torch's CPU kernels split their work by thread count, so a 64-row matmul with 1 and
with 2 threads differs in its last bits, and training carries that into the reported accuracies.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ewc.checks import SEED, THREADS, check, check_count

#: the device types a run trains on
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str) -> torch.device:
    """``device`` as a torch device of a type in :data:`DEVICE_TYPES` that exists here, or a
    ValueError (a config checks it when it is made, before a run creates anything)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as cpu or cuda, got {device!r}") from None
    if dev.type not in DEVICE_TYPES:
        raise ValueError(f"device must be a torch device such as cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


#: torch threads of one training run unless a config says otherwise (the same with or without
#: ``--jobs``, on any machine, so the numbers are too)
DEFAULT_THREADS = 1


def run_threads(threads: int | None) -> int:
    """The thread count a run uses: ``threads``, or (None) this process's current torch setting."""
    return torch.get_num_threads() if threads is None else check_count(threads, "threads")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch threads (None: as set), then restore the setting."""
    before = torch.get_num_threads()
    n = run_threads(threads)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def setup_runtime(seed: int, threads: int | None = None, device: str = "cpu") -> torch.device:
    """Set torch's thread count (None: torch's choice) and global seed; return the checked device."""
    check(seed, SEED, "seed")
    if threads is not None:
        torch.set_num_threads(check(threads, THREADS, "threads"))
    dev = check_device(device)
    torch.manual_seed(seed)
    return dev


_MALLOC_TRIM: Any = None  # glibc's malloc_trim, False where there is none (looked up once)


def release_freed_memory() -> None:
    """Give the pages of freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op). Once glibc has freed a large block its mmap threshold rises, so later blocks of that
    size come from the heap; small long-lived allocations placed between them (a run's records)
    then keep the freed holes from being reused or trimmed. A run that tested 1000 tasks after
    every task grew by gigabytes of such holes; calling this every few dozen evaluations keeps
    the resident memory at what is in use (a few ms a call)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


#: the optimisers a run or a stream learner can use (a fresh one per task in ``ewc run``)
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def check_optimizer(name: str, momentum: float = 0.0) -> None:
    """A ValueError for an unknown optimiser, or a momentum that has no effect (Adam's)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name != "sgd" and momentum != 0:
        why = "SGD's momentum has no effect on Adam"
        raise ValueError(f"momentum must be 0 with optimizer {name!r} ({why}), got {momentum!r}")


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``) or ``adam`` over ``params``; momentum must be 0 for Adam.

    The multi-tensor (``foreach``) implementations, which torch picks only on CUDA by default: on
    the CPU they give bit-identical parameters to the per-tensor loop, and an Adam step of the
    paper's MLP took 1.6-2.4 ms instead of 2.7-2.8 ms (three runs, one thread, a loaded machine;
    in whole runs of the loop the difference was within the noise). ``fused`` Adam (0.6-0.7 ms)
    rounds differently (1e-7 to 1e-6), so recorded runs would not reproduce bit for bit.
    """
    check_optimizer(name, momentum)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=True)
    return torch.optim.Adam(params, lr=lr, foreach=True)
