"""The regulariser's options beyond λ, mode and γ, and the checks of its saved config and keys.

What EWC / L2 anchor and how they store it: ``parameters=``, ``store_dtype=``, ``store_device=``.

* ``parameters``: which parameters are consolidated. ``None`` (the default): every parameter that
  requires grad at each consolidation, so a PEFT/LoRA model whose base weights are frozen
  consolidates only its adapters. An iterable of names, or a predicate ``(name, param) -> bool``
  evaluated once, when the regulariser is made: either is resolved to a tuple of names then (a
  saved state holds names; a function cannot be saved without running code when loaded).
* ``store_dtype`` / ``store_device``: the dtype and device θ* and F are kept in (``None``: each
  parameter's). The penalty is still evaluated on the parameters' device in a compute dtype of at
  least float32 (:mod:`ewc.quadratic`).

All three are saved in a state's config as plain strings and lists (see :func:`saved`); a state
saved before they existed has none of them and loads with all three None (:func:`check_config`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "OPTION_KEYS",
    "STORE_DTYPES",
    "Selection",
    "TermKey",
    "check_config",
    "check_keys",
    "check_storage",
    "check_store_device",
    "check_store_dtype",
    "grad_only_for",
    "pick",
    "resolve_selection",
    "saved",
    "selected",
]

# What ``parameters=`` may be: names, a predicate (name, param) -> bool, or None (all that require grad).
Selection = Iterable[str] | Callable[[str, Tensor], Any] | None
# The dtypes θ* and F may be stored in (floating point, with arithmetic on every device).
STORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Config keys of these options; a state saved before they existed has none of them (all None).
OPTION_KEYS = ("parameters", "store_dtype", "store_device")
# What names a term: an int (the default, the running task count) or a str.
TermKey = int | str


def _named(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters(remove_duplicate=False))


def _unknown(names: list[str], named: Mapping[str, Tensor]) -> ValueError:
    """The error for names that are not parameters of the model, with a few valid names."""
    close = difflib.get_close_matches(names[0], list(named), n=3)
    hint = f"; did you mean {close}?" if close else ""
    valid = list(named)[:5]
    more = f" (and {len(named) - 5} more)" if len(named) > 5 else ""
    return ValueError(
        f"parameters= names {names[:5]}, not parameters of the model{hint} Valid names: {valid}{more}"
    )


def resolve_selection(model: nn.Module, parameters: Selection) -> tuple[str, ...] | None:
    """``parameters=`` checked against ``model`` and resolved to distinct names (None stays None).

    ValueError for names that are not parameters of the model, for an empty selection and for
    anything that is neither None, an iterable of str nor a callable.
    """
    if parameters is None:
        return None
    named = _named(model)
    if callable(parameters):
        names = tuple(n for n, p in named.items() if parameters(n, p))
        if not names:
            raise ValueError(f"parameters= selects none of the model's {len(named)} parameters")
        return names
    if isinstance(parameters, str | bytes) or not isinstance(parameters, Iterable):
        raise ValueError(
            "parameters must be None, an iterable of parameter names or a predicate "
            f"(name, param) -> bool, got {type(parameters).__name__}"
            + (" (for one name, pass a list)" if isinstance(parameters, str) else "")
        )
    names = tuple(dict.fromkeys(parameters))
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise ValueError(f"parameters= must name parameters with str, got {wrong[:5]}")
    if not names:
        raise ValueError("parameters= is empty: select at least one parameter (None selects all)")
    unknown = [n for n in names if n not in named]
    if unknown:
        raise _unknown(unknown, named)
    return names


def selected(model: nn.Module, names: tuple[str, ...] | None) -> dict[str, Tensor]:
    """``{name: parameter}`` of a selection now (None: those that require grad), one name per tensor.

    ValueError if a selected parameter is no longer in the model.
    """
    if names is None:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    named = _named(model)
    gone = [n for n in names if n not in named]
    if gone:
        raise ValueError(f"selected parameters {gone[:5]} are missing from the model")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for n in names:
        if id(named[n]) not in seen:  # a tied parameter selected under two names counts once
            seen.add(id(named[n]))
            out[n] = named[n]
    return out


def pick(model: nn.Module, fisher: Any, names: tuple[str, ...] | None) -> Any:
    """The part of a Fisher ``{name: F}`` that a selection keeps (all of it for None).

    A tied parameter is found under any of its names. ValueError for a name that is not a
    parameter of the model, or if nothing selected is left.
    """
    if names is None or not isinstance(fisher, Mapping):
        return fisher  # the caller checks the form
    named = _named(model)
    unknown = [n for n in fisher if n not in named]
    if unknown:
        raise ValueError(f"the Fisher names {unknown[0]!r}, not a parameter of the model")
    by_tensor = {id(named[n]): f for n, f in fisher.items()}
    out = {n: by_tensor[id(p)] for n, p in selected(model, names).items() if id(p) in by_tensor}
    if not out:
        raise ValueError(f"the Fisher covers none of the selected parameters {list(names)[:5]}")
    return out


@contextmanager
def grad_only_for(model: nn.Module, names: tuple[str, ...] | None) -> Iterator[None]:
    """Within: ``requires_grad`` on exactly the selected parameters (restored after; nothing
    changes for None), so the Fisher engine, which covers the parameters that require grad,
    computes the selected ones, including frozen ones, and does no work for the others."""
    if names is None:
        yield
        return
    keep = {id(p) for p in selected(model, names).values()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def check_store_dtype(value: Any) -> torch.dtype | None:
    """``store_dtype``: None, or one of :data:`STORE_DTYPES` given as a dtype or its name."""
    if value is None:
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or dtype not in STORE_DTYPES:
        names = [str(d).removeprefix("torch.") for d in STORE_DTYPES]
        raise ValueError(f"store_dtype must be None or a floating dtype among {names}, got {value!r}")
    return dtype


def check_store_device(value: Any) -> torch.device | None:
    """``store_device``: None, or a device (or its string) that exists here, made canonical
    (``"cuda"`` → ``cuda:0``) so that comparing it with a tensor's device is exact."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"store_device must be None or a torch device, got {value!r}: {err}") from None
    try:
        return torch.empty(0, device=device).device
    except (RuntimeError, AssertionError) as err:  # e.g. "cuda" without CUDA
        raise ValueError(f"store_device {value!r} is not available here: {err}") from None


def check_storage(dtype: Any, device: Any) -> tuple[torch.dtype | None, torch.device | None]:
    """``(store_dtype, store_device)`` checked (see :func:`check_store_dtype`, :func:`check_store_device`)."""
    return check_store_dtype(dtype), check_store_device(device)


def saved(
    names: tuple[str, ...] | None, dtype: torch.dtype | None, device: torch.device | None
) -> dict[str, Any]:
    """The options as a state's config holds them: a list of names, dtype and device strings."""
    return {
        "parameters": None if names is None else list(names),
        "store_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "store_device": None if device is None else str(device),
    }


def check_config(config: Any, expected: tuple[str, ...], kind: str) -> dict[str, Any]:
    """A saved config with exactly the ``expected`` keys (the options of :data:`OPTION_KEYS` may be
    absent: None); its values are checked by building a regulariser from it."""
    if not isinstance(config, Mapping):
        raise ValueError(f"state 'config' must be a dict, got {type(config).__name__}")
    config = {**dict.fromkeys(OPTION_KEYS), **config}  # states saved before these options
    keys = set(config)
    if keys != set(expected):
        missing = sorted(set(expected) - keys)
        extra = sorted(keys - set(expected), key=str)
        raise ValueError(f"state 'config' of {kind} has missing keys {missing} and unexpected keys {extra}")
    return config


def check_keys(keys: Any, n_terms: int, num_tasks: int) -> list[TermKey]:
    """Saved term keys: one distinct int or str per stored term. Absent (a state saved before
    keys existed): the keys the old code implied, 0..n-1, or num_tasks - 1 for a merged term."""
    if keys is None:
        return [num_tasks - 1] if n_terms == 1 else list(range(n_terms))
    if not isinstance(keys, list) or len(keys) != n_terms:
        raise ValueError(f"state 'keys' must be a list of one key per task ({n_terms}), got {keys!r}")
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ValueError(f"state 'keys': a term key must be an int or a str, got {key!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"state 'keys' has duplicates: {keys}")
    return list(keys)
