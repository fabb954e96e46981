"""What a per-layer Fisher rule is: the record of one module call and the ``Rule`` interface.

A rule turns what a module saw in one call (its inputs) and the per-sample gradients of the
objective with respect to its outputs into per-sample gradients of the module's own parameters.
Rules receive output gradients with a leading ``K`` axis, one entry per backpropagated vector
(``K = 1`` for the empirical / sampled Fisher and MAS; for the exact Fisher ``K = C − 1``
columns of the softmax Hessian's factor, or ``D`` for a gaussian output of size D), so ``G`` has
shape ``[K, N, *out]``. Three entry points:

* ``per_sample``: the per-sample gradients themselves, ``[K, N, *param.shape]``. Enough for a
  rule: the others default to reducing it chunk by chunk, and a parameter with several
  contributions per sample (a module called twice, tied weights) always goes through it, or
  through ``add_per_sample`` (adds them into a given tensor: a rule may do it without a
  temporary, e.g. an embedding's rows by index);
* ``sum_sq``: Σ_k Σ_n (per-sample gradient)², the Fisher's reduction, which a rule may compute
  without materialising per-sample gradients where the layer's structure allows it;
* ``sum_abs``: Σ_k Σ_n |per-sample gradient| (MAS importances), likewise.

The engine calls ``accumulate``, which adds ``sum_sq`` or ``sum_abs`` into the running sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# Per-sample gradient chunks are bounded to this many bytes so that big batches do not turn into
# page-fault storms: glibc trims and regrows the heap around large fresh allocations, each regrown
# page a minor fault (docs/benchmarks.md, "Allocator effect").
CHUNK_BYTES = 64 * 2**20
# Per-sample sums of outer products Σ_t x_t y_tᵀ (a Linear weight on [N, T, in] inputs, attention's
# projections) are formed and squared this many bytes at a time: cache-sized batched matmuls
# measured 3-4x faster than 64 MiB einsum chunks on transformer shapes (docs/benchmarks.md).
OUTER_CHUNK_BYTES = 8 * 2**20
# On an accelerator every chunk is a few kernel launches, and the cache-sized CPU budgets above cut
# a transformer's batch of 256 into ~120 000 ops (about 5 µs each on an H100: the encoder's Fisher
# took 48x the floor there, scripts/cuda_check.py). Tensors on a non-CPU device are chunked to
# at least this many bytes instead (bounded memory, ~30x fewer ops).
DEVICE_CHUNK_BYTES = 256 * 2**20
# Per-sample gradients of at least this many entries are squared into the sums one sample at a
# time (see add_squares)
ROW_LOOP_NUMEL = 2**16


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
    # what the rule's recorder saw inside the call (Rule.recorder); its tensors' gradients are in
    # ``grads`` after the module's own outputs
    recorded: list[Any] = field(default_factory=list)


def chunks(
    n: int, per_sample_bytes: int, budget: int | None = None, like: Tensor | None = None
) -> list[slice]:
    """Slices of the sample axis whose per-sample tensors take about ``budget`` bytes each
    (default ``CHUNK_BYTES``; at least ``DEVICE_CHUNK_BYTES`` when ``like`` is not on the CPU)."""
    budget = CHUNK_BYTES if budget is None else budget
    if like is not None and like.device.type != "cpu":
        budget = max(budget, DEVICE_CHUNK_BYTES)
    size = max(1, budget // max(1, per_sample_bytes))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@contextmanager
def restored_on_error(module: nn.Module) -> Iterator[None]:
    """Run a trial of the module's forward (under ``torch.func``) that may fail half-way: if it
    raises, every parameter and buffer of ``module`` gets back its object and its value.

    A forward that changes its own weights and changes them back (PEFT's LoRA
    ``MultiheadAttention`` merges the adapter into ``out_proj.weight`` through ``.data`` and
    unmerges after the call) leaves them changed when ``torch.func`` stops it in between. Costs a
    copy of the module's state, so it guards first attempts only.
    """
    saved = [
        (owner, name, t, t.detach().clone())
        for owner in module.modules()
        for name, t in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]
    ]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for owner, name, t, value in saved:
                if getattr(owner, name, None) is not t:
                    setattr(owner, name, t)
                t.data = value
        raise


def first_grad(call: Call) -> Tensor | None:
    """The gradient of the call's first output, ``[K, N, *out]``: the one rules read."""
    return call.grads[0] if call.grads else None


def slice_samples(t: Tensor, sl: slice | None, dim: int = 0) -> Tensor:
    """Samples ``sl`` of ``t`` along ``dim`` (a view; all of ``t`` when ``sl`` is None)."""
    if sl is None:
        return t
    return t.narrow(dim, sl.start, sl.stop - sl.start)


def outer_sums(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample Σ_t x_t y_tᵀ: ``x`` [Kx, n, T, p], ``y`` [Ky, n, T, q] (Kx, Ky: 1 or K) → [K, n, p, q]."""
    dtype = torch.promote_types(x.dtype, y.dtype)  # autocast may hand over bfloat16 gradients
    return torch.matmul(x.to(dtype).transpose(-1, -2), y.to(dtype))


def add_squares(rows: Tensor, into: Tensor, absolute: bool = False) -> None:
    """``into += Σ_r rows[r]²`` (or Σ_r |rows[r]|), ``rows`` ``[R, *into.shape]``.

    Large rows are added one at a time with ``addcmul_``: ``vecdot`` (or ``square().sum(0)``)
    along the leading axis materialises every product first, 88 ms against 19 ms for [64, 640 000]
    (a tied 5 000 × 128 embedding's per-sample gradients, one thread). Small rows (a bias, a thin
    convolution's weight) go in one ``vecdot``: a Python loop would cost more than the arithmetic.
    """
    if absolute:
        into += rows.abs().sum(0).to(into.dtype)
    elif rows.shape[0] > 1 and rows[0].numel() >= ROW_LOOP_NUMEL:
        for r in rows:
            r = r.to(into.dtype)
            into.addcmul_(r, r)
    else:
        into += torch.linalg.vecdot(rows, rows, dim=0).to(into.dtype)


def add_outer_squares(x: Tensor, y: Tensor, into: Tensor, absolute: bool) -> None:
    """``into += Σ_k Σ_n (Σ_t x_t y_tᵀ)²`` (or |…|) of :func:`outer_sums`, a cache-sized chunk of
    samples at a time (:data:`OUTER_CHUNK_BYTES`), summed along the flattened (K·n) axis."""
    k, n = max(x.shape[0], y.shape[0]), x.shape[1]
    per_sample = k * x.shape[-1] * y.shape[-1] * into.element_size()
    for sl in chunks(n, per_sample, OUTER_CHUNK_BYTES, like=y):
        ps = outer_sums(slice_samples(x, sl, 1), slice_samples(y, sl, 1)).flatten(0, 1)
        add_squares(ps, into, absolute)


class Rule:
    """Base rule: ``sum_sq`` / ``sum_abs`` default to reducing ``per_sample`` chunk by chunk.

    A rule instance serves one module's parameters (``names``, relative to the module). For the
    rule table (:func:`ewc.fisher_rules.register_rule`), ``follows`` names the methods of the
    registered module type whose computation the rule reproduces: a subclass that overrides one
    of them gets the torch.func fallback instead.
    """

    follows: tuple[str, ...] = ("forward",)
    # Submodules whose parameters the rule also covers: the module's forward uses them without
    # calling them (MultiheadAttention's out_proj), so the engine binds them to this module's calls.
    submodules: tuple[str, ...] = ()

    def __init__(self, names: list[str]):
        self.names = names  # parameter names relative to the module

    @classmethod
    def applies_to(cls, module: nn.Module) -> bool:
        """True if the rule covers this instance of its module type (e.g. no Embedding max_norm)."""
        return True

    def per_sample(self, module: nn.Module, call: Call, n: slice | None = None) -> dict[str, Tensor]:
        """Per-sample gradients ``[K, n, *param.shape]`` of samples ``n`` (all when None)."""
        raise NotImplementedError

    def recorder(self, module: nn.Module) -> Any:
        """None, or a context manager the engine holds open during each captured call of the module:
        its ``records`` (each with an ``output`` tensor, made inside the call) go into the call's
        ``recorded``, and the outputs are differentiated with the call's own (gradients of
        intermediate results, e.g. attention's projections, without recomputing them)."""
        return None

    def add_per_sample(self, module: nn.Module, call: Call, sl: slice, name: str, into: Tensor) -> None:
        """``into += `` the per-sample gradients of parameter ``name`` (local) for samples ``sl``,
        ``into`` being ``[K, n, *param.shape]`` (a parameter with several contributions per sample)."""
        into += self.per_sample(module, call, sl)[name]

    def presquare(self, module: nn.Module, call: Call) -> bool:
        """True if ``sum_sq`` only needs Σ_k G_k², not each G_k: for the Fisher with several
        vectors, the engine then runs ``accumulate`` once, after the passes, with that sum as
        ``grads[0]`` and ``call.squared`` set."""
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
        g = first_grad(call)
        k, n_samples = g.shape[0], call.batch or g.shape[1]  # (a fallback's call may be sequence-first)
        n_params = sum(module.get_parameter(nm).numel() for nm in self.names)
        out: dict[str, Tensor] = {}
        for sl in chunks(n_samples, k * n_params * g.element_size(), like=g):
            for name, ps in self.per_sample(module, call, sl).items():
                sq = op(ps).sum(dim=(0, 1))
                out[name] = out[name] + sq if name in out else sq
        return out
