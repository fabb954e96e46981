"""Diagonal-Fisher speed: ewc's four modes against a per-sample loop, torch.func and BackPACK.

For an MLP 784-400-400-10 and a small CNN (conv 1→32, pool, conv 32→64, pool, linear) on
``--samples`` MNIST-shaped inputs (or the transformers below; fixed random data: timing does not
depend on the values), it
prints the median wall time of

* the floor: one forward + backward pass (cross-entropy, ``loss.backward()``) over the same data;
* ``diagonal_fisher`` in the modes exact / sample / empirical / batched;
* a per-sample loop (batch size 1, ``torch.autograd.grad``; run on ``--loop-samples`` samples and
  scaled linearly to the full data, as marked);
* ``torch.func`` ``vmap(grad)`` per-sample gradients, squared and summed (empirical Fisher);
* BackPACK ``SumGradSquared`` (empirical) and ``DiagGGNExact`` (exact Fisher: for the softmax
  cross-entropy the generalised Gauss-Newton is the Fisher), if ``backpack`` is installed;

each as a ratio to the floor, all measured side by side in one run, in rounds (every method once
per round, order shuffled each round), each method in worker processes of its own (so that
one method's allocations do not change the allocator state another is timed in;
``--processes N`` gives every method N of them and pools their times, since a fresh process's
heap layout alone moves a method's time by up to ~40%; ``--same-process`` times them all in
one). Peak extra memory (resident set above the floor's peak) is
measured per method in a fresh subprocess. Before timing, the per-sample methods are checked to
agree with each other (relative error printed), so the table never times a wrong answer.

Run (from the repository root)::

    .venv/bin/python benchmarks/fisher_speed.py --threads 2 --processes 3
    .venv/bin/python benchmarks/fisher_speed.py --threads 1 --models mlp --repeats 5
    .venv/bin/python benchmarks/fisher_speed.py --models encoder,gpt2 --modes empirical,sample \
        --samples 256 --batch-size 64 --loop-samples 16 --no-backpack --no-memory --repeats 2

``encoder`` is nn.TransformerEncoder (4 layers, d=256, T=64); ``gpt2`` a GPT-2-style LM (Hugging
Face GPT2LMHeadModel, vocabulary 5 000, 2 layers, d=128, T=32) with its sequence likelihood: logits
[N, T, V], labels the input ids shifted by one (``shift_labels=True``), a sample's log-likelihood
the sum over its tokens; its floor, loop and vmap use the same summed next-token loss (``exact``
would make 4 999 passes: time ``empirical`` and ``sample``).

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a machine shared
with other work, a method's CPU time moves far less than its wall time (with one thread, and
nothing else running, the two agree).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc import diagonal_fisher

Fisher = dict[str, Tensor]


# Transformer shapes (``--models encoder,gpt2``)
ENC_LAYERS, ENC_DIM, ENC_T, ENC_IN = 4, 256, 64, 32
LM_VOCAB, LM_DIM, LM_LAYERS, LM_T = 5000, 128, 2, 32
# ewc's modes to time (``--modes``) and the clock (``--clock``), passed to the worker processes
# through the environment
MODES = os.environ.get("EWC_BENCH_MODES", "empirical,sample,exact,batched").split(",")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock() -> float:
    return CLOCKS[os.environ.get("EWC_BENCH_CLOCK", "wall")]()


class Encoder(nn.Module):
    """nn.TransformerEncoder (batch-first, 4 heads), mean-pooled into 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(ENC_IN, ENC_DIM)
        layer = nn.TransformerEncoderLayer(ENC_DIM, 4, 4 * ENC_DIM, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, ENC_LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(ENC_DIM, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


class LM(nn.Module):
    """A GPT-2-style LM (Hugging Face GPT2LMHeadModel, eager attention): next-token logits
    [N, T, vocab] of a batch of token ids [N, T]."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.GPT2Config(
            vocab_size=LM_VOCAB, n_positions=LM_T, n_embd=LM_DIM, n_layer=LM_LAYERS, n_head=4,
            bos_token_id=0, eos_token_id=0,
            attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        self.lm = transformers.GPT2LMHeadModel(cfg)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)  # per sample (see docs)
        return self.lm(input_ids=ids, position_ids=pos).logits


def loss_of(model: nn.Module, out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """The negative log-likelihood the Fisher is of: cross-entropy, or for the LM the next-token
    cross-entropy summed over a sequence's tokens (mean: over the sequences)."""
    if not isinstance(model, LM):
        return F.cross_entropy(out, y, reduction=reduction)
    nll = F.cross_entropy(out[:, :-1].flatten(0, 1), y[:, 1:].flatten(), reduction="sum")
    return nll / len(y) if reduction == "mean" else nll


def fisher_options(model: nn.Module) -> dict[str, Any]:
    """diagonal_fisher's options for the model: the LM's labels are its inputs, shifted."""
    return {"shift_labels": True} if isinstance(model, LM) else {}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "encoder":
        return Encoder()
    if name == "gpt2":
        return LM()
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    )  # fmt: skip


def make_data(n: int, model_name: str = "mlp") -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    if model_name == "encoder":
        return torch.randn(n, ENC_T, ENC_IN, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    if model_name == "gpt2":
        ids = torch.randint(0, LM_VOCAB, (n, LM_T), generator=gen)
        return ids, ids
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def batches(x: Tensor, y: Tensor, bs: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


# ------------------------------------------------------------------------------------ methods


def floor(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> None:
    """One forward and backward pass over the data (what one training epoch costs)."""
    for x, y in data:
        model.zero_grad(set_to_none=True)
        loss_of(model, model(x), y).backward()


def per_sample_loop(model: nn.Module, data: list[tuple[Tensor, Tensor]], limit: int) -> Fisher:
    """Empirical Fisher, one sample at a time (the textbook implementation)."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for x, y in data:
        for i in range(len(x)):
            if seen == limit:
                return {n: a / seen for n, a in acc.items()}
            loss = loss_of(model, model(x[i : i + 1]), y[i : i + 1], "sum")
            for (n, _), g in zip(
                params.items(), torch.autograd.grad(loss, list(params.values())), strict=True
            ):
                acc[n] += g * g
            seen += 1
    return {n: a / seen for n, a in acc.items()}


def class_enumeration_fisher(model: nn.Module, x: Tensor) -> Fisher:
    """Exact Fisher by its definition, Σ_c p_c (∇ log p_c)² averaged over samples (a loop)."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        logp = F.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                acc[n] += logp[c].exp().detach() * g * g
    return {n: a / len(x) for n, a in acc.items()}


def vmap_fisher(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> Fisher:
    """Empirical Fisher from torch.func per-sample gradients (materialised per batch)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return loss_of(model, out, y.unsqueeze(0), "sum")

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in data:
        for n, g in per_sample(params, x, y).items():
            acc[n] += (g * g).sum(0)
        count += len(x)
    return {n: a / count for n, a in acc.items()}


def backpack_fisher(model: nn.Module, data: list[tuple[Tensor, Tensor]], kind: str) -> Fisher:
    """BackPACK's SumGradSquared (empirical) or DiagGGNExact (exact) over the data."""
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, SumGradSquared

    ext_model = extend(model)
    lossfunc = extend(nn.CrossEntropyLoss(reduction="sum"))
    ext, attr = (
        (SumGradSquared(), "sum_grad_squared") if kind == "empirical" else (DiagGGNExact(), "diag_ggn_exact")
    )
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, y in data:
        model.zero_grad(set_to_none=True)
        with backpack(ext):
            lossfunc(ext_model(x), y).backward()
        for n, p in model.named_parameters():
            acc[n] += getattr(p, attr)
        count += len(x)
    model.zero_grad(set_to_none=True)
    return {n: a / count for n, a in acc.items()}


def have_backpack() -> bool:
    try:
        import backpack  # noqa: F401
    except ImportError:
        return False
    return True


def methods(model: nn.Module, data: list, loop_samples: int, use_backpack: bool) -> dict[str, Callable]:
    """name -> zero-argument callable over the whole data."""
    out: dict[str, Callable] = {"floor (fwd+bwd)": lambda: floor(model, data)}
    for mode in MODES:
        out[f"ewc {mode}"] = lambda mode=mode: diagonal_fisher(
            model, data, mode=mode, **fisher_options(model)
        )
    out[f"per-sample loop (x{loop_samples} samples, scaled)"] = lambda: per_sample_loop(
        model, data, loop_samples
    )
    out["torch.func vmap (empirical)"] = lambda: vmap_fisher(model, data)
    if use_backpack:  # BackPACK's extend() adds module hooks for good: give it its own copy
        twin = copy.deepcopy(model)
        out["BackPACK SumGradSquared (empirical)"] = lambda: backpack_fisher(twin, data, "empirical")
        out["BackPACK DiagGGNExact (exact)"] = lambda: backpack_fisher(twin, data, "exact")
    return out


# ------------------------------------------------------------------------------- measurement


def rel_err(a: Fisher, b: Fisher) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in b)


def check_agreement(model: nn.Module, data: list, use_backpack: bool) -> dict[str, float]:
    """Relative differences between independent per-sample implementations on a few batches."""
    sub = data[:2]
    n = sum(len(x) for x, _ in sub)
    loop = per_sample_loop(model, sub, n)
    ours_e = diagonal_fisher(model, sub, mode="empirical", **fisher_options(model))
    few = sub[0][0][:32]
    out = {"ewc empirical vs loop": rel_err(ours_e, loop)}
    out["vmap vs loop"] = rel_err(vmap_fisher(model, sub), loop)
    if "exact" in MODES:
        out["ewc exact vs class enumeration (32 samples)"] = rel_err(
            diagonal_fisher(model, (few, torch.zeros(len(few), dtype=torch.long)), mode="exact"),
            class_enumeration_fisher(model, few),
        )
    if use_backpack:
        ours_x = diagonal_fisher(model, sub, mode="exact")
        twin = copy.deepcopy(model)
        out["BackPACK SumGradSquared vs loop"] = rel_err(backpack_fisher(twin, sub, "empirical"), loop)
        out["ewc exact vs BackPACK DiagGGNExact"] = rel_err(ours_x, backpack_fisher(twin, sub, "exact"))
    return out


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: reset by exec, unlike ru_maxrss,
    which a child inherits from its parent's peak on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_worker(args: tuple) -> int:
    """Bytes of peak resident memory a method adds above the floor's peak (fresh process)."""
    name, model_name, samples, bs, threads, loop_samples, use_backpack = args
    torch.set_num_threads(threads)
    model = make_model(model_name)
    data = batches(*make_data(samples, model_name), bs)
    table = methods(model, data, loop_samples, use_backpack)
    table["floor (fwd+bwd)"]()
    base = _peak_rss()
    table[name]()
    return max(0, _peak_rss() - base)


def peak_extra_memory(
    names: list[str], model_name: str, args: argparse.Namespace, use_backpack: bool
) -> dict:
    """Peak resident memory above the floor's, per method, each in a fresh interpreter."""
    out = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--memory-worker",
            name,
            "--models",
            model_name,
            "--samples",
            str(args.samples),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--loop-samples",
            str(args.loop_samples),
        ]
        if not use_backpack:
            cmd.append("--no-backpack")
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = int(done.stdout.strip().splitlines()[-1])
    return out


def time_in_process(table: dict[str, Callable], repeats: int) -> dict[str, list[float]]:
    """Every method in this process, in rounds (shuffled order each round)."""
    for fn in table.values():  # warm-up: allocator, kernels, BackPACK's extension
        fn()
    times: dict[str, list[float]] = {name: [] for name in table}
    order = list(table)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            t = clock()
            table[name]()
            times[name].append(clock() - t)
    return times


def _timing_worker(conn: Any, job: tuple) -> None:
    """Build the model, data and one method; warm up; then time one run per request."""
    name, model_name, samples, bs, threads, loop_samples, use_backpack = job
    torch.set_num_threads(threads)
    model = make_model(model_name)
    data = batches(*make_data(samples, model_name), bs)
    fn = methods(model, data, loop_samples, use_backpack)[name]
    fn()
    conn.send("ready")
    while conn.recv():
        t = clock()
        fn()
        conn.send(clock() - t)


def time_in_workers(
    names: list[str], model_name: str, args: argparse.Namespace, use_backpack: bool
) -> dict[str, list[float]]:
    """Each method in ``args.processes`` worker processes of its own, timed in interleaved
    rounds (every worker once per round, shuffled order); a method's times pool its workers.

    One process per method keeps one method's heap from changing another's timings: glibc's
    malloc adapts its mmap and trim thresholds to what the process allocated before (vmap's
    ~850 MB batches, BackPACK's buffers): the CNN's exact Fisher measured 6.1x the floor in a
    process shared with them and 4.8x in one that ran only the floor and ewc, same code.
    Several processes per method: a process's own heap layout decides whether it page-faults
    on every batch (the CNN's exact Fisher took 2.7-3.8 s per 2 560 samples in fresh processes
    of the same code, with 0 to 300k minor faults a run), so one process per method is a
    draw; the median over a few is the typical cost.
    Workers wait idle (blocked on a pipe) while another one runs.
    """
    ctx = mp.get_context("spawn")
    workers = {}
    for name in names:
        job = (name, model_name, args.samples, args.batch_size, args.threads, args.loop_samples, use_backpack)
        for copy_ in range(args.processes):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_timing_worker, args=(there, job), daemon=True)
            proc.start()
            if here.recv() != "ready":  # one at a time: warm-ups do not overlap
                raise RuntimeError(f"timing worker for {name!r} failed to start")
            workers[(name, copy_)] = (proc, here)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = list(workers)
    rng = random.Random(0)
    try:
        for _ in range(args.repeats):
            rng.shuffle(order)
            for key in order:
                conn = workers[key][1]
                conn.send(True)
                times[key[0]].append(conn.recv())
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(False)
            except (BrokenPipeError, OSError):  # a worker that died: its error is the one to see
                pass
            proc.join(timeout=30)
    return times


def run_model(model_name: str, args: argparse.Namespace, use_backpack: bool) -> None:
    model = make_model(model_name)
    data = batches(*make_data(args.samples, model_name), args.batch_size)
    table = methods(model, data, args.loop_samples, use_backpack)
    agree = check_agreement(model, data, use_backpack)
    # float32 sums agree to ~1e-6 (MLP, CNN); through 4 attention layers to ~2e-4 (vmap's attention)
    limit = 1e-3 if model_name in ("encoder", "gpt2") else 1e-4
    wrong = {k: v for k, v in agree.items() if not v < limit}
    if wrong:
        raise SystemExit(f"{model_name}: implementations disagree, nothing timed: {wrong}")
    procs = 1 if args.same_process else args.processes
    if args.same_process:
        times = time_in_process(table, args.repeats)
    else:
        times = time_in_workers(list(table), model_name, args, use_backpack)
    med = {name: statistics.median(v) for name, v in times.items()}
    loop_name = next(n for n in table if n.startswith("per-sample loop"))
    med[loop_name] *= args.samples / args.loop_samples
    memory = peak_extra_memory(list(table), model_name, args, use_backpack) if args.memory else {}
    base = med["floor (fwd+bwd)"]

    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n### {model_name.upper()} ({params:,} parameters), {args.samples} samples, "
        f"batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {len(times[loop_name])} ({args.repeats} rounds x {procs} process(es) per method)\n"
    )
    print("| method | seconds | ratio to floor | peak extra memory |")
    print("|---|---:|---:|---:|")
    for name in table:
        mem = f"{memory[name] / 2**20:.0f} MiB" if name in memory else "-"
        print(f"| {name} | {med[name]:.3f} | {med[name] / base:.2f}x | {mem} |")
    print(
        "\nagreement (max relative difference per tensor, 2 batches): "
        + ", ".join(f"{k}: {v:.1e}" for k, v in agree.items())
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds")
    ap.add_argument("--processes", type=int, default=1, help="worker processes per method (pooled)")
    ap.add_argument("--loop-samples", type=int, default=1000)
    ap.add_argument("--modes", default=",".join(MODES), help="ewc modes to time (exact: needs few classes)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall or process CPU time")
    ap.add_argument("--no-backpack", action="store_true")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="time every method in this one process (default: one worker process per method)",
    )
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.processes < 1 or args.repeats < 1:
        ap.error("--processes and --repeats must be at least 1")
    os.environ["EWC_BENCH_MODES"] = args.modes
    os.environ["EWC_BENCH_CLOCK"] = args.clock
    MODES[:] = args.modes.split(",")
    if args.memory_worker:
        use = have_backpack() and not args.no_backpack
        job = (
            args.memory_worker,
            args.models,
            args.samples,
            args.batch_size,
            args.threads,
            args.loop_samples,
            use,
        )
        print(_memory_worker(job))
        return
    torch.set_num_threads(args.threads)
    use_backpack = have_backpack() and not args.no_backpack
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"threads={args.threads}, clock={args.clock}, BackPACK={'yes' if use_backpack else 'not installed'}"
    )
    for name in args.models.split(","):
        run_model(name.strip(), args, use_backpack)


if __name__ == "__main__":
    main()
