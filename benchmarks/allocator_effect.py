"""How much of the per-sample Fisher's CPU overhead is the C allocator returning memory to the OS.

glibc's malloc trims the top of the heap when more than a (dynamic) threshold of it is free and
grows it again on the next request; every page it grows by is a minor page fault, paid in kernel
time. A training step allocates the same sizes every time and reaches a steady state without
faults; the Fisher engine holds more per batch (the captured layer inputs and outputs, the
gradients at the layer outputs), so the heap grows and shrinks once per batch.

This script times the floor (forward + backward), ``empirical`` and ``exact`` on the benchmark
CNN in a fresh process per allocator setting, and prints wall time, kernel time and minor page
faults per method: first with glibc's defaults, then with the heap pinned
(``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184``, the same for the floor
and for ewc). Run from the repository root::

    .venv/bin/python benchmarks/allocator_effect.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TUNED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def worker(threads: int, samples: int, batch: int, repeats: int) -> dict[str, list[float]]:
    """In this process: time each method ``repeats`` times; return wall, sys and faults per run."""
    import torch
    import torch.nn.functional as F

    from ewc import diagonal_fisher

    sys.path.insert(0, os.path.dirname(__file__))
    from fisher_speed import make_model  # the same CNN as the speed benchmark

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_model("cnn")
    x = torch.rand(samples, 1, 28, 28)
    y = torch.randint(0, 10, (samples,))
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, samples, batch)]

    def floor() -> None:
        for xb, yb in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()

    methods = {
        "floor (fwd+bwd)": floor,
        "ewc empirical": lambda: diagonal_fisher(model, batches, mode="empirical"),
        "ewc exact": lambda: diagonal_fisher(model, batches, mode="exact"),
    }
    for fn in methods.values():  # warm-up
        fn()
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out.setdefault(name, []).append(wall)
            out.setdefault(name + "|sys", []).append(r1.ru_stime - r0.ru_stime)
            out.setdefault(name + "|faults", []).append(r1.ru_minflt - r0.ru_minflt)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2560)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.threads, args.samples, args.batch_size, args.repeats)))
        return

    print(
        f"CNN, {args.samples} samples, batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {args.repeats}, each allocator setting in a fresh process"
    )
    print()
    print("| allocator | method | seconds | ratio to floor | kernel seconds | minor faults |")
    print("|---|---|---:|---:|---:|---:|")
    for label, extra in (("glibc defaults", {}), ("heap pinned", TUNED)):
        env = {k: v for k, v in os.environ.items() if k not in TUNED} | extra
        cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads)]
        cmd += ["--samples", str(args.samples), "--batch-size", str(args.batch_size)]
        cmd += ["--repeats", str(args.repeats)]
        res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        floor = statistics.median(res["floor (fwd+bwd)"])
        for name in ("floor (fwd+bwd)", "ewc empirical", "ewc exact"):
            wall = statistics.median(res[name])
            kernel = statistics.median(res[name + "|sys"])
            faults = statistics.median(res[name + "|faults"])
            print(f"| {label} | {name} | {wall:.3f} | {wall / floor:.2f}x | {kernel:.3f} | {faults:,.0f} |")


if __name__ == "__main__":
    main()
