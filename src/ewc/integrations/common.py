"""What the framework integrations share: the missing-extra error and each rank's share of the
Fisher data.

Under data parallelism every rank runs the same ``consolidate`` call. :func:`rank_share` gives
rank r the batches r, r + W, r + 2W, ... of the data in its own order (the batches
``diagonal_fisher`` would read in one process: a DataLoader is read without shuffling, whole data
is cut at the EWC's ``batch_size``, ``max_samples`` counts samples of the whole data), and the
engine sums the per-sample squares and the sample count over the ranks (``distributed=`` of
:func:`ewc.fisher.diagonal_fisher`, on whenever a process group is initialised). So every rank
gets the Fisher of the whole data, each sample counted once: the single-process Fisher, up to the
order of the float64 sum. A DistributedSampler would instead pad the ranks' parts with repeated
samples.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ewc import EWC
from ewc.fisher_data import batches

__all__ = ["in_order", "rank_and_world", "rank_share", "require"]


def require(package: str, extra: str, what: str) -> ModuleType:
    """``import package``, or an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"{what} needs the '{package}' package: pip install 'ewc[{extra}]'") from e


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def in_order(data: Any) -> Any:
    """A DataLoader over a map-style dataset rebuilt to read it in order (same dataset, batch size,
    collate function, drop_last and workers; no sampler of its own, so no shuffling and no
    DistributedSampler's split); anything else as it is."""
    if not isinstance(data, DataLoader) or data.batch_size is None:
        return data
    if isinstance(data.dataset, IterableDataset):
        return data
    return DataLoader(
        data.dataset,
        batch_size=data.batch_size,
        shuffle=False,
        collate_fn=data.collate_fn,
        drop_last=data.drop_last,
        num_workers=data.num_workers,
    )


def rank_share(data: Any, reg: EWC) -> Iterator[tuple[Any, Tensor | None]]:
    """This rank's batches of ``data``: ``(x, y)`` pairs, every W-th batch starting at the rank's
    own (see the module docstring); all of them in one process. ``data`` is any form
    :func:`ewc.fisher.diagonal_fisher` accepts; batches of whole data and the sample budget are the
    EWC's ``batch_size`` and ``max_samples``."""
    config = reg.state_dict()["config"]
    rank, world = rank_and_world()
    source = batches(in_order(data), config["batch_size"], config["max_samples"], needs_labels=False)
    for i, pair in enumerate(source):
        if i % world == rank:
            yield pair
