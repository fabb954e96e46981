"""Per-layer rules for per-sample squared (or absolute) gradients (BackPACK-style extensions).

A rule turns what a module saw in one call (its inputs) and the per-sample gradients of the
objective with respect to its outputs into per-sample gradients of the module's own parameters.
Rules receive output gradients with a leading ``K`` axis: ``K`` backpropagated vectors per sample
(``K = 1`` for the empirical / sampled Fisher, ``K = C`` classes for the exact Fisher), so ``G``
has shape ``[K, N, *out]``. Two entry points:

* ``sum_sq``: Σ_k Σ_n (per-sample gradient)², without materialising per-sample gradients where
  the layer's structure allows it (``nn.Linear`` on 2-D inputs: one matmul (G∘G)ᵀ(A∘A));
* ``sum_abs``: Σ_k Σ_n |per-sample gradient| (MAS importances), by the same means (``nn.Linear``
  on 2-D inputs: |g aᵀ| = |g| |a|ᵀ, one matmul |G|ᵀ|A|);
* ``per_sample``: the per-sample gradients themselves, ``[K, N, *param.shape]``, needed when a
  parameter receives several contributions per sample (a module called twice, tied weights).

Modules without a dedicated rule use :class:`FuncRule`, a ``torch.func`` vmap of the module's
own vector-Jacobian product, so every model works.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

# Per-sample gradient chunks are bounded to this many bytes so that big batches do not turn into
# page-fault storms (see shared/README.md: fresh large allocations dominate vmap timings).
CHUNK_BYTES = 64 * 2**20
# Samples per grouped convolution call: their per-sample weight gradients span about this many
# bytes (cache-sized; see ConvRule._groups).
CONV_GROUP_BYTES = 2 * 2**20
# Convolutions whose patch (C_in/groups · kernel size) has at most this many entries, and whose
# output gradients arrive in several passes (the exact Fisher), get their per-sample weight
# gradients from the unfolded input, kept for the call, and one batched matmul per pass
# (ConvRule._thin), provided each group has at least THIN_MIN_OUT output channels (below that the
# bmm is a batched matrix-vector product: depthwise layers stay on the grouped call). 0 turns
# this off.
THIN_PATCH = 32
THIN_MIN_OUT = 8


@dataclass
class Call:
    """One call of a module during the forward pass: its inputs and tensor outputs."""

    args: tuple
    kwargs: dict
    outputs: list[Tensor]  # floating tensor leaves of the module's output, in pytree order
    grads: list[Tensor | None] = field(default_factory=list)  # [K, *out] per output
    batch: int = 0  # N, the number of samples in the call
    squared: bool = False  # grads[0] already holds Σ_k G_k² (see Rule.presquare)
    passes: int = 1  # how many times gradients arrive for this call (K vectors, one at a time)
    cache: dict[str, Tensor] = field(default_factory=dict)  # rules' per-call values (all passes)


def _chunks(n: int, per_sample_bytes: int, budget: int = CHUNK_BYTES) -> list[slice]:
    """Slices of the sample axis whose per-sample tensors take about ``budget`` bytes each."""
    size = max(1, budget // max(1, per_sample_bytes))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _first_grad(call: Call) -> Tensor | None:
    return call.grads[0] if call.grads else None


class Rule:
    """Base rule: ``sum_sq`` / ``sum_abs`` default to reducing ``per_sample`` chunk by chunk."""

    def __init__(self, names: list[str]):
        self.names = names  # parameter names relative to the module

    def per_sample(self, module: nn.Module, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def presquare(self, module: nn.Module, call: Call) -> bool:
        """True if ``sum_sq`` only needs Σ_k G_k² (then set ``call.squared``), not each G_k."""
        return False

    def sum_sq(self, module: nn.Module, call: Call) -> dict[str, Tensor]:
        """Σ_k Σ_n (per-sample gradient)², the Fisher's reduction."""
        return self._reduce_per_sample(module, call, torch.square)

    def sum_abs(self, module: nn.Module, call: Call) -> dict[str, Tensor]:
        """Σ_k Σ_n |per-sample gradient|, the reduction of MAS importances."""
        return self._reduce_per_sample(module, call, torch.abs)

    def _accumulated(self, module: nn.Module, call: Call, absolute: bool) -> dict[str, Tensor]:
        """``sum_sq`` / ``sum_abs`` of a rule whose ``accumulate`` writes into the sums: run it on
        zeros."""
        out = {nm: torch.zeros_like(module.get_parameter(nm)) for nm in self.names}
        self.accumulate(module, call, out, absolute)
        return out

    def accumulate(self, module: nn.Module, call: Call, into: dict[str, Tensor], absolute: bool) -> None:
        """Add ``sum_sq`` (or ``sum_abs``) to the running sums ``into`` (local names), in place.

        Rules may override this to write into the sums directly (no temporary per batch).
        """
        sums = self.sum_abs(module, call) if absolute else self.sum_sq(module, call)
        for name, t in sums.items():
            into[name] += t

    def _reduce_per_sample(
        self, module: nn.Module, call: Call, op: Callable[[Tensor], Tensor]
    ) -> dict[str, Tensor]:
        g = _first_grad(call)
        k, n_samples = g.shape[0], g.shape[1]
        n_params = sum(module.get_parameter(nm).numel() for nm in self.names)
        out: dict[str, Tensor] = {}
        for sl in _chunks(n_samples, k * n_params * g.element_size()):
            for name, ps in self.per_sample(module, call, sl).items():
                sq = op(ps).sum(dim=(0, 1))
                out[name] = out[name] + sq if name in out else sq
        return out


def _slice_n(t: Tensor, sl: slice | None, dim: int = 0) -> Tensor:
    if sl is None:
        return t
    return t.narrow(dim, sl.start, sl.stop - sl.start)


class LinearRule(Rule):
    """``nn.Linear``: per-sample weight gradient g aᵀ; on 2-D inputs Σ_n (g∘g)(a∘a)ᵀ is one matmul."""

    def presquare(self, module: nn.Module, call: Call) -> bool:
        return call.args[0].dim() == 2

    def sum_sq(self, module: nn.Linear, call: Call) -> dict[str, Tensor]:
        if call.args[0].dim() != 2:
            return super().sum_sq(module, call)
        return self._accumulated(module, call, absolute=False)

    def accumulate(self, module: nn.Linear, call: Call, into: dict[str, Tensor], absolute: bool) -> None:
        """On 2-D inputs: ``into += (Σ_k G_k²)ᵀ (A∘A)`` as one in-place ``addmm_`` (or |G|ᵀ|A|)."""
        a, g = call.args[0], _first_grad(call)
        if a.dim() != 2 or (absolute and call.squared):
            return super().accumulate(module, call, into, absolute)
        if absolute:
            g1 = g[0].abs() if g.shape[0] == 1 else g.abs().sum(0)  # Σ_k |G_k|, [N, out]
            a1 = a.abs()
        else:  # Σ_k G_k², [N, out]; K = 1 (empirical, sample) needs no sum over K
            g1 = g[0] if call.squared else g[0].square() if g.shape[0] == 1 else g.square().sum(0)
            a1 = a.square()
        dtype = next(iter(into.values())).dtype  # the sums' (autocast may hand us bfloat16)
        g1, a1 = g1.to(dtype), a1.to(dtype)
        if "weight" in self.names:
            into["weight"].addmm_(g1.t(), a1)
        if "bias" in self.names:
            into["bias"] += g1.sum(0)

    def sum_abs(self, module: nn.Linear, call: Call) -> dict[str, Tensor]:
        """|g aᵀ| = |g| |a|ᵀ, so on 2-D inputs Σ_k Σ_n |g_kn a_nᵀ| = (Σ_k |G_k|)ᵀ |A|: one matmul."""
        if call.args[0].dim() != 2 or call.squared:
            return super().sum_abs(module, call)
        return self._accumulated(module, call, absolute=True)

    def per_sample(self, module: nn.Linear, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        a, g = _slice_n(call.args[0], n), _slice_n(_first_grad(call), n, 1)
        k, nb = g.shape[0], g.shape[1]
        a3 = a.reshape(nb, -1, a.shape[-1])  # [N, T, in]
        g4 = g.reshape(k, nb, -1, g.shape[-1])  # [K, N, T, out]
        out = {}
        if "weight" in self.names:
            out["weight"] = torch.einsum("knto,nti->knoi", g4, a3)
        if "bias" in self.names:
            out["bias"] = g4.sum(2)
        return out


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: per-sample weight gradients from one grouped ``convolution_backward``.

    Treating the batch (and the K backpropagated vectors) as extra convolution groups gives every
    sample's weight gradient in one call, for any stride, padding, dilation and groups. Thin
    convolutions (a first layer on 1-3 channels) run that call far below peak; when gradients
    arrive in several passes they use the unfolded input instead (see :meth:`_thin`).
    """

    def _geometry(self, module: nn.modules.conv._ConvNd, a: Tensor) -> tuple[Tensor, list[int]]:
        d = len(module.kernel_size)
        if module.padding_mode != "zeros":
            return F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), [0] * d
        if isinstance(module.padding, str):
            if module.padding == "valid":
                return a, [0] * d
            pads: list[int] = []  # "same": F.pad order is last dim first
            for k, dil in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(a, pads), [0] * d
        return a, list(module.padding)

    def _weight_grads(self, module: nn.modules.conv._ConvNd, call: Call, sl: slice) -> Tensor:
        """Per-sample weight gradients [K, n, *w.shape] of samples ``sl`` of the call."""
        g = _slice_n(_first_grad(call), sl, 1)
        if self._is_thin(module, call):
            return self._thin(module, call, sl, g)
        k, nb = g.shape[0], g.shape[1]
        a, padding = self._geometry(module, _slice_n(call.args[0], sl))
        dtype = torch.promote_types(a.dtype, g.dtype)  # autocast: float32 inputs, bfloat16 grads
        a, g = a.to(dtype), g.to(dtype)
        w = module.weight
        cin, cout = a.shape[1], w.shape[0]
        inp = a.unsqueeze(0).expand(k, *a.shape).reshape(1, k * nb * cin, *a.shape[2:])
        go = g.reshape(1, k * nb * cout, *g.shape[3:])
        _, gw, _ = torch.ops.aten.convolution_backward(
            go,
            inp,
            w.new_empty((k * nb * cout, *w.shape[1:]), dtype=dtype),
            None,
            list(module.stride),
            padding,
            list(module.dilation),
            False,
            [0] * len(padding),
            module.groups * k * nb,
            [False, True, False],
        )
        return gw.reshape(k, nb, *w.shape)

    @staticmethod
    def _is_thin(module: nn.modules.conv._ConvNd, call: Call) -> bool:
        w = module.weight
        patch = w[0].numel()  # C_in/groups · Π kernel
        per_group = w.shape[0] // module.groups  # output channels per group
        return (
            call.passes > 1
            and len(module.kernel_size) <= 2
            and patch <= THIN_PATCH
            and per_group >= THIN_MIN_OUT
        )

    def _thin(self, module: nn.modules.conv._ConvNd, call: Call, sl: slice, g: Tensor) -> Tensor:
        """Per-sample weight gradients as U_n G_nᵀ, one ``bmm`` over samples (and groups).

        U is the unfolded input [N, C_in·Π kernel, L]. A grouped ``convolution_backward`` with
        so few entries per patch runs far below the machine's peak; the ``bmm`` does not
        (benchmarks/conv_paths.py). U is built once per call and serves all K passes; with a
        single pass its cost is not always repaid, so ``_is_thin`` asks for several.
        """
        u = call.cache.get("unfolded")
        if u is None:
            u = self._unfold(module, call.args[0])
            call.cache["unfolded"] = u
        u = _slice_n(u, sl)
        k, nb = g.shape[0], g.shape[1]
        w = module.weight
        groups, cout, patch = module.groups, w.shape[0], w[0].numel()
        length = u.shape[-1]
        if g[0, 0, 0].numel() != length:
            raise ValueError(f"unfolded input has {length} positions, the output {g[0, 0, 0].numel()}")
        dtype = torch.promote_types(u.dtype, g.dtype)  # autocast may hand over bfloat16 gradients
        ug = u.to(dtype).reshape(nb * groups, patch, length)
        if k > 1:
            ug = ug.unsqueeze(0).expand(k, *ug.shape).reshape(k * nb * groups, patch, length)
        gg = g.to(dtype).reshape(k * nb * groups, cout // groups, length)
        gw = torch.bmm(ug, gg.transpose(1, 2))  # [K·n·groups, patch, C_out/groups]
        return gw.transpose(1, 2).reshape(k, nb, *w.shape)

    def _unfold(self, module: nn.modules.conv._ConvNd, a: Tensor) -> Tensor:
        """im2col of a 1-D or 2-D convolution's input: [N, C_in·Π kernel, L]."""
        a, padding = self._geometry(module, a)
        kernel, stride, dilation = list(module.kernel_size), list(module.stride), list(module.dilation)
        if len(kernel) == 1:  # Conv1d as a 2-D convolution of height 1
            a, padding = a.unsqueeze(2), [0, *padding]
            kernel, stride, dilation = [1, *kernel], [1, *stride], [1, *dilation]
        return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)

    def _groups(self, module: nn.modules.conv._ConvNd, k: int, nb: int) -> list[slice]:
        # Grouped convolutions with hundreds of groups run far below peak on CPU; calls of a few
        # samples (about 2 MB of per-sample gradients per call) were measured 2.5x faster.
        return _chunks(nb, k * module.weight.numel() * module.weight.element_size(), CONV_GROUP_BYTES)

    def _check(self, module: nn.modules.conv._ConvNd, a: Tensor) -> None:
        if a.dim() == len(module.kernel_size) + 1:
            raise ValueError("unbatched convolution input is not supported by the per-sample Fisher")

    def per_sample(
        self, module: nn.modules.conv._ConvNd, call: Call, n: slice | None = None
    ) -> dict[str, Tensor]:
        a, g = _slice_n(call.args[0], n), _slice_n(_first_grad(call), n, 1)
        self._check(module, a)
        out = {}
        if "weight" in self.names:
            start = 0 if n is None else n.start
            parts = [
                self._weight_grads(module, call, slice(start + sl.start, start + sl.stop))
                for sl in self._groups(module, g.shape[0], g.shape[1])
            ]
            out["weight"] = torch.cat(parts, dim=1)
        if "bias" in self.names:
            out["bias"] = g.sum(dim=tuple(range(3, g.dim())))
        return out

    def sum_sq(self, module: nn.modules.conv._ConvNd, call: Call) -> dict[str, Tensor]:
        return self._accumulated(module, call, absolute=False)

    def sum_abs(self, module: nn.modules.conv._ConvNd, call: Call) -> dict[str, Tensor]:
        return self._accumulated(module, call, absolute=True)

    def accumulate(
        self, module: nn.modules.conv._ConvNd, call: Call, into: dict[str, Tensor], absolute: bool
    ) -> None:
        """``into += Σ_k Σ_n (per-sample gradient)²`` (or |…|), a few samples per call, in place.

        The squares are summed over samples and the K vectors by one ``vecdot`` along the
        flattened (K·n) axis.
        """
        g = _first_grad(call)
        self._check(module, call.args[0])
        if "weight" in self.names:
            acc = into["weight"]
            for sl in self._groups(module, g.shape[0], g.shape[1]):
                gw = self._weight_grads(module, call, sl).flatten(0, 1)  # [K·n, *w.shape]
                acc += gw.abs().sum(0) if absolute else torch.linalg.vecdot(gw, gw, dim=0)
        if "bias" in self.names:
            gb = g.sum(dim=tuple(range(3, g.dim()))).flatten(0, 1)  # [K·n, C_out]
            into["bias"] += gb.abs().sum(0) if absolute else torch.linalg.vecdot(gb, gb, dim=0)


class EmbeddingRule(Rule):
    """``nn.Embedding``: a sample's gradient for row v sums the output gradients where it used v."""

    def sum_sq(self, module: nn.Embedding, call: Call) -> dict[str, Tensor]:
        idx, g = call.args[0], _first_grad(call)
        k, nb, dim = g.shape[0], g.shape[1], g.shape[-1]
        vocab = module.num_embeddings
        idx = idx.reshape(nb, -1)
        g = g.reshape(k, nb, -1, dim)
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
        # one key per (k, sample, row): sum within the key, square, then add into the rows
        sample = torch.arange(k * nb, device=idx.device).reshape(k, nb, 1)
        keys = (sample * vocab + idx.unsqueeze(0)).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        sums = g.new_zeros(uniq.numel(), dim).index_add_(0, inv, g.reshape(-1, dim))
        out = g.new_zeros(vocab, dim).index_add_(0, uniq % vocab, sums.square())
        return {"weight": out}

    def per_sample(self, module: nn.Embedding, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        idx, g = _slice_n(call.args[0], n), _slice_n(_first_grad(call), n, 1)
        k, nb, dim = g.shape[0], g.shape[1], g.shape[-1]
        idx = idx.reshape(nb, -1)
        g = g.reshape(k, nb, -1, dim)
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
        out = g.new_zeros(k, nb, module.num_embeddings, dim)
        index = idx.unsqueeze(0).unsqueeze(-1).expand(k, nb, idx.shape[1], dim)
        return {"weight": out.scatter_add_(2, index, g)}


def _sum(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.sum(dim=dims) if dims else t  # an empty dim tuple would reduce everything


class _AffineNormRule(Rule):
    """Affine normalisation layers: y = x̂·w + b, so a sample's gradients are Σ g·x̂ and Σ g."""

    channel_dim: int = 1

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def reduce_dims(self, module: nn.Module, g: Tensor) -> tuple[int, ...]:
        return (2,) + tuple(range(4, g.dim()))  # [K, N, C, *spatial] → sum all but K, N, C

    def per_sample(self, module: nn.Module, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        a, g = _slice_n(call.args[0], n), _slice_n(_first_grad(call), n, 1)
        dims = self.reduce_dims(module, g)
        out = {}
        if "weight" in self.names:
            out["weight"] = _sum(g * self.normalized(module, a).unsqueeze(0), dims)
        if "bias" in self.names:
            out["bias"] = _sum(g, dims)
        return out


class LayerNormRule(_AffineNormRule):
    def normalized(self, module: nn.LayerNorm, a: Tensor) -> Tensor:
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)

    def reduce_dims(self, module: nn.LayerNorm, g: Tensor) -> tuple[int, ...]:
        return tuple(range(2, g.dim() - len(module.normalized_shape)))


class GroupNormRule(_AffineNormRule):
    def normalized(self, module: nn.GroupNorm, a: Tensor) -> Tensor:
        return F.group_norm(a, module.num_groups, None, None, module.eps)

    def reduce_dims(self, module: nn.Module, g: Tensor) -> tuple[int, ...]:
        return tuple(range(3, g.dim()))


class BatchNormRule(_AffineNormRule):
    """BatchNorm in eval mode normalises with the running statistics, so samples are independent."""

    def normalized(self, module: nn.modules.batchnorm._BatchNorm, a: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (a.dim() - 2)
        mean = module.running_mean.reshape(shape)
        return (a - mean) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)

    def reduce_dims(self, module: nn.Module, g: Tensor) -> tuple[int, ...]:
        return tuple(range(3, g.dim()))


class FuncRule(Rule):
    """Fallback for any module: vmap over samples of the module's own vector-Jacobian product.

    Calls the module functionally on each sample (with a batch axis of one) and pulls the output
    gradient back to the named parameters (which may live in submodules that the forward uses
    without calling them, e.g. ``MultiheadAttention.out_proj``). If the module cannot be vmapped
    (data-dependent control flow, ``.item()``), a per-sample autograd loop gives the same answer.
    """

    def __init__(self, names: list[str]):
        super().__init__(names)
        self._warned = False

    def per_sample(self, module: nn.Module, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        n_all = call.batch
        k = next(g for g in call.grads if g is not None).shape[0]
        sl = n if n is not None else slice(0, n_all)
        nb = sl.stop - sl.start
        leaves, spec = tree_flatten((call.args, call.kwargs))
        in_dims = [_batch_dim(t, n_all) for t in leaves]
        params = {nm: module.get_parameter(nm).detach() for nm in self.names}

        def fn(p: dict[str, Tensor], sample_leaves: list[Tensor]) -> tuple[Tensor, ...]:
            it = iter(sample_leaves)
            full = [t if d is None else next(it).unsqueeze(d) for t, d in zip(leaves, in_dims, strict=True)]
            args, kwargs = tree_unflatten(full, spec)
            out = torch.func.functional_call(module, p, tuple(args), kwargs)
            return tuple(t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point())

        b_dims = [d for d in in_dims if d is not None]
        b_leaves = [
            t.detach().narrow(d, sl.start, nb) for t, d in zip(leaves, in_dims, strict=True) if d is not None
        ]
        out_dims = self._out_dims(
            call, fn, params, [t.select(d, 0) for t, d in zip(b_leaves, b_dims, strict=True)]
        )
        gs = []
        for g, o, od in zip(call.grads, call.outputs, out_dims, strict=True):
            g = torch.zeros((k, *o.shape), dtype=o.dtype, device=o.device) if g is None else g
            gs.append(g.narrow(od + 1, sl.start, nb))

        def one(sample_leaves: list[Tensor], sample_grads: list[Tensor]) -> dict[str, Tensor]:
            _, vjp_fn = torch.func.vjp(lambda p: fn(p, sample_leaves), params)
            return vjp_fn(tuple(g.unsqueeze(od) for g, od in zip(sample_grads, out_dims, strict=True)))[0]

        try:
            per_k = [
                torch.func.vmap(one, in_dims=(b_dims, out_dims))(b_leaves, [g[kk] for g in gs])
                for kk in range(k)
            ]
        except Exception as err:  # noqa: BLE001 - any vmap limitation → exact per-sample loop
            if not self._warned:
                warnings.warn(
                    f"{type(module).__name__}: torch.func.vmap failed ({err.__class__.__name__}: {err}); "
                    "using a per-sample loop for this module (correct, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned = True
            with torch.enable_grad():
                per_k = [
                    self._loop(params, fn, b_leaves, b_dims, [g[kk] for g in gs], out_dims, nb)
                    for kk in range(k)
                ]
        return {nm: torch.stack([pk[nm] for pk in per_k]) for nm in self.names}

    @staticmethod
    def _out_dims(call: Call, fn: Callable, params: dict[str, Tensor], first: list[Tensor]) -> list[int]:
        """Batch axis of each output: where the full call has N and a one-sample call has 1."""
        n = call.batch
        cands = [[d for d, size in enumerate(o.shape) if size == n] for o in call.outputs]
        if all(len(c) == 1 for c in cands):
            return [c[0] for c in cands]
        with torch.no_grad():
            probe = fn(params, first)
        dims = []
        for o, q in zip(call.outputs, probe, strict=True):
            found = [d for d in range(o.dim()) if o.shape[d] == n and q.shape[d] == 1]
            if not found:
                raise ValueError(f"cannot find the batch axis of an output of shape {tuple(o.shape)}")
            dims.append(found[0])
        return dims

    @staticmethod
    def _loop(
        params: dict[str, Tensor],
        fn: Callable,
        b_leaves: list[Tensor],
        b_dims: list[int],
        grads: list[Tensor],
        out_dims: list[int],
        nb: int,
    ) -> dict[str, Tensor]:
        names = list(params)
        rows: dict[str, list[Tensor]] = {nm: [] for nm in names}
        for i in range(nb):
            p = {nm: t.clone().requires_grad_(True) for nm, t in params.items()}
            outs = fn(p, [t.select(d, i) for t, d in zip(b_leaves, b_dims, strict=True)])
            total = sum(
                (o * g.select(od, i).unsqueeze(od)).sum()
                for o, g, od in zip(outs, grads, out_dims, strict=True)
            )
            gr = torch.autograd.grad(total, [p[nm] for nm in names], allow_unused=True)
            for nm, gi in zip(names, gr, strict=True):
                rows[nm].append(torch.zeros_like(params[nm]) if gi is None else gi)
        return {nm: torch.stack(v) for nm, v in rows.items()}


def _batch_dim(t: Any, n: int) -> int | None:
    """Batch axis of an input: 0, or 1 for RNN-style hidden states [layers, N, H]."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        return None
    if t.shape[0] == n:
        return 0
    if t.dim() >= 3 and t.shape[1] == n:
        return 1
    return None


def _plain(module: nn.Module, base: type, *methods: str) -> bool:
    """True if ``module`` is a ``base`` whose forward (and named helpers) are not overridden."""
    if not isinstance(module, base):
        return False
    return all(getattr(type(module), m) is getattr(base, m) for m in ("forward", *methods))


def rule_for(module: nn.Module, names: list[str]) -> Rule:
    """Choose the fast rule for a module's own parameters, or the torch.func fallback."""
    from torch.nn.utils import parametrize

    own = {n for n, _ in module.named_parameters(recurse=False)}
    if parametrize.is_parametrized(module) or not set(names) <= own:
        return FuncRule(names)
    if _plain(module, nn.Linear):
        return LinearRule(names)
    if any(_plain(module, base, "_conv_forward") for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return ConvRule(names)
    if _plain(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return EmbeddingRule(names)
    if _plain(module, nn.LayerNorm):
        return LayerNormRule(names)
    if _plain(module, nn.GroupNorm):
        return GroupNormRule(names)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and _plain(
        module, nn.modules.batchnorm._BatchNorm
    ):
        return BatchNormRule(names)
    return FuncRule(names)
