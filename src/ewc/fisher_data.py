"""The Fisher's input contract: the data forms accepted, batches truncated to a sample budget, the
checks on inputs, labels and targets, and eval mode for the duration.

An input ``x`` is a tensor with a leading batch axis, or a tuple/list of them (the model is
then called as ``model(*x)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def batches(
    data: Any, batch_size: int, max_samples: int | None, needs_labels: bool
) -> Iterator[tuple[Any, Tensor | None]]:
    """Yield ``(x, y)`` batches from any supported data form, truncated to ``max_samples``."""
    if isinstance(data, Tensor):
        source: Iterable = ((data[i : i + batch_size], None) for i in range(0, len(data), batch_size))
    elif isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        if X.dim() == 0 or Y.dim() == 0 or len(X) != len(Y):
            raise ValueError(f"(X, y) pair with mismatched shapes {tuple(X.shape)} and {tuple(Y.shape)}")
        source = ((X[i : i + batch_size], Y[i : i + batch_size]) for i in range(0, len(X), batch_size))
    elif isinstance(data, Iterable):
        source = (_split(b) for b in data)
    else:
        raise ValueError(
            f"data must be a DataLoader, an iterable of batches or tensors, got {type(data).__name__}"
        )

    seen = 0
    for x, y in source:
        n = batch_len(x)
        if n == 0:
            continue
        if max_samples is not None:
            if seen >= max_samples:
                return
            if seen + n > max_samples:
                keep = max_samples - seen
                x = slice_rows(x, 0, keep)
                y = None if y is None else y[:keep]
                n = keep
        if needs_labels and y is None:
            raise ValueError("this Fisher mode needs labels: give (x, y) batches")
        seen += n
        yield x, y


def _split(batch: Any) -> tuple[Any, Tensor | None]:
    """``(x, y)`` of one batch of an iterable: a tensor, or a tuple whose first two items are x, y."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, tuple | list) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ValueError(f"a batch must be a tensor or an (x, y) tuple, got {type(batch).__name__}")


def batch_len(x: Any) -> int:
    """The number of samples in an input (its first tensor's leading axis)."""
    t = x if isinstance(x, Tensor) else (x[0] if isinstance(x, tuple | list) and x else None)
    if not isinstance(t, Tensor) or t.dim() == 0:
        raise ValueError("inputs must be tensors with a leading batch dimension")
    return t.shape[0]


def splittable(x: Any, n: int) -> bool:
    """True if every input is a tensor with the batch first and no other axis of size N.

    Conservative: an input such as a graph's [N, N] adjacency ties samples together, so a batch
    with one is never split (nor, harmlessly, a batch of 28 images of 28x28).
    """
    xs = x if isinstance(x, tuple | list) else (x,)
    return all(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n and n not in t.shape[1:] for t in xs)


def slice_rows(x: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of an input (every tensor of a tuple input)."""
    return x[start:stop] if isinstance(x, Tensor) else type(x)(t[start:stop] for t in x)


def to_device(x: Any, device: torch.device) -> Any:
    """An input on ``device`` (every tensor of a tuple input)."""
    if isinstance(x, Tensor):
        return x.to(device)
    return type(x)(t.to(device) if isinstance(t, Tensor) else t for t in x)


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(*x)`` for a tuple input."""
    return model(*x) if isinstance(x, tuple | list) else model(x)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_finite(x: Any, what: str) -> None:
    """Raise if a floating tensor (or one of a tuple) holds NaN or Inf."""
    for t in x if isinstance(x, tuple | list) else (x,):
        # A sum is NaN/Inf whenever an element is (one cheap reduction); confirm element-wise.
        if not (isinstance(t, Tensor) and t.is_floating_point() and t.numel()):
            continue
        if not math.isfinite(t.detach().sum()):
            if not torch.isfinite(t).all():
                raise ValueError(f"{what} contain NaN or Inf values")


def check_labels(y: Tensor | None, n: int, classes: int) -> Tensor:
    """Categorical labels as int64 class indices ``[n]`` in ``[0, classes)``, or a clear error."""
    if y is None:
        raise ValueError("this Fisher mode needs labels: give (x, y) batches")
    if not isinstance(y, Tensor):
        raise ValueError(f"labels must be a tensor, got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"categorical labels must be an integer tensor (class indices), got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [N] = [{n}], got {tuple(y.shape)}")
    y = y.to(torch.long)
    if n and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(
            f"labels out of range: expected 0 <= y < {classes}, got [{int(y.min())}, {int(y.max())}]"
        )
    return y


def check_targets(y: Tensor | None, out: Tensor) -> Tensor:
    """Gaussian targets of the outputs' shape, finite, in their device and dtype, or a clear error."""
    if y is None:
        raise ValueError("this Fisher mode needs targets: give (x, y) batches")
    if not isinstance(y, Tensor) or not y.is_floating_point():
        raise ValueError("gaussian targets must be a floating-point tensor")
    if y.shape != out.shape:
        raise ValueError(
            f"targets shape {tuple(y.shape)} does not match model output shape {tuple(out.shape)}"
        )
    check_finite(y, "targets")
    return y.to(device=out.device, dtype=out.dtype)
