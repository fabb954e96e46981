"""Framework overhead of ``ewc.train.run_method`` over a bare PyTorch loop doing the same work.

Both train the same MLP from the same initial weights on the same permuted-MNIST tasks (the
embedded mnist-10k), with the same batch order, optimiser and number of steps, and both evaluate
the same things: the curve subsets of every task at the start and end of each task and every
``--eval-every`` steps, and the full test sets after each task (the accuracy matrix). The method
is plain fine-tuning (``sgd``) so that only the loop itself is compared. Runs alternate
(bare, ewc, bare, ewc, ...) and the medians are compared.

Run (from the repository root)::

    .venv/bin/python benchmarks/train_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from ewc.data import load_dataset, make_sequence
from ewc.models import make_mlp
from ewc.train import TrainConfig, accuracy, run_method


def bare_loop(tasks: list, cfg: TrainConfig) -> list[list[float]]:
    """The same training and evaluation written directly in PyTorch."""
    torch.manual_seed(cfg.seed)
    model = make_mlp(math.prod(tasks[0].x_train.shape[1:]), cfg.hidden, 10)
    tests = [(t.x_test, t.y_test) for t in tasks]
    subsets = [(x[: cfg.curve_samples], y[: cfg.curve_samples]) for x, y in tests]
    [accuracy(model, x, y) for x, y in tests]  # baseline accuracies
    matrix = []
    for i, task in enumerate(tasks):
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed * 10_007 + i)
        x, y = task.x_train, task.y_train
        [accuracy(model, sx, sy) for sx, sy in subsets]
        model.train()
        step = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for b in range(0, len(x), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % cfg.eval_every == 0:
                    [accuracy(model, sx, sy) for sx, sy in subsets]
                    model.train()
        if step % cfg.eval_every:
            [accuracy(model, sx, sy) for sx, sy in subsets]
        matrix.append([accuracy(model, tx, ty) for tx, ty in tests])
    return matrix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = make_sequence(load_dataset("mnist-10k"), "permuted", args.tasks, seed=0)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=0.05,
        optimizer="sgd",
        eval_every=args.eval_every,
        progress=False,
        threads=args.threads,
    )
    bare_t, ours_t = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        bare = bare_loop(tasks, cfg)
        bare_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = run_method(tasks, "sgd", cfg)["accuracy_matrix"]
        ours_t.append(time.perf_counter() - t)
    same = bare == ours
    b, o = statistics.median(bare_t), statistics.median(ours_t)
    print(
        f"{args.tasks} tasks x {args.epochs} epoch(s), batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {args.repeats}"
    )
    print("| loop | seconds | ratio |\n|---|---:|---:|")
    print(f"| bare PyTorch | {b:.2f} | 1.00x |\n| ewc.train.run_method | {o:.2f} | {o / b:.3f}x |")
    print(f"identical accuracy matrices: {same}")


if __name__ == "__main__":
    main()
