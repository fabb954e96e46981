"""Per-layer Fisher rules for transformers: ``nn.MultiheadAttention`` and Hugging Face's ``Conv1D``.

Both reduce to per-sample sums of outer products Σ_t x_t y_tᵀ over positions
(:func:`~ewc.fisher_rule_base.outer_sums`), squared a cache-sized chunk of samples at a time.

* ``nn.MultiheadAttention`` (batch-first, without ``add_bias_kv`` / ``add_zero_attn``): the rule
  records the inputs and outputs of the forward's ``F.linear`` calls on its projection weights
  (:class:`_ProjectionRecorder`), whose output gradients the engine computes with the module's
  own; where nothing was recorded it recomputes the attention from the call's inputs with the
  module's own weights (once per call, kept for every pass) and backpropagates the output
  gradients through it in closed form, to the gradients at q, k, v and at ``out_proj``'s input.
  ``out_proj`` is not called as a module (the forward uses its weight functionally), so the rule
  covers its parameters too (``submodules``).
* Hugging Face's GPT-2 ``Conv1D``, y = x W + b with W [in, out]: per-sample Σ_t a_t g_tᵀ. It is
  matched without importing ``transformers``: :func:`lazy_rules` names it by module and class,
  and the table registers it when its module has been imported (a Conv1D exists only then).
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.fisher_rule_base import Call, Rule, add_outer_squares, chunks, first_grad, outer_sums, slice_samples

__all__ = ["Conv1DRule", "MultiheadAttentionRule", "lazy_rules"]

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
# Record the projections' inputs and outputs during the captured forward (False: recompute q, k, v
# and the attention from the call's inputs and backpropagate through them in closed form)
RECORD_PROJECTIONS = True


class _OuterRule(Rule):
    """A rule whose per-sample gradients are blocks of Σ_t x_t y_tᵀ (weights) and Σ_t g_t (biases).

    ``blocks`` gives, for samples ``sl``, a list of (name, rows, x, y): rows ``rows`` of parameter
    ``name`` (all rows when None) get Σ_t x_t y_tᵀ, or Σ_t x_t when ``y`` is None (a bias);
    x is [K, n, T, p], y [1, n, T, q].
    """

    def blocks(
        self, module: nn.Module, call: Call, sl: slice
    ) -> list[tuple[str, slice | None, Tensor, Tensor | None]]:
        raise NotImplementedError

    def _sample_bytes(self, module: nn.Module, call: Call) -> int:
        g = first_grad(call)
        n_params = sum(module.get_parameter(nm).numel() for nm in self.names)
        return g.shape[0] * n_params * g.element_size()

    def per_sample(self, module: nn.Module, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        sl = n if n is not None else slice(0, first_grad(call).shape[1])
        out: dict[str, Tensor] = {}
        for name, rows, x, y in self.blocks(module, call, sl):
            part = x.sum(2) if y is None else outer_sums(x, y)
            if rows is None:
                out[name] = part
            else:
                if name not in out:
                    shape = module.get_parameter(name).shape
                    out[name] = part.new_zeros(part.shape[0], part.shape[1], *shape)
                out[name][:, :, rows] = part
        return out

    def sum_sq(self, module: nn.Module, call: Call) -> dict[str, Tensor]:
        return self._accumulated(module, call, absolute=False)

    def sum_abs(self, module: nn.Module, call: Call) -> dict[str, Tensor]:
        return self._accumulated(module, call, absolute=True)

    def accumulate(self, module: nn.Module, call: Call, into: dict[str, Tensor], absolute: bool) -> None:
        """``into += Σ_k Σ_n (per-sample gradient)²`` (or |…|) block by block, in chunks of samples."""
        n = first_grad(call).shape[1]
        for sl in chunks(n, self._sample_bytes(module, call), like=first_grad(call)):
            for name, rows, x, y in self.blocks(module, call, sl):
                acc = into[name] if rows is None else into[name][rows]
                if y is None:
                    s = x.sum(2).flatten(0, 1).to(acc.dtype)  # [K·n, p]
                    acc += s.abs().sum(0) if absolute else torch.linalg.vecdot(s, s, dim=0)
                else:
                    add_outer_squares(x, y, acc, absolute)


class Conv1DRule(_OuterRule):
    """Hugging Face's ``Conv1D`` (GPT-2): y = x W + b, W [in, out]; per sample W gets Σ_t a_t g_tᵀ."""

    def blocks(
        self, module: nn.Module, call: Call, sl: slice
    ) -> list[tuple[str, slice | None, Tensor, Tensor | None]]:
        a, g = slice_samples(call.args[0], sl), slice_samples(first_grad(call), sl, 1)
        k, nb = g.shape[0], g.shape[1]
        g4 = g.reshape(k, nb, -1, g.shape[-1])  # [K, n, T, out]
        a4 = a.reshape(1, nb, -1, a.shape[-1])  # [1, n, T, in]
        out: list[tuple[str, slice | None, Tensor, Tensor | None]] = []
        if "weight" in self.names:
            out.append(("weight", None, a4, g4))  # Σ_t a_t g_tᵀ: [K, n, in, out]
        if "bias" in self.names:
            out.append(("bias", None, g4, None))
        return out


@dataclass
class _Projection:
    """One ``F.linear`` call inside a MultiheadAttention forward on (rows of) its weights."""

    weight: str  # parameter name (local to the module)
    rows: slice | None  # the weight's rows it used (None: all)
    bias: str | None
    bias_rows: slice | None
    input: Tensor  # [L, N, in] or [L·N, in] (positions first, as F.multi_head_attention_forward has them)
    output: Tensor


class _ProjectionRecorder:
    """Records the input and output of every ``F.linear`` call on the module's projection weights
    while its forward runs (``torch.nn.functional.linear`` replaced for the call's duration): the
    engine then backpropagates to those outputs, and the projections' per-sample gradients are
    outer products of what autograd gives there, with no recomputation of the attention."""

    def __init__(self, module: nn.MultiheadAttention):
        self.module = module
        self.records: list[_Projection] = []

    def __enter__(self) -> _ProjectionRecorder:
        self.previous = F.linear
        F.linear = self._linear
        return self

    def __exit__(self, *exc: object) -> None:
        F.linear = self.previous

    def _linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = self.previous(input, weight, bias)
        m = self.module
        if weight is m.out_proj.weight:
            found = ("out_proj.weight", None)
            bias_found = ("out_proj.bias", None) if bias is not None and bias is m.out_proj.bias else None
        else:
            names = (
                ["in_proj_weight"]
                if m._qkv_same_embed_dim
                else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
            )
            found = _rows_of(weight, [(nm, getattr(m, nm)) for nm in names])
            bias_found = _rows_of(bias, [("in_proj_bias", m.in_proj_bias)]) if bias is not None else None
        if found is not None and out.requires_grad and (bias is None or bias_found is not None):
            self.records.append(_Projection(*found, *(bias_found or (None, None)), input, out))
        return out


def _rows_of(t: Tensor, params: list[tuple[str, Tensor | None]]) -> tuple[str, slice | None] | None:
    """(name, rows) if ``t`` is one of ``params`` or a slice of its rows (a split of in_proj)."""
    for name, p in params:
        if p is None:
            continue
        if t is p:
            return name, None
        if (
            t._base is p
            and t.stride() == p.stride()
            and (t.storage_offset() - p.storage_offset()) % p.stride(0) == 0
        ):
            start = (t.storage_offset() - p.storage_offset()) // p.stride(0)
            return name, slice(start, start + t.shape[0])
    return None


def _samples_second(t: Tensor, n: int, k: bool) -> Tensor:
    """A recorded tensor ([L, N, d] or [L·N, d], after a K axis if ``k``) as [(K,) N, L, d]."""
    lead = 1 if k else 0
    if t.dim() == lead + 2:
        t = t.unflatten(lead, (-1, n))
    return t.transpose(lead, lead + 1)


class MultiheadAttentionRule(_OuterRule):
    """``nn.MultiheadAttention``: q, k, v projections, scaled dot-product attention, ``out_proj``.

    With P = softmax(q kᵀ/√d + mask) per head and the context c = P v, the output gradient g gives
    ``out_proj``: Σ_t g_t c_tᵀ and Σ_t g_t; dc = g W_o, dP = dc vᵀ (+ the gradient at the returned
    attention weights), dv = Pᵀ dc, dS = P ∘ (dP − rowsum(dP ∘ P)), dq = dS k/√d, dk = dSᵀ q/√d;
    the input projections get Σ_t dq_t query_tᵀ, Σ_s dk_s key_sᵀ, Σ_s dv_s value_sᵀ and the sums
    of dq, dk, dv. q, k, v and P are computed once per call (all K passes use them).
    """

    submodules = ("out_proj",)

    @classmethod
    def applies_to(cls, module: nn.Module) -> bool:
        """Batch-first modules without ``add_bias_kv`` / ``add_zero_attn``. Sequence-first ones
        ([T, N, E] outputs) take the fallback: the engine reads a rule's call as batch-first."""
        return bool(module.batch_first) and module.bias_k is None and not module.add_zero_attn

    @staticmethod
    def _weights(module: nn.MultiheadAttention) -> tuple[list[Tensor], list[Tensor | None]]:
        e = module.embed_dim
        if module._qkv_same_embed_dim:
            ws = list(module.in_proj_weight.detach().split(e))
        else:
            ws = [module.q_proj_weight.detach(), module.k_proj_weight.detach(), module.v_proj_weight.detach()]
        b = module.in_proj_bias
        bs: list[Tensor | None] = [None] * 3 if b is None else list(b.detach().split(e))
        return ws, bs

    def _forward(self, module: nn.MultiheadAttention, call: Call) -> dict[str, Tensor]:
        """q, k, v [N, H, L|S, d], P [N, H, L, S] and the context c [N, L, E] of the whole call."""
        cache = call.cache
        if "attn_p" in cache:
            return cache
        bound = _MHA_SIGNATURE.bind(module, *call.args, **call.kwargs).arguments
        query, key, value = bound["query"], bound["key"], bound["value"]
        if query.dim() != 3:
            raise ValueError("unbatched attention input is not supported by the per-sample Fisher")
        n, length, e = query.shape
        h = module.num_heads
        ws, bs = self._weights(module)
        heads = [
            F.linear(t, w, b).reshape(n, t.shape[1], h, e // h).transpose(1, 2)
            for t, w, b in zip((query, key, value), ws, bs, strict=True)
        ]
        q, k, v = heads
        mask = _mask(bound.get("attn_mask"), bound.get("key_padding_mask"), n, h, q.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(e // h)
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, dim=-1)
        if mask is not None:  # a fully masked row attends to nothing: 0, as PyTorch's kernel gives
            p = p.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
        ctx = torch.matmul(p, v).transpose(1, 2).reshape(n, length, e)
        cache.update(query=query, key=key, value=value, attn_q=q, attn_k=k, attn_v=v, attn_p=p, attn_c=ctx)
        return cache

    def recorder(self, module: nn.Module) -> _ProjectionRecorder | None:
        return _ProjectionRecorder(module) if RECORD_PROJECTIONS else None

    def blocks(
        self, module: nn.Module, call: Call, sl: slice
    ) -> list[tuple[str, slice | None, Tensor, Tensor | None]]:
        recorded = self._recorded(call)
        if recorded is not None:
            return self._recorded_blocks(call, recorded, sl)
        f = {name: slice_samples(t, sl) for name, t in self._forward(module, call).items()}
        g = slice_samples(first_grad(call), sl, 1)  # [K, n, L, E]
        out: list[tuple[str, slice | None, Tensor, Tensor | None]] = []
        if "out_proj.weight" in self.names:
            out.append(("out_proj.weight", None, g, f["attn_c"].unsqueeze(0)))
        if "out_proj.bias" in self.names:
            out.append(("out_proj.bias", None, g, None))
        inner = [nm for nm in self.names if not nm.startswith("out_proj.")]
        if not inner:
            return out
        q, k, v, p = f["attn_q"], f["attn_k"], f["attn_v"], f["attn_p"]
        kk, nb, length, e = g.shape
        h = module.num_heads
        dc = torch.matmul(g, module.out_proj.weight.detach().to(g.dtype))
        dc = dc.reshape(kk, nb, length, h, e // h).transpose(2, 3)  # [K, n, H, L, d]
        dp = torch.matmul(dc, v.transpose(-1, -2))  # [K, n, H, L, S]
        gw = (
            slice_samples(call.grads[1], sl, 1) if len(call.grads) > 1 and call.grads[1] is not None else None
        )
        if gw is not None:  # the returned attention weights are used downstream too
            average = _MHA_SIGNATURE.bind(module, *call.args, **call.kwargs).arguments.get(
                "average_attn_weights", True
            )
            dp = dp + (gw.unsqueeze(2) / h if average else gw)
        dv = torch.matmul(p.transpose(-1, -2), dc)  # [K, n, H, S, d]
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / math.sqrt(e // h)
        dq, dk = torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q)
        grads = [t.transpose(2, 3).reshape(kk, nb, t.shape[3], e) for t in (dq, dk, dv)]  # [K, n, ·, E]
        inputs = [f[name].unsqueeze(0) for name in ("query", "key", "value")]
        if module._qkv_same_embed_dim:
            for i, (dt, x) in enumerate(zip(grads, inputs, strict=True)):
                if "in_proj_weight" in self.names:
                    out.append(("in_proj_weight", slice(i * e, (i + 1) * e), dt, x))
        else:
            for name, dt, x in zip(
                ("q_proj_weight", "k_proj_weight", "v_proj_weight"), grads, inputs, strict=True
            ):
                if name in self.names:
                    out.append((name, None, dt, x))
        if "in_proj_bias" in self.names:
            out += [("in_proj_bias", slice(i * e, (i + 1) * e), dt, None) for i, dt in enumerate(grads)]
        return out

    def _recorded(self, call: Call) -> list[tuple[_Projection, Tensor | None]] | None:
        """The recorded projections with their output gradients, if they cover every parameter of
        the rule (else None: the closed-form route, e.g. on a call captured without the recorder)."""
        if not call.recorded:
            return None
        own = len(call.outputs) - len(call.recorded)
        pairs = [(r, call.grads[own + j]) for j, r in enumerate(call.recorded)]
        covered = {r.weight for r in call.recorded} | {r.bias for r in call.recorded if r.bias}
        return pairs if set(self.names) <= covered else None

    def _recorded_blocks(
        self, call: Call, pairs: list[tuple[_Projection, Tensor | None]], sl: slice
    ) -> list[tuple[str, slice | None, Tensor, Tensor | None]]:
        """Σ_t g_t x_tᵀ of each recorded projection (g: autograd's gradient at its output)."""
        g0 = first_grad(call)
        k, n = g0.shape[0], g0.shape[1]
        out: list[tuple[str, slice | None, Tensor, Tensor | None]] = []
        for r, g in pairs:
            if g is None:  # the projection does not reach the outputs
                g = torch.zeros((k, *r.output.shape), dtype=r.output.dtype, device=r.output.device)
            gs = slice_samples(_samples_second(g, n, True), sl, 1)  # [K, n, L, out]
            if r.weight in self.names:
                x = slice_samples(_samples_second(r.input.detach(), n, False), sl)  # [n, L, in]
                out.append((r.weight, r.rows, gs, x.unsqueeze(0)))
            if r.bias is not None and r.bias in self.names:
                out.append((r.bias, r.bias_rows, gs, None))
        return out


def _mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int, h: int, dtype: torch.dtype
) -> Tensor | None:
    """The additive mask [N or 1, H or 1, L, S] that ``F.multi_head_attention_forward`` applies
    (boolean masks: True is left out, i.e. −inf)."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.reshape(1, 1, *mask.shape) if mask.dim() == 2 else mask.reshape(n, h, *mask.shape[1:])
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask).reshape(n, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    return mask


def lazy_rules() -> dict[tuple[str, str], type[Rule]]:
    """Rules for types of optional libraries, by (module, class name): registered by the table
    once that module is imported (never importing it here)."""
    return {("transformers.pytorch_utils", "Conv1D"): Conv1DRule}


def loaded_types(names: dict[tuple[str, str], type[Rule]]) -> dict[type[nn.Module], type[Rule]]:
    """The types among ``names`` whose modules are imported already."""
    out = {}
    for (mod, cls), rule in names.items():
        t = getattr(sys.modules.get(mod), cls, None)
        if isinstance(t, type) and issubclass(t, nn.Module):
            out[t] = rule
    return out
