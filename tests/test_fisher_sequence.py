"""Sequence likelihoods: per-token logits [N, T, C], labels [N, T] with an ignore index, the
causal-LM shift, against the float64 per-sample reference (``reference_sequence_fisher``)."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_fisher_close, reference_sequence_fisher, split_batches
from torch import nn

import ewc.fisher as fisher_mod
from ewc.fisher import diagonal_fisher
from ewc.fisher_check import FisherPlanWarning
from ewc.fisher_sequence import EXACT_MAX_CLASSES

DT = torch.float64
N, T, V, C = 7, 6, 11, 4
MODES = ["exact", "sample", "empirical", "batched"]


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


class GRUTagger(nn.Module):
    def __init__(self, classes: int = C, vocab: int = V) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 5, padding_idx=0)
        self.rnn = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(ids))[0])


class EncoderTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(T, 8))
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids) + self.pos))


def _seeded(cls: type[nn.Module], *args: Any) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels with masked tokens: padding at the end, a few masked inside, and one
    sequence (row 3) with every label masked (skipped, not counted, in the per-sequence mean)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (N, T), generator=g)
    y = torch.randint(0, C, (N, T), generator=g)
    ids[::2, 4:] = 0
    y[::2, 4:] = -100
    y[1, 1] = y[5, 0] = -100
    y[3] = -100
    return ids, y


def _close(got: dict, ref: dict, tol: float = 1e-9) -> float:
    assert_fisher_close(got, ref, tol=tol)
    return max(((got[k] - r).abs().max() / r.abs().max()).item() for k, r in ref.items())


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_cls", [GRUTagger, EncoderTagger])
def test_token_tagger(model_cls: type[nn.Module], mode: str, tokens: bool) -> None:
    model = _seeded(model_cls)
    ids, y = _data()
    batches = split_batches(ids, y, 3)
    seq = "tokens" if tokens else "sum"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GRU: the vmap fallback's per-sample loop
        got = diagonal_fisher(model, batches, mode, generator=gen(), sequence=seq)
    ref = reference_sequence_fisher(model, batches, mode, tokens=tokens, generator=gen())
    _close(got, ref)


@pytest.mark.parametrize("tokens", [False, True])
def test_sum_and_tokens_denominators(tokens: bool) -> None:
    """exact: the per-sequence and per-token Fishers differ by the count only (sequences with a
    target vs targets); a sequence whose labels are all masked adds nothing to either."""
    model = _seeded(GRUTagger)
    ids, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f_sum = diagonal_fisher(model, (ids, y), "exact", batch_size=3)
        f_tok = diagonal_fisher(model, (ids, y), "exact", batch_size=3, sequence="tokens")
        keep = torch.arange(N) != 3
        f_skip = diagonal_fisher(model, (ids[keep], y[keep]), "exact", batch_size=3)
    sequences, targets = N - 1, int((y != -100).sum())
    for k in f_sum:
        torch.testing.assert_close(f_sum[k] * sequences, f_tok[k] * targets, rtol=1e-12, atol=0)
        torch.testing.assert_close(f_sum[k], f_skip[k], rtol=1e-12, atol=1e-300)


def test_exact_is_the_sequence_fisher() -> None:
    """The per-position factor passes equal E_Y[(∇ Σ_t log p(y_t | x))²] by enumerating every label
    sequence Y (C^T of them) of a short sequence: the cross terms between tokens vanish."""
    model = _seeded(GRUTagger, 3)
    ids = torch.tensor([[3, 5, 2]])
    params = [p for p in model.parameters()]
    logp = F.log_softmax(model(ids), -1)[0]
    ref = [torch.zeros_like(p) for p in params]
    for ys in itertools.product(range(3), repeat=3):
        ll = sum(logp[t, c] for t, c in enumerate(ys))
        grads = torch.autograd.grad(ll, params, retain_graph=True)
        for r, g in zip(ref, grads, strict=True):
            r += ll.detach().exp() * g**2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = diagonal_fisher(model, ids, "exact")
    names = [n for n, _ in model.named_parameters()]
    _close(got, dict(zip(names, ref, strict=True)))


def test_parts_and_sample_draws() -> None:
    """Parts change nothing: the batch's per-token uniforms are drawn once, [N, T, 1]."""
    model = _seeded(GRUTagger)
    ids, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = diagonal_fisher(model, (ids, y), "sample", generator=gen(), sequence="tokens")
        old = fisher_mod.ACTIVATION_BYTES
        fisher_mod.ACTIVATION_BYTES = 1  # one sample per part
        try:
            parts = diagonal_fisher(model, (ids, y), "sample", generator=gen(), sequence="tokens")
        finally:
            fisher_mod.ACTIVATION_BYTES = old
    for k in whole:
        torch.testing.assert_close(whole[k], parts[k], rtol=1e-12, atol=1e-300)


def test_errors() -> None:
    model = _seeded(GRUTagger)
    ids, y = _data()
    with pytest.raises(ValueError, match=r"need labels \[N, T\] = \[7, 5\], got \(7, 6\)"):
        diagonal_fisher(model, (ids, y), "empirical", output=lambda o: o[:, :5])
    with pytest.raises(ValueError, match=r"integer tensor.*torch.float64"):
        diagonal_fisher(model, (ids, y.to(DT)), "empirical")
    with pytest.raises(ValueError, match=r"every label of a batch is masked \(ignore_index=-100\)"):
        diagonal_fisher(model, (ids, torch.full_like(y, -100)), "sample")
    with pytest.raises(ValueError, match=r"every label of a batch is masked \(ignore_index=7\)"):
        diagonal_fisher(model, (ids, torch.full_like(y, 7)), "empirical", ignore_index=7)
    with pytest.raises(ValueError, match=r"every label of a batch is masked"):  # row 3 alone
        diagonal_fisher(model, (ids, y), "empirical", batch_size=1, max_samples=4)
    bad = y.clone()
    bad[0, 0] = C
    with pytest.raises(ValueError, match=rf"labels out of range: expected 0 <= y < {C} or ignore_index"):
        diagonal_fisher(model, (ids, bad), "batched")
    with pytest.raises(ValueError, match=r"unknown sequence likelihood 'token'"):
        diagonal_fisher(model, (ids, y), sequence="token")
    with pytest.raises(ValueError, match=r"ignore_index must be an integer"):
        diagonal_fisher(model, (ids, y), ignore_index=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shift_labels must be True, False or None"):
        diagonal_fisher(model, (ids, y), shift_labels=1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# A vocabulary of 50 000
# ----------------------------------------------------------------------------------------------


class WideLM(nn.Module):
    """Token ids → a 50 000-way head per position (a small causal-free LM)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("mode", ["sample", "empirical", "batched"])
def test_vocabulary_50k(mode: str, tokens: bool) -> None:
    vocab = 50_000
    model = _seeded(WideLM, vocab)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 5), generator=g)
    y = torch.randint(0, vocab, (3, 5), generator=g)
    y[0, 3:] = -100
    batches = split_batches(ids, y, 2)
    seq = "tokens" if tokens else "sum"
    got = diagonal_fisher(model, batches, mode, generator=gen(), sequence=seq, shift_labels=True)
    ref = reference_sequence_fisher(model, batches, mode, tokens=tokens, shift=True, generator=gen())
    _close(got, ref)


def test_exact_refused_above_the_limit() -> None:
    model = _seeded(WideLM, EXACT_MAX_CLASSES + 1)
    ids = torch.randint(0, EXACT_MAX_CLASSES, (2, 3))
    with pytest.raises(ValueError, match=r"EXACT_MAX_CLASSES = 1024 classes use mode='sample'"):
        diagonal_fisher(model, ids, "exact")


# ----------------------------------------------------------------------------------------------
# A Hugging Face causal LM (skipped without transformers)
# ----------------------------------------------------------------------------------------------


def _tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=60, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).to(DT)


def _lm_batches() -> list[dict[str, torch.Tensor]]:
    """HF causal-LM batches: labels = input_ids, -100 on (right) padding."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 60, (5, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = mask[3, 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3], "labels": labels[i : i + 3]}
        for i in range(0, 5, 3)
    ]


def _as_reference(batches: list[dict[str, torch.Tensor]]) -> list[tuple[dict, torch.Tensor]]:
    return [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]


def _gpt2_fisher(model: nn.Module, batches: list, mode: str, **kw: Any) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FisherPlanWarning)  # tied wte and shared positions: rerouted
        return diagonal_fisher(model, batches, mode, generator=gen(), **kw)


@pytest.mark.parametrize(
    ("mode", "tokens"), [("empirical", False), ("empirical", True), ("sample", False), ("exact", False)]
)
def test_gpt2_causal_lm(mode: str, tokens: bool) -> None:
    model = _tiny_gpt2()
    batches = _lm_batches()
    got = _gpt2_fisher(model, batches, mode, sequence="tokens" if tokens else "sum")  # shift: auto
    ref = reference_sequence_fisher(
        model,
        _as_reference(batches),
        mode,
        tokens=tokens,
        shift=True,
        generator=gen(),
        output=lambda o: o.logits,
    )
    _close(got, ref)


def test_gpt2_shift_is_the_models_own_loss() -> None:
    """One sequence: the empirical Fisher is (n_targets · ∇ HF loss)², the loss the model computes
    itself from (input_ids, labels); explicit shift_labels=True agrees with auto, False does not."""
    model = _tiny_gpt2()
    b = {k: v[:1] for k, v in _lm_batches()[0].items()}
    model.eval()
    loss = model(**b).loss
    names = [n for n, p in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    targets = int((b["labels"][:, 1:] != -100).sum())
    ref = {n: (targets * g) ** 2 for n, g in zip(names, grads, strict=True)}
    auto = _gpt2_fisher(model, [b], "empirical")
    _close(auto, ref, tol=1e-6)  # HF's loss upcasts the logits to float32
    explicit = _gpt2_fisher(model, [b], "empirical", shift_labels=True)
    for k in auto:
        assert torch.equal(auto[k], explicit[k])
    unshifted = _gpt2_fisher(model, [b], "empirical", shift_labels=False)
    assert not torch.allclose(unshifted["transformer.wte.weight"], auto["transformer.wte.weight"])
