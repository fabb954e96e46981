"""The continual-learning method an :class:`~ewc.rl.dqn.Agent` runs, built from its :class:`DQNConfig`.

``method="ewc"`` (the default) is the paper's policy EWC, :class:`ewc.rl.consolidation.PolicyEWC`,
set by the ``ewc_*`` and ``fisher_*`` fields. The other names in :data:`~ewc.rl.config.AGENT_METHODS`
are registered methods (``make_method(name, **method_params)``) set up on the Q-network's
:class:`~ewc.rl.qnet.SharedView`, so they anchor, track or measure the shared parameters only:
``l2`` anchors them, ``mas`` takes its importances from ‖Q(s)‖² on the context's replay states,
``si`` integrates its path over the updates (:class:`VisitSI`: one integral per visit), ``sgd``
adds nothing. Methods that need labelled data or output heads are refused by the config.
"""

from __future__ import annotations

from typing import Any

from ewc.methods import Method, SIMethod, make_method
from ewc.rl.config import DQNConfig
from ewc.rl.consolidation import PolicyEWC
from ewc.rl.qnet import SharedView
from ewc.scenario import Scenario

__all__ = ["VisitSI", "build_method"]


class VisitSI(SIMethod):
    """SI over visits: the path integral starts at the visit's first context and is consolidated
    (Ω merged, θ* moved) at its first ``after_task``; a visit's other contexts share it (SI keeps
    one merged Ω, so nothing per context is lost)."""

    def before_task(self, index: int, task: Any) -> None:
        if self._start is None:
            super().before_task(index, task)

    def after_task(self, index: int, task: Any) -> None:
        if self._start is not None:
            super().after_task(index, task)


def build_method(config: DQNConfig, view: SharedView) -> Method:
    """The method ``config`` names, set up on ``view`` (what the agent's hooks call)."""
    c = config
    method: Method
    if c.method == "ewc":
        method = PolicyEWC(c.ewc_lam, c.ewc_mode, c.ewc_gamma, c.ewc_min_steps, c.fisher_temperature)
    elif c.method == "si":
        built = make_method("si", **c.method_params)
        assert isinstance(built, SIMethod)
        method = VisitSI(built.c, built.xi)
    else:
        method = make_method(c.method, **c.method_params)
    method.setup(view, Scenario.shared())
    return method
