"""Shared fixtures and an independent reference for the diagonal-Fisher tests.

The reference below is deliberately naive: it loops over samples one at a time (batch size 1)
and uses plain ``torch.autograd.grad`` of log p(y | x_n) for every mode, straight from the
definitions in the spec.  It never imports anything from ``ewc``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

SEED = 1234


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


# ----------------------------------------------------------------------------------------------
# Reference implementation
# ----------------------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _log_lik(out: torch.Tensor, y: torch.Tensor, likelihood: str, sigma: float) -> torch.Tensor:
    """log p(y | x) for every row of ``out`` (constants dropped), shape [B]."""
    if likelihood == "categorical":
        return F.log_softmax(out, dim=-1).gather(1, y.long().view(-1, 1)).squeeze(1)
    if likelihood == "gaussian":
        return -((y - out) ** 2).sum(dim=1) / (2.0 * sigma**2)
    raise AssertionError(likelihood)


def _rows(x: object, i: int, j: int) -> object:
    """Samples i:j of an input: a tensor, a tuple of tensors or a dict of keyword inputs."""
    if isinstance(x, torch.Tensor):
        return x[i:j]
    if isinstance(x, dict):
        return {k: v[i:j] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return tuple(t[i:j] for t in x)


def _len(x: object) -> int:
    if isinstance(x, dict):
        return next(v for v in x.values() if isinstance(v, torch.Tensor)).shape[0]
    return (x if isinstance(x, torch.Tensor) else x[0]).shape[0]


def _forward(model: nn.Module, x: object, output: Callable | None) -> torch.Tensor:
    """model(x), model(*x) or model(**x); ``output`` picks the logits from what it returns."""
    if isinstance(x, dict):
        out = model(**x)
    else:
        out = model(x) if isinstance(x, torch.Tensor) else model(*x)
    return out if output is None else output(out)


def _grads(scalar: torch.Tensor, params: Sequence[nn.Parameter]) -> tuple[torch.Tensor, ...]:
    gs = torch.autograd.grad(scalar, list(params), retain_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True))


def reference_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    mode: str,
    *,
    likelihood: str = "categorical",
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
    output: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher straight from the definitions, one sample at a time.

    ``batches`` must be the batches exactly as the engine sees them (this matters for
    ``sample``, where labels are drawn batch by batch, and for ``batched``). An input ``x`` is a
    tensor, a tuple (``model(*x)``) or a dict (``model(**x)``, labels not in it); ``output``
    picks the logits from what the model returns (None: it returns them).
    """
    params = _trainable(model)
    names, plist = list(params), list(params.values())
    acc = [torch.zeros_like(p) for p in plist]
    flags = {m: m.training for m in model.modules()}
    model.eval()
    n_total = 0
    try:
        for x, y in batches:
            bsz = _len(x)
            n_total += bsz
            if mode == "sample":
                # One batched forward per batch, labels drawn exactly as the spec says.
                with torch.no_grad():
                    out = _forward(model, x, output)
                if likelihood == "categorical":
                    probs = torch.softmax(out, -1)
                    # the documented rule: u ~ U[0,1) per sample, y = #{c < C-1 : S_c <= u S_C-1}
                    u = torch.rand(bsz, 1, generator=generator, dtype=probs.dtype)
                    labels = []
                    for i in range(bsz):
                        s, total = 0.0, float(probs[i].sum())
                        below = 0
                        for c in range(probs.shape[1] - 1):
                            s += float(probs[i, c])
                            below += s <= float(u[i, 0]) * total
                        labels.append(below)
                    y = torch.tensor(labels)
                else:
                    y = out + sigma * torch.randn(out.shape, generator=generator, dtype=out.dtype)
            if mode == "batched":
                out = _forward(model, x, output)
                mean_ll = _log_lik(out, y, likelihood, sigma).mean()
                for a, g in zip(acc, _grads(mean_ll, plist), strict=True):
                    a += bsz * g**2
                continue
            for i in range(bsz):
                out = _forward(model, _rows(x, i, i + 1), output)
                if mode == "exact":
                    if likelihood == "categorical":
                        logp = F.log_softmax(out, dim=-1)[0]
                        p = logp.detach().exp()
                        for c in range(out.shape[1]):
                            for a, g in zip(acc, _grads(logp[c], plist), strict=True):
                                a += p[c] * g**2
                    else:
                        for d in range(out.shape[1]):
                            for a, g in zip(acc, _grads(out[0, d], plist), strict=True):
                                a += g**2 / sigma**2
                elif mode in ("empirical", "sample"):
                    ll = _log_lik(out, y[i : i + 1], likelihood, sigma)[0]
                    for a, g in zip(acc, _grads(ll, plist), strict=True):
                        a += g**2
                else:
                    raise AssertionError(mode)
    finally:
        for m, t in flags.items():
            m.training = t
    assert n_total > 0
    return {n: a / n_total for n, a in zip(names, acc, strict=True)}


def reference_sequence_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    mode: str,
    *,
    tokens: bool = False,
    shift: bool = False,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    output: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of per-token logits [N, T, C] with labels [N, T], one sample at a time.

    A sequence's log-likelihood is Σ_t log p(y_t | x) over its targets: positions whose label is
    not ``ignore_index`` (``shift``: logits[:, :-1] against labels[:, 1:]; without labels every
    position, the last one excepted when shifted). ``tokens``: every target is its own sample.
    The mean counts sequences with at least one target (``tokens``: targets). ``exact`` enumerates
    the classes at each target position: the label sequence's cross terms have mean zero.
    ``sample`` draws one uniform per position, [B, T, 1] per batch, labels as in ``reference_fisher``.
    """
    params = _trainable(model)
    names, plist = list(params), list(params.values())
    acc = [torch.zeros_like(p) for p in plist]
    flags = {m: m.training for m in model.modules()}
    model.eval()
    count = 0
    try:
        for x, y in batches:
            bsz = _len(x)
            with torch.no_grad():
                full = _forward(model, x, output)
            n_t = full.shape[1]
            if y is None:
                target = torch.zeros(bsz, n_t, dtype=torch.long)
                mask = torch.ones(bsz, n_t, dtype=torch.bool)
            else:
                target, mask = y.long().clone(), y != ignore_index
            if shift:  # logits at t predict the label at t + 1; the last logits have no target
                target = torch.cat([target[:, 1:], torch.zeros_like(target[:, :1])], 1)
                mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
            if mode == "sample":
                probs = torch.softmax(full, -1)
                u = torch.rand(bsz, n_t, 1, generator=generator, dtype=probs.dtype)
                cdf = probs.cumsum(-1)
                target = (cdf[..., :-1] <= u * cdf[..., -1:]).sum(-1)
            if mode == "batched":
                logp = F.log_softmax(_forward(model, x, output), -1)
                ll = (logp.gather(2, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum()
                b = int(mask.sum()) if tokens else int(mask.any(1).sum())
                for a, g in zip(acc, _grads(ll / b, plist), strict=True):
                    a += b * g**2
                count += b
                continue
            for i in range(bsz):
                logp = F.log_softmax(_forward(model, _rows(x, i, i + 1), output), -1)[0]  # [T, C]
                ts = [t for t in range(n_t) if mask[i, t]]
                count += len(ts) if tokens else int(bool(ts))
                if mode == "exact":
                    for t in ts:
                        for c in range(logp.shape[1]):
                            for a, g in zip(acc, _grads(logp[t, c], plist), strict=True):
                                a += logp[t, c].detach().exp() * g**2
                    continue
                terms = [logp[t, target[i, t]] for t in ts]
                for ll in terms if tokens else [sum(terms)] if terms else []:
                    for a, g in zip(acc, _grads(ll, plist), strict=True):
                        a += g**2
    finally:
        for m, t in flags.items():
            m.training = t
    assert count > 0
    return {n: a / count for n, a in zip(names, acc, strict=True)}


def split_batches(x: torch.Tensor, y: torch.Tensor | None, bs: int) -> list[Batch]:
    return [(x[i : i + bs], None if y is None else y[i : i + bs]) for i in range(0, x.shape[0], bs)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_fisher_close(
    got: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    model: nn.Module | None = None,
    tol: float = 1e-6,
) -> None:
    assert isinstance(got, dict)
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    if model is not None:
        expected = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        assert set(got) == set(expected)
    for k, r in ref.items():
        g = got[k]
        assert isinstance(g, torch.Tensor), k
        assert g.shape == r.shape, (k, g.shape, r.shape)
        assert g.dtype == r.dtype, (k, g.dtype, r.dtype)
        assert torch.isfinite(g).all(), k
        err = rel_err(g.detach(), r)
        assert err < tol, f"{k}: relative error {err:.3e} (max ref {r.abs().max().item():.3e})"
    for k, g in got.items():
        # A Fisher attached to the autograd graph would keep the graph alive and let a penalty
        # built from it backpropagate into the parameters through F itself.
        assert not g.requires_grad and g.grad_fn is None, f"{k}: result is attached to a graph"


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def init_gloo(rank: int, init_file: str, world_size: int = 2, timeout_s: float = 60.0) -> None:
    """Join a CPU (gloo) process group through a shared file: the DDP set-up of our tests."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def same_state(a: object, b: object) -> bool:
    """Equal nested dicts / lists / tensors (tensors bit for bit with their dtype, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same_state, a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    return a == b


def sigint_default() -> None:
    """``preexec_fn`` of a child the test will interrupt: SIGINT back to its default action. A
    shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler: a test suite started that way (``.ci/run &``) must still reach the child's."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
