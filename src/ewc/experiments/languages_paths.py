"""``ewc experiment languages --path transformers | lightning``: one language's steps through the
framework integrations, the same steps as the library loop (:mod:`ewc.experiments.languages_train`).

Each path trains the same model on the same words in the same order (the job's stream, read
sequentially: the Trainer's ``train_sampling_strategy="sequential"``, a DataLoader without shuffling
for Lightning), batched by the same collate function, with the same optimiser (Adam, fresh for each
language, a constant learning rate) and the same gradient clipping, then consolidates on the same
Fisher words with the same generator:

* ``transformers``: an :class:`ewc.integrations.transformers.EWCTrainer` per language (the penalty
  in its loss), ``trainer.consolidate(words, key=language)``;
* ``lightning``: a ``lightning.pytorch.Trainer`` per language with an
  :class:`ewc.integrations.lightning.EWCCallback` (the penalty's gradient before each optimizer
  step), ``callback.consolidate(loader, key=language)``.

So the three paths differ only in the order of floating-point operations (the penalty added to the
loss or to the gradient, the loss's mean taken by Hugging Face or by us); ``key=None`` (fine-tuning)
trains without consolidating. The frameworks are imported when a path runs.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ewc.data.words import encode_batch
from ewc.experiments.languages_model import lm_loss
from ewc.experiments.languages_train import make_optimizer, task_generator
from ewc.penalty import EWC

__all__ = ["PATH_TASKS", "WordItems", "collate", "lightning_task", "transformers_task"]


class WordItems(Dataset):
    """Encoded words as dataset items ``{"input_ids": [ids]}``, in the given order."""

    def __init__(self, words: Sequence[Sequence[int]]):
        self.words = list(words)

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": list(self.words[i])}


def collate(items: Sequence[dict[str, Sequence[int]]]) -> dict[str, Tensor]:
    """A batch of items as :func:`ewc.data.words.encode_batch` makes it."""
    return encode_batch([item["input_ids"] for item in items])


def transformers_task(
    model: nn.Module,
    reg: EWC,
    ordered: Sequence[Sequence[int]],
    fisher_words: Sequence[Sequence[int]],
    s: dict[str, Any],
    key: str | None,
    seed: int,
    task: int,
) -> None:
    """Train ``s["steps"]`` steps on ``ordered`` with an EWCTrainer; then consolidate under ``key``."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    from ewc.integrations.transformers import EWCTrainer

    hf_logging.set_verbosity_error()
    optimizer = make_optimizer(model, s["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=s["batch_size"],
            max_steps=s["steps"],
            train_sampling_strategy="sequential",
            max_grad_norm=s["grad_clip"],
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=seed,
            dataloader_num_workers=0,
        )
        trainer = EWCTrainer(
            model=model,
            args=args,
            train_dataset=WordItems(ordered),
            data_collator=collate,
            ewc=reg,
            optimizers=(optimizer, schedule),
        )
        trainer.remove_callback(PrinterCallback)  # no printed summary per language
        trainer.train()
        if key is not None:
            generator = task_generator(seed, task, 1)
            trainer.consolidate(WordItems(fisher_words), key=key, generator=generator, shift_labels=True)


def lightning_task(
    model: nn.Module,
    reg: EWC,
    ordered: Sequence[Sequence[int]],
    fisher_words: Sequence[Sequence[int]],
    s: dict[str, Any],
    key: str | None,
    seed: int,
    task: int,
) -> None:
    """Train ``s["steps"]`` steps on ``ordered`` with Lightning and an EWCCallback; then consolidate."""
    import lightning.pytorch as L

    from ewc.integrations.lightning import EWCCallback

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    callback = EWCCallback(reg, consolidate=False)
    trainer = L.Trainer(
        max_steps=s["steps"],
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=s["grad_clip"] or None,
        callbacks=[callback],
        num_sanity_val_steps=0,
    )
    loader = DataLoader(WordItems(ordered), batch_size=s["batch_size"], shuffle=False, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning 2.6 on torch 2.13
        trainer.fit(_lightning_module(L, model, s["lr"]), loader)
    if key is not None:
        fisher = DataLoader(WordItems(fisher_words), batch_size=s["fisher_batch"], collate_fn=collate)
        callback.consolidate(fisher, key=key, generator=task_generator(seed, task, 1), shift_labels=True)


def _lightning_module(L: Any, model: nn.Module, lr: float) -> Any:
    """A LightningModule around ``model``: the library's loss, the library's optimiser."""

    class CharLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return lm_loss(self.model, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return make_optimizer(self.model, lr)

    return CharLM()


PATH_TASKS: dict[str, Callable[..., None]] = {"transformers": transformers_task, "lightning": lightning_task}
