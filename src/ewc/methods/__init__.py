"""Continual-learning methods behind one small interface (:class:`Method`)."""

from __future__ import annotations

from ewc.methods.base import Batch, Joint, Method
from ewc.methods.regularizers import EWCMethod, L2Method

METHODS = ("sgd", "l2", "ewc", "online-ewc", "joint", "joint-cumulative")


def make_method(
    name: str,
    *,
    lam: float = 100.0,
    l2_lam: float | None = None,
    gamma: float = 1.0,
    fisher: str = "exact",
    fisher_samples: int | None = None,
) -> Method:
    """A fresh method by name; ``lam`` is EWC's strength, ``l2_lam`` L2's (default: ``lam``)."""
    if name == "sgd":
        return Method()
    if name == "joint":
        return Joint("task")
    if name == "joint-cumulative":
        return Joint("all")
    if name == "l2":
        return L2Method(lam if l2_lam is None else l2_lam)
    if name == "ewc":
        return EWCMethod(lam, "separate", gamma, fisher, fisher_samples)
    if name == "online-ewc":
        return EWCMethod(lam, "online", gamma, fisher, fisher_samples)
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Batch", "EWCMethod", "Joint", "L2Method", "Method", "make_method"]
