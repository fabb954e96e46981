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
