"""The fallback Fisher rule for any module: a ``torch.func`` vmap of the module's own vector-Jacobian
product over the samples (a per-sample autograd loop where the module cannot be vmapped)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ewc.fisher_rule_base import Call, Rule, restored_on_error


class FuncRule(Rule):
    """Fallback for any module: vmap over samples of the module's own vector-Jacobian product.

    Calls the module functionally on each sample (with a batch axis of one) and pulls the output
    gradient back to the named parameters (which may live in submodules that the forward uses
    without calling them, e.g. ``MultiheadAttention.out_proj``). If the module cannot be vmapped
    (data-dependent control flow, ``.item()``), a per-sample autograd loop gives the same answer.
    """

    def __init__(self, names: list[str]):
        super().__init__(names)
        self._vmap: bool | None = None  # None: untried; False: it failed, the loop from then on

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

        def vmapped() -> list[dict[str, Tensor]]:
            return [
                torch.func.vmap(one, in_dims=(b_dims, out_dims))(b_leaves, [g[kk] for g in gs])
                for kk in range(k)
            ]

        per_k = None
        if self._vmap is None:  # the first attempt: a failure must not leave the module changed
            try:
                with restored_on_error(module):
                    per_k = vmapped()
                self._vmap = True
            except Exception as err:  # noqa: BLE001 - any vmap limitation → exact per-sample loop
                self._vmap = False
                warnings.warn(
                    f"{type(module).__name__}: torch.func.vmap failed ({err.__class__.__name__}: {err}); "
                    "using a per-sample loop for this module (correct, slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        elif self._vmap:
            per_k = vmapped()
        if per_k is None:
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
