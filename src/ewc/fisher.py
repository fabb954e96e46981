"""The diagonal Fisher information of any PyTorch model, from per-sample gradients.

``diagonal_fisher(model, data, mode)`` returns, for every parameter that requires grad, the
mean over samples of the squared per-sample gradient of the log-likelihood:

* ``exact``:     F = 1/N Σ_n Σ_c p_c(x_n) (∇ log p(c|x_n))²   (expectation over the model's classes)
* ``sample``:    F = 1/N Σ_n (∇ log p(ŷ_n|x_n))²,  ŷ_n ~ p(·|x_n)  (one Monte-Carlo label per sample)
* ``empirical``: F = 1/N Σ_n (∇ log p(y_n|x_n))²  (the true labels)
* ``batched``:   F = 1/N Σ_b B_b (∇ 1/B_b Σ_{n∈b} log p(y_n|x_n))²  (squared mini-batch gradients, what
  many libraries compute; biased towards zero by roughly the batch size, kept for comparison only)

Per-token logits ``[N, T, C]`` with labels ``[N, T]`` (masked where ``ignore_index``) are a sequence
likelihood (:mod:`ewc.fisher_sequence`): a sequence's log-likelihood is Σ_t log p(y_t | x) over its
unmasked tokens (``sequence="sum"``), or every unmasked token is a sample (``sequence="tokens"``);
``shift_labels`` pairs logits[:, t] with labels[:, t + 1], as Hugging Face causal LMs do.

How: one forward pass records what each layer saw (module hooks); one backward pass per
backpropagated vector computes gradients with respect to the layer *outputs* only (autograd then
skips the weight gradients), and per-layer rules (:mod:`ewc.fisher_rules`) turn inputs and output
gradients into summed squared per-sample gradients. For ``exact`` the softmax structure is used:
diag(p) − ppᵀ has a closed-form factor with C − 1 columns (:func:`softmax_hessian_factor`), so
C − 1 backward passes to the layer outputs, with their squares summed, replace the enumeration
of all C classes.

This module is the public entry (argument checks, eval mode, mean over samples, distributed
all-reduce); :mod:`ewc.fisher_engine` is the engine, :mod:`ewc.fisher_data` the accepted data
forms and checks, :mod:`ewc.fisher_vectors` the backpropagated vectors.

Assumption: samples are processed independently (true for ordinary models in eval mode; the
Fisher is always computed in eval mode, BatchNorm then uses its running statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ewc.checks import check_count
from ewc.fisher_data import Output, batches, eval_mode
from ewc.fisher_engine import FisherEngine
from ewc.fisher_sequence import IGNORE_INDEX, SEQUENCE_MODES, SequenceLikelihood, causal_lm
from ewc.fisher_vectors import sample_categorical, softmax_hessian_factor

__all__ = [
    "ACTIVATION_BYTES",
    "FISHER_MODES",
    "IMPORTANCE_KINDS",
    "LIKELIHOODS",
    "SEQUENCE_MODES",
    "diagonal_fisher",
    "diagonal_importance",
    "sample_categorical",
    "softmax_hessian_factor",
]

FISHER_MODES = ("exact", "sample", "empirical", "batched")
LIKELIHOODS = ("categorical", "gaussian")
IMPORTANCE_KINDS = ("mas",)
# Captured activations per forward/backward part (see FisherEngine._part_size); None: no parts.
# Read when diagonal_fisher / diagonal_importance is called.
ACTIVATION_BYTES: int | None = 32 * 2**20


def diagonal_fisher(
    model: nn.Module,
    data: Any,
    mode: str = "exact",
    max_samples: int | None = None,
    *,
    likelihood: str = "categorical",
    sigma: float = 1.0,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    distributed: bool | None = None,
    output: Output = None,
    sequence: str = "sum",
    ignore_index: int = IGNORE_INDEX,
    shift_labels: bool | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher of ``model`` on ``data`` (mean over samples), one tensor per parameter.

    Args:
        model: any ``nn.Module`` returning logits ``[N, C]`` (categorical) or means ``[N, D]``
            (gaussian), alone or inside what it returns (see ``output``). Evaluated in eval mode;
            training flags, parameters, buffers and ``.grad`` are left as they were.
        data: a DataLoader or any iterable of ``(x, y)`` batches (``x`` alone is enough for
            ``exact`` and ``sample``), a pair ``(X, y)`` of tensors *as a tuple*, or a tensor
            ``X``. A list is always a list of batches: ``[xb1, xb2]`` is two unlabelled batches,
            and a list ``[X, y]`` that looks like the pair is a ValueError. An input
            ``x`` is a tensor (``model(x)``), a tuple of tensors (``model(*x)``) or a mapping
            (``model(**x)``); a mapping batch, or a mapping of whole data, holds its labels
            under ``"labels"``, which is not passed to the model.
        mode: one of ``FISHER_MODES`` (see the module docstring).
        max_samples: use only the first ``max_samples`` samples in data order.
        likelihood: ``"categorical"`` (softmax over logits) or ``"gaussian"`` (unit-free mean
            output with noise std ``sigma``).
        batch_size: batch size used when ``data`` is a tensor or a pair of tensors.
        generator: random generator for ``mode="sample"`` (labels drawn batch by batch with
            :func:`sample_categorical`; gaussian noise with ``torch.randn``).
        distributed: sum the Fisher and the sample count over all ranks; default: whenever
            ``torch.distributed`` is initialised.
        output: picks the logits (means) from what the model returns. None: a tensor as is, the
            first item of a tuple, ``["logits"]`` of a mapping or ``.logits`` (a Hugging Face
            ``ModelOutput``); a string: that key or attribute; a callable: ``output(returned)``,
            which must give a tensor.
        sequence: for per-token logits ``[N, T, C]`` (labels ``[N, T]``): ``"sum"``, a sequence is a
            sample with log-likelihood Σ_t log p(y_t | x) over its unmasked tokens (the mean counts
            sequences with an unmasked token), or ``"tokens"``, every unmasked token is a sample
            (the mean counts tokens). ``exact`` is refused above
            ``ewc.fisher_sequence.EXACT_MAX_CLASSES`` classes (use ``sample``).
        ignore_index: per-token labels equal to it are masked (PyTorch's and Hugging Face's -100).
        shift_labels: per-token logits[:, t] predict labels[:, t + 1] (the last position has no
            target), as a Hugging Face causal LM computes its loss; None: True exactly for a Hugging
            Face decoder-only generative model (``can_generate()``, not encoder-decoder).

    Returns:
        ``{name: F}`` with the names and shapes of ``model.named_parameters()`` that require grad.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; expected one of {FISHER_MODES}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    check_count(max_samples, "max_samples", allow_none=True)
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    check_count(batch_size, "batch_size")
    _check_output(output)
    if sequence not in SEQUENCE_MODES:
        raise ValueError(f"unknown sequence likelihood {sequence!r}; expected one of {SEQUENCE_MODES}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    if shift_labels is not None and not isinstance(shift_labels, bool):
        raise ValueError(f"shift_labels must be True, False or None (auto), got {shift_labels!r}")

    model, prefix, named = _unwrap(model)
    shift = causal_lm(model) if shift_labels is None else shift_labels
    engine = FisherEngine(
        model,
        named,
        mode,
        likelihood,
        float(sigma),
        generator,
        output=output,
        part_bytes=ACTIVATION_BYTES,
        sequence=SequenceLikelihood(sequence, ignore_index, shift),
    )
    needs_labels = mode in ("empirical", "batched")
    return _mean_over_samples(engine, data, batch_size, max_samples, needs_labels, distributed, prefix)


def diagonal_importance(
    model: nn.Module,
    data: Any,
    kind: str = "mas",
    max_samples: int | None = None,
    *,
    output_fn: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 256,
    distributed: bool | None = None,
    output: Output = None,
) -> dict[str, Tensor]:
    """Per-parameter importances other than the Fisher, on the Fisher engine (mean over samples).

    ``kind="mas"`` (Memory Aware Synapses, Aljundi et al. 2018, Eq. 2 and 4):

        Ω_i = 1/N Σ_n |∂ ‖f(x_n)‖²₂ / ∂θ_i|

    the mean absolute *per-sample* gradient of the squared L2 norm of the output vector f(x),
    needing no labels. f(x) is the model's output (logits, no softmax; picked from what the model
    returns by ``output`` as for :func:`diagonal_fisher`), or ``output_fn`` of it, e.g. the active
    head of a multi-head model; ``output_fn`` must act on every sample (row) separately. The
    engine backpropagates the one vector ∂‖f‖²/∂output = 2·f per sample to the layer outputs and
    reduces with the rules' ``sum_abs`` (Linear: one matmul |G|ᵀ|A|).

    ``data``, ``max_samples``, ``batch_size``, ``distributed`` and ``output`` are as for
    :func:`diagonal_fisher`; labels in ``data`` are ignored. Evaluated in eval mode.
    """
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"unknown importance kind {kind!r}; expected one of {IMPORTANCE_KINDS}")
    check_count(max_samples, "max_samples", allow_none=True)
    check_count(batch_size, "batch_size")
    if output_fn is not None and not callable(output_fn):
        raise ValueError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
    _check_output(output)
    model, prefix, named = _unwrap(model)
    engine = FisherEngine(
        model,
        named,
        kind,
        "categorical",
        1.0,
        None,
        output=output,
        output_fn=output_fn,
        part_bytes=ACTIVATION_BYTES,
    )
    return _mean_over_samples(engine, data, batch_size, max_samples, False, distributed, prefix)


def _check_output(output: Output) -> None:
    if not (output is None or isinstance(output, str) or callable(output)):
        raise ValueError(
            f"output must be None, a key/attribute name or a callable, got {type(output).__name__}"
        )


def _unwrap(model: nn.Module) -> tuple[nn.Module, str, list[tuple[str, nn.Parameter]]]:
    """(the module inside a (Distributed)DataParallel, its name prefix, trainable parameters)."""
    prefix = ""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model, prefix = model.module, "module."
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameters that require grad")
    return model, prefix, named


def _mean_over_samples(
    engine: FisherEngine,
    data: Any,
    batch_size: int,
    max_samples: int | None,
    needs_labels: bool,
    distributed: bool | None,
    prefix: str,
) -> dict[str, Tensor]:
    """Feed every batch to the engine (eval mode), then return its sums over the sample count."""
    with eval_mode(engine.model), torch.enable_grad():
        try:
            for x, y in batches(data, batch_size, max_samples, needs_labels):
                engine.add(x, y)
        finally:
            engine.close()

    sums, count = engine.sums, float(engine.count)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        sums, count = _all_reduce(sums, count)
    what = "the Fisher" if engine.reduction == "sq" else "importances"
    if count == 0:
        raise ValueError(f"empty data: no samples to compute {what} on")
    bad = [prefix + n for n, _ in engine.named if not bool(torch.isfinite(sums[n]).all())]
    if bad:  # never hand back NaN/inf as a Fisher: a per-sample gradient overflowed or was NaN
        raise ValueError(f"{what} of {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} is not finite")
    return {prefix + n: sums[n] / count for n, _ in engine.named}


def _all_reduce(sums: dict[str, Tensor], count: float) -> tuple[dict[str, Tensor], float]:
    names = list(sums)
    flat = torch.cat(
        [sums[n].reshape(-1).double() for n in names]
        + [torch.tensor([count], dtype=torch.float64, device=next(iter(sums.values())).device)]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, i = {}, 0
    for n in names:
        k = sums[n].numel()
        out[n] = flat[i : i + k].reshape(sums[n].shape).to(sums[n].dtype)
        i += k
    return out, float(flat[-1].item())
