"""EWC as a Lightning callback: :class:`EWCCallback` (``pip install 'ewc[lightning]'``).

A callback cannot change the loss a ``training_step`` returns, so it adds the penalty's gradient
instead, in ``on_before_optimizer_step``: once per optimizer step, after every backward of the
accumulated batches (Lightning has already divided their loss by ``accumulate_grad_batches``),
after AMP's unscaling and before gradient clipping, and (under DDP) after the gradients were
averaged over the ranks, to which it adds the same λ·F·(θ − θ*) on every rank. It goes into
``.grad`` of the parameters that optimizer steps: by the penalty's own ``backward()`` in one
process (one fused pass), else (DDP, an optimizer of some parameters) by ``torch.autograd.grad``,
which runs no ``AccumulateGrad`` hook such as DDP's. The penalty is logged there with
``pl_module.log("ewc_penalty", ...)``.

At the end of every ``fit`` that trained (``on_train_end``, on every rank) the callback
consolidates on the data it was given, or on the ``fit``'s own train DataLoader (the datamodule's),
read in order and shared between the ranks (:mod:`ewc.integrations.common`). Its state is the
EWC's ``state_dict`` (``state_dict`` / ``load_state_dict`` of the callback, so every Lightning
checkpoint holds it and ``fit(ckpt_path=...)`` restores it).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ewc import EWC
from ewc.integrations.common import rank_and_world, rank_share, require
from ewc.penalty_config import TermKey

L = require("lightning.pytorch", "lightning", "ewc.integrations.lightning")

__all__ = ["EWCCallback", "PENALTY_LOG_NAME"]

PENALTY_LOG_NAME = "ewc_penalty"


class EWCCallback(L.Callback):
    """Elastic Weight Consolidation for a ``LightningModule`` (see the module docstring).

    Args:
        ewc: a regulariser built on the module (or on ``module``); default: one built at
            ``setup`` from ``ewc_options`` (``lam=``, ``fisher=``, ``batch_size=``, ...; see
            :class:`ewc.EWC`).
        data: the data the Fisher is computed on at the end of each ``fit``: anything
            :func:`ewc.fisher.diagonal_fisher` accepts, or a callable ``(trainer, pl_module) ->
            data``; default: the ``fit``'s train DataLoader. The model is called on each batch's
            inputs (``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict batch).
        consolidate: consolidate at the end of each ``fit`` that ran a training step (default);
            ``False``: only when :meth:`consolidate` is called.
        module: the attribute of the LightningModule that is the penalised model (e.g. ``"net"``);
            default: the LightningModule itself (its ``forward`` must give the logits).
        log_name: the logged scalar's name.
    """

    def __init__(
        self,
        ewc: EWC | None = None,
        *,
        data: Any = None,
        consolidate: bool = True,
        module: str | None = None,
        log_name: str = PENALTY_LOG_NAME,
        **ewc_options: Any,
    ) -> None:
        if ewc is not None and not isinstance(ewc, EWC):
            raise ValueError(f"ewc must be an ewc.EWC, got {type(ewc).__name__}")
        if ewc is not None and (ewc_options or module is not None):
            raise ValueError("give either an EWC (built on the model) or EWC options and module=, not both")
        allowed = set(inspect.signature(EWC).parameters) - {"model"}
        unknown = sorted(set(ewc_options) - allowed)
        if unknown:
            raise ValueError(f"unknown EWC option(s) {unknown}; see ewc.EWC for the options")
        self._ewc = ewc
        self._options = ewc_options
        self._module = module
        self.data = data
        self.consolidate_at_end = bool(consolidate)
        self.log_name = log_name
        self._pending: dict[str, Any] | None = None  # a state loaded before setup
        self._start_step = 0

    @property
    def ewc(self) -> EWC:
        """The regulariser (built at the first ``setup`` unless one was given)."""
        if self._ewc is None:
            raise RuntimeError("the EWC is built at the Trainer's setup: run fit() first, or pass ewc=")
        return self._ewc

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._ewc is None:
            model = pl_module if self._module is None else getattr(pl_module, self._module, None)
            if not isinstance(model, nn.Module):
                raise ValueError(f"the LightningModule has no submodule {self._module!r}")
            self._ewc = EWC(model, **self._options)
        if self._pending is not None:
            self._ewc.load_state_dict(self._pending)
            self._pending = None

    # -- consolidation -----------------------------------------------------------------------

    def consolidate(
        self, data: Any = None, *, trainer: Any = None, key: TermKey | None = None, **fisher_options: Any
    ) -> dict[str, Tensor]:
        """Anchor the model at its current parameters with the Fisher on ``data`` (default: the
        callback's ``data``, else ``trainer``'s train DataLoader); call it on every rank.
        ``key`` and ``fisher_options`` go to :meth:`ewc.EWC.consolidate`. Returns the Fisher."""
        if data is None:
            data = self.data
            if callable(data):
                data = data(trainer, trainer.lightning_module if trainer is not None else None)
        if data is None and trainer is not None:
            data = trainer.train_dataloader
            if isinstance(data, list | tuple | dict):
                raise ValueError(
                    "several train dataloaders: name the Fisher's data with EWCCallback(data=...)"
                )
        if data is None:
            raise ValueError("consolidate needs data (EWCCallback(data=...), or a trainer that has fitted)")
        return self.ewc.consolidate(rank_share(data, self.ewc), key=key, **fisher_options)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_step = trainer.global_step

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.consolidate_at_end and trainer.global_step > self._start_step:
            self.consolidate(trainer=trainer)

    # -- the penalty's gradient and its log --------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer
    ) -> None:
        reg = self.ewc
        value = self.add_gradient(optimizer) if reg.num_tasks else torch.zeros(())
        pl_module.log(self.log_name, value, on_step=True, on_epoch=False)

    def add_gradient(self, optimizer: torch.optim.Optimizer | None = None) -> Tensor:
        """``.grad += λ·F·(θ − θ*)`` for the parameters ``optimizer`` steps (default: all of the
        model's); returns the penalty's value. Nothing is added in a step whose backward was skipped
        (no such parameter has a gradient). In one process, when the optimizer steps every
        parameter, by the penalty's own ``backward()`` (one fused pass into ``.grad``); otherwise
        by ``torch.autograd.grad`` (which runs no ``AccumulateGrad`` hook, such as DDP's)."""
        reg = self.ewc
        trainable = [p for p in reg.model.parameters() if p.requires_grad]
        stepped = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = trainable if stepped is None else [p for p in trainable if id(p) in stepped]
        with torch.enable_grad():
            penalty = reg.penalty()
        if not (params and penalty.requires_grad and any(p.grad is not None for p in params)):
            return penalty.detach()
        if rank_and_world()[1] == 1 and len(params) == len(trainable):
            penalty.backward()
            return penalty.detach()
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        return penalty.detach()

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._ewc is None:
            return {} if self._pending is None else dict(self._pending)
        return self._ewc.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self._ewc is None:
            self._pending = dict(state_dict)
        else:
            self._ewc.load_state_dict(state_dict)
