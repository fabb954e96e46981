"""What the EWC penalty adds to a training step of the Hugging Face Trainer and of Lightning.

Model: a GPT-2-style character model built from a config (vocab 100, n_embd 128, 4 layers, 4
heads, T = 64; 0.86 M parameters), causal-LM loss on random tokens, batches of 8 sequences.
Variants, each with its own copy of the same initial model:

* ``Trainer``: ``transformers.Trainer`` (AdamW, the defaults), no penalty;
* ``EWCTrainer``: :class:`ewc.integrations.transformers.EWCTrainer` whose EWC holds ``--tasks``
  consolidations (random positive Fishers at perturbed parameters, through the public
  ``consolidate(fisher_diag=...)``, so no Fisher is computed; λ = 100); its loss carries the
  penalty and the value is read every step (for ``ewc_penalty`` in the logs);
* ``Lightning`` / ``EWCCallback``: the same model in a ``LightningModule`` (AdamW), without and
  with :class:`ewc.integrations.lightning.EWCCallback` (the penalty's gradient added before each
  optimizer step, its value logged).

A step's time is the process CPU time (``time.process_time``, one torch thread) from the
framework's step-begin hook to its step-end hook (``on_step_begin`` / ``on_step_end``,
``on_train_batch_start`` / ``on_train_batch_end``): forward, backward, the penalty, the optimizer
step. Process CPU time, not wall-clock, because the machine is shared with other jobs: a wall-clock
step during which another process holds the core is 2-3x longer. The variants run ``--steps``
steps in turn, in a freshly shuffled order every round; the first ``--warmup`` steps of each run
are dropped. Printed: the median ms/step of each variant and the ratio EWC / plain of the same
framework, of the medians and paired (the median over rounds of the ratio of the round medians).

Run (from the repository root)::

    .venv/bin/python benchmarks/integration_overhead.py

Target (issue #18): the penalty adds at most 10 % to a Trainer step.
"""

from __future__ import annotations

import argparse
import logging
import platform
import random
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

from ewc import EWC

V, T, BATCH = 100, 64, 8


def char_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=V, n_positions=T, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def data(n: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "labels": r} for r in ids]


def filled_ewc(model: torch.nn.Module, tasks: int) -> EWC:
    """An EWC with ``tasks`` consolidations at perturbed parameters, random positive Fishers."""
    gen = torch.Generator().manual_seed(2)
    reg = EWC(model, lam=100.0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(tasks):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n] + 0.01 * torch.randn(p.shape, generator=gen))
        reg.consolidate(
            fisher_diag={n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
        )
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    return reg


class Variant:
    """One model and its framework; ``run(steps)`` trains that many steps, returns step times."""

    def __init__(self, name: str, framework: str, run: Any) -> None:
        self.name, self.framework, self.run = name, framework, run
        self.rounds: list[float] = []  # median ms/step of each round


def trainer_clock(times: list[float]) -> Any:
    """A ``transformers.TrainerCallback`` appending each step's process CPU time to ``times``
    (from ``on_step_begin`` to ``on_step_end``)."""
    import transformers

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            self.t = time.process_time()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            times.append(time.process_time() - self.t)

    return Clock()


def trainer_variant(name: str, tasks: int, out: str, steps: int) -> Variant:
    import transformers

    from ewc.integrations.transformers import EWCTrainer

    times: list[float] = []

    model = char_model()
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        train_sampling_strategy="sequential",
        log_level="error",
    )
    kw: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": data(BATCH * steps),
        "callbacks": [trainer_clock(times)],
    }
    trainer = EWCTrainer(ewc=filled_ewc(model, tasks), **kw) if tasks else transformers.Trainer(**kw)
    trainer.remove_callback(transformers.PrinterCallback)

    def run() -> list[float]:
        times.clear()
        trainer.train()
        return list(times)

    return Variant(name, "Trainer", run)


def lightning_variant(name: str, tasks: int, out: str, steps: int) -> Variant:
    import lightning.pytorch as L

    from ewc.integrations.lightning import EWCCallback

    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, index):  # noqa: ANN001, ANN201
            self.t = time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, index):  # noqa: ANN001, ANN201
            times.append(time.process_time() - self.t)

    class LM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = char_model()

        def forward(self, **batch: torch.Tensor) -> Any:
            return self.model(**batch)

        def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=5e-5)

    module = LM()
    callbacks: list[Any] = [Clock()]
    if tasks:
        callbacks.append(EWCCallback(filled_ewc(module, tasks), consolidate=False))
    loader = torch.utils.data.DataLoader(data(BATCH * steps), batch_size=BATCH)

    def run() -> list[float]:
        times.clear()
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=10,
            default_root_dir=out,
            callbacks=callbacks,
        )
        trainer.fit(module, loader)
        return list(times)

    return Variant(name, "Lightning", run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=5, help="consolidated tasks in the EWC variants")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frameworks", default="transformers,lightning")
    opts = ap.parse_args()
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    frameworks = opts.frameworks.split(",")
    with tempfile.TemporaryDirectory() as out:
        variants = []
        if "transformers" in frameworks:
            variants += [trainer_variant("Trainer", 0, out, opts.steps)]
            variants += [trainer_variant(f"EWCTrainer ({opts.tasks} tasks)", opts.tasks, out, opts.steps)]
        if "lightning" in frameworks:
            variants += [lightning_variant("Lightning", 0, out, opts.steps)]
            variants += [lightning_variant(f"EWCCallback ({opts.tasks} tasks)", opts.tasks, out, opts.steps)]
        order = random.Random(0)
        for _ in range(opts.rounds):
            for v in order.sample(variants, len(variants)):
                v.rounds.append(1e3 * statistics.median(v.run()[opts.warmup :]))
    params = sum(p.numel() for p in char_model().parameters())
    print(
        f"torch {torch.__version__}, {platform.machine()}, threads={opts.threads}, GPT-2 char model "
        f"({params / 1e6:.2f} M parameters, vocab {V}, n_embd 128, 4 layers, T={T}), batch {BATCH}, "
        f"{opts.rounds} rounds x {opts.steps - opts.warmup} timed steps, process CPU time (shared machine)\n"
    )
    print("| variant | ms/step (median over rounds) | ratio to plain | ratio to plain (paired) |")
    print("|---|---:|---:|---:|")
    for v in variants:
        plain = next(p for p in variants if p.framework == v.framework)
        ratio = statistics.median(v.rounds) / statistics.median(plain.rounds)
        paired = statistics.median(a / b for a, b in zip(v.rounds, plain.rounds, strict=True))
        print(f"| {v.name} | {statistics.median(v.rounds):.2f} | {ratio:.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
