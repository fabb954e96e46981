"""Where the EWC penalty's cost in a training step goes: variants of one SGD step, side by side.

Same model, data and EWC state as ``penalty_overhead.py`` (MLP 784-400-400-10, batch 256, online
EWC after 20 consolidations). Each variant is one full SGD step:

* ``plain``: no penalty;
* ``library``: ``loss + reg.penalty()`` (what users run);
* ``forward only``: the penalty's value added detached (its forward, no gradient);
* ``grad add``: no penalty; a precomputed λF(θ − θ*) added to ``.grad`` after ``backward()``
  (the cost of the gradient's extra memory pass alone);
* ``penalty first``: ``reg.penalty() + loss`` with the penalty computed before the forward;
* ``chunked``: the penalty computed in chunks of ``--chunk`` elements (θ − θ* kept in L2);
* ``flat``: θ* and λF copied into one flat buffer each; one ``sub`` per parameter into a flat
  θ − θ*, then one multiply and one dot over all parameters (8 kernel calls instead of 18);
* ``compiled`` (with ``--compile``): value and gradient from one ``torch.compile``d kernel;
* ``native`` (with ``--native``): value and gradient from one hand-written C++ loop (built with
  ``torch.utils.cpp_extension.load_inline``; needs a C++ compiler and ninja, ~20 s the first
  time): θ, θ* and F read once, λF(θ − θ*) written once, the value summed on the way. Not part of
  the library (it would ship native code); it shows what one pass over memory costs here.

Rounds run every variant once in a freshly shuffled order; the table gives medians and ratios to
``plain``. Run::

    .venv/bin/python benchmarks/penalty_anatomy.py --threads 1 [--compile] [--native]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from penalty_overhead import filled_ewc, make_model, time_rounds

from ewc import EWC


class _Handed(torch.autograd.Function):
    """Value ½·total from ``compute(params) -> (ws, total)``; the gradient is ws, handed over."""

    @staticmethod
    def forward(ctx: Any, compute: Callable, *ps: torch.Tensor) -> torch.Tensor:
        ws, total = compute(ps)
        ctx.ws = ws
        return 0.5 * total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return (None, *ctx.ws)


def penalty_lists(reg: EWC) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The anchored parameters with the merged θ* and F the penalty applies (the stored tensors)."""
    anchors, fishers = reg.anchors(), reg.precisions()
    named = dict(reg.model.named_parameters())
    return [named[n] for n in anchors], list(anchors.values()), [fishers[n] for n in anchors]


def chunked_penalty(reg: EWC, chunk: int) -> Callable[[], torch.Tensor]:
    """λ/2 Σ F (θ − θ*)² with value and gradient computed chunk by chunk (same maths)."""
    params, anchors, fishers = penalty_lists(reg)
    lam = reg.lam

    def compute(ps: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        ws, parts = [], []
        for p, a, f in zip(ps, anchors, fishers, strict=True):
            w = torch.empty_like(p)
            pv, av, fv, wv = p.view(-1), a.view(-1), f.view(-1), w.view(-1)
            for s in range(0, pv.numel(), chunk):
                d = pv[s : s + chunk] - av[s : s + chunk]
                ws_ = torch.mul(d, fv[s : s + chunk], out=wv[s : s + chunk]).mul_(lam)
                parts.append(torch.dot(ws_, d))
            ws.append(w)
        return ws, torch.stack(parts).sum()

    return lambda: _Handed.apply(compute, *params)


def flat_penalty(reg: EWC) -> Callable[[], torch.Tensor]:
    """The same penalty over flat copies of θ* and λF: fewer, longer kernel calls."""
    params, anchors, fishers = penalty_lists(reg)
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]
    anchor = torch.cat([a.reshape(-1) for a in anchors])
    lam_f = torch.cat([f.reshape(-1) for f in fishers]) * reg.lam
    diff = torch.empty_like(anchor)
    diffs = [d.view(s) for d, s in zip(diff.split(sizes), shapes, strict=True)]
    anchor_views = [a.view(s) for a, s in zip(anchor.split(sizes), shapes, strict=True)]

    def compute(ps: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        for p, a, d in zip(ps, anchor_views, diffs, strict=True):
            torch.sub(p, a, out=d)
        w = torch.mul(diff, lam_f)
        return [g.view(s) for g, s in zip(w.split(sizes), shapes, strict=True)], torch.dot(w, diff)

    return lambda: _Handed.apply(compute, *params)


def compiled_penalty(reg: EWC) -> Callable[[], torch.Tensor]:
    """The same penalty as one ``torch.compile``d kernel (value and gradient in one loop)."""
    params, anchors, fishers = penalty_lists(reg)
    lam = reg.lam

    @torch.compile(dynamic=False, fullgraph=True)
    def fused(ps: list[torch.Tensor], ans: list[torch.Tensor], fs: list[torch.Tensor]) -> Any:
        ws, total = [], 0.0
        for p, a, f in zip(ps, ans, fs, strict=True):
            d = p - a
            w = lam * f * d
            ws.append(w)
            total = total + (w * d).sum()
        return ws, total

    return lambda: _Handed.apply(lambda ps: fused(list(ps), anchors, fishers), *params)


def check_variants(base: torch.nn.Module, builders: dict[str, Callable], tasks: int) -> dict[str, float]:
    """Max relative difference of each variant's value and gradient from the library's."""
    model = copy.deepcopy(base)
    reg = filled_ewc(model, "online", tasks, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # away from the anchor, so the gradient is not ~0
    params = list(model.parameters())
    ref_value = reg.penalty()
    ref_grads = torch.autograd.grad(ref_value, params)
    worst = {}
    for name, build in builders.items():
        value = build(reg)()
        grads = torch.autograd.grad(value, params)
        diffs = [((value - ref_value).abs() / ref_value.abs()).item()]
        diffs += [((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads, strict=True)]
        worst[name] = max(diffs)
        if worst[name] > 1e-5:
            raise SystemExit(f"variant {name!r} disagrees with the library: {worst[name]:.1e}")
    return worst


NATIVE_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
// w = lam * f * (p - a) and the sum of w * (p - a), in one pass (float32, contiguous, CPU).
double penalty_pass(torch::Tensor p, torch::Tensor a, torch::Tensor f, torch::Tensor w, double lam) {
  TORCH_CHECK(p.device().is_cpu() && a.device().is_cpu() && f.device().is_cpu() && w.device().is_cpu());
  TORCH_CHECK(p.is_contiguous() && a.is_contiguous() && f.is_contiguous() && w.is_contiguous());
  TORCH_CHECK(p.scalar_type() == torch::kFloat32 && a.scalar_type() == torch::kFloat32 &&
              f.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32);
  const float* P = p.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  const float* F = f.data_ptr<float>();
  float* W = w.data_ptr<float>();
  const int64_t n = p.numel();
  const float l = static_cast<float>(lam);
  double total = 0.0;
  for (int64_t s = 0; s < n; s += 4096) {  // float sums of 4096 terms, added in double
    const int64_t e = std::min(n, s + 4096);
    float part = 0.f;
    #pragma omp simd reduction(+:part)
    for (int64_t j = s; j < e; ++j) {
      const float d = P[j] - A[j];
      const float wj = l * F[j] * d;
      W[j] = wj;
      part += wj * d;
    }
    total += part;
  }
  return total;
}
"""


def native_penalty(reg: EWC) -> Callable[[], torch.Tensor]:
    """The same penalty from one hand-written C++ pass per parameter (float32, CPU)."""
    from torch.utils.cpp_extension import load_inline

    ext = load_inline(
        "ewc_penalty_anatomy",
        cpp_sources=NATIVE_SOURCE,
        functions=["penalty_pass"],
        extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
    )
    params, anchors, fishers = penalty_lists(reg)
    lam = reg.lam

    def compute(ps: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        ws = [torch.empty_like(p) for p in ps]
        total = 0.0
        for p, a, f, w in zip(ps, anchors, fishers, ws, strict=True):
            total += ext.penalty_pass(p.detach(), a, f, w, lam)
        return ws, torch.tensor(total)

    return lambda: _Handed.apply(compute, *params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    ap.add_argument("--native", action="store_true", help="add the hand-written C++ variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 784, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    base = make_model()

    builders: dict[str, Callable[[EWC], Callable[[], torch.Tensor]]] = {
        "chunked": lambda r: chunked_penalty(r, args.chunk),
        "flat": flat_penalty,
    }
    if args.compile:
        builders["compiled"] = compiled_penalty
    if args.native:
        try:
            native_penalty(filled_ewc(copy.deepcopy(base), "online", 1, torch.Generator()))  # build once
            builders["native"] = native_penalty
        except Exception as exc:  # no compiler or ninja: time the others
            print(f"native variant skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")

    def variant(kind: str) -> Callable[[], None]:
        model = copy.deepcopy(base)
        reg = filled_ewc(model, "online", args.tasks, gen)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        params, anchors, fishers = penalty_lists(reg)
        with torch.no_grad():
            grad_w = [reg.lam * f * (p - a) for p, a, f in zip(params, anchors, fishers, strict=True)]
        own_penalty = builders[kind](reg) if kind in builders else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if kind == "penalty first":
                pen = reg.penalty()
                loss = pen + F.cross_entropy(model(x), y)
            else:
                loss = F.cross_entropy(model(x), y)
                if kind == "library":
                    loss = loss + reg.penalty()
                elif kind == "forward only":
                    loss = loss + reg.penalty().detach()
                elif own_penalty is not None:  # chunked, flat, compiled
                    loss = loss + own_penalty()
            loss.backward()
            if kind == "grad add":
                torch._foreach_add_([p.grad for p in params], grad_w)
            opt.step()

        return step

    kinds = ["plain", "library", "forward only", "grad add", "penalty first", *builders]
    agree = check_variants(base, builders, args.tasks)
    steps = {k: variant(k) for k in kinds}
    times = time_rounds(steps, args.rounds, args.warmup, seed=0)
    plain = statistics.median(times["plain"])
    print(f"threads={args.threads}, {args.tasks} tasks (online), {args.rounds} rounds, chunk={args.chunk}\n")
    print("agreement with the library (max relative difference, value and gradient): ", end="")
    print(", ".join(f"{k} {v:.1e}" for k, v in agree.items()) + "\n")
    print("| variant | ms/step (median) | ratio to plain |")
    print("|---|---:|---:|")
    for k in kinds:
        med = statistics.median(times[k])
        print(f"| {k} | {med * 1e3:.3f} | {med / plain:.3f} |")


if __name__ == "__main__":
    main()
