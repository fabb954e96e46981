"""EWC in the Hugging Face ``Trainer``: :class:`EWCTrainer` (``pip install 'ewc[transformers]'``).

``EWCTrainer`` is a ``transformers.Trainer`` that owns an :class:`ewc.EWC` (``trainer.ewc``):

* ``compute_loss`` adds the penalty to the training loss (never to the evaluation loss), weighted
  so that one optimizer step gets λ·F·(θ − θ*) once, whatever the gradient accumulation: the
  Trainer divides a per-batch loss by the accumulation steps itself, and a loss already scaled over
  the accumulated batch (``num_items_in_batch``) gets the penalty divided by them here. It goes
  through the same backward as the loss, so loss scaling (fp16), gradient clipping, the logged
  ``grad_norm`` and DDP's gradient averaging (of equal terms on every rank) all see it.
* ``log`` adds ``ewc_penalty``, the penalty's mean over the optimizer steps since the last log,
  next to ``loss`` (which includes it), so it reaches ``state.log_history`` and every logger.
* ``consolidate(dataset)`` computes the Fisher on ``dataset`` (default: ``train_dataset``) through
  the Trainer's own collator (dict batches with ``labels``, columns the model does not take removed
  as for evaluation), at the EWC's ``batch_size``; under DDP each rank computes its share and the
  sums are all-reduced (:mod:`ewc.integrations.common`). ``consolidate_after_train=`` does it at
  the end of every ``train()``.
* ``save_model`` (so every checkpoint) writes ``ewc_state.pt`` next to the weights, and
  ``train(resume_from_checkpoint=...)`` reads it back before training resumes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ewc import EWC
from ewc.integrations.common import rank_share, require
from ewc.penalty_config import TermKey
from ewc.state import safe_load

transformers = require("transformers", "transformers", "ewc.integrations.transformers")
trainer_utils = require("transformers.trainer_utils", "transformers", "ewc.integrations.transformers")

__all__ = ["EWCTrainer", "EWC_STATE_NAME", "PENALTY_LOG_NAME"]

EWC_STATE_NAME = "ewc_state.pt"  # in every checkpoint folder and save_model directory
PENALTY_LOG_NAME = "ewc_penalty"  # the logged scalar


class EWCTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with the EWC penalty (see the module docstring).

    Args:
        *args, **kwargs: the ``Trainer``'s (``model=`` is required: the EWC state belongs to one
            model, so ``model_init`` is refused).
        ewc: the regulariser, built on the same model (``EWC(model, lam=..., fisher=...)``);
            default ``EWC(model)``. Its options (``fisher``, ``max_samples``, ``batch_size``,
            ``parameters``, ...) are the Fisher's and the penalty's; ``trainer.ewc`` reads it.
        consolidate_after_train: ``True``: ``consolidate()`` on ``train_dataset`` at the end of
            every ``train()``; a dataset: on that one; ``False`` (default): only when called.
    """

    def __init__(
        self, *args: Any, ewc: EWC | None = None, consolidate_after_train: Any = False, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        if self.model_init is not None:
            raise ValueError("EWCTrainer takes model=, not model_init: its EWC state belongs to one model")
        if ewc is None:
            ewc = EWC(self.model)
        elif not isinstance(ewc, EWC):
            raise ValueError(f"ewc must be an ewc.EWC, got {type(ewc).__name__}")
        elif ewc.model is not self.model:
            raise ValueError("ewc is built on another model than the Trainer's: pass the same model to both")
        self.ewc = ewc
        self.consolidate_after_train = consolidate_after_train
        self._penalty_sum: Tensor | None = None  # Σ penalty / accumulation steps since the last log
        self._penalty_steps = 0.0  # optimizer steps those cover

    # -- consolidation -----------------------------------------------------------------------

    def consolidate(
        self, dataset: Any = None, *, key: TermKey | None = None, **fisher_options: Any
    ) -> dict[str, Tensor]:
        """Anchor the model at its current parameters with the Fisher on ``dataset`` (default:
        ``train_dataset``), batched by the Trainer's collator at the EWC's ``batch_size``; call it on
        every rank. ``key`` and ``fisher_options`` (``generator=``, ``sequence=``, ...) go to
        :meth:`ewc.EWC.consolidate`. Returns this task's Fisher ``{name: F}``."""
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("consolidate needs a dataset (the Trainer has no train_dataset)")
        # the evaluation loader's dataset and collator (columns the model does not take removed);
        # read in order, whole, at the Fisher's batch size: rank_share splits it between ranks
        prepared = self.get_test_dataloader(dataset)
        loader = DataLoader(
            prepared.dataset,
            batch_size=self.ewc.state_dict()["config"]["batch_size"],
            collate_fn=prepared.collate_fn,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.ewc.consolidate(rank_share(loader, self.ewc), key=key, **fisher_options)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a checkpoint to resume from also gives back its EWC state, and
        ``consolidate_after_train`` consolidates once training is over."""
        if resume_from_checkpoint is True and os.path.isdir(self.args.output_dir):
            resume_from_checkpoint = trainer_utils.get_last_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, str | os.PathLike):
            self.load_ewc(resume_from_checkpoint)
        self._penalty_sum, self._penalty_steps = None, 0.0
        out = super().train(resume_from_checkpoint, *args, **kwargs)
        after = self.consolidate_after_train
        if after is True:
            self.consolidate()
        elif after is not False and after is not None:
            self.consolidate(after)
        return out

    # -- the penalty in the loss, and in the logs -------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Any:
        """The Trainer's loss, plus the penalty's share of this micro-batch when training."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not (model.training and torch.is_grad_enabled()):
            return result  # evaluation: the task loss alone
        loss, outputs = result if return_outputs else (result, None)
        steps = getattr(self, "current_gradient_accumulation_steps", 1)
        penalty = self.ewc.penalty()
        value = penalty.detach()
        self._penalty_sum = value / steps if self._penalty_sum is None else self._penalty_sum + value / steps
        self._penalty_steps += 1.0 / steps
        if self.ewc.num_tasks:
            loss = loss + (penalty / steps if self._loss_is_scaled(num_items_in_batch) else penalty)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` takes the loss as already scaled for gradient accumulation
        (the Trainer's own rule; it divides any other loss by the accumulation steps)."""
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool(accepts and num_items_in_batch is not None) or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with ``ewc_penalty`` added to the training logs (those with ``loss``)."""
        if "loss" in logs and self._penalty_sum is not None and self._penalty_steps > 0:
            logs[PENALTY_LOG_NAME] = float(self._penalty_sum) / self._penalty_steps
            self._penalty_sum, self._penalty_steps = None, 0.0
        super().log(logs, *args, **kwargs)

    # -- state -------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (called for every checkpoint too), then the EWC state into the
        same directory (``ewc_state.pt``, written atomically by the process that saves)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.ewc.save(os.path.join(output_dir or self.args.output_dir, EWC_STATE_NAME))

    def load_ewc(self, checkpoint: str | os.PathLike) -> None:
        """Restore the EWC state saved in a checkpoint (or ``save_model``) directory."""
        path = os.path.join(checkpoint, EWC_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{os.fspath(checkpoint)!r} has no {EWC_STATE_NAME}: it was not saved by an EWCTrainer"
            )
        self.ewc.load_state_dict(safe_load(path, map_location="cpu"))
