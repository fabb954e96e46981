"""The built-in per-layer Fisher rules and the table that picks a module's rule (BackPACK-style).

``RULES`` maps a module type to its rule class (:class:`~ewc.fisher_rule_base.Rule`); a module
gets the rule of the nearest registered type along its MRO, provided it keeps that type's
``forward`` (and the other methods the rule ``follows``). Everything else takes
:class:`~ewc.fisher_fallback.FuncRule`, a ``torch.func`` vmap of the module's own
vector-Jacobian product, so every model works. :func:`register_rule` adds a user's rule.

The built-in rules avoid per-sample gradients where the layer's structure allows it:

* ``nn.Linear`` on 2-D inputs: Σ_n (g∘g)(a∘a)ᵀ is one matmul (G∘G)ᵀ(A∘A), and |g aᵀ| = |g| |a|ᵀ
  makes MAS one matmul |G|ᵀ|A|;
* ``nn.Conv1d/2d/3d``: per-sample weight gradients from one grouped ``convolution_backward`` (or
  the unfolded input for thin convolutions), a few samples per call;
* ``nn.Embedding``, affine ``LayerNorm`` / ``GroupNorm`` / ``BatchNorm`` (eval): closed forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.fisher_fallback import FuncRule
from ewc.fisher_rule_base import Call, Rule, add_outer_squares, add_squares, chunks, first_grad, slice_samples
from ewc.fisher_rules_attention import Conv1DRule, MultiheadAttentionRule, lazy_rules, loaded_types

__all__ = [
    "CONV_GROUP_BYTES",
    "RULES",
    "THIN_MIN_OUT",
    "THIN_PATCH",
    "BatchNormRule",
    "Call",
    "Conv1DRule",
    "ConvRule",
    "EmbeddingRule",
    "FuncRule",
    "GroupNormRule",
    "LAZY_RULES",
    "LayerNormRule",
    "LinearRule",
    "MultiheadAttentionRule",
    "Rule",
    "register_rule",
    "rule_for",
]

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


class LinearRule(Rule):
    """``nn.Linear``: per-sample weight gradient g aᵀ; on 2-D inputs Σ_n (g∘g)(a∘a)ᵀ is one matmul."""

    def presquare(self, module: nn.Module, call: Call) -> bool:
        return call.args[0].dim() == 2

    def sum_sq(self, module: nn.Linear, call: Call) -> dict[str, Tensor]:
        return self._accumulated(module, call, absolute=False)

    def accumulate(self, module: nn.Linear, call: Call, into: dict[str, Tensor], absolute: bool) -> None:
        """On 2-D inputs: ``into += (Σ_k G_k²)ᵀ (A∘A)`` as one in-place ``addmm_`` (or |G|ᵀ|A|); on
        [N, T, in] inputs: per-sample Σ_t g_t a_tᵀ, a cache-sized chunk of samples at a time."""
        a, g = call.args[0], first_grad(call)
        if a.dim() != 2:
            nb = g.shape[1]
            a3, g4 = a.reshape(nb, -1, a.shape[-1]), g.reshape(g.shape[0], nb, -1, g.shape[-1])
            if "weight" in self.names:
                add_outer_squares(g4, a3.unsqueeze(0), into["weight"], absolute)
            if "bias" in self.names:
                gb = g4.sum(2).flatten(0, 1).to(into["bias"].dtype)  # [K·N, out]
                into["bias"] += gb.abs().sum(0) if absolute else torch.linalg.vecdot(gb, gb, dim=0)
            return
        if absolute and call.squared:
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
        if call.squared:
            return super().sum_abs(module, call)
        return self._accumulated(module, call, absolute=True)

    def per_sample(self, module: nn.Linear, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        a, g = slice_samples(call.args[0], n), slice_samples(first_grad(call), n, 1)
        k, nb = g.shape[0], g.shape[1]
        a3 = a.reshape(nb, -1, a.shape[-1])  # [N, T, in]
        g4 = g.reshape(k, nb, -1, g.shape[-1])  # [K, N, T, out]
        out = {}
        if "weight" in self.names:
            out["weight"] = torch.einsum("knto,nti->knoi", g4, a3)
        if "bias" in self.names:
            out["bias"] = g4.sum(2)
        return out

    def add_per_sample(self, module: nn.Linear, call: Call, sl: slice, name: str, into: Tensor) -> None:
        """The weight's per-sample Σ_t g_t a_tᵀ added by one in-place batched matmul (no temporary)."""
        if name != "weight":
            return super().add_per_sample(module, call, sl, name, into)
        a, g = slice_samples(call.args[0], sl), slice_samples(first_grad(call), sl, 1)
        k, nb = g.shape[0], g.shape[1]
        a4 = a.reshape(1, nb, -1, a.shape[-1]).expand(k, -1, -1, -1).reshape(k * nb, -1, a.shape[-1])
        g3 = g.reshape(k * nb, -1, g.shape[-1]).to(into.dtype)  # [K·n, T, out]
        into.view(k * nb, *into.shape[2:]).baddbmm_(g3.transpose(1, 2), a4.to(into.dtype))


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: per-sample weight gradients from grouped ``convolution_backward`` calls.

    Treating the samples (and the K backpropagated vectors) as extra convolution groups gives
    their weight gradients in one call, for any stride, padding, dilation and groups; calls take a
    few samples each (see :meth:`_groups`). Thin convolutions (a first layer on 1-3 channels) run
    that call far below peak; when gradients arrive in several passes they use the unfolded input
    instead (see :meth:`_thin`).
    """

    follows = ("forward", "_conv_forward")

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
        g = slice_samples(first_grad(call), sl, 1)
        if self._is_thin(module, call):
            return self._thin(module, call, sl, g)
        k, nb = g.shape[0], g.shape[1]
        a, padding = self._geometry(module, slice_samples(call.args[0], sl))
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
        u = slice_samples(u, sl)
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
        return chunks(
            nb, k * module.weight.numel() * module.weight.element_size(), CONV_GROUP_BYTES, like=module.weight
        )

    def _check(self, module: nn.modules.conv._ConvNd, a: Tensor) -> None:
        if a.dim() == len(module.kernel_size) + 1:
            raise ValueError("unbatched convolution input is not supported by the per-sample Fisher")

    def per_sample(
        self, module: nn.modules.conv._ConvNd, call: Call, n: slice | None = None
    ) -> dict[str, Tensor]:
        a, g = slice_samples(call.args[0], n), slice_samples(first_grad(call), n, 1)
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

        The squares are summed over samples and the K vectors along the flattened (K·n) axis
        (:func:`~ewc.fisher_rule_base.add_squares`).
        """
        g = first_grad(call)
        self._check(module, call.args[0])
        if "weight" in self.names:
            acc = into["weight"]
            for sl in self._groups(module, g.shape[0], g.shape[1]):
                gw = self._weight_grads(module, call, sl).flatten(0, 1)  # [K·n, *w.shape]
                add_squares(gw, acc, absolute)
        if "bias" in self.names:
            gb = g.sum(dim=tuple(range(3, g.dim()))).flatten(0, 1)  # [K·n, C_out]
            into["bias"] += gb.abs().sum(0) if absolute else torch.linalg.vecdot(gb, gb, dim=0)


class EmbeddingRule(Rule):
    """``nn.Embedding``: a sample's gradient for row v sums the output gradients where it used v."""

    @classmethod
    def applies_to(cls, module: nn.Module) -> bool:
        """Not with ``max_norm`` (renormalises rows in the forward) or ``scale_grad_by_freq``."""
        return module.max_norm is None and not module.scale_grad_by_freq

    def sum_sq(self, module: nn.Embedding, call: Call) -> dict[str, Tensor]:
        idx, g = call.args[0], first_grad(call)
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
        g = slice_samples(first_grad(call), n, 1)
        k, nb, dim = g.shape[0], g.shape[1], g.shape[-1]
        out = g.new_zeros(k, nb, module.num_embeddings, dim)
        self._scatter(module, call, n, out)
        return {"weight": out}

    def add_per_sample(self, module: nn.Embedding, call: Call, sl: slice, name: str, into: Tensor) -> None:
        """Each token's output gradient added into its row of its sample (a tied output projection's
        per-sample gradients, say), without a dense temporary."""
        self._scatter(module, call, sl, into)

    @staticmethod
    def _scatter(module: nn.Embedding, call: Call, n: slice | None, into: Tensor) -> None:
        idx, g = slice_samples(call.args[0], n), slice_samples(first_grad(call), n, 1)
        k, nb, dim = g.shape[0], g.shape[1], g.shape[-1]
        idx = idx.reshape(nb, -1)
        g = g.reshape(k, nb, -1, dim)
        if module.padding_idx is not None:
            g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
        index = idx.unsqueeze(0).unsqueeze(-1).expand(k, nb, idx.shape[1], dim)
        into.scatter_add_(2, index, g.to(into.dtype))


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
        a, g = slice_samples(call.args[0], n), slice_samples(first_grad(call), n, 1)
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


# ----------------------------------------------------------------------------------- the table

RULES: dict[type[nn.Module], type[Rule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Conv3d: ConvRule,
    nn.Embedding: EmbeddingRule,
    nn.LayerNorm: LayerNormRule,
    nn.GroupNorm: GroupNormRule,
    nn.modules.batchnorm._BatchNorm: BatchNormRule,  # BatchNorm1d/2d/3d keep its forward
    nn.MultiheadAttention: MultiheadAttentionRule,
}
# Types of optional libraries, by (module, class name): added to RULES by rule_for once their module
# is imported (a module of such a type exists only then), so ewc never imports them itself.
LAZY_RULES: dict[tuple[str, str], type[Rule]] = lazy_rules()


def register_rule(module_type: type[nn.Module], rule: type[Rule]) -> None:
    """Give ``module_type`` (and its subclasses that keep the methods ``rule.follows``) ``rule``.

    ``rule`` is a :class:`Rule` subclass; it is instantiated once per module with the names of
    the module's own parameters. A type already in ``RULES`` (a built-in one included) is an
    error: register a subclass instead.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of nn.Module, got {module_type!r}")
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise TypeError(f"rule must be a subclass of ewc.fisher_rules.Rule, got {rule!r}")
    if module_type in RULES:
        raise ValueError(
            f"{module_type.__qualname__} already has a rule ({RULES[module_type].__qualname__}); "
            "register a subclass of it instead"
        )
    missing = [m for m in rule.follows if not callable(getattr(module_type, m, None))]
    if missing:
        raise TypeError(f"{rule.__qualname__} follows {missing}, which {module_type.__qualname__} lacks")
    RULES[module_type] = rule


def rule_for(module: nn.Module, names: list[str]) -> Rule:
    """The table's rule for a module's own parameters ``names``, or the torch.func fallback.

    The nearest type along the module's MRO that is in ``RULES`` decides: its rule applies if the
    module's class still has that type's ``follows`` methods (a subclass that overrides
    ``forward`` computes something else) and the rule accepts the instance. Parametrised modules
    and parameters of submodules take the fallback, except those of the submodules the rule
    names in ``Rule.submodules`` (MultiheadAttention's ``out_proj``). Types in ``LAZY_RULES``
    (Hugging Face's ``Conv1D``) join the table here once their library is imported.
    """
    from torch.nn.utils import parametrize

    for t, lazy in loaded_types(LAZY_RULES).items():
        RULES.setdefault(t, lazy)  # a user's own registration of the type comes first
    if parametrize.is_parametrized(module):
        return FuncRule(names)
    cls = type(module)
    base = next((t for t in cls.__mro__ if t in RULES), None)
    if base is not None:
        rule = RULES[base]
        covered = {n for n, _ in module.named_parameters(recurse=False)}
        for sub in rule.submodules:  # submodules the module's forward uses without calling them
            child = module.get_submodule(sub)
            if not parametrize.is_parametrized(child):
                covered |= {f"{sub}.{n}" for n, _ in child.named_parameters(recurse=False)}
        kept = all(getattr(cls, m) is getattr(base, m) for m in rule.follows)
        if kept and set(names) <= covered and rule.applies_to(module):
            return rule(names)
    return FuncRule(names)
