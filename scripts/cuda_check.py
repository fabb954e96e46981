"""Check ewc's CUDA paths on a machine with a GPU: correctness against CPU references, then speed.

Correctness (float64 on the GPU against the float64 per-sample loop of ``tests/conftest.py`` on
the CPU, which shares no code with the engine; float32 on the GPU reported beside it):

* ``diagonal_fisher`` in every mode on an MLP, a CNN, an nn.TransformerEncoder with a padding mask,
  and (if ``transformers`` is installed) a tiny GPT2LMHeadModel with HF dict batches, sequence
  likelihoods ``sum`` and ``tokens``, labels shifted as HF does;
* the EWC penalty with the model on the GPU and θ*, F stored in float32 on the GPU, in bfloat16,
  and on the CPU: value and gradient against λ/2 Σ F (θ − θ*)² in float64;
* every registered method trained for two tiny tasks through the real loop on the GPU, with its
  accuracy matrix compared with the same run on the CPU;
* ``ewc run`` on the built-in data with ``--device cuda``.

Speed (``--speed``): Fisher time as a ratio to one forward + backward pass over the same data,
CUDA-synchronised, for the transformer encoder of ``benchmarks/fisher_speed.py`` (4 layers,
d = 256, T = 64, N = 2 048) and a GPT-2-style LM (vocabulary 5 000, sequence likelihood,
``sample`` mode).

Run (from the repository root, on the GPU machine)::

    PYTHONPATH=src python3 scripts/cuda_check.py --speed --out results/cuda_check.json

Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import reference_fisher, reference_sequence_fisher  # noqa: E402

from ewc import EWC, diagonal_fisher  # noqa: E402

RESULTS: list[dict[str, Any]] = []
DEVICE = "cuda"  # --device: cpu only to try the script out on a machine without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def record(name: str, ok: bool, **numbers: Any) -> None:
    RESULTS.append({"check": name, "ok": ok, **numbers})
    shown = " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"{'PASS' if ok else 'FAIL'} {name} {shown}", flush=True)


def guarded(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception as exc:  # a broken path is a failed check, not the end of the run
        traceback.print_exc()
        record(fn.__name__, False, error=f"{type(exc).__name__}: {exc}")


def rel(got: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    worst = 0.0
    for k, r in ref.items():
        g = got[k].detach().double().cpu()
        worst = max(worst, float((g - r).norm() / r.norm().clamp_min(1e-300)))
    return worst


def agree(mode: str, errs: dict[str, float]) -> bool:
    """float64 within 1e-6 of the reference; float32 within 1e-2, except for ``sample``, whose
    labels are drawn from float32 probabilities (other labels than the float64 reference's)."""
    return errs["float64"] < 1e-6 and (mode == "sample" or errs["float32"] < 1e-2)


def to(batches: list, device: str, dtype: torch.dtype) -> list:
    def move(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.to(device, dtype) if v.is_floating_point() else v.to(device)
        if isinstance(v, dict):
            return {k: move(u) for k, u in v.items()}
        if isinstance(v, tuple | list):
            return type(v)(move(u) for u in v)
        return v

    return move(batches)


# ---------------------------------------------------------------------------------------- models


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        return self.fc(torch.relu(self.bn(self.c2(h))).flatten(1))


class Encoder(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2, inp: int = 4, classes: int = 5, ff: int = 32) -> None:
        super().__init__()
        self.emb = nn.Linear(inp, d)
        layer = nn.TransformerEncoderLayer(d, 2 if d < 64 else 4, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        return self.head(self.enc(self.emb(x), src_key_padding_mask=pad).mean(1))


def fisher_cases() -> list[tuple[str, nn.Module, list, list[str]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(12, 12, generator=g)
    y = torch.randint(0, 5, (12,), generator=g)
    mlp_data = [(x[:8], y[:8]), (x[8:], y[8:])]
    img = torch.randn(10, 1, 8, 8, generator=g)
    yi = torch.randint(0, 5, (10,), generator=g)
    cnn = CNN()
    cnn.bn.running_mean.uniform_(-0.5, 0.5)
    cnn_data = [(img[:6], yi[:6]), (img[6:], yi[6:])]
    enc = Encoder()
    seq = torch.randn(8, 6, 4, generator=g)
    pad = torch.zeros(8, 6, dtype=torch.bool)
    pad[1::2, -2:] = True
    ye = torch.randint(0, 5, (8,), generator=g)
    enc_data = [((seq[:4], pad[:4]), ye[:4]), ((seq[4:], pad[4:]), ye[4:])]
    modes = ["exact", "sample", "empirical", "batched"]
    return [("mlp", mlp, mlp_data, modes), ("cnn", cnn, cnn_data, modes), ("encoder", enc, enc_data, modes)]


def check_fisher() -> None:
    for name, model, data, modes in fisher_cases():
        for mode in modes:
            ref_model = copy.deepcopy(model).double()
            ref = reference_fisher(
                ref_model, to(data, "cpu", torch.float64), mode, generator=torch.Generator().manual_seed(5)
            )
            errs = {}
            for dt in (torch.float64, torch.float32):
                m = copy.deepcopy(model).to(DEVICE, dt)
                got = diagonal_fisher(
                    m, to(data, DEVICE, dt), mode, generator=torch.Generator().manual_seed(5)
                )
                assert all(v.device.type == DEVICE for v in got.values()), "Fisher not on the model's device"
                errs[str(dt).removeprefix("torch.")] = rel(got, ref)
            record(f"fisher {name} {mode}", agree(mode, errs), **errs)


def check_gpt2_sequence() -> None:
    try:
        import transformers
    except ImportError:
        record("fisher gpt2 (transformers missing)", True, skipped=1)
        return
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (6, 7), generator=g)
    labels = ids.clone()
    labels[0, 4:] = -100
    labels[3, :2] = -100
    pos = torch.arange(7).expand(6, 7)
    data = [
        {"input_ids": ids[i : i + 3], "position_ids": pos[i : i + 3], "labels": labels[i : i + 3]}
        for i in (0, 3)
    ]
    for mode in ("exact", "sample", "empirical"):
        for tokens in (False, True):
            ref_model = copy.deepcopy(model).double()
            ref_batches = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in data]
            ref = reference_sequence_fisher(
                ref_model,
                ref_batches,
                mode,
                tokens=tokens,
                shift=True,
                generator=torch.Generator().manual_seed(2),
                output=lambda o: o.logits,
            )
            errs = {}
            for dt in (torch.float64, torch.float32):
                m = copy.deepcopy(model).to(DEVICE, dt)
                got = diagonal_fisher(
                    m,
                    to(data, DEVICE, dt),
                    mode,
                    sequence="tokens" if tokens else "sum",
                    generator=torch.Generator().manual_seed(2),
                )
                errs[str(dt).removeprefix("torch.")] = rel(got, ref)
            seq = "tokens" if tokens else "sum"
            record(f"fisher gpt2 {mode} {seq}", agree(mode, errs), **errs)


# -------------------------------------------------------------------------------------- penalty


def check_penalty_storage() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 7)).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    fishers, anchors = [], []
    regs = {
        "float32 cuda": EWC(model, lam=50.0, mode="separate"),
        "bfloat16 cuda": EWC(model, lam=50.0, mode="separate", store_dtype=torch.bfloat16),
        "float32 cpu": EWC(model, lam=50.0, mode="separate", store_device="cpu"),
        "bfloat16 cpu": EWC(model, lam=50.0, mode="separate", store_dtype=torch.bfloat16, store_device="cpu"),
    }
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for _ in range(3):
            for n, p in model.named_parameters():
                p.copy_(start[n] + 0.1 * torch.randn(p.shape, generator=g).to(DEVICE))
            fisher = {n: torch.rand(p.shape, generator=g).to(DEVICE) for n, p in model.named_parameters()}
            fishers.append({n: f.double().cpu() for n, f in fisher.items()})
            anchors.append({n: p.detach().double().cpu() for n, p in model.named_parameters()})
            for reg in regs.values():
                reg.consolidate(fisher_diag=fisher)
        for n, p in model.named_parameters():
            p.copy_(start[n] + 0.05)
    theta = {n: p.detach().double().cpu().requires_grad_(True) for n, p in model.named_parameters()}
    want = 25.0 * sum(
        ((f[n] * (theta[n] - a[n]) ** 2).sum() for f, a in zip(fishers, anchors, strict=True) for n in f)
    )
    want_grad = torch.autograd.grad(want, list(theta.values()))
    mem = {}
    for label, reg in regs.items():
        model.zero_grad()
        value = reg.penalty()
        value.backward()
        assert value.device.type == DEVICE, f"penalty on {value.device}"
        grads = [p.grad.double().cpu() for p in model.parameters()]
        v_err = abs(float(value) - float(want)) / float(want)
        g_err = max(float((a - b).norm() / b.norm()) for a, b in zip(grads, want_grad, strict=True))
        tol = 1e-5 if label.startswith("float32") else 2e-2  # bfloat16 keeps 8 bits of mantissa
        mem[label] = reg.memory_bytes()
        record(
            f"penalty {label}", v_err < tol and g_err < tol, value_err=v_err, grad_err=g_err, bytes=mem[label]
        )
    ratio = mem["bfloat16 cpu"] / mem["float32 cuda"]
    record("penalty bfloat16 storage halves memory", ratio == 0.5, ratio=ratio)
    # the consolidation itself from data on the GPU, stored on the CPU
    reg = EWC(model, lam=1.0, store_device="cpu", store_dtype=torch.bfloat16)
    x, y = torch.randn(16, 30).to(DEVICE), torch.randint(0, 7, (16,)).to(DEVICE)
    fisher = reg.consolidate([(x, y)])
    devices = {t.device.type for t in fisher.values()}
    record("consolidate on cuda, store on cpu", True, fisher_devices=",".join(sorted(devices)))


# -------------------------------------------------------------------------------------- methods


def check_methods() -> None:
    from test_contracts import CONFIG, tiny_tasks

    from ewc.methods import METHODS
    from ewc.train import run_method

    for name in METHODS:
        results = {}
        for device in ("cpu", DEVICE):
            cfg = dataclasses.replace(CONFIG, device=device)
            res = run_method(tiny_tasks(), name, cfg)
            results[device] = torch.tensor(res["accuracy_matrix"])
        diff = float((results["cpu"] - results[DEVICE]).abs().max())
        # the same seeds on two devices: float differences may flip a few test predictions
        record(f"method {name} on cuda", diff <= 0.25, max_accuracy_diff=diff)


def check_cli_run() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-c",
            "from ewc.cli import main; raise SystemExit(main())",
            "run",
            "permuted",
            "--tasks",
            "3",
            "--methods",
            "sgd,ewc,online-ewc,si",
            "--epochs",
            "1",
            "--max-train-per-task",
            "2000",
            "--device",
            DEVICE,
            "--out",
            str(Path(tmp) / "run"),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        ok = proc.returncode == 0 and (Path(tmp) / "run" / "results.json").exists()
        if not ok:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
        record("ewc run --device cuda", ok, seconds=round(seconds, 1))


# ---------------------------------------------------------------------------------------- speed


def timed(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def speed_encoder(n: int = 2048, batch: int = 256) -> None:
    torch.manual_seed(0)
    model = Encoder(d=256, layers=4, inp=32, classes=10, ff=1024).to(DEVICE)
    x = torch.randn(n, 64, 32, device=DEVICE)
    y = torch.randint(0, 10, (n,), device=DEVICE)
    data = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]

    def floor() -> None:
        for xb, yb in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()

    model.eval()
    base = timed(floor)
    for mode in ("empirical", "sample"):
        t = timed(lambda m=mode: diagonal_fisher(model, data, m, generator=torch.Generator().manual_seed(0)))
        record(f"speed encoder {mode}", True, seconds=t, floor=base, ratio=t / base)


def speed_gpt2(n: int = 512, batch: int = 64, vocab: int = 5000, t_len: int = 64) -> None:
    try:
        import transformers
    except ImportError:
        return
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=t_len, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
    model.config._attn_implementation = "eager"
    model.eval()
    ids = torch.randint(0, vocab, (n, t_len), device=DEVICE)
    pos = torch.arange(t_len, device=DEVICE).expand(n, t_len)
    data = [
        {"input_ids": ids[i : i + batch], "position_ids": pos[i : i + batch], "labels": ids[i : i + batch]}
        for i in range(0, n, batch)
    ]

    def floor() -> None:
        for b in data:
            model.zero_grad(set_to_none=True)
            model(**b).loss.backward()

    base = timed(floor, 3)
    for mode, seq in (("sample", "sum"), ("sample", "tokens"), ("empirical", "sum")):
        t = timed(
            lambda m=mode, s=seq: diagonal_fisher(
                model, data, m, sequence=s, generator=torch.Generator().manual_seed(0)
            ),
            3,
        )
        record(f"speed gpt2 {mode} {seq}", True, seconds=t, floor=base, ratio=t / base)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed", action="store_true", help="also time the transformer Fisher")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing to check", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor()
    print(f"torch {torch.__version__}, {name}, python {platform.python_version()}")
    for fn in (check_fisher, check_gpt2_sequence, check_penalty_storage, check_methods, check_cli_run):
        guarded(fn)
    if args.speed:
        guarded(speed_encoder)
        guarded(speed_gpt2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "device": name}
        Path(args.out).write_text(json.dumps({"env": env, "results": RESULTS}, indent=1))
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
