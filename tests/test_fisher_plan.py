"""The Fisher plan check: parameters used in several ways get the right Fisher, never a silently wrong one.

Every model below uses some parameter outside the module call whose rule would cover it (or, as
controls, in ways the rules do cover). Each is compared, in every Fisher mode and for MAS
importances, with the independent float64 per-sample reference of ``conftest.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_fisher_close, reference_fisher, split_batches
from test_fisher import CASES
from torch import nn

import ewc.fisher as fisher_module
from ewc.fisher import diagonal_fisher, diagonal_importance
from ewc.fisher_check import FisherPlanWarning

DT = torch.float64
N, BS = 19, 8  # batches of 8, 8, 3: the check runs on 4 samples, the general path on every batch
MODES = ("exact", "sample", "empirical", "batched")


class FunctionalReuse(nn.Module):
    """The issue's model: a.weight is used by a's call and again functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.b(F.linear(h, self.a.weight))


class FunctionalBefore(nn.Module):
    """a.weight used functionally before a's call: the call's input depends on its own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(F.linear(x, self.a.weight)))))


class Gate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w)


class ParamTwoPlaces(nn.Module):
    """One nn.Parameter used by its module's forward and again by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gate, self.head = nn.Linear(5, 4), Gate(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(self.gate(h) + h * self.gate.w)


class ParamTwoModules(nn.Module):
    """One nn.Parameter registered in two custom modules, both called (the rules cover it)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.g1, self.g2, self.head = nn.Linear(5, 4), Gate(4), Gate(4), nn.Linear(4, 3)
        self.g2.w = self.g1.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.g2(self.g1(self.inp(x)) + 0.5))


class TiedTranspose(nn.Module):
    """An encoder's weight reused, transposed, as the decoder (tied autoencoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(5, 4), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())))


class TiedModules(nn.Module):
    """Two Linear modules sharing one weight, both called (the rules cover it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Block(nn.Module):
    """A user module with its own parameter that also uses its child's weight outside the child's call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.randn(5) * 0.5 + 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * self.scale + 0.5 * x @ self.lin.weight.t()


class CustomBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = Block(), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class InPlace(nn.Module):
    """Parameters applied by in-place ops: a's bias added into a's output, a root gain multiplied in."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.add_(self.a.bias)
        h = torch.sin(h)  # (sin's backward reads its input, not the output modified next)
        h.mul_(self.gain)
        return self.head(h)


class EmbedOutput(nn.Module):
    """An embedding matrix reused as the output projection (weight tying of language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm = nn.Embedding(6, 4, padding_idx=0), nn.LayerNorm(4)
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.norm(self.emb(tok).mean(dim=1)) @ self.emb.weight.t() + self.bias


class TiedHead(nn.Module):
    """A language model's tied head: the embedding matrix is also the weight of an output Linear
    applied to every position ([N, T, d] inputs), both called as modules (the rules cover it)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tok))).mean(dim=1)


class Keeper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept = x * self.w  # an intermediate the parent uses too: not through the output
        return torch.tanh(self.kept)


class KeptIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.keep, self.head = Keeper(), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.keep(x)
        return self.head(y + self.keep.kept)


class NoVmap(FunctionalReuse):
    """FunctionalReuse with data-dependent control flow: torch.func cannot vmap it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if h.sum().item() > -1e9:
            h = F.linear(h, self.a.weight)
        return self.b(h)


def tokens() -> torch.Tensor:
    tok = torch.randint(1, 6, (N, 5))
    tok[:, 3] = 0
    return tok


# name → (model class, input builder, the parameters the check must reroute)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], set[str]]] = {
    "functional_reuse": (FunctionalReuse, lambda: torch.randn(N, 5, dtype=DT), {"a.weight"}),
    "functional_before_call": (FunctionalBefore, lambda: torch.randn(N, 5, dtype=DT), {"a.weight"}),
    "param_two_places": (ParamTwoPlaces, lambda: torch.randn(N, 5, dtype=DT), {"gate.w"}),
    "param_two_modules": (ParamTwoModules, lambda: torch.randn(N, 5, dtype=DT), set()),
    "tied_transpose": (TiedTranspose, lambda: torch.randn(N, 5, dtype=DT), {"enc.weight"}),
    "tied_modules": (TiedModules, lambda: torch.randn(N, 5, dtype=DT), set()),
    "custom_block": (CustomBlock, lambda: torch.randn(N, 5, dtype=DT), {"block.lin.weight"}),
    "in_place": (InPlace, lambda: torch.randn(N, 5, dtype=DT), {"a.bias"}),
    "embedding_as_output": (EmbedOutput, tokens, {"emb.weight"}),
    "tied_head": (TiedHead, tokens, set()),
    "kept_intermediate": (KeptIntermediate, lambda: torch.randn(N, 5, dtype=DT), {"keep.w"}),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    cls, inputs, _ = MODELS[name]
    torch.manual_seed(sorted(MODELS).index(name))
    model = cls().to(DT)
    x = inputs()
    classes = 6 if name in ("embedding_as_output", "tied_head") else 3
    return model, x, torch.randint(0, classes, (N,))


def fisher_and_warnings(model: nn.Module, data: object, mode: str, **kw: object) -> tuple[dict, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = diagonal_fisher(model, data, mode, **kw)
    return got, [w for w in caught if issubclass(w.category, FisherPlanWarning)]


def rerouted(caught: list) -> set[str]:
    """The parameter names one plan warning lists."""
    assert len(caught) == 1, [str(w.message) for w in caught]
    text = str(caught[0].message)
    return {name for name in text.split(" is also")[0].split(" are also")[0][len("Fisher: ") :].split(", ")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_reference(name: str, mode: str) -> None:
    model, x, y = build(name)
    batches = split_batches(x, y, BS)
    gen = torch.Generator().manual_seed(5)
    got, caught = fisher_and_warnings(model, batches, mode, generator=gen)
    ref = reference_fisher(model, batches, mode, generator=torch.Generator().manual_seed(5))
    assert_fisher_close(got, ref, model)
    expected = MODELS[name][2]
    if expected and mode != "batched":  # batched squares the batch gradient: no rules, no check
        assert rerouted(caught) == expected
    else:
        assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", list(MODELS))
def test_mas_matches_reference(name: str) -> None:
    model, x, _ = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FisherPlanWarning)
        got = diagonal_importance(model, x, "mas", batch_size=BS)
    named = dict(model.named_parameters())
    ref = {n: torch.zeros_like(p) for n, p in named.items()}
    model.eval()
    for i in range(N):
        grads = torch.autograd.grad(
            model(x[i : i + 1]).square().sum(), list(named.values()), allow_unused=True
        )
        for n, g in zip(named, grads, strict=True):
            if g is not None:
                ref[n] += g.abs() / N
    assert_fisher_close(got, ref, model)


@pytest.mark.parametrize("bytes_", [1, None], ids=["parts", "no_parts"])
@pytest.mark.parametrize("name", ["functional_reuse", "embedding_as_output", "in_place"])
def test_parts_and_coupled_samples(name: str, bytes_: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of one sample; ACTIVATION_BYTES = None (samples maybe coupled: check on the whole batch,
    rerouted parameters by one backward pass per sample through the batch's graph)."""
    monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", bytes_)
    model, x, y = build(name)
    for mode in ("exact", "empirical"):
        got, caught = fisher_and_warnings(model, (x, y), mode, batch_size=BS)
        assert_fisher_close(got, reference_fisher(model, split_batches(x, y, BS), mode), model)
        assert rerouted(caught) == MODELS[name][2]
        assert ("backward pass per sample" in str(caught[0].message)) == (bytes_ is None)


def test_no_vmap_falls_back_to_a_loop() -> None:
    torch.manual_seed(3)
    model, x, y = NoVmap().to(DT), torch.randn(N, 5, dtype=DT), torch.randint(0, 3, (N,))
    got, caught = fisher_and_warnings(model, (x, y), "exact", batch_size=BS)
    assert_fisher_close(got, reference_fisher(model, split_batches(x, y, BS), "exact"), model)
    assert rerouted(caught) == {"a.weight"}
    assert "per-sample loop" in str(caught[0].message)


def test_one_warning_naming_the_parameters() -> None:
    """Several batches, one warning, naming exactly the rerouted parameters (not a.bias, b.*)."""
    model, x, y = build("functional_reuse")
    with pytest.warns(FisherPlanWarning, match=r"^Fisher: a\.weight is also used outside") as record:
        diagonal_fisher(model, (x, y), "empirical", batch_size=4)
    assert len([w for w in record if issubclass(w.category, FisherPlanWarning)]) == 1
    assert record[0].filename == __file__  # points at the caller


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ordinary_models_give_no_warning(case: object) -> None:
    """test_fisher's models (shared and tied modules, attention's out_proj, RNNs, ...) pass the check."""
    model, x, y = case.build()  # type: ignore[attr-defined]
    for mode in ("exact", "empirical"):
        _, caught = fisher_and_warnings(model, (x, y), mode, batch_size=BS, **case.kw())  # type: ignore[attr-defined]
        assert not caught, [str(w.message) for w in caught]


def test_float32_and_bfloat16_ordinary_models_give_no_warning() -> None:
    """The tolerance follows the precision: float32 and bfloat16 autocast pass on ordinary models."""
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    )
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,))
    for model in (cnn, mlp):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FisherPlanWarning)
            diagonal_fisher(model, (x, y), "exact")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                diagonal_fisher(model, (x, y), "empirical")


class DictReuse(nn.Module):
    """The issue's model behind keyword inputs and a mapping output (a Hugging Face-like model)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = FunctionalReuse()

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": features, "logits": self.inner(features * scale)}


@pytest.mark.parametrize("mode", ("exact", "empirical"))
def test_rerouting_works_with_mapping_inputs_and_outputs(mode: str) -> None:
    torch.manual_seed(0)
    model = DictReuse().to(DT)
    x = torch.randn(N, 5, dtype=DT)
    y = torch.randint(0, 3, (N,))
    scale = torch.rand(N, 1, dtype=DT) + 0.5
    batches = [
        ({"features": x[i : i + BS], "scale": scale[i : i + BS]}, y[i : i + BS]) for i in range(0, N, BS)
    ]
    got, caught = fisher_and_warnings(model, batches, mode)
    ref = reference_fisher(model, batches, mode, output=lambda out: out["logits"])
    assert_fisher_close(got, ref, model)
    assert rerouted(caught) == {"inner.a.weight"}


class SeqFirstSquare(nn.Module):
    """Linear layers on a [T, N, d] layout: T == N hides the mix-up from a check of sums alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize("mode", ("exact", "empirical"))
@pytest.mark.parametrize("n", (4, 8))
def test_sequence_first_with_length_equal_to_the_batch_is_rerouted(mode: str, n: int) -> None:
    torch.manual_seed(0)
    model = SeqFirstSquare().to(DT)
    x, y = torch.randn(n, n, 4, dtype=DT), torch.randint(0, 3, (n,))
    got, caught = fisher_and_warnings(model, [(x, y)], mode)
    assert_fisher_close(got, reference_fisher(model, [(x, y)], mode), model)
    assert rerouted(caught) == {"a.weight", "a.bias"}


def test_a_fully_masked_attention_row_gives_a_finite_correct_fisher() -> None:
    """A sample that is all padding attends to nothing (PyTorch's kernel returns 0 there): the
    attention rule must not turn that row into NaN."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    head = nn.Linear(8, 3)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.head = layer, head

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            return self.head(torch.nan_to_num(self.enc(x, src_key_padding_mask=pad)).mean(1))

    model = Model().to(DT)
    x, y = torch.randn(6, 5, 8, dtype=DT), torch.randint(0, 3, (6,))
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[:, 3:] = True
    pad[2] = True  # sample 2 is all padding
    got, caught = fisher_and_warnings(model, [((x, pad), y)], "empirical")
    assert all(torch.isfinite(f).all() for f in got.values())
    assert_fisher_close(got, reference_fisher(model, [((x, pad), y)], "empirical"), model)
    assert not caught


def test_a_non_finite_fisher_is_an_error() -> None:
    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * 1e200  # finite outputs, per-sample gradients that overflow when squared

    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="not finite"):
        diagonal_fisher(Overflow().to(DT), (x, y), "empirical")
