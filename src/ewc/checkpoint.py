"""A trained continual learner saved with its run: the network, the method's state, and the recipe.

A checkpoint holds the network's architecture record (registry name, input shape, output width,
the factory's options) and weights, the method's registry name, parameters
and ``state_dict()`` (anchors, importances, replay memory, frozen copies …) and the scenario, so
that :func:`load_checkpoint` rebuilds a learner that carries on where the run stopped: its
penalty, memory and heads are exactly those of the end of the run. Written atomically; read with
``torch.load(weights_only=True)`` (no code runs while loading).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ewc.methods import Method, make_method
from ewc.models import build_model
from ewc.scenario import Scenario
from ewc.state import atomic_save, check_model_state, safe_load

FORMAT = "ewc.checkpoint/1"
_KEYS = {"format", "method", "params", "scenario", "architecture", "model", "state"}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    method: Method,
    *,
    name: str,
    params: dict[str, Any],
    scenario: Scenario,
    architecture: dict[str, Any],
) -> None:
    """Save the learner at ``path`` (``architecture``: the run's record of the network: registry
    name, input shape, output width and the factory's options)."""
    atomic_save(
        {
            "format": FORMAT,
            "method": name,
            "params": dict(params),
            "scenario": {"kind": scenario.kind, "task_classes": [list(c) for c in scenario.task_classes]},
            "architecture": dict(architecture),
            "model": model.state_dict(),
            "state": method.state_dict(),
        },
        path,
    )


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, Method, Scenario]:
    """The (model, method, scenario) saved at ``path``; a clear ValueError naming the file for a
    foreign or damaged file, weights that do not fit the recorded network (missing or extra keys,
    other shapes) or that are not finite, and a method state that does not load."""
    ck = safe_load(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or set(ck) != _KEYS:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{os.fspath(path)!r} is not an ewc checkpoint ({FORMAT}); got format {got!r}")
    where = f"checkpoint {os.fspath(path)!r}:"
    try:
        model = _build(dict(ck["architecture"]))
        scenario = Scenario(ck["scenario"]["kind"], ck["scenario"]["task_classes"])
        method = make_method(ck["method"], **ck["params"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} its network, scenario or method record does not build ({err})") from None
    check_model_state(model, ck["model"], f"{where} state 'model'")
    model.load_state_dict(ck["model"])
    method.setup(model, scenario)
    try:
        method.load_state_dict(ck["state"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} the {ck['method']} state does not load ({err})") from None
    return model, method, scenario


def _build(arch: dict[str, Any]) -> nn.Module:
    """The network an architecture record describes (records without a model name are MLPs)."""
    name = arch.pop("model", "mlp")
    input_dim, num_outputs = arch.pop("input_dim"), arch.pop("num_classes")
    input_shape = tuple(arch.pop("input_shape", (input_dim,)))
    return build_model(name, input_shape, num_outputs, **arch)
