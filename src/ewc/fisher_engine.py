"""The Fisher engine: Σ_n (per-sample gradient)² of a model's parameters, batch by batch.

Per batch, or per part of a batch with large activations:

1. capture: a forward pass with module hooks records every call of a module that owns parameters
   (:class:`~ewc.fisher_rule_base.Call`: inputs, outputs), and redoes it with copies when an
   in-place operation changed a tensor a rule will read;
2. vectors: K vectors per sample at the model's outputs (:mod:`ewc.fisher_vectors`);
3. backward: one ``autograd.grad`` per vector to the layer outputs only (autograd then skips the
   weight gradients);
4. reduction: per-layer rules (:mod:`ewc.fisher_rules`) add Σ_n (per-sample gradient)² (``mas``:
   Σ_n |…|) into the running sums, routed as planned once per part before the K passes.

The first batch binds a rule to every called module that owns parameters, measures the
activations that size the parts, and checks the plan (:mod:`ewc.fisher_check`): a parameter whose
rules miss part of its gradient goes to a general per-sample path. ``batched`` mode squares
mini-batch gradients instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ewc.fisher_check import GeneralPath, check_batch_first, check_batchnorm, check_plan, graph_leaves
from ewc.fisher_data import Output, batch_len, call_model, check_finite, slice_rows, splittable, to_device
from ewc.fisher_fallback import FuncRule
from ewc.fisher_rule_base import Call, Rule, add_squares, chunks, first_grad
from ewc.fisher_rules import rule_for
from ewc.fisher_vectors import BackpropVectors


@dataclass(eq=False)
class _Binding:
    """A rule bound to a module, with its parameters' local → global names."""

    module: nn.Module
    rule: Rule
    names: dict[str, str]


class _Route(Enum):
    """How one module call's output gradients reach the sums of its parameters."""

    DIRECT = "direct"  # the only contribution to each of its parameters: the rule adds every pass
    PRESQUARED = "presquared"  # DIRECT, and the rule needs only Σ_k G_k²: summed first, rule runs once
    SHARED = "shared"  # a parameter with other contributions per sample: sum per-sample grads, then square


@dataclass(eq=False)
class _Reduction:
    """One bound call's way into the sums for a part's K passes."""

    binding: _Binding
    call: Call
    route: _Route
    squares: Tensor | None = None  # PRESQUARED: Σ_k G_k² of the first output over the passes so far


@dataclass
class _ReductionPlan:
    """What a part's backward passes differentiate, and how each bound call's gradients are added."""

    outputs: list[tuple[Call, int, Tensor]]  # (call, output index, layer output) that need grad
    reductions: list[_Reduction] = field(default_factory=list)


class FisherEngine:
    """Accumulates Σ_n (per-sample gradient)² batch by batch (for ``mode="mas"``: Σ_n |…|).

    ``part_bytes`` bounds the captured activations per forward/backward part (see
    :meth:`_part_size`); None keeps the caller's batches whole.
    """

    def __init__(
        self,
        model: nn.Module,
        named: list[tuple[str, nn.Parameter]],
        mode: str,
        likelihood: str,
        sigma: float,
        generator: torch.Generator | None,
        *,
        output: Output = None,
        output_fn: Callable[[Tensor], Tensor] | None = None,
        part_bytes: int | None = None,
        sequence: Any = None,
    ):
        self.model, self.mode = model, mode
        self.output = output  # picks the tensor of outputs from what the model returns
        self.reduction = "abs" if mode == "mas" else "sq"  # per-sample gradients: squared or |.|
        self.vectors = BackpropVectors(mode, likelihood, sigma, generator, output_fn, sequence)
        self.named = named
        self.global_name = {id(p): n for n, p in named}
        self.sums = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in named}
        self.count = 0
        self.device = named[0][1].device
        self.bindings: list[_Binding] | None = None  # set by the first batch (_bind_rules)
        self.hooks: list[Any] = []
        self.calls: dict[int, list[Call]] = {}  # id(module) → its calls in the current capture
        self.capturing = False
        self.recorders: dict[int, Any] = {}  # id(module) → its rule's recorder, open during its call
        self.clone = False  # clone layer inputs/outputs when the model modifies them in place
        self.part_bytes = part_bytes
        self.activation_bytes = 0  # all modules' outputs in the first batch (set by _bind_rules)
        self.part_size: int | None = None  # samples per part (None: whole batches), from batch 1
        self.general: GeneralPath | None = None  # parameters the rules cannot cover (fisher_check)

    # ---- public steps

    def add(self, x: Any, y: Tensor | None) -> None:
        """Add one batch's Σ_n (per-sample gradient)² into ``sums`` and its size into ``count``."""
        x = to_device(x, self.device)
        if isinstance(y, Tensor):
            y = y.to(self.device)
        check_finite(x, "inputs")
        n = batch_len(x)
        if self.mode == "batched":
            self._add_batched(x, y, n)
            return
        self.vectors.new_batch(y)
        if self.bindings is None:
            logits = self._bind_rules(x)
            self._check_plan(x)
            self.part_size = self._part_size(n)
            parts = self._parts(x, n)
            if len(parts) == 1:
                self._add_part(x, y, parts[0], n, logits)
                return
            # A first batch too big for one part: its planning forward is not backpropagated
            # (K passes over all of it are what the parts avoid); it runs in parts like the rest.
            self.calls = {}
            del logits
        else:
            parts = self._parts(x, n)
        whole = len(parts) == 1
        for rows in parts:
            part = x if whole else slice_rows(x, rows.start, rows.stop)
            ys = y if whole or y is None else y[rows]
            self._add_part(part, ys, rows, n, self._capture_forward(part))

    def close(self) -> None:
        """Remove the module hooks."""
        for h in self.hooks:
            h.remove()
        self.hooks = []

    # ---- parts

    def _add_part(self, x: Any, y: Tensor | None, rows: slice, n: int, logits: Tensor) -> None:
        """One forward part: ``rows`` of a batch of ``n`` samples."""
        vectors = self.vectors(logits, y, rows, n)  # [K, part, *out]
        try:
            check_batch_first(self.bindings or [], self.calls, rows.stop - rows.start)
            if self.general is not None:  # per-token logits: the lazy vectors in blocks
                for block in vectors.blocks() if hasattr(vectors, "blocks") else [vectors]:
                    self.general.add(x, logits, block, self.sums, absolute=self.reduction == "abs")
            self._accumulate(logits, vectors)
        finally:
            self.calls = {}
        self.count += getattr(vectors, "count", rows.stop - rows.start)  # sequences: see fisher_sequence

    def _part_size(self, n: int) -> int | None:
        """Samples per forward/backward part: about ``part_bytes`` of captured activations.

        Every backward pass walks the activation gradients of the whole part, and ``exact``
        makes K of them. With large activations (the benchmark CNN at batch 256: ~90 MB) each
        pass streams memory and fresh allocations page-fault; parts of ~32 MB were measured
        5.7x → 4.8x the floor (``exact``) and 1.29x → 1.16x (``empirical``) on that CNN.
        Small models (an MLP at batch 256: under 2 MB) keep the caller's batches, and so do models
        on an accelerator: no page faults there, and every part is another few thousand kernel
        launches (a 4-layer encoder's batch of 256 came in ~25 parts, and its Fisher took 48x
        the floor on an H100, scripts/cuda_check.py).
        """
        if self.part_bytes is None or self.device.type != "cpu":
            return None
        per_sample = self.activation_bytes / max(1, n)
        return max(1, int(self.part_bytes // max(1.0, per_sample)))

    def _parts(self, x: Any, n: int) -> list[slice]:
        """Row ranges of a batch: one, or balanced parts of at most ``part_size`` samples (so no
        tiny remainder) when every input is batch-first and the samples can be sliced apart."""
        size = self.part_size
        if size is None or n <= size or not splittable(x, n):
            return [slice(0, n)]
        count = -(-n // size)
        step = -(-n // count)
        return [slice(i, min(n, i + step)) for i in range(0, n, step)]

    # ---- first batch: which rule covers which parameter

    def _bind_rules(self, x: Any) -> Tensor:
        """First batch: find the called modules and the parameters the forward uses, bind rules.

        The forward is captured for every module, so that it also serves as the first batch's
        capture once the rules are bound (no extra pass).
        """
        called: set[int] = set()
        temp = []
        for m in self.model.modules():
            temp.append(m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))))
            temp.append(m.register_forward_hook(self._hook, with_kwargs=True))
        try:
            out = self._recorded_forward(x)
        finally:
            for h in temp:
                h.remove()
        used_ids = graph_leaves(out)

        check_batchnorm(self.model, called)

        bindings: list[_Binding] = []
        covered: set[int] = set()
        for m in self.model.modules():
            own = {ln: p for ln, p in m.named_parameters(recurse=False) if p.requires_grad}
            if not own or id(m) not in called:
                continue
            names = {ln: self.global_name[id(p)] for ln, p in own.items()}
            bindings.append(_Binding(m, rule_for(m, list(names)), names))
            covered |= {id(p) for p in own.values()}

        # Parameters the forward uses without calling their module (e.g. MultiheadAttention's
        # out_proj): the nearest called ancestor's rule covers them, else its functional vjp.
        extra: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        modules = dict(self.model.named_modules())
        for gname, p in self.named:
            if id(p) not in used_ids or id(p) in covered:
                continue
            parts = gname.split(".")
            for cut in range(len(parts) - 1, -1, -1):
                anc = modules[".".join(parts[:cut])]
                if id(anc) in called:
                    extra.setdefault(id(anc), (anc, {}))[1][".".join(parts[cut:])] = gname
                    break
        for anc, names in extra.values():  # a rule naming them in Rule.submodules takes anc's own too
            prior = next((b for b in bindings if b.module is anc), None)
            merged = {**(prior.names if prior else {}), **names}
            rule = rule_for(anc, list(merged))
            if isinstance(rule, FuncRule):  # the fallback for these alone; anc's own binding stays
                rule, merged = FuncRule(list(names)), names
            elif prior is not None:
                bindings.remove(prior)
            bindings.append(_Binding(anc, rule, merged))

        self.bindings = bindings
        self._hook_bound()
        outputs = {id(t): t for calls in self.calls.values() for c in calls for t in c.outputs}
        self.activation_bytes = sum(t.numel() * t.element_size() for t in outputs.values())
        bound = {id(b.module) for b in bindings}
        self.calls = {k: v for k, v in self.calls.items() if k in bound}
        if self._modified():
            return self._capture_forward(x)
        check_finite(out, "model outputs")
        return out

    def _hook_bound(self) -> None:
        """Capture hooks on the bound modules (only)."""
        self.close()
        for mod in {id(b.module): b.module for b in self.bindings or []}.values():
            self.hooks.append(mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self.hooks.append(mod.register_forward_hook(self._hook, with_kwargs=True))

    def _check_plan(self, x: Any) -> None:
        """First batch: parameters whose rules miss part of their gradient (used outside their bound
        calls too) leave their rules for the general per-sample path (:func:`check_plan`)."""
        kept, capture = self.calls, lambda sub: (self._capture_forward(sub), self.calls)
        self.bindings, self.general = check_plan(
            self.model, self.named, self.bindings or [], capture, x, self.part_bytes is not None, self.output
        )
        if self.general is not None:
            self._hook_bound()
        bound = {id(b.module) for b in self.bindings}
        self.calls = {k: v for k, v in kept.items() if k in bound}

    # ---- forward with capture

    def _pre_hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.capturing and self.bindings:
            rule = next(b.rule for b in self.bindings if b.module is mod)
            recorder = rule.recorder(mod)
            if recorder is not None:
                self.recorders[id(mod)] = recorder.__enter__()
        if not (self.capturing and self.clone):
            return None
        clone = lambda t: t.clone() if isinstance(t, Tensor) else t  # noqa: E731
        leaves, spec = tree_flatten((args, kwargs))
        return tree_unflatten([clone(t) for t in leaves], spec)

    def _hook(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.capturing:
            return None
        if isinstance(output, Tensor):  # the common case, without pytree's cost (~20 µs a call)
            leaves, spec = [output], None
        else:
            leaves, spec = tree_flatten(output)
        outs = [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]
        recorder = self.recorders.pop(id(mod), None)
        if recorder is not None:
            recorder.__exit__(None, None, None)
        records = [] if recorder is None else recorder.records
        call = Call(args, kwargs, outs + [r.output for r in records], recorded=records)
        if not kwargs and all(isinstance(t, Tensor) for t in args):
            in_leaves = list(args)
        else:
            in_leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        call.versions = [t._version for t in in_leaves + outs]  # type: ignore[attr-defined]
        call.watched = in_leaves + outs  # type: ignore[attr-defined]
        self.calls.setdefault(id(mod), []).append(call)
        if self.clone:  # hand a copy downstream so later in-place ops cannot touch what we hold
            copies = [t.clone() if isinstance(t, Tensor) and t.is_floating_point() else t for t in leaves]
            return copies[0] if spec is None else tree_unflatten(copies, spec)
        return None

    def _capture_forward(self, x: Any) -> Tensor:
        """Forward with the bound modules' calls recorded; redone once, with copies, after an
        in-place change."""
        for attempt in range(2):
            out = self._recorded_forward(x)
            if not self._modified() or attempt == 1:
                break
        check_finite(out, "model outputs")
        return out

    def _recorded_forward(self, x: Any) -> Tensor:
        """One forward with the hooks recording every call into ``self.calls`` (fresh)."""
        self.calls = {}
        self.capturing = True
        try:
            return call_model(self.model, x, self.output)
        finally:
            self.capturing = False
            for recorder in self.recorders.values():  # a call that raised: its recorder closes here
                recorder.__exit__(None, None, None)
            self.recorders = {}

    def _modified(self) -> bool:
        """True (and copies from now on) if an in-place op changed a tensor a rule will read."""
        modified = any(
            t._version != v
            for calls in self.calls.values()
            for c in calls
            for t, v in zip(c.watched, c.versions, strict=True)  # type: ignore[attr-defined]
        )
        self.clone = self.clone or modified
        return modified

    # ---- backward to layer outputs and reduction into the sums

    def _accumulate(self, out: Tensor, vectors: Tensor) -> None:
        """Backpropagate each of the K vectors to the layer outputs; the rules add into the sums."""
        k = vectors.shape[0]
        plan = self._plan_reduction(out, k)
        if plan is None:
            return
        for kk in range(k):
            self._backward_to_layer_outputs(out, vectors[kk], plan, retain_graph=kk < k - 1)
            with torch.no_grad():  # the Fisher is a constant: no graph through activations
                self._reduce_pass(plan)
        with torch.no_grad():
            self._reduce_presquared(plan)
        for c, _, _ in plan.outputs:  # what rules kept for the passes (unfolded inputs) goes now
            c.cache.clear()

    def _plan_reduction(self, out: Tensor, k: int) -> _ReductionPlan | None:
        """Before a part's K passes: the layer outputs to differentiate and every bound call's route.

        None when there is nothing to differentiate (no captured output, or not the model's
        output, requires grad).
        """
        assert self.bindings is not None
        plan = _ReductionPlan(
            [
                (c, i, t)
                for calls in self.calls.values()
                for c in calls
                for i, t in enumerate(c.outputs)
                if t.requires_grad
            ]
        )
        if not plan.outputs or not out.requires_grad:
            return None
        for c, _, _ in plan.outputs:
            c.batch, c.passes = out.shape[0], k
        differentiated = {id(c) for c, _, _ in plan.outputs}
        pairs = [
            (b, c) for b in self.bindings for c in self.calls.get(id(b.module), []) if id(c) in differentiated
        ]
        contributions: dict[str, int] = {}  # global parameter name → calls that contribute to it
        for b, _ in pairs:
            for gname in b.names.values():
                contributions[gname] = contributions.get(gname, 0) + 1
        for b, c in pairs:
            if any(contributions[gname] > 1 for gname in b.names.values()):
                route = _Route.SHARED
            elif k > 1 and self.reduction == "sq" and len(c.outputs) == 1 and b.rule.presquare(b.module, c):
                # Σ_k G_k² suffices (Linear on [N, in]): one matmul for all vectors of the exact Fisher
                route = _Route.PRESQUARED
            else:
                route = _Route.DIRECT
            plan.reductions.append(_Reduction(b, c, route))
        return plan

    def _backward_to_layer_outputs(
        self, out: Tensor, vector: Tensor, plan: _ReductionPlan, retain_graph: bool
    ) -> None:
        """One backward pass of ``vector`` [N, *out]; each call's ``grads`` become [1, N, *out]."""
        grads = torch.autograd.grad(
            out,
            [t for _, _, t in plan.outputs],
            grad_outputs=vector,
            retain_graph=retain_graph,
            allow_unused=True,
        )
        for c, _, _ in plan.outputs:
            c.grads = [None] * len(c.outputs)
        for (c, i, _), g in zip(plan.outputs, grads, strict=True):
            c.grads[i] = None if g is None else g.unsqueeze(0)

    def _reduce_pass(self, plan: _ReductionPlan) -> None:
        """Add one pass's gradients: DIRECT calls through their rule, PRESQUARED squares into their
        running sum, SHARED parameters per sample across their calls."""
        shared: dict[str, list[tuple[_Binding, Call, str]]] = {}
        for r in plan.reductions:
            c = r.call
            if not any(g is not None for g in c.grads):
                continue
            if c.grads[0] is None:  # rules read the first output's gradient
                o = c.outputs[0]
                c.grads[0] = torch.zeros((1, *o.shape), dtype=o.dtype, device=o.device)
            if r.route is _Route.PRESQUARED:
                g0 = c.grads[0]
                if r.squares is None:
                    r.squares = g0.square()
                else:
                    r.squares.addcmul_(g0, g0)
            elif r.route is _Route.DIRECT:
                self._add(r.binding, c)
            else:
                for local, gname in r.binding.names.items():
                    shared.setdefault(gname, []).append((r.binding, c, local))
        for gname, contributions in shared.items():
            self._add_shared(gname, contributions)

    def _reduce_presquared(self, plan: _ReductionPlan) -> None:
        """After the K passes: PRESQUARED calls' rules run once on Σ_k G_k²."""
        for r in plan.reductions:
            if r.route is _Route.PRESQUARED and r.squares is not None:
                r.call.grads, r.call.squared = [r.squares], True
                self._add(r.binding, r.call)

    def _add(self, b: _Binding, c: Call) -> None:
        """The rule adds this call's reduction into the running sums (in place)."""
        into = {local: self.sums[gname] for local, gname in b.names.items()}
        b.rule.accumulate(b.module, c, into, absolute=self.reduction == "abs")

    def _add_shared(self, gname: str, contributions: list[tuple[_Binding, Call, str]]) -> None:
        """Several contributions to one parameter per sample: sum per-sample gradients, then square
        (or take the absolute value)."""
        first = contributions[0][1]
        g = first_grad(first)
        into = self.sums[gname]
        k, numel = g.shape[0], into.numel()
        for sl in chunks(first.batch, k * numel * into.element_size(), like=g):
            total = into.new_zeros(k, sl.stop - sl.start, *into.shape)
            for b, c, local in contributions:
                b.rule.add_per_sample(b.module, c, sl, local, total)
            add_squares(total.flatten(0, 1), into, absolute=self.reduction == "abs")

    # ---- batched (mini-batch) mode

    def _add_batched(self, x: Any, y: Tensor | None, n: int) -> None:
        """``batched``: add n · (gradient of the batch-mean log-likelihood)²."""
        if self.count == 0:
            check_batchnorm(self.model)
        out = call_model(self.model, x, self.output)
        check_finite(out, "model outputs")
        vectors = self.vectors(out, y, slice(0, n), n)
        count = getattr(vectors, "count", n)  # sequences: sequences or tokens (fisher_sequence)
        v = vectors[0] / count  # gradient of the batch-mean log-likelihood
        params = [p for _, p in self.named]
        grads = torch.autograd.grad(out, params, grad_outputs=v, allow_unused=True)
        for (name, _), g in zip(self.named, grads, strict=True):
            if g is not None:
                self.sums[name] += count * g.square()
        self.count += count
