"""The Fisher's data and output contract: models returning tuples, dicts or ``ModelOutput``-like
objects, keyword inputs from dict batches with ``labels``, an ``output`` selector, and the errors.

Every result is checked against the independent float64 per-sample reference
(``conftest.reference_fisher``), which calls the model the same way (``model(**x)``) and reads the
logits with an explicit ``output`` callable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_fisher_close, reference_fisher, rel_err
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ewc.fisher as fisher_mod
from ewc.fisher import FISHER_MODES, diagonal_fisher, diagonal_importance
from ewc.fisher_check import FisherPlanWarning

DT = torch.float64
N, T, V, C = 13, 6, 20, 3
BS = 5


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


class FakeModelOutput(OrderedDict):
    """Like Hugging Face's ``ModelOutput``: an OrderedDict whose items are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


class AttrOutput:
    """An output object with a ``logits`` attribute, not a mapping."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.hidden, self.logits = hidden, logits


class Body(nn.Module):
    """A small MLP whose forward returns (hidden, logits); the wrappers change only what is returned."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.head = nn.Linear(8, C)

    def hidden_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x))
        return h, self.head(h)


class ReturnsTuple(Body):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logits = self.hidden_logits(x)
        return logits, h


class ReturnsDict(Body):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, logits = self.hidden_logits(x)
        return {"hidden": h, "logits": logits}  # logits not first


class ReturnsModelOutput(Body):
    def forward(self, x: torch.Tensor) -> FakeModelOutput:
        h, logits = self.hidden_logits(x)
        return FakeModelOutput(hidden=h, logits=logits)


class ReturnsAttr(Body):
    def forward(self, x: torch.Tensor) -> AttrOutput:
        h, logits = self.hidden_logits(x)
        return AttrOutput(logits, h)


class ReturnsNested(Body):
    """Needs an ``output`` callable (or the key ``scores`` for its inner dict)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h, logits = self.hidden_logits(x)
        return h, {"scores": logits}


class KeywordModel(nn.Module):
    """Token model called as ``model(input_ids=..., attention_mask=...)``, returning a ModelOutput;
    it records whether it was ever given ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, C)
        self.got_labels = False

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> FakeModelOutput:
        self.got_labels |= labels is not None
        h = torch.tanh(self.lin(self.ln(self.emb(input_ids))))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1))
        return FakeModelOutput(logits=logits, hidden=h)


def _x_y() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(N, 5, dtype=DT), torch.randint(0, C, (N,))


def _tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, V, (N, T))
    mask = torch.ones(N, T, dtype=torch.long)
    mask[::3, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, C, (N,))}


def _dict_batches(data: dict[str, torch.Tensor], bs: int = BS) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i : i + bs] for k, v in data.items()} for i in range(0, N, bs)]


def _as_reference(batches: list[dict[str, torch.Tensor]]) -> list[tuple[dict, torch.Tensor]]:
    """The (inputs without labels, labels) pairs the engine is documented to see."""
    return [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(DT)


OUTPUT_MODELS: list[tuple[type[nn.Module], Any, Callable]] = [
    # (model, output= given to diagonal_fisher, the reference's explicit selector)
    (ReturnsTuple, None, lambda o: o[0]),
    (ReturnsDict, None, lambda o: o["logits"]),
    (ReturnsModelOutput, None, lambda o: o["logits"]),
    (ReturnsAttr, None, lambda o: o.logits),
    (ReturnsDict, "logits", lambda o: o["logits"]),
    (ReturnsNested, lambda o: o[1]["scores"], lambda o: o[1]["scores"]),
]


@pytest.mark.parametrize("mode", FISHER_MODES)
@pytest.mark.parametrize("case", range(len(OUTPUT_MODELS)))
def test_outputs_match_reference(case: int, mode: str) -> None:
    cls, output, select = OUTPUT_MODELS[case]
    model = _seeded(cls)
    x, y = _x_y()
    batches = [(x[i : i + BS], y[i : i + BS]) for i in range(0, N, BS)]
    got = diagonal_fisher(model, batches, mode, generator=gen(), output=output)
    ref = reference_fisher(model, batches, mode, generator=gen(), output=select)
    assert_fisher_close(got, ref, model)


def test_output_selection_is_bit_identical_to_a_tensor_model() -> None:
    """Picking the logits changes nothing: the same numbers as the model that returns them."""
    x, y = _x_y()
    plain = _seeded(ReturnsTuple)
    plain.forward = lambda x: plain.hidden_logits(x)[1]  # type: ignore[method-assign]
    for cls, output, _ in OUTPUT_MODELS:
        model = _seeded(cls)
        for mode in FISHER_MODES:
            a = diagonal_fisher(model, (x, y), mode, generator=gen(), output=output)
            b = diagonal_fisher(plain, (x, y), mode, generator=gen())
            assert all(torch.equal(a[k], b[k]) for k in b), (cls.__name__, mode)
        a = diagonal_importance(model, x, output=output)
        b = diagonal_importance(plain, x)
        assert all(torch.equal(a[k], b[k]) for k in b), cls.__name__


def test_gaussian_means_from_a_dict() -> None:
    model = _seeded(ReturnsDict)
    x = torch.randn(N, 5, dtype=DT)
    targets = torch.randn(N, C, dtype=DT)
    batches = [(x[i : i + BS], targets[i : i + BS]) for i in range(0, N, BS)]
    for mode in FISHER_MODES:
        got = diagonal_fisher(model, batches, mode, likelihood="gaussian", sigma=0.8, generator=gen())
        ref = reference_fisher(
            model,
            batches,
            mode,
            likelihood="gaussian",
            sigma=0.8,
            generator=gen(),
            output=lambda o: o["logits"],
        )
        assert_fisher_close(got, ref, model)


@pytest.mark.parametrize("mode", FISHER_MODES)
def test_keyword_inputs_from_dict_batches(mode: str) -> None:
    model = _seeded(KeywordModel)
    batches = _dict_batches(_tokens())
    got = diagonal_fisher(model, batches, mode, generator=gen())
    ref = reference_fisher(model, _as_reference(batches), mode, generator=gen(), output=lambda o: o.logits)
    assert_fisher_close(got, ref, model)
    assert not model.got_labels, "a dict batch's labels must not be passed to the model"


@pytest.mark.parametrize("mode", FISHER_MODES)
def test_dict_forms_agree(mode: str) -> None:
    """A list of dict batches, a DataLoader over dict samples, a whole-data dict, and (x, y) pairs
    with a dict x give the same Fisher; labels of an (x, y) pair's dict x would go to the model."""
    model = _seeded(KeywordModel)
    data = _tokens()
    expected = diagonal_fisher(model, _dict_batches(data), mode, generator=gen())

    class Samples(Dataset):
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {k: v[i] for k, v in data.items()}

    forms = {
        "loader": DataLoader(Samples(), batch_size=BS),
        "whole": data,
        "pairs": _as_reference(_dict_batches(data)),
    }
    for name, form in forms.items():
        got = diagonal_fisher(model, form, mode, batch_size=BS, generator=gen())
        for k in expected:
            assert rel_err(got[k], expected[k]) < 1e-12, (name, k)
    assert not model.got_labels


@pytest.mark.parametrize("mode", ["exact", "empirical", "sample"])
def test_dict_and_tuple_inputs_split_into_parts(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts slice every tensor of a dict (or tuple) input along the batch axis, settings untouched."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(5, 8), nn.Linear(3, 8), nn.Linear(8, C)
            self.sizes: list[int] = []

        def forward(self, x1: torch.Tensor, x2: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
            assert x1.shape[0] == x2.shape[0]
            self.sizes.append(x1.shape[0])
            return {"logits": self.head(torch.tanh(self.a(x1) + scale * self.b(x2)))}

    torch.manual_seed(0)
    model = TwoInputs().to(DT)
    x1, y = _x_y()
    x2 = torch.randn(N, 3, dtype=DT)
    dict_batches = [({"x1": x1[i : i + 9], "x2": x2[i : i + 9], "scale": 0.5}, y[i : i + 9]) for i in (0, 9)]
    tuple_batches = [((x1[i : i + 9], x2[i : i + 9]), y[i : i + 9]) for i in (0, 9)]
    logits = lambda o: o["logits"]  # noqa: E731
    refs = [
        reference_fisher(model, b, mode, generator=gen(), output=logits)
        for b in (dict_batches, tuple_batches)
    ]
    monkeypatch.setattr(fisher_mod, "ACTIVATION_BYTES", 300)  # a few samples per part
    for batches, ref in zip((dict_batches, tuple_batches), refs, strict=True):
        model.sizes = []
        assert_fisher_close(diagonal_fisher(model, batches, mode, generator=gen()), ref, model)
        assert max(model.sizes[1:]) < 9, model.sizes  # the batches did run in parts


def test_max_samples_with_dict_batches() -> None:
    model = _seeded(KeywordModel)
    data = _tokens()
    got = diagonal_fisher(model, _dict_batches(data), "empirical", max_samples=7)
    first = {k: v[:7] for k, v in data.items()}
    ref = reference_fisher(
        model, _as_reference(_dict_batches(first, 7)), "empirical", output=lambda o: o.logits
    )
    assert_fisher_close(got, ref, model)


def test_importance_with_dict_batches_and_output() -> None:
    model = _seeded(KeywordModel)
    batches = _dict_batches(_tokens())
    a = diagonal_importance(model, batches)
    b = diagonal_importance(model, batches, output=lambda o: o.logits)
    c = diagonal_importance(model, batches, output="hidden")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"]) and not c["head.weight"].any()


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", FISHER_MODES)
def test_error_output_callable_returns_non_tensor(mode: str) -> None:
    model = _seeded(ReturnsDict)
    with pytest.raises(ValueError, match=r"output\(model output\) must return a tensor, got dict"):
        diagonal_fisher(model, _x_y(), mode, output=lambda o: o)


@pytest.mark.parametrize("output", [3, ["logits"]])
def test_error_output_of_wrong_type(output: Any) -> None:
    with pytest.raises(ValueError, match=r"output must be None, a key/attribute name or a callable"):
        diagonal_fisher(_seeded(ReturnsDict), _x_y(), output=output)
    with pytest.raises(ValueError, match=r"output must be"):
        diagonal_importance(_seeded(ReturnsDict), _x_y()[0], output=output)


def test_error_output_without_logits() -> None:
    model = _seeded(ReturnsNested)
    model.forward = lambda x: {"scores": model.hidden_logits(x)[1]}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"dict with keys \['scores'\] without 'logits'.*output="):
        diagonal_fisher(model, _x_y())
    with pytest.raises(ValueError, match=r"without 'means'"):
        diagonal_fisher(model, _x_y(), output="means")
    model.forward = lambda x: ({"scores": model.hidden_logits(x)[1]},)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"first item is dict, not a tensor"):
        diagonal_fisher(model, _x_y())
    model.forward = lambda x: FakeModelOutput(logits=None)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"'logits' is a NoneType, not a tensor"):
        diagonal_fisher(model, _x_y())


@pytest.mark.parametrize("mode", ["exact", "sample", "empirical", "batched"])
def test_error_sequence_logits(mode: str) -> None:
    """Per-token logits [N, T, C] with one label per sequence, or logits [N, T, S, C]: clear errors
    (sequence likelihoods are tested in tests/test_fisher_sequence.py)."""
    model = _seeded(KeywordModel)
    model.forward = lambda input_ids, attention_mask: {  # type: ignore[method-assign]
        "logits": model.head(model.emb(input_ids))
    }
    with pytest.raises(ValueError, match=r"need labels \[N, T\] = \[5, 6\], got \(5,\)"):
        diagonal_fisher(model, _dict_batches(_tokens()), mode, generator=gen())
    model.forward = lambda input_ids, attention_mask: {  # type: ignore[method-assign]
        "logits": model.head(model.emb(input_ids)).unsqueeze(2)
    }
    with pytest.raises(ValueError, match=r"logits of shape \[N, C\].*got \(5, 6, 1, 3\)"):
        diagonal_fisher(model, _dict_batches(_tokens()), mode, generator=gen())


@pytest.mark.parametrize("mode", ["empirical", "batched"])
def test_error_labels_shape_mismatch(mode: str) -> None:
    model = _seeded(KeywordModel)
    batches = _dict_batches(_tokens())
    batches[1]["labels"] = batches[1]["labels"].unsqueeze(1).expand(-1, T)  # per-token labels
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[5\], got \(5, 6\)"):
        diagonal_fisher(model, batches, mode)
    data = _tokens()
    data["labels"] = data["labels"][:-1]
    with pytest.raises(ValueError, match=r"'labels' must be a tensor of 13 labels.*\(12,\)"):
        diagonal_fisher(model, data, mode)


@pytest.mark.parametrize("mode", ["empirical", "batched"])
def test_error_dict_batch_without_labels(mode: str) -> None:
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in _dict_batches(_tokens())]
    with pytest.raises(ValueError, match=r"needs labels.*'labels' key"):
        diagonal_fisher(_seeded(KeywordModel), batches, mode)


def test_error_dict_batch_missing_or_unknown_inputs() -> None:
    model = _seeded(KeywordModel)
    data = _tokens()
    missing = [{"input_ids": data["input_ids"][:5], "labels": data["labels"][:5]}]
    with pytest.raises(ValueError, match=r"does not take the mapping batch's inputs \['input_ids'\]"):
        diagonal_fisher(model, missing)
    unknown = [{**{k: v[:5] for k, v in data.items()}, "idx": torch.arange(5)}]
    with pytest.raises(ValueError, match=r"'idx'"):
        diagonal_fisher(model, unknown)
    with pytest.raises(ValueError, match=r"needs input tensors besides 'labels'"):
        diagonal_fisher(model, [{"labels": data["labels"]}])
    with pytest.raises(ValueError, match=r"string keys"):
        diagonal_fisher(model, [{0: data["input_ids"]}])


def test_model_errors_pass_through() -> None:
    """A TypeError raised inside the model (signature fine) is the user's: never rewrapped."""

    class Broken(KeywordModel):
        def forward(self, **kw: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            raise TypeError("boom inside the model")

    with pytest.raises(TypeError, match="boom inside the model"):
        diagonal_fisher(_seeded(Broken), _dict_batches(_tokens()))
    model = _seeded(KeywordModel)
    model.forward = lambda input_ids, attention_mask: input_ids + "x"  # type: ignore[method-assign]
    with pytest.raises(TypeError):
        diagonal_fisher(model, _dict_batches(_tokens()))


# ----------------------------------------------------------------------------------------------
# A real Hugging Face model (skipped without transformers)
# ----------------------------------------------------------------------------------------------


def _tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=C,
    )
    return transformers.BertForSequenceClassification(cfg).to(DT)


def _bert_batches(position_ids: bool) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 100, (10, 7))
    mask = torch.ones(10, 7, dtype=torch.long)
    mask[::3, 5:] = 0
    data = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, C, (10,))}
    if position_ids:
        data["position_ids"] = torch.arange(7).expand(10, 7)
    return [{k: v[i : i + 4] for k, v in data.items()} for i in range(0, 10, 4)]


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_huggingface_bert_sequence_classification(mode: str) -> None:
    model = _tiny_bert()
    batches = _bert_batches(position_ids=True)
    got = diagonal_fisher(model, batches, mode)  # default output: the ModelOutput's logits
    ref = reference_fisher(model, _as_reference(batches), mode, output=lambda o: o.logits)
    # The key biases add a constant to every attention score of a query: softmax cancels it, so
    # their Fisher is exactly 0 (both sides hold ~1e-43 of rounding, a meaningless ratio).
    zero = {k for k in ref if "attention.self.key.bias" in k}
    assert zero and all(ref[k].abs().max() < 1e-30 and got[k].abs().max() < 1e-30 for k in zero)
    assert_fisher_close(
        {k: v for k, v in got.items() if k not in zero}, {k: ref[k] for k in ref if k not in zero}
    )
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_huggingface_shared_position_embeddings_are_rerouted() -> None:
    """Without position_ids, BERT embeds positions [1, T] once for the batch: the samples share
    that output, which the Embedding rule cannot split, so the plan check computes it through the
    whole model per sample (one warning) and the Fisher is right."""
    model = _tiny_bert()
    batches = _bert_batches(position_ids=False)
    with pytest.warns(FisherPlanWarning, match="position_embeddings"):
        got = diagonal_fisher(model, batches, "empirical")
    ref = reference_fisher(model, _as_reference(batches), "empirical", output=lambda o: o.logits)
    zero = {k for k in ref if "attention.self.key.bias" in k}  # exactly 0 (see above)
    assert_fisher_close(
        {k: v for k, v in got.items() if k not in zero}, {k: ref[k] for k in ref if k not in zero}
    )


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_sequence_first_layer_is_rerouted(mode: str) -> None:
    """A Linear on [T, N, d] (sequence-first) would read T as the samples: the plan check routes it
    through the general per-sample path instead of returning a wrong sum."""

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))

    model = _seeded(SeqFirst)
    x, y = torch.randn(6, 5, 4, dtype=DT), torch.randint(0, C, (6,))
    with pytest.warns(FisherPlanWarning, match="lin.weight, lin.bias"):
        got = diagonal_fisher(model, (x, y), mode)
    assert_fisher_close(got, reference_fisher(model, [(x, y)], mode))
