"""The costs issue #18 bounds, on the model and data of ``ewc experiment languages`` (its defaults).

1. **The Fisher of one language against an epoch of its training.** The library loop's work for a
   language: ``epoch`` = one pass over its 20 000 training words in the experiment's batches of 64
   (313 steps of forward, backward, clipping, Adam; fine-tuning, no penalty); ``Fisher`` = the
   experiment's consolidation (``EWC.consolidate`` on the first 1 000 training words, ``fisher =
   "sample"``, per-sample gradients of the word likelihood, ``shift_labels=True``). Printed: both
   process CPU times and the Fisher in epochs (target: at most 2).
2. **What the penalty adds to a Hugging Face Trainer step.** ``Trainer`` against ``EWCTrainer`` whose
   EWC holds the three earlier languages (english, german, french, each with its real Fisher;
   λ = 3, the default run's choice), both training the experiment's model on swedish words in
   the experiment's batches (the same collate function); a step's process CPU time from
   ``on_step_begin`` to ``on_step_end`` (forward, backward, penalty, clipping, Adam), the two
   variants in a shuffled order each round, the first ``--warmup`` steps of a run dropped.
   Printed: median ms/step and the ratio, of the medians, paired (median over rounds of the
   ratio of the round medians) and of the fastest rounds (the least disturbed by other jobs on a
   shared machine). Target: at most 1.10.

Process CPU time with one torch thread, because the 2-core machine may be shared with other jobs.

Run (from the repository root; under a minute)::

    .venv/bin/python benchmarks/languages_cost.py
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import random
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from integration_overhead import trainer_clock

from ewc.experiments.languages import Config, settings
from ewc.experiments.languages_model import build_lm
from ewc.experiments.languages_paths import WordItems, collate
from ewc.experiments.languages_train import (
    data_order,
    fisher_batches,
    library_task,
    load_tasks,
    make_optimizer,
    make_regularizer,
    task_generator,
)


def model_of(s: dict[str, Any], vocab: int) -> torch.nn.Module:
    shape = {k: s[k] for k in ("n_embd", "n_layer", "n_head")}
    return build_lm(s["model"], vocab, n_positions=s["max_length"] + 2, seed=0, **shape)


def fisher_vs_epoch(s: dict[str, Any], vocab: int, tasks: list[Any]) -> tuple[float, float]:
    """(CPU seconds of one epoch of training, median CPU seconds of one language's Fisher)."""
    model = model_of(s, vocab)
    train = tasks[0].train
    steps = math.ceil(len(train) / s["batch_size"])
    order = data_order(len(train), steps, s["batch_size"], task_generator(0, 0, 0))
    t = time.process_time()
    library_task(model, train, order, None, None, s)
    epoch = time.process_time() - t
    reg = make_regularizer("ewc", model, 3.0, s)
    fisher = []
    for i, task in enumerate(tasks[:3]):
        batches = fisher_batches(task.train, s)
        t = time.process_time()
        reg.consolidate(batches, key=task.name, generator=task_generator(0, i, 1), shift_labels=True)
        fisher.append(time.process_time() - t)
    return epoch, statistics.median(fisher)


def trainer_steps(
    s: dict[str, Any], vocab: int, tasks: list[Any], opts: argparse.Namespace
) -> dict[str, list[float]]:
    """Median ms/step of each round for ``Trainer`` and ``EWCTrainer`` (see the module docstring)."""
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from ewc.integrations.transformers import EWCTrainer

    times: list[float] = []

    swedish = tasks[-1].train
    order = data_order(len(swedish), opts.steps, s["batch_size"], task_generator(0, 3, 0))
    items = WordItems([swedish[k] for idx in order for k in idx])
    runs = {}
    for name in ("Trainer", "EWCTrainer"):
        model = model_of(s, vocab)
        kw: dict[str, Any] = {}
        if name == "EWCTrainer":
            reg = make_regularizer("ewc", model, 3.0, s)
            for i, task in enumerate(tasks[:3]):
                gen = task_generator(0, i, 1)
                reg.consolidate(
                    fisher_batches(task.train, s), key=task.name, generator=gen, shift_labels=True
                )
            kw["ewc"] = reg
        optimizer = make_optimizer(model, s["lr"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=s["batch_size"],
            max_steps=opts.steps,
            train_sampling_strategy="sequential",
            max_grad_norm=s["grad_clip"],
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            log_level="error",
        )
        cls = EWCTrainer if name == "EWCTrainer" else transformers.Trainer
        trainer = cls(
            model=model,
            args=args,
            train_dataset=items,
            data_collator=collate,
            optimizers=(optimizer, schedule),
            callbacks=[trainer_clock(times)],
            **kw,
        )
        trainer.remove_callback(PrinterCallback)
        runs[name] = trainer
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    shuffle = random.Random(0)
    for _ in range(opts.rounds):
        for name in shuffle.sample(sorted(runs), len(runs)):
            times.clear()
            runs[name].train()
            rounds[name].append(1e3 * statistics.median(times[opts.warmup :]))
    return rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=14, help="Trainer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted")
    ap.add_argument("--rounds", type=int, default=30)
    opts = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    s = settings(Config(threads=1))
    vocab, tasks = load_tasks(s)
    model = model_of(s, vocab)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, {platform.machine()}, 1 thread, process CPU time; the experiment's "
        f"model ({s['model']}, {params} parameters, n_embd {s['n_embd']}, {s['n_layer']} layers), "
        f"batches of {s['batch_size']} words, {len(tasks[0].train)} training words per language\n"
    )
    epoch, fisher = fisher_vs_epoch(s, vocab, tasks)
    steps = math.ceil(len(tasks[0].train) / s["batch_size"])
    print(
        f"epoch ({steps} steps): {epoch:.2f} s CPU; Fisher of {s['fisher_samples']} words: {fisher:.2f} s CPU"
    )
    print(f"Fisher / epoch: {fisher / epoch:.3f} epochs (target <= 2)\n")
    rounds = trainer_steps(s, vocab, tasks, opts)
    plain, ewc = statistics.median(rounds["Trainer"]), statistics.median(rounds["EWCTrainer"])
    paired = statistics.median(a / b for a, b in zip(rounds["EWCTrainer"], rounds["Trainer"], strict=True))
    fastest = min(rounds["EWCTrainer"]) / min(rounds["Trainer"])
    print("| variant | ms/step: median of rounds | fastest round | ratio: medians | paired | fastest |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| Trainer | {plain:.2f} | {min(rounds['Trainer']):.2f} | 1.000 | 1.000 | 1.000 |")
    print(
        f"| EWCTrainer (3 languages, λ = 3) | {ewc:.2f} | {min(rounds['EWCTrainer']):.2f} | "
        f"{ewc / plain:.3f} | {paired:.3f} | {fastest:.3f} |"
    )
    print(f"\n{opts.rounds} rounds x {opts.steps - opts.warmup} timed steps (target: ratio <= 1.10)")


if __name__ == "__main__":
    main()
