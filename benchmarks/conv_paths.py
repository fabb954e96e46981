"""Per-sample convolution weight gradients: the grouped call against unfold + bmm (thin layers).

``ewc.fisher_rules.ConvRule`` has two ways to the per-sample weight gradients of a convolution:
one grouped ``convolution_backward`` in which the samples are extra groups, and, for thin layers
(C_in/groups · kernel size ≤ ``THIN_PATCH``) whose gradients arrive in several passes (the exact
Fisher), the unfolded input (built once per call) times each pass's output gradients in one
``bmm``. This script measures both, side by side in shuffled rounds:

1. per layer shape: milliseconds per pass of the grouped call, of the bmm, and of the unfold
   (paid once per call, i.e. divided by K passes), and the speed-up at K = 1 and K = 9;
2. the whole exact Fisher of the benchmark CNN (conv 1→32, pool, conv 32→64, pool, linear) on
   ``--samples`` samples with the thin path on (``THIN_PATCH`` = 32) and off (0), and the floor
   (one forward + backward pass), all in this one process.

Both paths are checked to agree before timing. Run (from the repository root)::

    .venv/bin/python benchmarks/conv_paths.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fisher_speed import batches, floor, make_data, make_model, time_in_process

import ewc.fisher_rules as rules
from ewc import diagonal_fisher

# (samples, C_in, C_out, height = width, kernel, stride): first layers of small image models.
SHAPES = [
    (86, 1, 32, 28, 3, 1),  # the benchmark CNN's first layer, one part of 86 samples
    (86, 3, 32, 32, 3, 1),
    (86, 3, 64, 32, 3, 1),
    (32, 3, 64, 64, 7, 2),
    (86, 1, 64, 28, 3, 1),
    (86, 4, 32, 28, 3, 1),
    (86, 8, 16, 28, 3, 1),  # patch 72: above THIN_PATCH, for contrast
]


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_shape(n: int, cin: int, cout: int, size: int, k: int, s: int, rounds: int) -> tuple[float, ...]:
    """Milliseconds of the grouped call, the bmm and the unfold for one layer shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, cin, size, size, generator=gen)
    pad = k // 2
    out = (size + 2 * pad - k) // s + 1
    g = torch.randn(n, cout, out, out, generator=gen)
    w = torch.empty(cout, cin, k, k)

    def grouped() -> torch.Tensor:
        _, gw, _ = torch.ops.aten.convolution_backward(
            g.reshape(1, n * cout, out, out),
            x.reshape(1, n * cin, size, size),
            w.new_empty((n * cout, cin, k, k)),
            None,
            [s, s],
            [pad, pad],
            [1, 1],
            False,
            [0, 0],
            n,
            [False, True, False],
        )
        return gw.reshape(n, cout, cin * k * k)

    def unfold() -> torch.Tensor:
        return F.unfold(x, k, padding=pad, stride=s)

    u = unfold()

    def bmm() -> torch.Tensor:
        return torch.bmm(u, g.reshape(n, cout, out * out).transpose(1, 2)).transpose(1, 2)

    ref = grouped()
    diff = (bmm() - ref).abs().max() / ref.abs().max()
    if diff > 1e-5:
        raise SystemExit(f"paths disagree on shape {(n, cin, cout, size, k, s)}: {diff:.1e}")
    return median_ms(grouped, rounds), median_ms(bmm, rounds), median_ms(unfold, rounds)


def layer_table(rounds: int) -> None:
    cols = ["samples", "C_in", "C_out", "size", "kernel", "stride", "patch", "grouped ms", "bmm ms"]
    cols += ["unfold ms", "speed-up K=1", "speed-up K=9"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for shape in SHAPES:
        n, cin, cout, size, k, s = shape
        t_g, t_b, t_u = time_shape(*shape, rounds)
        row = [n, cin, cout, size, k, s, cin * k * k, f"{t_g:.3f}", f"{t_b:.3f}", f"{t_u:.3f}"]
        row += [f"{t_g / (t_b + t_u):.2f}x", f"{t_g / (t_b + t_u / 9):.2f}x"]
        print("| " + " | ".join(map(str, row)) + " |")
    print("\n(speed-up: grouped / (bmm + unfold / K), the unfold being shared by the K passes of a call)")


def whole_fisher(samples: int, rounds: int) -> None:
    model = make_model("cnn")
    data = batches(*make_data(samples), 256)
    default = rules.THIN_PATCH

    def exact(thin: int) -> Callable[[], None]:
        def run() -> None:
            rules.THIN_PATCH = thin
            try:
                diagonal_fisher(model, data, mode="exact")
            finally:
                rules.THIN_PATCH = default

        return run

    methods = {"floor (fwd+bwd)": lambda: floor(model, data), "exact, thin path": exact(default)}
    methods["exact, grouped only"] = exact(0)
    rules.THIN_PATCH = default
    on = diagonal_fisher(model, data[:1], mode="exact")
    rules.THIN_PATCH = 0
    off = diagonal_fisher(model, data[:1], mode="exact")
    rules.THIN_PATCH = default
    worst = max(((on[k] - off[k]).abs().max() / off[k].abs().max()).item() for k in on)
    if worst > 1e-5:
        raise SystemExit(f"the thin and grouped paths disagree on the exact Fisher: {worst:.1e}")
    times = time_in_process(methods, rounds)
    base = statistics.median(times["floor (fwd+bwd)"])
    print(f"\nexact Fisher of the benchmark CNN, {samples} samples, batch 256, median of {rounds} rounds")
    print(f"(thin path vs grouped only: max relative difference {worst:.1e})\n")
    print("| method | seconds | ratio to floor |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2560)
    ap.add_argument("--layer-rounds", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}\n")
    layer_table(args.layer_rounds)
    whole_fisher(args.samples, args.rounds)


if __name__ == "__main__":
    main()
