"""Transformers get per-layer rules, never the torch.func fallback: nn.MultiheadAttention (with its
out_proj), nn.TransformerEncoder and a GPT-2 (Hugging Face's Conv1D), each against the float64
per-sample reference."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import reference_fisher, rel_err
from torch import nn

from ewc import diagonal_fisher
from ewc import fisher_engine as E
from ewc import fisher_rules as R
from ewc.fisher import diagonal_importance
from ewc.fisher_fallback import FuncRule

DT = torch.float64
N, L, S, EMB, C = 6, 5, 4, 8, 3


@contextmanager
def bound_rules() -> Iterator[list]:
    """Spy on the rule choice: every engine's (module, rule, names) after its plan check, and the
    names the plan check rerouted (the general path)."""
    seen: list = []
    orig = E.FisherEngine._check_plan

    def spy(self: E.FisherEngine, x: Any) -> None:
        orig(self, x)
        seen.append(([(b.module, b.rule, dict(b.names)) for b in self.bindings], self.general))

    E.FisherEngine._check_plan = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        E.FisherEngine._check_plan = orig  # type: ignore[method-assign]


def assert_no_fallback(seen: list) -> None:
    assert seen
    for bindings, general in seen:
        assert general is None, f"rerouted: {list(general.params)}"
        fallback = [names for _, rule, names in bindings if isinstance(rule, FuncRule)]
        assert not fallback, f"bound to the torch.func fallback: {fallback}"


def check(
    model: nn.Module, data: list, mode: str, output: Callable | None = None, tol: float = 1e-6
) -> float:
    """Fisher vs the float64 per-sample reference."""
    got = diagonal_fisher(model, data, mode, output=output)
    ref = reference_fisher(model, data, mode, output=output)
    assert set(got) == set(ref)
    errs = {k: rel_err(got[k], ref[k]) for k in ref if ref[k].abs().max() > 1e-30}
    worst = max(errs, key=errs.__getitem__)
    assert errs[worst] < tol, f"{worst}: relative error {errs[worst]:.2e}"


# ------------------------------------------------------------------------ nn.MultiheadAttention


class Attn(nn.Module):
    """An attention layer between two Linear layers, with the options the rule handles."""

    def __init__(
        self,
        mask: str = "none",
        cross: bool = False,
        use_weights: bool = False,
        shared_kv: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__()
        self.shared_kv = shared_kv  # cross-attention with one tensor as keys and values (k is v)
        self.inp = nn.Linear(4, EMB)
        self.average = kw.pop("average", True)
        self.mha = nn.MultiheadAttention(EMB, 2, batch_first=kw.pop("batch_first", True), **kw)
        self.head = nn.Linear(EMB, C)
        self.mask, self.cross, self.use_weights = mask, cross, use_weights
        # (no bias on the keys' input: it shifts every score of a query alike, so its Fisher is 0 and
        # the plan check would judge rounding noise)
        self.mem = nn.Linear(4, kw.get("kdim") or EMB, bias=False) if cross else None
        self.memv = nn.Linear(4, kw.get("vdim") or EMB) if cross else None

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        bf = self.mha.batch_first
        k = self.mem(ctx) if self.mem is not None else h
        v = k if self.shared_kv else self.memv(ctx) if self.memv is not None else h
        s = k.shape[1]
        kw: dict[str, Any] = {"need_weights": self.use_weights, "average_attn_weights": self.average}
        if self.mask in ("padding", "both"):
            kw["key_padding_mask"] = pad[:, :s]  # a sample's own: some ignore their last key
        if self.mask in ("causal", "both"):
            kw["attn_mask"] = torch.ones(h.shape[1], s, dtype=torch.bool).triu(1)
        if self.mask == "float3d":  # [N·H, L, S], each sample's own
            bias = torch.einsum("nl,ns->nls", x[..., 0], ctx[..., 0, None].expand(-1, -1, s)[..., 0])
            kw["attn_mask"] = torch.stack([bias, -bias], 1).reshape(-1, h.shape[1], s)
        if not bf:
            h, k, v = h.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, w = self.mha(h, k, v, **kw)
        if not bf:
            out = out.transpose(0, 1)
        pooled = out.mean(1)
        if self.use_weights:  # the returned attention weights feed the output too
            pooled = pooled + w.reshape(w.shape[0], -1).sum(-1, keepdim=True).sin()
        return self.head(pooled)


def attn_data(cross: bool = False) -> list:
    x, ctx = torch.randn(N, L, 4, dtype=DT), torch.randn(N, S if cross else L, 4, dtype=DT)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[::2, S - 1] = True
    y = torch.randint(0, C, (N,))
    return [((x[:4], ctx[:4], pad[:4]), y[:4]), ((x[4:], ctx[4:], pad[4:]), y[4:])]


MHA_CASES = {
    "self": {},
    "padding": {"mask": "padding"},
    "causal_need_weights": {"mask": "causal", "use_weights": True},
    "both_masks": {"mask": "both"},
    "float_3d_mask": {"mask": "float3d"},
    "no_bias": {"bias": False},
    "cross_kdim_vdim": {"cross": True, "kdim": 3, "vdim": 5, "mask": "padding"},
    "cross_same_dim": {"cross": True},
    "cross_keys_are_values": {"cross": True, "shared_kv": True},
    "weights_per_head": {"use_weights": True, "mask": "padding", "average": False},
}


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "closed_form"])
@pytest.mark.parametrize("name", list(MHA_CASES))
@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_multihead_attention_rule_matches_reference(
    name: str, mode: str, record: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both routes of the rule: the projections' gradients recorded during the forward (the
    default), and the attention recomputed and differentiated in closed form."""
    import ewc.fisher_rules_attention as A

    monkeypatch.setattr(A, "RECORD_PROJECTIONS", record)
    used = {"recorded": 0, "closed_form": 0}
    recorded_blocks, forward = A.MultiheadAttentionRule._recorded_blocks, A.MultiheadAttentionRule._forward

    def count(route: str, fn: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            used[route] += 1
            return fn(*args)

        return wrapped

    monkeypatch.setattr(A.MultiheadAttentionRule, "_recorded_blocks", count("recorded", recorded_blocks))
    monkeypatch.setattr(A.MultiheadAttentionRule, "_forward", count("closed_form", forward))
    case = dict(MHA_CASES[name])
    model = Attn(**case).to(DT)
    with bound_rules() as seen:
        check(model, attn_data(case.get("cross", False)), mode)
    assert_no_fallback(seen)
    # (the first batch's calls come from the forward that bound the rules, without recorders)
    assert used["closed_form"] > 0 and (used["recorded"] > 0) is record
    mha = [rule for m, rule, _ in seen[0][0] if m is model.mha]
    assert len(mha) == 1 and isinstance(mha[0], R.MultiheadAttentionRule)
    assert any(n.startswith("out_proj.") for n in mha[0].names)


@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({}, R.MultiheadAttentionRule),
        ({"batch_first": False}, FuncRule),  # [T, N, E] outputs: the engine reads calls batch-first
        ({"add_bias_kv": True}, FuncRule),
        ({"add_zero_attn": True}, FuncRule),
    ],
)
def test_multihead_attention_rule_choice(kw: dict, rule: type) -> None:
    mha = nn.MultiheadAttention(EMB, 2, **{"batch_first": True, **kw})
    names = [n for n, _ in mha.named_parameters()]
    assert type(R.rule_for(mha, names)) is rule


@pytest.mark.parametrize("kw", [{"batch_first": False}, {"add_bias_kv": True}])
def test_multihead_attention_fallback_cases_stay_exact(kw: dict) -> None:
    check(Attn(**kw).to(DT), attn_data(), "exact")


def test_multihead_attention_mas_matches_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = Attn(mask="both").to(DT), attn_data()
    got = diagonal_importance(model, data)
    monkeypatch.delitem(R.RULES, nn.MultiheadAttention)
    ref = diagonal_importance(model, data)
    assert max(rel_err(got[k], ref[k]) for k in ref) < 1e-10


# ------------------------------------------------------------------------- nn.TransformerEncoder


class Encoder(nn.Module):
    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Linear(4, EMB)
        layer = nn.TransformerEncoderLayer(EMB, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(EMB, C)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        h = self.enc(self.emb(x), mask=causal, src_key_padding_mask=pad)
        return self.head(h.mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["exact", "empirical", "sample"])
def test_transformer_encoder_never_falls_back(norm_first: bool, mode: str) -> None:
    """In eval mode with gradients on, the encoder layer's fused fast path is not taken (it requires
    no parameter to need grad), so every module is called and gets its rule."""
    model = Encoder(norm_first).to(DT)
    x, pad = torch.randn(N, L, 4, dtype=DT), torch.zeros(N, L, dtype=torch.bool)
    pad[1::2, -2:] = True
    y = torch.randint(0, C, (N,))
    data = [((x[:4], pad[:4]), y[:4]), ((x[4:], pad[4:]), y[4:])]
    with bound_rules() as seen, warnings.catch_warnings():
        warnings.simplefilter("error")  # no FisherPlanWarning, no vmap batching-rule warning
        if mode == "sample":
            got = diagonal_fisher(model, data, mode, generator=torch.Generator().manual_seed(3))
            ref = reference_fisher(model, data, mode, generator=torch.Generator().manual_seed(3))
            assert max(rel_err(got[k], ref[k]) for k in ref) < 1e-6
        else:
            check(model, data, mode)
    assert_no_fallback(seen)


# ------------------------------------------------------------------------------------------ GPT-2


def _gpt2_config(transformers: Any, **kw: Any) -> Any:
    return transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2, pad_token_id=0, **kw
    )


def _token_batches(vocab: int = 50) -> list:
    ids = torch.randint(1, vocab, (N, L))
    pos = torch.arange(L).expand(N, L)  # per sample: GPT-2's default [1, T] is shared (see docs)
    y = torch.randint(0, C, (N,))
    return [({"input_ids": ids[i : i + 4], "position_ids": pos[i : i + 4]}, y[i : i + 4]) for i in (0, 4)]


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_gpt2_sequence_classification_never_falls_back(mode: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(_gpt2_config(transformers, num_labels=C)).to(DT)
    model.config._attn_implementation = "eager"
    with bound_rules() as seen:
        check(model, _token_batches(), mode, output=lambda o: o.logits)
    assert_no_fallback(seen)
    conv1d = transformers.pytorch_utils.Conv1D
    kinds = {type(m): type(r) for m, r, _ in seen[0][0]}
    assert kinds[conv1d] is R.Conv1DRule


def test_gpt2_lm_head_mean_pooled_logits_never_falls_back() -> None:
    """GPT2LMHeadModel (lm_head tied to the token embedding) through mean-pooled LM logits [N, V]."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config(transformers)).to(DT)
    data = [(x, torch.randint(0, 50, (4 if i == 0 else 2,))) for i, (x, _) in enumerate(_token_batches())]
    with bound_rules() as seen:
        check(model, data, "empirical", output=lambda o: o.logits.mean(1))
    assert_no_fallback(seen)


def test_conv1d_rule_is_lazy() -> None:
    """ewc never imports transformers; Conv1D gets its rule once transformers is imported."""
    code = (
        "import sys, ewc, ewc.fisher_rules as R, ewc.fisher_engine\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "m = Conv1D(4, 3)\n"
        "assert type(R.rule_for(m, ['weight', 'bias'])) is R.Conv1DRule\n"
        "assert R.RULES[Conv1D] is R.Conv1DRule\n"
    )
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_conv1d_rule_matches_reference_on_2d_and_3d_inputs() -> None:
    transformers = pytest.importorskip("transformers")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = transformers.pytorch_utils.Conv1D(6, 4), transformers.pytorch_utils.Conv1D(C, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)).mean(1))  # a on [N, T, 4], b on [N, 6]

    model = Net().to(DT)
    x, y = torch.randn(N, L, 4, dtype=DT), torch.randint(0, C, (N,))
    with bound_rules() as seen:
        for mode in ("exact", "empirical"):
            check(model, [(x, y)], mode)
    assert_no_fallback(seen)
