"""The Fisher plan check: the per-layer rules must account for every parameter's whole gradient.

A rule sees a parameter only through the module calls bound to it: the call's inputs and the
gradients at its outputs. A parameter the forward also uses elsewhere (a module's weight also used
functionally, an embedding matrix reused as the output projection, an intermediate a module keeps
and the model uses later) would get a Fisher that silently misses that use. So, on the first batch,
:func:`check_plan` compares, for a few samples and one random vector v at the outputs,

* the true gradient G = ∇_θ Σ_n v_n · f(x_n) (one ``autograd.grad``), with
* the rules' view: Σ_n of the per-sample gradients the rules form from the bound calls
  (``Rule.per_sample``), i.e. what the rules will square,

and reroutes every parameter where they differ to :class:`GeneralPath`: per-sample gradients through
the whole model (``torch.func`` vmap of the model's vjp over samples; a per-sample loop, or
per-sample backward passes through the batch's own graph, where that fails), with one warning
naming it. Such a model gets a correct Fisher, more slowly, never a silently wrong one.

The engine's other checks of a model against the rules live here too: :func:`check_batch_first`
(a rule's call must have the samples first), :func:`check_batchnorm` (BatchNorm without running
statistics mixes the samples) and :func:`graph_leaves` (the parameters an output reaches).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ewc.fisher_data import Output, batch_len, select_output, slice_rows, splittable
from ewc.fisher_fallback import FuncRule
from ewc.fisher_rule_base import Call, chunks, restored_on_error

# Samples the check runs on (its own forward and backward on the first batch's first rows): the
# rules' coverage of a parameter is a property of the model's graph, not of the data.
CHECK_SAMPLES = 4


class FisherPlanWarning(RuntimeWarning):
    """Parameters the per-layer rules cannot cover were rerouted to the general per-sample path."""


def check_plan(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    bindings: list[Any],
    capture: Callable[[Any], tuple[Tensor, dict[int, list[Call]]]],
    x: Any,
    independent: bool,
    output: Output = None,
) -> tuple[list[Any], GeneralPath | None]:
    """The bindings with every parameter whose rules miss part of its gradient taken out, and the
    general path that computes those parameters (None when the rules cover everything).

    ``bindings`` are the engine's (dataclasses with ``module``, ``rule`` and ``names``: local →
    global parameter names); ``named`` the parameters the sums are for.

    ``capture(x)`` runs the engine's capture forward (model output, {id(module): calls}); the check
    runs on the first :data:`CHECK_SAMPLES` rows of ``x`` when the samples are ``independent`` and
    ``x`` can be sliced, else on all of it.
    """
    n = batch_len(x)
    if independent and splittable(x, n) and n > CHECK_SAMPLES:
        x = slice_rows(x, 0, CHECK_SAMPLES)
    out, calls = capture(x)
    if not out.requires_grad:
        return bindings, None
    pairs = [(b, c) for b in bindings for c in calls.get(id(b.module), [])]
    # a call whose output does not have the samples first (an input shared by the samples, such as
    # a Hugging Face model's position_ids [1, T], or a sequence-first layout) is not the rules' case
    shared = {
        g
        for b, c in pairs
        if not isinstance(b.rule, FuncRule) and not _batch_first(c, out)
        for g in b.names.values()
    }
    pairs = [(b, c) for b, c in pairs if not shared & set(b.names.values())]
    v = _probe(out)
    outputs = [(c, i, t) for _, c in pairs for i, t in enumerate(c.outputs) if t.requires_grad]
    params = [p for _, p in named]
    tol = tolerance([out, *params, *(t for _, _, t in outputs)])
    # The probe: v on every sample, whose sum over samples catches a use outside the bound calls.
    # Where another axis of a call's output has the batch's size (a sequence-first layer whose length
    # equals the batch size could pass for batch-first), v on sample 0 alone, compared with the rules'
    # gradient of sample 0 alone: it catches that too, and a use outside the bound calls, in the one
    # backward pass (such a batch cannot be sliced to a few samples, so a pass costs a whole batch).
    n_out = out.shape[0]
    first_only = any(n_out in o.shape[1:] for _, c in pairs for o in c.outputs[:1])
    if first_only:
        v = torch.where(torch.arange(n_out, device=v.device).view(-1, *[1] * (v.dim() - 1)) == 0, v, 0)
    true = _true_gradients(out, outputs, named, v)
    with torch.no_grad():
        ruled = _rule_view(pairs, dict(named), first_only=first_only)
    differing = set(_differing(true, ruled, tol))
    missed = [name for name, _ in named if name in shared or name in differing]
    for c, _, _ in outputs:
        c.cache.clear()
    if not missed:
        return bindings, None
    general = GeneralPath(model, {name: p for name, p in named if name in missed}, output)
    general.choose(x, out, v, {name: true[name] for name in missed}, tol, independent)
    warnings.warn(
        f"Fisher: {', '.join(missed)} {'is' if len(missed) == 1 else 'are'} also used outside the module "
        "calls whose per-layer rules cover it (e.g. a module's weight used functionally too) or used on "
        "inputs shared by the samples (e.g. position ids [1, T]) or sequence-first, so the rules "
        f"would miss part of its gradient; computed instead from per-sample gradients through the whole "
        f"model ({GeneralPath.WAYS[general.how]}: correct, slower)",
        FisherPlanWarning,
        stacklevel=6,  # the caller of diagonal_fisher / diagonal_importance
    )
    return _without(bindings, set(missed)), general


def tolerance(tensors: Iterable[Tensor]) -> float:
    """√ε of the least precise arithmetic involved: the tensors' dtypes, an active autocast's,
    TF32 for float32 on CUDA where allowed (cuDNN convolutions use it by default)."""
    tensors = [t for t in tensors if t.is_floating_point()]
    eps = max(torch.finfo(t.dtype).eps for t in tensors)
    for device in {t.device.type for t in tensors}:
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            eps = max(eps, torch.finfo(torch.get_autocast_dtype(device)).eps)
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    if tf32 and any(t.is_cuda and t.dtype == torch.float32 for t in tensors):
        eps = max(eps, 2.0**-10)
    return eps**0.5


class GeneralPath:
    """Per-sample gradients of some parameters through the whole model, for any model.

    ``vmap``: ``torch.func`` vmap over samples of the vjp of the model (``functional_call``) on one
    sample; ``loop``: the same one sample at a time; ``graph``: one backward pass per sample and
    vector through the batch's own graph (samples need not be separable: O(N²) per batch).
    """

    WAYS = {
        "vmap": "torch.func vmap over samples",
        "loop": "a per-sample loop",
        "graph": "a backward pass per sample",
    }

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], output: Output = None):
        self.model, self.params, self.output = model, params, output
        self.how = "graph"

    def choose(
        self, x: Any, out: Tensor, v: Tensor, true: dict[str, Tensor], tol: float, independent: bool
    ) -> None:
        """The first way that reproduces the true gradient on the check's samples (``graph`` always
        does: it differentiates the same graph)."""
        if not (independent and _rows(x) == out.shape[0]):
            return
        for how in ("vmap", "loop"):
            self.how = how
            try:  # a way that fails half-way must not leave the model changed (restored_on_error)
                with restored_on_error(self.model):
                    got = self.per_sample(x, out, v.unsqueeze(0), slice(0, out.shape[0]))
            except Exception:  # noqa: BLE001 - any limitation of this way: try the next one
                continue
            if not _differing(true, {name: g.sum(dim=(0, 1)) for name, g in got.items()}, tol):
                return
        self.how = "graph"

    def add(self, x: Any, out: Tensor, vectors: Tensor, sums: dict[str, Tensor], absolute: bool) -> None:
        """Add Σ_k Σ_n (per-sample gradient)² (or |…|) of the parameters into ``sums``."""
        k, n = vectors.shape[0], vectors.shape[1]
        how = self.how if _rows(x) == n else "graph"
        numel = sum(p.numel() * p.element_size() for p in self.params.values())
        for sl in chunks(n, k * numel * 2, like=vectors):
            for name, ps in self.per_sample(x, out, vectors, sl, how).items():
                sums[name] += (ps.abs() if absolute else ps.square()).sum(dim=(0, 1)).to(sums[name].dtype)

    def per_sample(
        self, x: Any, out: Tensor, vectors: Tensor, sl: slice, how: str | None = None
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``[K, n, *shape]`` of (k-th vector · output), samples ``sl``."""
        how = how or self.how
        v = vectors[:, sl]
        if how == "graph":
            return self._graph(out, v, sl)
        xs = tuple(t[sl] for t in (x if isinstance(x, tuple | list) else (x,)))
        primals = {name: p.detach() for name, p in self.params.items()}
        return self._vmap(primals, xs, v) if how == "vmap" else self._loop(primals, xs, v)

    def _vmap(self, primals: dict[str, Tensor], xs: tuple[Tensor, ...], v: Tensor) -> dict[str, Tensor]:
        """vmap over samples (and the K vectors) of the vjp of the model on one sample."""

        def one(x1: tuple[Tensor, ...], v1: Tensor) -> dict[str, Tensor]:
            _, vjp = torch.func.vjp(lambda p: self._call(p, x1), primals)
            return torch.func.vmap(lambda vk: vjp(vk.unsqueeze(0))[0])(v1)

        with torch.no_grad():  # (torch.func still differentiates; the other parameters stay constants)
            got = torch.func.vmap(one, in_dims=(0, 1))(xs, v)
        return {name: g.transpose(0, 1) for name, g in got.items()}

    def _loop(self, primals: dict[str, Tensor], xs: tuple[Tensor, ...], v: Tensor) -> dict[str, Tensor]:
        """One sample at a time: the model on it, one backward pass per vector."""
        k, nb = v.shape[0], v.shape[1]
        rows: dict[str, list[Tensor]] = {name: [] for name in primals}
        for i in range(nb):
            p = {name: t.clone().requires_grad_(True) for name, t in primals.items()}
            with torch.enable_grad():
                o = self._call(p, tuple(t[i] for t in xs))
                for kk in range(k):
                    grads = torch.autograd.grad(
                        o, list(p.values()), v[kk, i].unsqueeze(0), retain_graph=True, allow_unused=True
                    )
                    for name, g in zip(p, grads, strict=True):
                        rows[name].append(_dense(g, p[name]))
        return {name: torch.stack(r).unflatten(0, (nb, k)).transpose(0, 1) for name, r in rows.items()}

    def _call(self, params: dict[str, Tensor], x1: tuple[Tensor, ...]) -> Tensor:
        """The model on one sample (a batch axis of one), with ``params`` in place of its own."""
        out = torch.func.functional_call(self.model, params, tuple(t.unsqueeze(0) for t in x1))
        return select_output(out, self.output)

    def _graph(self, out: Tensor, v: Tensor, sl: slice) -> dict[str, Tensor]:
        """One backward pass per sample and vector through the batch's graph (``out`` [N, ...])."""
        params = list(self.params.values())
        rows: dict[str, list[Tensor]] = {name: [] for name in self.params}
        for kk in range(v.shape[0]):
            for i in range(v.shape[1]):
                cot = torch.zeros_like(out)
                cot[sl.start + i] = v[kk, i]
                grads = torch.autograd.grad(out, params, cot, retain_graph=True, allow_unused=True)
                for (name, p), g in zip(self.params.items(), grads, strict=True):
                    rows[name].append(torch.zeros_like(p) if g is None else _dense(g, p))
        return {name: torch.stack(r).unflatten(0, (v.shape[0], v.shape[1])) for name, r in rows.items()}


def _batch_first(c: Call, out: Tensor) -> bool:
    """True if the call's first output has the samples on its leading axis, as the model output."""
    o = c.outputs[0] if c.outputs else None
    return o is None or (o.dim() > 0 and o.shape[0] == out.shape[0])


def _true_gradients(
    out: Tensor, outputs: list[tuple[Call, int, Tensor]], named: list[tuple[str, nn.Parameter]], v: Tensor
) -> dict[str, Tensor]:
    """∇_θ (v · out) by autograd; the gradients at the bound calls' outputs go into the calls (as
    the engine passes them to the rules)."""
    params = [p for _, p in named]
    grads = torch.autograd.grad(
        out, [t for _, _, t in outputs] + params, grad_outputs=v, retain_graph=True, allow_unused=True
    )
    for c, _, _ in outputs:
        c.grads, c.batch, c.passes = [None] * len(c.outputs), out.shape[0], 1
    for (c, i, _), g in zip(outputs, grads[: len(outputs)], strict=True):
        c.grads[i] = None if g is None else g.unsqueeze(0)
    return {name: _dense(g, p) for (name, p), g in zip(named, grads[len(outputs) :], strict=True)}


def _rule_view(
    pairs: list[tuple[Any, Call]], params: dict[str, nn.Parameter], first_only: bool = False
) -> dict[str, Tensor]:
    """Σ_n of the per-sample gradients the bound rules form from their calls (the probe's one pass);
    ``first_only``: sample 0's alone."""
    ruled: dict[str, Tensor] = {}
    for b, c in pairs:
        if not any(g is not None for g in c.grads):
            continue
        if c.grads[0] is None:  # rules read the first output's gradient (as the engine passes it)
            o = c.outputs[0]
            c.grads[0] = torch.zeros((1, *o.shape), dtype=o.dtype, device=o.device)
        size = sum(params[g].numel() * params[g].element_size() for g in b.names.values())
        for sl in [slice(0, 1)] if first_only else chunks(c.batch, size, like=c.grads[0]):
            for local, ps in b.rule.per_sample(b.module, c, sl).items():
                gname = b.names[local]
                total = ps.sum(dim=(0, 1)).to(params[gname].dtype)
                ruled[gname] = ruled[gname] + total if gname in ruled else total
    return ruled


def _differing(true: dict[str, Tensor], other: dict[str, Tensor], tol: float) -> list[str]:
    """The names whose two gradients differ by more than ``tol`` of their largest entry (a missing
    ``other`` is zero; non-finite gradients are not judged: they show in the result). One host
    synchronisation for all of them."""
    if not true:
        return []
    stats = torch.stack([_err_scale(t, other.get(name)) for name, t in true.items()]).tolist()
    return [
        name
        for name, (err, scale) in zip(true, stats, strict=True)
        if math.isfinite(err) and math.isfinite(scale) and err > tol * scale
    ]


def _err_scale(t: Tensor, r: Tensor | None) -> Tensor:
    """[max |t − r|, max |t| + max |t − r| (≥ the larger one's largest entry)] in float64."""
    if not t.numel():
        return torch.zeros(2, dtype=torch.float64, device=t.device)
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    err = _max_abs(t if r is None else t - r.to(t.dtype))
    return torch.stack([err, _max_abs(t) + err]).double()


def _max_abs(t: Tensor) -> Tensor:
    lo, hi = torch.aminmax(t)
    return torch.maximum(-lo, hi)


def _without(bindings: list[Any], names: set[str]) -> list[Any]:
    """The bindings without the rerouted (global) parameter names; a binding left with none goes."""
    kept = []
    for b in bindings:
        local = {ln: gn for ln, gn in b.names.items() if gn not in names}
        if len(local) == len(b.names):
            kept.append(b)
        elif local:
            kept.append(replace(b, rule=type(b.rule)(list(local)), names=local))
    return kept


def _probe(out: Tensor) -> Tensor:
    """A standard normal vector of the output's shape from a generator of its own (fixed seed: the
    global random state and the user's generator are left alone)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)


def _rows(x: Any) -> int | None:
    """The leading axis shared by every input tensor (None if the inputs do not share one)."""
    xs = x if isinstance(x, tuple | list) else (x,)
    sizes = {t.shape[0] if isinstance(t, Tensor) and t.dim() else None for t in xs}
    return sizes.pop() if len(sizes) == 1 else None


def _dense(g: Tensor | None, p: Tensor) -> Tensor:
    """A gradient as a dense tensor (zeros when the parameter is unused; sparse Embedding grads)."""
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.is_sparse else g


def check_batch_first(bindings: list[Any], calls: dict[int, list[Call]], n: int) -> None:
    """The built-in rules read a call's leading axis as its samples: a call whose output has another
    leading size (an input shared by the samples, e.g. a Hugging Face model's ``position_ids``
    [1, T], or a sequence-first [T, N, …] layout) is an error, not a wrong sum."""
    for b in bindings:
        if isinstance(b.rule, FuncRule):  # finds each output's batch axis itself
            continue
        for c in calls.get(id(b.module), []):
            o = c.outputs[0] if c.outputs else None
            if o is not None and (o.dim() == 0 or o.shape[0] != n):
                name = next(iter(b.names.values())).rpartition(".")[0] or type(b.module).__name__
                raise ValueError(
                    f"module {name!r} ({type(b.module).__name__}) returned shape {tuple(o.shape)} in a "
                    f"batch of {n} samples: its rule needs the samples on the leading axis. Either its "
                    "input is shared by the samples (e.g. a Hugging Face model's position_ids [1, T]: "
                    "give them per sample, [N, T]) or the layout is sequence-first (use batch_first)"
                )


def check_batchnorm(model: nn.Module, called: set[int] | None = None) -> None:
    """BatchNorm without running statistics mixes the samples of a batch even in eval mode."""
    for m in model.modules():
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is None
            and (called is None or id(m) in called)
        ):
            raise ValueError(
                f"{type(m).__name__} without running statistics (track_running_stats=False) mixes "
                "samples even in eval mode: the per-sample Fisher is undefined"
            )


def graph_leaves(out: Tensor) -> set[int]:
    """Ids of the leaf tensors (parameters) that the autograd graph of ``out`` reaches."""
    seen, stack, leaves = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.add(id(var))
        stack.extend(nxt for nxt, _ in node.next_functions)
    return leaves
