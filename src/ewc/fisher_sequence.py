"""Sequence likelihoods: per-token logits ``[N, T, C]`` with labels ``[N, T]`` and an ignore index.

With the model's logits at fixed inputs x (for a causal language model: the data's own tokens,
teacher forcing), the tokens' labels are modelled as independent given x, p(y | x) = Π_t p(y_t | x),
over the unmasked positions (label ≠ ``ignore_index``). Two likelihoods per sample:

* ``sequence="sum"`` (default): a sequence is a sample, log p(y | x) = Σ_t log p(y_t | x); its
  per-sample gradient is the sum of its tokens' gradients, squared after summing. The mean's
  denominator counts sequences with at least one unmasked token (a sequence without one has no
  likelihood term: skipped, not counted).
* ``sequence="tokens"``: every unmasked token is a sample (mean over tokens of the squared
  per-token gradient); the denominator counts unmasked tokens. A token's gradient differs from
  its sequence's, so every position with an unmasked token in the part takes its own backward pass.

The vectors are built lazily, one backward pass at a time (:class:`SequenceVectors`): e_y − p
is one ``[N, T, C]`` tensor, never ``[K, N, T, C]``. Since E[e_y − p] = 0, the cross terms between
tokens vanish in expectation, so the exact Fisher of a sequence is the sum of its tokens' exact
Fishers: ``exact`` backpropagates the C − 1 columns of the softmax-Hessian factor at one position
at a time (T·(C−1) passes), affordable up to :data:`EXACT_MAX_CLASSES` classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ewc.fisher_vectors import sample_categorical, softmax_hessian_factor

SEQUENCE_MODES = ("sum", "tokens")
IGNORE_INDEX = -100  # PyTorch's cross_entropy and Hugging Face's default
# exact on per-token logits costs T·(C−1) backward passes per batch: refused above this many classes
EXACT_MAX_CLASSES = 1024
# vectors materialised at once for the general per-sample path (fisher_check.GeneralPath)
BLOCK_BYTES = 64 * 2**20


def causal_lm(model: nn.Module) -> bool:
    """True for a Hugging Face decoder-only generative model (``can_generate()`` and not
    ``config.is_encoder_decoder``): its loss shifts the labels inside the model, so ours must too."""
    can = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    if not callable(can) or config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        return bool(can())
    except Exception:  # noqa: BLE001 - not a Hugging Face model after all
        return False


class SequenceLikelihood:
    """The categorical vectors for per-token logits, batch by batch (``sample`` keeps a batch's draws).

    ``shift``: the Hugging Face causal-LM convention, labels[:, t + 1] is the target of
    logits[:, t]; the last position has no target (masked), the first label is never a target.
    """

    def __init__(self, sequence: str = "sum", ignore_index: int = IGNORE_INDEX, shift: bool = False):
        self.tokens = sequence == "tokens"
        self.ignore_index, self.shift = ignore_index, shift
        self.noise: Tensor | None = None  # sample: the current batch's uniforms [N, T, 1]
        self.labels: Tensor | None = None  # the current batch's labels (the all-masked check)

    def new_batch(self, y: Any = None) -> None:
        """Forget the draws; remember the batch's labels (its parts see only their rows)."""
        self.noise, self.labels = None, y if isinstance(y, Tensor) else None

    def __call__(
        self, mode: str, logits: Tensor, y: Tensor | None, rows: slice, batch: int, gen: Any
    ) -> SequenceVectors:
        n, t, c = logits.shape
        if mode == "exact" and c > EXACT_MAX_CLASSES:
            raise ValueError(
                f"the exact Fisher of per-token logits with {c} classes takes T·(C−1) = {t * (c - 1)} "
                f"backward passes per batch; above EXACT_MAX_CLASSES = {EXACT_MAX_CLASSES} classes use "
                "mode='sample' (one pass, an unbiased estimate) or 'empirical'"
            )
        if rows.start == 0:  # once per batch: not every label of the batch may be masked
            whole = y if rows.stop == batch or self.labels is None else self.labels
            if whole is not None and not self._mask(self.labels_of(whole, batch, t, c)).any():
                raise ValueError(
                    f"every label of a batch is masked (ignore_index={self.ignore_index}"
                    f"{', after the causal-LM shift' if self.shift else ''}): no token to compute the "
                    "Fisher on; check the labels, ignore_index and shift_labels"
                )
        labels = None if y is None else self.labels_of(y, n, t, c)
        mask = self._mask(labels) if labels is not None else self._mask(None, n, t, logits.device)
        count = int(mask.sum()) if self.tokens else int(mask.any(1).sum())
        p = torch.softmax(logits, dim=-1)
        if mode == "exact":
            return SequenceVectors(p, None, mask, self.tokens, count)
        if mode == "sample":
            if self.noise is None:
                where = logits.device if gen is None else gen.device
                dtype = torch.promote_types(p.dtype, torch.float32)
                self.noise = torch.rand((batch, t, 1), generator=gen, dtype=dtype, device=where)
            u = self.noise[rows].to(p.device).reshape(n * t, 1)
            labels = sample_categorical(p.reshape(n * t, c), gen, u=u).reshape(n, t)
        assert labels is not None  # empirical / batched: batches() asked for labels
        e = p.neg_()  # e_y − p, masked; p is not needed any more
        e.scatter_add_(-1, labels.where(mask, 0).unsqueeze(-1), torch.ones_like(e[..., :1]))
        e.mul_(mask.unsqueeze(-1).to(e.dtype))
        # batched backpropagates all tokens at once (a mini-batch gradient), whatever counts as a sample
        return SequenceVectors(e, e, mask, self.tokens and mode != "batched", count)

    def labels_of(self, y: Any, n: int, t: int, c: int) -> Tensor:
        """Labels ``[n, t]`` checked (integers, in [0, C) or the ignore index) and shifted if asked."""
        if not isinstance(y, Tensor):
            raise ValueError(f"labels must be a tensor, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(
                f"categorical labels must be an integer tensor (class indices), got dtype {y.dtype}"
            )
        if y.shape != (n, t):
            raise ValueError(
                f"per-token logits [N, T, C] = {[n, t, c]} need labels [N, T] = {[n, t]}, "
                f"got {tuple(y.shape)}"
            )
        y = y.to(torch.long)
        bad = (y != self.ignore_index) & ((y < 0) | (y >= c))
        if bad.any():
            raise ValueError(
                f"labels out of range: expected 0 <= y < {c} or ignore_index={self.ignore_index}, "
                f"got {int(y[bad][0])}"
            )
        if self.shift:
            y = torch.cat([y[:, 1:], torch.full_like(y[:, :1], self.ignore_index)], dim=1)
        return y

    def _mask(self, y: Tensor | None, n: int = 0, t: int = 0, device: Any = None) -> Tensor:
        """[n, t] True at the positions with a target: unmasked labels (without labels, every
        position; the last one has no target when shifted)."""
        if y is not None:
            return y != self.ignore_index
        mask = torch.ones(n, t, dtype=torch.bool, device=device)
        if self.shift:
            mask[:, -1] = False
        return mask


class SequenceVectors:
    """K vectors ``[N, T, C]`` at the logits, built one at a time (``v[k]``), never stacked.

    ``sum`` with e_y − p (empirical, sample, batched): K = 1, every position at once. Otherwise one
    position per vector (positions with an unmasked token in the part): e_y − p there (``tokens``),
    or for ``exact`` each of the C − 1 columns of the softmax-Hessian factor there.
    ``count`` is the part's number of samples (sequences or tokens, see the module docstring).
    """

    def __init__(self, p: Tensor, base: Tensor | None, mask: Tensor, tokens: bool, count: int):
        self.p, self.base, self.mask, self.count = p, base, mask, count
        n, t, c = p.shape
        self.cols = 1 if base is not None else max(1, c - 1)
        self.split = base is None or tokens  # one position per vector
        self.positions = mask.any(0).nonzero().flatten().tolist() if self.split else []
        k = len(self.positions) * self.cols if self.split else 1
        self.shape = (k, n, t, c)
        self._factor: tuple[int, Tensor] | None = None  # (position, its factor [C−1, N, C], masked)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, k: int) -> Tensor:
        if not self.split:
            assert self.base is not None
            return self.base
        pos, col = self.positions[k // self.cols], k % self.cols
        v = torch.zeros_like(self.p)
        if self.base is not None:
            v[:, pos] = self.base[:, pos]
            return v
        if self._factor is None or self._factor[0] != pos:
            keep = self.mask[:, pos].to(self.p.dtype).unsqueeze(-1)
            self._factor = (pos, softmax_hessian_factor(self.p[:, pos]) * keep)
        v[:, pos] = self._factor[1][col]
        return v

    def blocks(self, budget: int = BLOCK_BYTES) -> Iterator[Tensor]:
        """The vectors stacked ``[k, N, T, C]``, a few at a time (about ``budget`` bytes each)."""
        size = max(1, budget // max(1, self.p.numel() * self.p.element_size()))
        for i in range(0, len(self), size):
            yield torch.stack([self[k] for k in range(i, min(len(self), i + size))])
