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
* ``compiled`` (with ``--compile``): value and gradient from one ``torch.compile``d kernel.

Rounds run every variant once in a freshly shuffled order; the table gives medians and ratios to
``plain``. Run::

    .venv/bin/python benchmarks/penalty_anatomy.py --threads 1 [--compile]
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


def chunked_penalty(reg: EWC, chunk: int) -> Callable[[], torch.Tensor]:
    """λ/2 Σ F (θ − θ*)² with value and gradient computed chunk by chunk (same maths)."""
    params, anchors, fishers, _, _ = reg._penalty_lists()
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


def compiled_penalty(reg: EWC) -> Callable[[], torch.Tensor]:
    """The same penalty as one ``torch.compile``d kernel (value and gradient in one loop)."""
    params, anchors, fishers, _, _ = reg._penalty_lists()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 784, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    base = make_model()

    def variant(kind: str) -> Callable[[], None]:
        model = copy.deepcopy(base)
        reg = filled_ewc(model, "online", args.tasks, gen)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        params = list(model.parameters())
        with torch.no_grad():
            grad_w = [
                reg.lam * f * (p - a) for p, a, f in zip(params, *reg._penalty_lists()[1:3], strict=True)
            ]
        custom = {"compiled": compiled_penalty, "chunked": lambda r: chunked_penalty(r, args.chunk)}
        own_penalty = custom[kind](reg) if kind in custom else None

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
                elif own_penalty is not None:  # chunked, compiled
                    loss = loss + own_penalty()
            loss.backward()
            if kind == "grad add":
                torch._foreach_add_([p.grad for p in params], grad_w)
            opt.step()

        return step

    kinds = ["plain", "library", "forward only", "grad add", "penalty first", "chunked"]
    if args.compile:
        kinds.append("compiled")
    steps = {k: variant(k) for k in kinds}
    times = time_rounds(steps, args.rounds, args.warmup, seed=0)
    plain = statistics.median(times["plain"])
    print(f"threads={args.threads}, {args.tasks} tasks (online), {args.rounds} rounds, chunk={args.chunk}\n")
    print("| variant | ms/step (median) | ratio to plain |")
    print("|---|---:|---:|")
    for k in kinds:
        med = statistics.median(times[k])
        print(f"| {k} | {med * 1e3:.3f} | {med / plain:.3f} |")


if __name__ == "__main__":
    main()
