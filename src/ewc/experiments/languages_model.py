"""The character language model of ``ewc experiment languages``, its loss and bits per character.

Two models, the same size settings:

* ``gpt2``: Hugging Face's ``GPT2LMHeadModel`` built from a ``GPT2Config`` (no download; needs
  ``pip install 'ewc[transformers]'``), dropout off (so every path computes the same steps);
* ``own``: :class:`CharTransformer`, a pre-LayerNorm causal transformer of the same width, depth
  and heads written with ``nn.MultiheadAttention`` (plain PyTorch: the experiment runs without the extra);
* ``auto``: ``gpt2`` when transformers is installed, else ``own`` (the run records which).

Both take ``input_ids`` and ``position_ids`` ``[N, T]`` and return per-position logits ``[N, T, V]``
(the Hugging Face model inside its output's ``.logits``); position t predicts token t + 1.

Bits per character of a set of words = Σ −log p(target) over every predicted token of every word
(its characters and EOS, not BOS) / the number of those tokens / ln 2.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.data.words import BOS, EOS, IGNORE_INDEX, encode_batch

__all__ = [
    "MODELS",
    "CharTransformer",
    "bits_per_char",
    "build_lm",
    "lm_loss",
    "logits_of",
    "resolve_model",
]

MODELS = ("auto", "gpt2", "own")
EVAL_BATCH = 512  # words per forward pass when measuring bits per character


def resolve_model(kind: str) -> str:
    """``auto`` → ``gpt2`` when transformers is installed, else ``own``; others as they are."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; expected one of {', '.join(MODELS)}")
    if kind == "auto":
        return "gpt2" if importlib.util.find_spec("transformers") is not None else "own"
    return kind


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4× GELU MLP, both residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small GPT-style causal language model in plain PyTorch (learned positions, final LayerNorm)."""

    def __init__(self, vocab_size: int, n_positions: int, n_embd: int, n_layer: int, n_head: int):
        super().__init__()
        self.n_positions = n_positions
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        n, t = input_ids.shape
        if t > self.n_positions:
            raise ValueError(
                f"sequences of {t} tokens are longer than the model's {self.n_positions} positions"
            )
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(n, t)
        x = self.tokens(input_ids) + self.positions(position_ids)
        mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).triu(1)  # True: not attended
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))


def build_lm(
    kind: str, vocab_size: int, *, n_positions: int, n_embd: int, n_layer: int, n_head: int, seed: int
) -> nn.Module:
    """A fresh character LM (``gpt2`` or ``own``; ``auto`` resolved) whose weights depend on ``seed`` only."""
    kind = resolve_model(kind)
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    torch.manual_seed(seed)
    if kind == "own":
        return CharTransformer(vocab_size, n_positions, n_embd, n_layer, n_head)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("--model gpt2 needs transformers: pip install 'ewc[transformers]'") from e
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return GPT2LMHeadModel(config)


def logits_of(output: Any) -> Tensor:
    """The logits of what a model returned: a tensor, or a Hugging Face output's ``.logits``."""
    return output if isinstance(output, Tensor) else output.logits


def lm_loss(model: nn.Module, batch: dict[str, Tensor], reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy (nats) of ``batch`` (``encode_batch``): mean (or sum) over the
    predicted tokens, logits[:, t] against labels[:, t + 1]."""
    logits = logits_of(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]))[:, :-1]
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


@torch.no_grad()
def bits_per_char(model: nn.Module, words: Sequence[Sequence[int]], batch_size: int = EVAL_BATCH) -> float:
    """Bits per character of encoded ``words`` (see the module docstring), in eval mode (restored)."""
    if not words:
        raise ValueError("bits_per_char needs at least one word")
    ordered = sorted(words, key=len)  # little padding per batch; the sum does not depend on order
    training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(ordered), batch_size):
            batch = encode_batch(ordered[i : i + batch_size])
            total += float(lm_loss(model, batch, reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(training)
    return total / count / math.log(2)
