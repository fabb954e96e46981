"""The Fisher's input contract: the data forms accepted, batches truncated to a sample budget, the
model called on an input and its outputs picked, the checks on inputs, labels and targets, and
eval mode for the duration.

The data: a tensor ``X``; an ``(X, y)`` pair, as a *tuple* of two tensors; a mapping of whole
data; or an iterable of batches (a DataLoader, a list, a generator). A list is always a list of
batches, never the pair (``[xb1, xb2]`` is two batches); a list ``[X, y]`` whose second tensor holds
one label per row of the first is refused (give the pair as a tuple). A batch of an iterable may be
a list or a tuple ``(x, y, ...)``, as a DataLoader collates it.

An input ``x`` is a tensor with a leading batch axis (``model(x)``), a tuple/list of them
(``model(*x)``), or a mapping of keyword arguments (``model(**x)``; a Hugging Face batch). A
mapping *batch* (or a mapping of whole data) carries its labels under ``"labels"``: they are
taken out and not passed to the model (a Hugging Face model would compute a loss we discard).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        if X.dim() == 0 or Y.dim() == 0 or len(X) != len(Y):
            raise ValueError(f"(X, y) pair with mismatched shapes {tuple(X.shape)} and {tuple(Y.shape)}")
        source = ((X[i : i + batch_size], Y[i : i + batch_size]) for i in range(0, len(X), batch_size))
    elif isinstance(data, Mapping):
        source = _mapping_batches(data, batch_size)
    elif isinstance(data, Iterable):
        if isinstance(data, list):
            _check_not_a_pair(data)
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
            where = " or a 'labels' key in mapping batches" if isinstance(x, Mapping) else ""
            raise ValueError(f"this Fisher mode needs labels: give (x, y) batches{where}")
        seen += n
        yield x, y


def _check_not_a_pair(data: list) -> None:
    """A list is a list of batches; ``[X, y]`` (inputs, then one label per row) is refused, not
    read as two batches (nor, as before, silently as a pair): the pair is a tuple."""
    if len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        X, Y = data
        if X.dim() > 0 and Y.dim() == 1 and X.dim() != 1 and len(X) == len(Y):
            raise ValueError(
                f"data is a list of two tensors of shapes {tuple(X.shape)} and {tuple(Y.shape)}: a list "
                "is a list of batches; give an (X, y) pair as a tuple"
            )


def _mapping_batches(data: Mapping, batch_size: int) -> Iterator[tuple[Any, Tensor | None]]:
    """Whole data as a mapping of tensors (e.g. a tokenizer's output with ``labels``), in batches."""
    x, y = _split_mapping(data)
    n = batch_len(x)
    if y is not None and (not isinstance(y, Tensor) or y.dim() == 0 or len(y) != n):
        what = f"of shape {tuple(y.shape)}" if isinstance(y, Tensor) else f"a {type(y).__name__}"
        raise ValueError(f"'labels' must be a tensor of {n} labels, one per sample, got {what}")
    for i in range(0, n, batch_size):
        yield slice_rows(x, i, i + batch_size), (None if y is None else y[i : i + batch_size])


def _split(batch: Any) -> tuple[Any, Tensor | None]:
    """``(x, y)`` of one batch of an iterable: a tensor, a tuple whose first two items are x, y,
    or a mapping of keyword inputs with its labels under ``"labels"``."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, tuple | list) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        return _split_mapping(batch)
    raise ValueError(
        f"a batch must be a tensor, an (x, y) tuple or a mapping of inputs, got {type(batch).__name__}"
    )


def _split_mapping(batch: Mapping) -> tuple[dict[str, Any], Tensor | None]:
    """A mapping's keyword inputs (every key but ``labels``) and its labels (None without)."""
    bad = [k for k in batch if not isinstance(k, str)]
    if bad:
        raise ValueError(f"a mapping of inputs needs string keys (keyword arguments), got {bad[0]!r}")
    x = {k: v for k, v in batch.items() if k != "labels"}
    if not any(isinstance(v, Tensor) for v in x.values()):
        raise ValueError(f"a mapping batch needs input tensors besides 'labels', got keys {list(batch)}")
    return x, batch.get("labels")


def batch_len(x: Any) -> int:
    """The number of samples in an input (its first tensor's leading axis)."""
    if isinstance(x, Mapping):
        t = next((v for v in x.values() if isinstance(v, Tensor)), None)
    else:
        t = x if isinstance(x, Tensor) else (x[0] if isinstance(x, tuple | list) and x else None)
    if not isinstance(t, Tensor) or t.dim() == 0:
        raise ValueError("inputs must be tensors with a leading batch dimension")
    return t.shape[0]


def splittable(x: Any, n: int) -> bool:
    """True if every input is a tensor with the batch first and no other axis of size N.

    Conservative: an input such as a graph's [N, N] adjacency ties samples together, so a batch
    with one is never split (nor, harmlessly, a batch of 28 images of 28x28). A mapping's values
    other than tensors must be plain settings (None, bool, number, string), given to every part.
    """
    if isinstance(x, Mapping):
        if not all(v is None or isinstance(v, Tensor | bool | int | float | str) for v in x.values()):
            return False
        xs: Iterable = [v for v in x.values() if isinstance(v, Tensor)]
    else:
        xs = x if isinstance(x, tuple | list) else (x,)
    return all(isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n and n not in t.shape[1:] for t in xs)


def slice_rows(x: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of an input (every tensor of a tuple or mapping input)."""
    if isinstance(x, Mapping):
        return {k: v[start:stop] if isinstance(v, Tensor) else v for k, v in x.items()}
    return x[start:stop] if isinstance(x, Tensor) else type(x)(t[start:stop] for t in x)


def to_device(x: Any, device: torch.device) -> Any:
    """An input on ``device`` (every tensor of a tuple or mapping input)."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in x.items()}
    return type(x)(t.to(device) if isinstance(t, Tensor) else t for t in x)


Output = str | Callable[[Any], Tensor] | None


def call_model(model: nn.Module, x: Any, output: Output = None) -> Tensor:
    """The tensor of outputs of ``model(x)``, ``model(*x)`` for a tuple input or ``model(**x)`` for a
    mapping, picked from what the model returns by ``output`` (see :func:`select_output`)."""
    if not isinstance(x, Mapping):
        out = model(*x) if isinstance(x, tuple | list) else model(x)
        return select_output(out, output)
    try:
        out = model(**x)
    except TypeError as e:
        # Ours only if the keys do not fit the forward's signature; errors inside the model pass.
        try:
            inspect.signature(model.forward).bind(**x)
        except TypeError:
            raise ValueError(
                f"the model's forward does not take the mapping batch's inputs {list(x)} "
                f"({e}); labels go under 'labels', other keys are passed as keyword arguments"
            ) from e
        raise
    return select_output(out, output)


def select_output(out: Any, output: Output = None) -> Tensor:
    """The tensor the likelihood reads (logits or means) from what the model returned.

    ``output=None``: a tensor as is, the first item of a tuple/list, ``out["logits"]`` of a mapping
    (a Hugging Face ``ModelOutput`` is an OrderedDict) or the attribute ``out.logits``. A string
    picks that key or attribute; a callable is applied to the model's return value.
    """
    if callable(output):
        t = output(out)
        if not isinstance(t, Tensor):
            raise ValueError(f"output(model output) must return a tensor, got {type(t).__name__}")
        return t
    if output is None and isinstance(out, Tensor):
        return out
    if output is None and isinstance(out, tuple | list):
        if not out or not isinstance(out[0], Tensor):
            first = type(out[0]).__name__ if out else "nothing"
            raise ValueError(
                f"the model returned a {type(out).__name__} whose first item is {first}, not a tensor "
                "of outputs; pass output= (a key, an attribute or a callable) to pick it"
            )
        return out[0]
    key = "logits" if output is None else output
    if isinstance(out, Mapping) and key in out:
        t = out[key]
    elif not isinstance(out, Mapping) and hasattr(out, key):
        t = getattr(out, key)
    else:
        keys = f" with keys {list(out)}" if isinstance(out, Mapping) else ""
        raise ValueError(
            f"the model returned a {type(out).__name__}{keys} without {key!r}: pass output= "
            "(a key, an attribute or a callable) to pick the tensor of outputs"
        )
    if not isinstance(t, Tensor):
        raise ValueError(f"the model output's {key!r} is a {type(t).__name__}, not a tensor")
    return t


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
    """Raise if a floating tensor (or one of a tuple or mapping) holds NaN or Inf."""
    xs = x.values() if isinstance(x, Mapping) else x if isinstance(x, tuple | list) else (x,)
    for t in xs:
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
