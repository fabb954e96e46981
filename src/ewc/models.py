"""The model registry: ``{name: factory}``; a factory builds a fresh network for a task sequence.

Contract: ``factory(input_shape, num_outputs, **options) -> nn.Module`` where ``input_shape`` is
one sample's shape (e.g. ``(28, 28)``), ``num_outputs`` the width of the output layer (all heads
of the scenario) and ``options`` the architecture settings the factory declares as keyword
arguments (the MLP: ``hidden``, ``dropout``, ``batchnorm``). Register a new one with
:func:`register_model`; ``mlp`` (the paper's network) is the first entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ewc.config import accepted_options

__all__ = ["MLP_HIDDEN", "MODELS", "build_model", "make_mlp", "mlp", "model_options", "register_model"]

ModelFactory = Callable[..., nn.Module]
#: the paper's MLP width (two hidden layers of 400), the default of ``mlp`` and of ``ewc run``
MLP_HIDDEN: tuple[int, ...] = (400, 400)
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory`` under ``name`` (a clear error for a name taken twice)."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS and MODELS[name] is not factory:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = factory
        return factory

    return add


def make_mlp(
    input_dim: int,
    hidden: tuple[int, ...],
    num_classes: int,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """The paper's fully connected classifier: Flatten, (Linear, ReLU[, Dropout]) × depth, Linear.

    With ``batchnorm`` each hidden block is Linear → BatchNorm1d → ReLU [→ Dropout] (for the
    BatchNorm experiment; the paper's networks have no normalisation).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("mlp")
def mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    *,
    hidden: Sequence[int] = MLP_HIDDEN,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """:func:`make_mlp` on the flattened input."""
    return make_mlp(math.prod(input_shape), tuple(hidden), num_outputs, dropout, batchnorm)


def build_model(
    name: str, input_shape: Sequence[int], num_outputs: int, *, strict: bool = True, **options: Any
) -> nn.Module:
    """A fresh registered model. ``options`` the factory does not declare are a clear error, or,
    with ``strict=False`` (the training loop, which offers every architecture setting), left out."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    factory = MODELS[name]
    taken = accepted_options(factory, options)
    unknown = sorted(set(options) - set(taken))
    if unknown and strict:
        raise ValueError(f"model {name!r} takes no option(s) {', '.join(unknown)}")
    return factory(tuple(input_shape), num_outputs, **taken)


def model_options(name: str, **options: Any) -> dict[str, Any]:
    """The subset of ``options`` that model ``name``'s factory takes (what a run records)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return accepted_options(MODELS[name], options)
