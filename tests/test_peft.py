"""A PEFT LoRA model: EWC consolidates only the trainable adapters, with the right Fisher.

Runs the real `peft` package (installed by CI with the `peft` extra) on a tiny GPT-2 built from a
config (no download); the Fisher is checked against the independent float64 per-sample loop.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_fisher_close, reference_fisher

from ewc import EWC, diagonal_fisher

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

DT = torch.float64


def lora_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=3, pad_token_id=0
    )
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    base = transformers.GPT2ForSequenceClassification(cfg).to(DT)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    with torch.no_grad():  # LoRA's B starts at zero: move it so that A has a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return model


def batches(n: int = 6, t: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, t), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    pos = torch.arange(t).expand(n, t)
    return [
        {"input_ids": ids[i : i + 3], "position_ids": pos[i : i + 3], "labels": labels[i : i + 3]}
        for i in range(0, n, 3)
    ]


def test_lora_model_consolidates_only_its_adapters() -> None:
    model = lora_classifier()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    reg = EWC(model, lam=1.0, fisher="empirical")
    reg.consolidate(batches())
    assert set(reg.precisions()) == trainable  # the frozen base weights are not anchored
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert reg.memory_bytes() < frozen_bytes / 10


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_lora_fisher_matches_the_reference(mode: str) -> None:
    model = lora_classifier()
    data = batches()
    got = diagonal_fisher(model, data, mode)
    pairs = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in data]
    ref = reference_fisher(model, pairs, mode, output=lambda out: out.logits)
    assert set(got) == set(ref)
    assert_fisher_close(got, ref, model)


def test_ewc_takes_the_output_and_fisher_options() -> None:
    """``EWC(output=)`` picks the logits; consolidate passes sequence options on (same numbers as
    diagonal_fisher called directly)."""
    model = lora_classifier()
    data = batches()
    picked = EWC(model, fisher="empirical", output=lambda out: out.logits).consolidate(data)
    direct = diagonal_fisher(model, data, "empirical", output="logits")
    assert all(torch.equal(picked[k], direct[k]) for k in direct)
    with pytest.raises(ValueError, match="output"):
        EWC(model, fisher="empirical", output=lambda out: "not a tensor").consolidate(data)


class AttentionClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(6, 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_lora_on_multihead_attention_leaves_the_base_weights_alone(mode: str) -> None:
    """PEFT's LoRA ``MultiheadAttention`` merges its adapter into the base weights for the call and
    unmerges it after; torch.func stops that forward half-way (it refuses ``.data`` writes), which
    once left the base weights merged and the Fisher computed on a changed model. The attempt is
    now undone: the base weights change no more than one plain forward of PEFT's changes them
    (its merge/unmerge round-off), and the Fisher matches the reference loop on an untouched copy."""
    import copy
    import warnings

    torch.manual_seed(0)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False)
    model = peft.get_peft_model(AttentionClassifier().to(DT), lora)
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, 6, dtype=DT, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's refusal and the plan check's rerouting, by design
        got = diagonal_fisher(model, data, mode)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.allclose(after[name].detach(), value, rtol=0, atol=1e-12), name
    ref = reference_fisher(twin, data, mode)
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_fisher_close(got, {n: ref[n] for n in got}, model)
