"""Time per SGD step with and without the EWC penalty, after 1, 5 and 20 consolidated tasks.

Model: MLP 784-400-400-10 (ReLU), cross-entropy, SGD, batches of 64 and 256 (one table each) of
fixed random MNIST-shaped data. Every variant has its own copy of the same initial model and
optimiser; the EWC state is filled through the public API (``consolidate(fisher_diag=...)`` with
random positive Fishers at randomly perturbed parameters), so no Fisher is computed. Each EWC
variant runs with float32 storage of θ* and F (the default: the parameters' dtype) and with
``store_dtype=torch.bfloat16`` ("bf16 store"). An EWC step is ``loss = ce + reg.penalty();
loss.backward(); opt.step()``, which never reads the penalty's value (it is computed only when
read); the "value read every step" rows also call ``loss.item()`` after the step.

The floor rows add λF(θ − θ*) of the merged quadratic to the gradients after ``loss.backward()``
with ``torch._foreach_*`` ops (``_foreach_sub``, ``_foreach_mul_``, ``_foreach_add_``; no penalty
value, no autograd node). The "fused floor" rows do the same in two passes: θ − θ* into a buffer
allocated once, then ``_foreach_addcmul_`` into ``.grad``.

After a warm-up the variants are timed one step each, in a freshly shuffled order every round
(this cancels drift and ordering effects). The time is the calling thread's CPU time by default
(``--clock cpu``, ``time.thread_time``; one thread only): on a shared machine wall-clock step
times are bimodal (a step during which the OS gives the core to another process takes 2-3x
longer, and a longer step is preempted more often), so wall-clock medians and their ratios move
by several percent between runs; ``--clock wall`` measures wall-clock time. The table reports
the median ms/step, its ratio to plain SGD, and two ratios to the floor of the same storage: of
the medians, and the median over rounds of the ratio within a round ("paired").
A second table gives ``reg.memory_bytes()`` per storage.

Run (from the repository root)::

    .venv/bin/python benchmarks/penalty_overhead.py --threads 1

Target (issue #15): online EWC at 20 tasks, batch 64, within 1.05x of the floor.
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ewc import EWC


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))


def filled_ewc(
    model: nn.Module, mode: str, tasks: int, gen: torch.Generator, store_dtype: torch.dtype | None = None
) -> EWC:
    """An EWC with ``tasks`` consolidations at perturbed parameters with random Fishers."""
    reg = EWC(model, lam=100.0, mode=mode, gamma=0.9 if mode == "online" else 1.0, store_dtype=store_dtype)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for _ in range(tasks):
            for n, p in model.named_parameters():
                p.copy_(start[n] + 0.01 * torch.randn(p.shape, generator=gen))
            fisher = {n: torch.rand(p.shape, generator=gen) + 1e-3 for n, p in model.named_parameters()}
            reg.consolidate(fisher_diag=fisher)
        for n, p in model.named_parameters():
            p.copy_(start[n])
    return reg


def make_step(
    model: nn.Module, reg: EWC | None, x: torch.Tensor, y: torch.Tensor, lr: float
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if reg is not None:
            loss = loss + reg.penalty()
        loss.backward()
        opt.step()

    return step


def make_read_step(
    model: nn.Module, reg: EWC, x: torch.Tensor, y: torch.Tensor, lr: float
) -> Callable[[], None]:
    """The EWC step, with the loss (and so the penalty's value) read after the optimiser step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y) + reg.penalty()
        loss.backward()
        opt.step()
        loss.item()

    return step


def make_floor_step(
    model: nn.Module, reg: EWC, x: torch.Tensor, y: torch.Tensor, lr: float, fused: bool = False
) -> Callable[[], None]:
    """Plain SGD whose gradients get λF(θ − θ*) of ``reg``'s merged quadratic added with foreach ops."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    anchors, fishers = reg.anchors(), reg.precisions()  # the merged quadratic, as stored
    params = [p for n, p in model.named_parameters() if n in anchors]
    a_list = [anchors[n] for n, _ in model.named_parameters() if n in anchors]
    f_list = [fishers[n] for n, _ in model.named_parameters() if n in anchors]
    lam = reg.lam

    buffers = [torch.empty_like(p) for p in params]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            if fused:
                for p, a, d in zip(params, a_list, buffers, strict=True):
                    torch.sub(p, a, out=d)
                torch._foreach_addcmul_([p.grad for p in params], buffers, f_list, value=lam)
            else:
                diff = torch._foreach_sub(params, a_list)
                torch._foreach_mul_(diff, f_list)
                torch._foreach_add_([p.grad for p in params], diff, alpha=lam)
        opt.step()

    return step


def time_rounds(
    steps: dict[Any, Callable[[], None]],
    rounds: int,
    warmup: int,
    seed: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Seconds per call of every step, one call each per round in a freshly shuffled order."""
    order = list(steps)
    times: dict[Any, list[float]] = {k: [] for k in order}
    shuffler = random.Random(seed)
    for r in range(warmup + rounds):
        shuffler.shuffle(order)
        for key in order:
            t0 = clock()
            steps[key]()
            dt = clock() - t0
            if r >= warmup:
                times[key].append(dt)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=300, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=30, help="untimed rounds first")
    parser.add_argument("--tasks", default="1,5,20", help="comma-separated task counts")
    parser.add_argument("--batch-sizes", default="64,256", help="comma-separated; one table each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the calling thread's CPU time (time.thread_time; default, one thread only); wall",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --clock wall with --threads > 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    torch.set_num_threads(args.threads)
    task_counts = [int(t) for t in args.tasks.split(",")]
    stores = {"": None, ", bf16 store": torch.bfloat16}
    memory: dict[tuple[str, int], dict[str, int]] = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(batch, 784, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        base = make_model()

        variants: dict[tuple[str, int], Callable[[], None]] = {
            ("plain SGD", 0): make_step(copy.deepcopy(base), None, x, y, lr=1e-3)
        }
        for label, dtype in stores.items():
            for mode in ("online", "separate"):
                for t in task_counts:
                    model = copy.deepcopy(base)
                    reg = filled_ewc(model, mode, t, gen, store_dtype=dtype)
                    memory.setdefault((mode, t), {})[label] = reg.memory_bytes()
                    variants[(f"EWC {mode}{label}", t)] = make_step(model, reg, x, y, lr=1e-3)
            top = max(task_counts)
            model = copy.deepcopy(base)
            reg = filled_ewc(model, "online", top, gen, store_dtype=dtype)
            variants[(f"EWC online{label}, value read every step", top)] = make_read_step(
                model, reg, x, y, 1e-3
            )
            model = copy.deepcopy(base)
            reg = filled_ewc(model, "online", top, gen, store_dtype=dtype)
            variants[(f"floor: foreach λF(θ − θ*) into .grad{label}", top)] = make_floor_step(
                model, reg, x, y, 1e-3
            )
            model = copy.deepcopy(base)
            reg = filled_ewc(model, "online", top, gen, store_dtype=dtype)
            variants[(f"fused floor: θ − θ* into a buffer, addcmul_ into .grad{label}", top)] = (
                make_floor_step(model, reg, x, y, 1e-3, fused=True)
            )

        times = time_rounds(variants, args.rounds, args.warmup, args.seed, clock)

        plain = statistics.median(times[("plain SGD", 0)])
        floors = {
            label: times[(f"floor: foreach λF(θ − θ*) into .grad{label}", max(task_counts))]
            for label in stores
        }
        print(
            f"torch {torch.__version__}, {platform.machine()}, threads={args.threads}, "
            f"batch={batch}, {args.rounds} timed rounds after {args.warmup} warm-up, {args.clock} time"
        )
        print()
        print("| variant | tasks | ms/step (median) | ratio to plain | ratio to floor | ", end="")
        print("ratio to floor (paired) |")
        print("|---|---:|---:|---:|---:|---:|")
        for key in variants:
            med = statistics.median(times[key])
            label = ", bf16 store" if "bf16 store" in key[0] else ""
            cells = ["", ""]
            if key[1]:
                floor = floors[label]
                paired = statistics.median(t / f for t, f in zip(times[key], floor, strict=True))
                cells = [f"{med / statistics.median(floor):.3f}", f"{paired:.3f}"]
            print(f"| {key[0]} | {key[1]} | {med * 1e3:.3f} | {med / plain:.3f} | {' | '.join(cells)} |")
        print()

    n_params = sum(p.numel() for p in make_model().parameters())
    print(f"memory_bytes() of the stored θ* and F ({n_params:,} float32 parameters)")
    print()
    print("| mode | tasks | float32 store | bf16 store | ratio |")
    print("|---|---:|---:|---:|---:|")
    for (mode, t), by in memory.items():
        f32, bf16 = by[""], by[", bf16 store"]
        print(f"| {mode} | {t} | {f32:,} | {bf16:,} | {bf16 / f32:.3f} |")


if __name__ == "__main__":
    main()
