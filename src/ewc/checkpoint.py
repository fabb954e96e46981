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
import time
from typing import Any

import torch
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
        model = build_from_record(dict(ck["architecture"]))
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


def build_from_record(arch: dict[str, Any]) -> nn.Module:
    """The network an architecture record describes (records without a model name are MLPs)."""
    name = arch.pop("model", "mlp")
    input_dim, num_outputs = arch.pop("input_dim"), arch.pop("num_classes")
    input_shape = tuple(arch.pop("input_shape", (input_dim,)))
    return build_model(name, input_shape, num_outputs, **arch)


# ---- a training run's progress at a task boundary (resume after a kill)

PROGRESS_FORMAT = "ewc.progress/1"


class SaveSchedule:
    """When a run saves its progress: after a task, unless saving has been taking more than
    ``share`` of the time since the last save.

    A run's progress grows with its tasks (the accuracy matrix; one quadratic per task for
    ``ewc``), so saving after every task costs O(tasks²) in all: a 1 000-task run would write
    its whole record a thousand times. A save is due when the time since the previous one is at
    least the previous save's duration divided by ``share``: saving takes at most about that share
    of the run, and a killed run loses at most about 1/``share`` times one save's duration of
    work. Where saving is cheap (a 10-task run of the paper's MLP: milliseconds against seconds a
    task) every task is saved. Which tasks are saved never changes the results: a resumed run
    redoes the tasks after the last save from the same state.
    """

    def __init__(self, share: float = 0.1, clock: Any = time.monotonic):
        self.share, self.clock = share, clock
        self.last_end: float | None = None  # when the last save finished
        self.last_cost = 0.0  # how long it took

    def due(self) -> bool:
        return self.last_end is None or self.clock() - self.last_end >= self.last_cost / self.share

    def save(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` (the save), timing it."""
        start = self.clock()
        fn(*args)
        self.last_end = self.clock()
        self.last_cost = self.last_end - start


def save_progress(
    path: str | os.PathLike, identity: str, model: nn.Module, method: Method, loop: dict[str, Any]
) -> None:
    """Save a run after a finished task: the network, the method's state, the loop's record so far
    (``loop``: accuracy matrix, curves, step, timings) and torch's global random state, atomically.
    ``identity`` names the run's settings; :func:`load_progress` resumes only the same run."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_save(
        {
            "format": PROGRESS_FORMAT,
            "identity": identity,
            "model": model.state_dict(),
            "state": method.state_dict(),
            "loop": loop,
            "rng": rng,
        },
        path,
    )


def load_progress(
    path: str | os.PathLike, identity: str, model: nn.Module, method: Method
) -> dict[str, Any] | None:
    """Restore ``model``, ``method`` and torch's random state from :func:`save_progress`'s file and
    return the loop's record; None (nothing touched) when there is no such file or it belongs to
    another run. A corrupt file is a ValueError naming it."""
    if not os.path.exists(path):
        return None
    saved = safe_load(path)
    if not isinstance(saved, dict) or saved.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an ewc progress file ({PROGRESS_FORMAT}): remove it")
    if saved.get("identity") != identity:
        return None
    model.load_state_dict(saved["model"])
    method.load_state_dict(saved["state"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return saved["loop"]
