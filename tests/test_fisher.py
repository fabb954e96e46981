"""Correctness tests for ``ewc.fisher.diagonal_fisher`` against an independent per-sample reference.

The reference (``conftest.reference_fisher``) loops over samples with batch size 1 and uses plain
``torch.autograd.grad``; everything is float64 so the engine must agree to < 1e-6 relative error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    assert_fisher_close,
    assert_state_equal,
    clone_state,
    reference_fisher,
    rel_err,
    split_batches,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ewc.fisher import FISHER_MODES, diagonal_fisher

DT = torch.float64
N = 24  # samples per data set
BS = 5  # batch size used for the list-of-batches data form (last batch is smaller: 4)
MODES = ("exact", "sample", "empirical", "batched")


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def mlp(d_in: int = 5, d_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, d_out))


class EmbedLN(nn.Module):
    """Embedding (padding_idx) + LayerNorm + mean-pool over the sequence + Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.emb(tok)).mean(dim=1))


class SeqLinear(nn.Module):
    """A Linear applied to a 3-D input [N, T, d]: the per-sample gradient sums over T."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)).mean(dim=1))


class ScaleShift(nn.Module):
    """A custom module with its own parameters (no fast rule can know it)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d) * 0.5 + 1.0)
        self.shift = nn.Parameter(torch.randn(d) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.shift


class CustomBilinear(nn.Module):
    def __init__(self, d_out: int = 3) -> None:
        super().__init__()
        self.ss = ScaleShift(5)
        self.lin = nn.Linear(5, 4)
        self.bil = nn.Bilinear(5, 4, 4)
        self.head = nn.Linear(4, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ss(x)
        return self.head(torch.tanh(self.bil(h, torch.tanh(self.lin(x)))))


class RNNNet(nn.Module):
    def __init__(self, cell: str) -> None:
        super().__init__()
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn_cls(3, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class SharedLinear(nn.Module):
    """The same nn.Linear is called twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h) + h)
        return self.head(h)


class TiedLinear(nn.Module):
    """Two modules holding the same Parameter object."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Attention(nn.Module):
    """nn.MultiheadAttention: out_proj.weight is used functionally, not via a module call."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.head((a + h).mean(dim=1))


def _randomise_affine(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)


def _warm_bn(model: nn.Module, shape: tuple[int, ...]) -> None:
    """A few train-mode forwards so that the running statistics are far from (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *shape, dtype=DT) * 2.0 + 0.7)
    model.eval()


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]
    likelihood: str = "categorical"
    sigma: float = 1.0

    def kw(self) -> dict[str, object]:
        return {"likelihood": self.likelihood, "sigma": self.sigma}


def _labels(n: int = N, c: int = 3) -> torch.Tensor:
    return torch.randint(0, c, (n,))


def b_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return mlp().to(DT), torch.randn(N, 5, dtype=DT), _labels()


def b_mlp_frozen() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, x, y = b_mlp()
    model[2].bias.requires_grad_(False)
    return model, x, y


def b_cnn2d() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).to(DT)
    return model, torch.randn(N, 2, 8, 8, dtype=DT), _labels()


def b_cnn1d() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(4, 6, 2, dilation=2, padding=1, groups=2, bias=False),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).to(DT)
    return model, torch.randn(N, 3, 10, dtype=DT), _labels()


def b_embed() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = EmbedLN().to(DT)
    _randomise_affine(model)
    tok = torch.randint(1, 10, (N, 7))
    tok[:, 3] = tok[:, 0]  # the same token id twice inside one sample
    tok[:, 5] = tok[:, 0]  # ... three times
    tok[:, 6] = 0  # padding
    tok[::3, 4] = 0
    return model, tok, _labels()


def b_seqlinear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    return SeqLinear().to(DT), torch.randn(N, 6, 4, dtype=DT), _labels()


def b_bn1d() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    _randomise_affine(model)
    _warm_bn(model, (5,))
    return model, torch.randn(N, 5, dtype=DT), _labels()


def b_bn2d_gn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).to(DT)
    _randomise_affine(model)
    _warm_bn(model, (2, 6, 6))
    return model, torch.randn(N, 2, 6, 6, dtype=DT), _labels()


def b_custom() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    return CustomBilinear().to(DT), torch.randn(N, 5, dtype=DT), _labels()


def b_gru() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(8)
    return RNNNet("gru").to(DT), torch.randn(N, 4, 3, dtype=DT), _labels()


def b_lstm() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(9)
    return RNNNet("lstm").to(DT), torch.randn(N, 4, 3, dtype=DT), _labels()


def b_shared() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(10)
    return SharedLinear().to(DT), torch.randn(N, 5, dtype=DT), _labels()


def b_tied() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    return TiedLinear().to(DT), torch.randn(N, 5, dtype=DT), _labels()


def b_attention() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(12)
    return Attention().to(DT), torch.randn(N, 5, 4, dtype=DT), _labels()


def b_gauss_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x = torch.randn(N, 4, dtype=DT)
    return model, x, torch.randn(N, 3, dtype=DT)


def b_gauss_custom() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(14)
    return CustomBilinear().to(DT), torch.randn(N, 5, dtype=DT), torch.randn(N, 3, dtype=DT)


CASES = [
    Case("mlp", b_mlp),
    Case("mlp_frozen", b_mlp_frozen),
    Case("cnn2d", b_cnn2d),
    Case("cnn1d", b_cnn1d),
    Case("embedding_layernorm", b_embed),
    Case("linear_3d_input", b_seqlinear),
    Case("batchnorm1d", b_bn1d),
    Case("batchnorm2d_groupnorm", b_bn2d_gn),
    Case("custom_bilinear", b_custom),
    Case("gru", b_gru),
    Case("lstm", b_lstm),
    Case("shared_linear", b_shared),
    Case("tied_params", b_tied),
    Case("multihead_attention", b_attention),
    Case("gaussian_mlp", b_gauss_mlp, "gaussian", 0.7),
    Case("gaussian_custom", b_gauss_custom, "gaussian", 1.3),
]


# ----------------------------------------------------------------------------------------------
# Agreement with the reference
# ----------------------------------------------------------------------------------------------


def test_fisher_modes_constant() -> None:
    assert tuple(FISHER_MODES) == MODES


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case: Case, mode: str) -> None:
    model, x, y = case.build()
    batches = split_batches(x, y, BS)
    got = diagonal_fisher(model, batches, mode, generator=gen(), **case.kw())
    ref = reference_fisher(model, batches, mode, generator=gen(), **case.kw())
    assert_fisher_close(got, ref, model)
    # None of the tensors is trivially zero (otherwise the comparison would be weak).
    for k, v in ref.items():
        assert v.abs().max() > 0, k


@pytest.mark.parametrize("mode", ["exact", "sample", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parts_match_reference(case: Case, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big batches are split into parts (ACTIVATION_BYTES); a tiny budget makes parts of 1."""
    import ewc.fisher as fisher_module

    monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", 1)
    model, x, y = case.build()
    batches = split_batches(x, y, 9)
    got = diagonal_fisher(model, batches, mode, generator=gen(), **case.kw())
    ref = reference_fisher(model, batches, mode, generator=gen(), **case.kw())
    assert_fisher_close(got, ref, model)


@pytest.mark.parametrize("mode", ["exact", "sample", "empirical"])
def test_parts_sized_by_activations(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The part size follows the first batch's activation bytes; the first batch plans whole."""
    import ewc.fisher as fisher_module

    seen: list[int] = []
    model = mlp().to(DT)
    model[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x, y = torch.randn(40, 5, dtype=DT), torch.randint(0, 3, (40,))
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    per_sample = 8 * (8 + 8 + 6 + 6 + 3)  # float64 outputs of Linear, ReLU, Linear, Tanh, Linear
    monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", 7 * per_sample)
    split = diagonal_fisher(model, iter(data), mode, generator=gen(3))
    # the planning forward sees batch 1 whole, the plan check its first 4 samples, then parts
    assert seen == [20, 4, 7, 7, 6, 7, 7, 6]
    seen.clear()
    monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", 20 * per_sample)
    whole = diagonal_fisher(model, iter(data), mode, generator=gen(3))
    assert seen == [20, 4, 20]  # fits in one part: the planning forward is also the capture
    for k in whole:  # same labels drawn in sample mode: the parts share the batch's draws
        torch.testing.assert_close(split[k], whole[k], rtol=1e-12, atol=0)


def test_parts_balanced_and_not_across_coupled_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts have balanced sizes (no remainder of 1); inputs with a second axis of size N (an
    adjacency) are never split; ACTIVATION_BYTES = None turns parts off."""
    import ewc.fisher as fisher_module

    class Squeezy(nn.Module):  # works on the caller's batches, breaks on a part of one sample
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, adj: torch.Tensor | None = None) -> torch.Tensor:
            h = self.lin(x).squeeze()
            return h if adj is None else adj @ h

    model = Squeezy().to(DT)
    seen: list[int] = []
    model.lin.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x = torch.randn(18, 4, dtype=DT)
    # 4 samples of 32 bytes (the Linear's and the squeezed output, 2 float64 each)
    monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", 4 * 32)
    got = diagonal_fisher(model, x, "exact", batch_size=9)
    assert seen == [9, 4, 3, 3, 3, 3, 3, 3]  # planning, plan check (4 samples), parts
    seen.clear()
    adj = torch.eye(9, dtype=DT)
    diagonal_fisher(model, [((x[:9], adj), None), ((x[9:], adj), None)], "exact")
    assert seen == [9, 9, 9]  # the plan check runs on the whole first batch
    seen.clear()
    monkeypatch.setattr(fisher_module, "ACTIVATION_BYTES", None)
    whole = diagonal_fisher(model, x, "exact", batch_size=9)
    assert seen == [9, 9, 9]
    assert_fisher_close(got, whole, model)  # (the batch-1 reference cannot run this model)


@pytest.mark.parametrize("mode", ["exact", "empirical", "sample"])
def test_under_autocast_bfloat16(mode: str) -> None:
    """Under CPU autocast the layers see bfloat16; the sums stay float32 and close to float32."""
    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    plain = diagonal_fisher(model, (x, y), mode, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = diagonal_fisher(model, (x, y), mode, generator=gen(1))
    for k in plain:
        assert low[k].dtype == torch.float32
        assert rel_err(low[k], plain[k]) < 0.3, k  # bfloat16 gradients: 0.16 on the first layer


def test_keys_are_trainable_named_parameters() -> None:
    model, x, y = b_mlp_frozen()
    f = diagonal_fisher(model, (x, y), "empirical")
    expected = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "2.bias" not in f
    assert list(f) == expected
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert f[n].shape == p.shape


def test_tied_parameter_appears_once() -> None:
    model, x, y = b_tied()
    f = diagonal_fisher(model, (x, y), "exact")
    assert set(f) == {"a.weight", "a.bias", "b.bias", "head.weight", "head.bias"}
    # The tied weight's Fisher is the square of the *summed* gradient of both uses: it is not
    # the Fisher of either use alone, and not the sum of the two squared contributions.
    ref = reference_fisher(model, split_batches(x, y, BS), "exact")
    assert rel_err(f["a.weight"], ref["a.weight"]) < 1e-6


def test_exact_categorical_closed_form() -> None:
    """Second, independent route for exact: diag(J^T (diag(p) - p p^T) J) per sample."""
    model, x, _ = b_mlp()
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    model.eval()
    for i in range(N):
        out = model(x[i : i + 1])[0]
        p = torch.softmax(out, -1).detach()
        jac = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], params, retain_graph=True)
            jac.append(torch.cat([t.reshape(-1) for t in g]))
        j = torch.stack(jac)  # [C, P]
        h = torch.diag(p) - torch.outer(p, p)
        diag = torch.einsum("cp,cd,dp->p", j, h, j)
        off = 0
        for a, q in zip(acc, params, strict=True):
            a += diag[off : off + q.numel()].view_as(q)
            off += q.numel()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref = {n: a / N for n, a in zip(names, acc, strict=True)}
    got = diagonal_fisher(model, x, "exact", batch_size=7)
    assert_fisher_close(got, ref, model)


def test_exact_is_expectation_of_sample() -> None:
    """Statistical check: the mean of many sampled-label Fishers converges to the exact one."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    base = torch.randn(3, 3, dtype=DT) * 2.0
    x = base.repeat(1000, 1)  # 3 distinct inputs, each 1000 times
    exact = diagonal_fisher(model, x, "exact", batch_size=500)
    sample = diagonal_fisher(model, x, "sample", batch_size=500, generator=gen(5))
    for k in exact:
        # ~1/sqrt(1000) relative noise; a wrong definition (e.g. argmax labels) is off by >> 15%.
        assert rel_err(sample[k], exact[k]) < 0.15, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_categorical_frequencies(dtype: torch.dtype) -> None:
    """Labels follow p (rows scaled by their sum), zero-probability classes are never drawn."""
    from ewc.fisher import sample_categorical

    p = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.6]], dtype=dtype)
    rows = p.repeat_interleave(50_000, dim=0)
    y = sample_categorical(rows, gen(3))
    assert y.dtype == torch.long and y.shape == (100_000,)
    for r in range(2):
        counts = torch.bincount(y[r * 50_000 : (r + 1) * 50_000], minlength=6).to(torch.float64)
        expected = 50_000 * p[r].double() / p[r].double().sum()
        assert torch.all(counts[expected == 0] == 0), (r, counts)
        # binomial standard deviation; 5 sigma
        sd = (expected * (1 - expected / 50_000)).sqrt()
        assert torch.all((counts - expected).abs() <= 5 * sd + 1e-9), (r, counts, expected)
    again = sample_categorical(rows, gen(3))
    assert torch.equal(y, again)  # seeded
    # bfloat16 probabilities: drawn in float32 (bfloat16 has ~1 300 values in [0, 1)), so the
    # frequencies follow the (rounded) probabilities themselves.
    q = torch.tensor([[0.997, 0.003]]).to(torch.bfloat16)
    draws = sample_categorical(q.repeat(200_000, 1), gen(4))
    expected = 200_000 * float(q[0, 1]) / float(q[0].float().sum())
    assert abs(int(draws.sum()) - expected) <= 5 * math.sqrt(expected), (int(draws.sum()), expected)
    with pytest.raises(ValueError, match="shape"):
        sample_categorical(p[0], gen(0))


def test_sample_categorical_inverts_the_cumulative_sum_exactly() -> None:
    """The label is the number of partial sums S_c (c < C−1) at or below u·S_{C−1}: checked against
    that count row by row, for u at 0, just below 1 and on the partial sums themselves,
    with zero-probability classes anywhere (the last one included)."""
    from ewc.fisher import sample_categorical

    g = torch.Generator().manual_seed(5)
    p = torch.rand(300, 7, generator=g)
    p[p < 0.3] = 0.0
    p[0], p[1] = torch.tensor([0, 0, 0, 0, 0, 0, 1.0]), torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    u = torch.rand(300, 1, generator=g)
    u[:20], u[20:40] = 0.0, 1.0 - 2.0**-24
    cdf = p.cumsum(-1)
    u[40:60] = (cdf[40:60, 2:3] / cdf[40:60, -1:]).clamp(max=1 - 2.0**-24)  # on a partial sum
    y = sample_categorical(p, u=u)
    for r in range(300):
        x = float(u[r, 0] * cdf[r, -1])  # the product in float32, as documented
        expected = sum(1 for c in range(6) if float(cdf[r, c]) <= x)
        assert int(y[r]) == expected, (r, int(y[r]), expected)
        assert p[r, int(y[r])] > 0 or p[r].sum() == 0, r  # never a class of probability 0


def test_exact_gaussian_is_expectation_of_sample() -> None:
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = (torch.randn(2, 3, dtype=DT)).repeat(1500, 1)
    kw: dict[str, object] = {"likelihood": "gaussian", "sigma": 0.5, "batch_size": 600}
    exact = diagonal_fisher(model, x, "exact", **kw)
    sample = diagonal_fisher(model, x, "sample", generator=gen(6), **kw)
    for k in exact:
        assert rel_err(sample[k], exact[k]) < 0.15, k


def test_gaussian_sigma_scaling() -> None:
    """Exact gaussian Fisher scales as 1/sigma^2."""
    model, x, y = b_gauss_mlp()
    f1 = diagonal_fisher(model, (x, y), "exact", likelihood="gaussian", sigma=1.0)
    f2 = diagonal_fisher(model, (x, y), "exact", likelihood="gaussian", sigma=2.0)
    for k in f1:
        assert rel_err(4.0 * f2[k], f1[k]) < 1e-10, k


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------


class DropNet(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(p)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.drop(torch.relu(self.bn(self.l1(x)))))


def _dropnet(p: float) -> DropNet:
    torch.manual_seed(30)
    model = DropNet(p).to(DT)
    _randomise_affine(model)
    _warm_bn(model, (5,))
    return model


@pytest.mark.parametrize("mode", MODES)
def test_train_mode_restored_and_eval_used(mode: str) -> None:
    model = _dropnet(0.5)
    x, y = torch.randn(N, 5, dtype=DT), _labels()
    ref = reference_fisher(model, split_batches(x, y, BS), mode, generator=gen())
    model.train()
    before = clone_state(model)
    got = diagonal_fisher(model, split_batches(x, y, BS), mode, generator=gen())
    assert all(m.training for m in model.modules())
    assert_state_equal(clone_state(model), before)  # running stats untouched
    assert_fisher_close(got, ref, model)

    # Without dropout (same weights) the Fisher is the same: dropout was inactive.
    plain = _dropnet(0.0)
    plain.load_state_dict(model.state_dict())
    plain.train()
    got_plain = diagonal_fisher(plain, split_batches(x, y, BS), mode, generator=gen())
    assert_fisher_close(got_plain, got, tol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_training_flags_restored(mode: str) -> None:
    model = _dropnet(0.3)
    x, y = torch.randn(N, 5, dtype=DT), _labels()
    ref = reference_fisher(model, split_batches(x, y, BS), mode, generator=gen())
    model.eval()
    model.bn.train()  # BatchNorm alone in train mode: it must still be evaluated in eval mode
    flags = {name: m.training for name, m in model.named_modules()}
    before = clone_state(model)
    got = diagonal_fisher(model, split_batches(x, y, BS), mode, generator=gen())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert_state_equal(clone_state(model), before)
    assert_fisher_close(got, ref, model)


@pytest.mark.parametrize("mode", MODES)
def test_grads_untouched(mode: str) -> None:
    model, x, y = b_mlp_frozen()
    existing = torch.randn_like(model[0].weight)
    model[0].weight.grad = existing.clone()
    model[4].bias.grad = torch.zeros_like(model[4].bias)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    diagonal_fisher(model, (x, y), mode, batch_size=BS, generator=gen())
    for n, p in model.named_parameters():
        if n == "0.weight":
            assert p.grad is not None and torch.equal(p.grad, existing)
        elif n == "4.bias":
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
        else:
            assert p.grad is None, n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [b_bn2d_gn, b_embed, b_attention], ids=lambda b: b.__name__)
def test_params_and_buffers_unchanged(mode: str, build: Callable) -> None:
    model, x, y = build()
    model.train()
    before = clone_state(model)
    params_before = {n: p for n, p in model.named_parameters()}
    diagonal_fisher(model, (x, y), mode, batch_size=BS, generator=gen())
    assert_state_equal(clone_state(model), before)
    # The very same Parameter objects are still registered.
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert all(m.training for m in model.modules())


def _data_forms(x: torch.Tensor, y: torch.Tensor, with_labels: bool) -> dict[str, object]:
    forms: dict[str, object] = {
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=BS, shuffle=False),
        "list_of_batches": split_batches(x, y, BS),
        "tuple_of_batches": tuple(split_batches(x, y, BS)),
        "iterator": iter(split_batches(x, y, BS)),
        "pair": (x, y),
    }
    if not with_labels:
        forms["tensor"] = x
        forms["list_of_x"] = [x[i : i + BS] for i in range(0, N, BS)]
    return forms


@pytest.mark.parametrize("mode", MODES)
def test_data_forms_agree(mode: str) -> None:
    model, x, y = b_cnn1d()
    ref = reference_fisher(model, split_batches(x, y, BS), mode, generator=gen(3))
    forms = _data_forms(x, y, with_labels=mode in ("empirical", "batched"))
    for name, data in forms.items():
        got = diagonal_fisher(model, data, mode, batch_size=BS, generator=gen(3))
        try:
            assert_fisher_close(got, ref, model)
        except AssertionError as e:
            raise AssertionError(f"data form {name!r}: {e}") from e


def test_pair_default_batch_size_exact() -> None:
    # exact does not depend on how the data is batched: a pair with the default batch_size works.
    model, x, y = b_embed()
    ref = reference_fisher(model, split_batches(x, y, BS), "exact")
    assert_fisher_close(diagonal_fisher(model, (x, y), "exact"), ref, model)
    assert_fisher_close(diagonal_fisher(model, x, "exact", batch_size=1), ref, model)


@pytest.mark.parametrize("mode", ["exact", "empirical", "batched"])
@pytest.mark.parametrize("k", [1, 13, 15])
def test_max_samples_first_k(mode: str, k: int) -> None:
    model, x, y = b_gru()
    ref = reference_fisher(model, split_batches(x[:k], y[:k], BS), mode)
    for data in (split_batches(x, y, BS), (x, y)):
        got = diagonal_fisher(model, data, mode, max_samples=k, batch_size=BS)
        assert_fisher_close(got, ref, model)
    # Not the same as using everything (so max_samples really did something).
    full = diagonal_fisher(model, split_batches(x, y, BS), mode)
    assert max(rel_err(full[n], ref[n]) for n in ref) > 1e-3


def test_max_samples_sample_mode_batch_boundary() -> None:
    model, x, y = b_mlp()
    ref = reference_fisher(model, split_batches(x[:10], y[:10], BS), "sample", generator=gen(9))
    got = diagonal_fisher(model, split_batches(x, y, BS), "sample", max_samples=10, generator=gen(9))
    assert_fisher_close(got, ref, model)


@pytest.mark.parametrize("mode", MODES)
def test_max_samples_larger_than_data(mode: str) -> None:
    model, x, y = b_mlp()
    ref = reference_fisher(model, split_batches(x, y, BS), mode, generator=gen())
    got = diagonal_fisher(model, split_batches(x, y, BS), mode, max_samples=10 * N, generator=gen())
    assert_fisher_close(got, ref, model)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_sample_seed_reproducible(likelihood: str) -> None:
    model, x, y = b_mlp() if likelihood == "categorical" else b_gauss_mlp()
    kw: dict[str, object] = {"likelihood": likelihood, "batch_size": BS}
    a = diagonal_fisher(model, x, "sample", generator=gen(11), **kw)
    b = diagonal_fisher(model, x, "sample", generator=gen(11), **kw)
    c = diagonal_fisher(model, x, "sample", generator=gen(12), **kw)
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.allclose(a[k], c[k], rtol=1e-6, atol=0) for k in a)
    # No generator: still a valid Fisher (finite, non-negative, right shapes).
    d = diagonal_fisher(model, x, "sample", **kw)
    for n, p in model.named_parameters():
        assert d[n].shape == p.shape and torch.isfinite(d[n]).all() and (d[n] >= 0).all()


def test_batched_differs_from_empirical_unless_batch_size_one() -> None:
    model, x, y = b_cnn2d()
    emp = diagonal_fisher(model, (x, y), "empirical", batch_size=6)
    bat = diagonal_fisher(model, (x, y), "batched", batch_size=6)
    assert max(rel_err(bat[k], emp[k]) for k in emp) > 1e-2
    bat1 = diagonal_fisher(model, (x, y), "batched", batch_size=1)
    bat1_list = diagonal_fisher(model, split_batches(x, y, 1), "batched")
    emp1 = diagonal_fisher(model, split_batches(x, y, 7), "empirical")
    for k in emp:
        assert rel_err(bat1[k], emp[k]) < 1e-10, k
        assert rel_err(bat1_list[k], emp[k]) < 1e-10, k
        assert rel_err(emp1[k], emp[k]) < 1e-10, k  # empirical does not depend on batching


@pytest.mark.parametrize("mode", MODES)
def test_under_no_grad_and_no_leftover_hooks(mode: str) -> None:
    """Callable inside torch.no_grad(); leaves no hooks behind; a second call is identical."""
    model, x, y = b_bn2d_gn()
    calls: list[int] = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(1))

    def hook_counts() -> list[tuple[int, int, int, int]]:
        return [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for m in model.modules()
        ]

    counts = hook_counts()
    ref = reference_fisher(model, split_batches(x, y, BS), mode, generator=gen())
    with torch.no_grad():
        got = diagonal_fisher(model, (x, y), mode, batch_size=BS, generator=gen())
    assert_fisher_close(got, ref, model)
    assert hook_counts() == counts
    again = diagonal_fisher(model, (x, y), mode, batch_size=BS, generator=gen())
    for k in got:
        assert torch.allclose(again[k], got[k], rtol=1e-12, atol=0), k
    calls.clear()
    model(x)
    assert calls == [1]  # the user's hook is still registered and still fires once per call


def test_fisher_nonnegative_and_detached() -> None:
    model, x, y = b_attention()
    for mode in MODES:
        f = diagonal_fisher(model, (x, y), mode, generator=gen())
        for k, v in f.items():
            assert (v >= 0).all(), (mode, k)
            assert v.grad_fn is None and not v.requires_grad, (mode, k)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def _small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(40)
    return (
        nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT),
        torch.randn(10, 5, dtype=DT),
        torch.randint(0, 3, (10,)),
    )


def test_error_unknown_mode() -> None:
    model, x, y = _small()
    with pytest.raises(ValueError, match=r"(?i)mode"):
        diagonal_fisher(model, (x, y), "fishy")


def test_error_unknown_likelihood() -> None:
    model, x, y = _small()
    with pytest.raises(ValueError, match=r"(?i)likelihood"):
        diagonal_fisher(model, (x, y), "exact", likelihood="poisson")


EMPTY = r"(?i)empty|no (data|samples|batches)|zero samples"


@pytest.mark.parametrize("form", ["list", "pair", "tensor", "dataloader"])
def test_error_empty_data(form: str) -> None:
    model, x, y = _small()
    data = {
        "list": [],
        "pair": (x[:0], y[:0]),
        "tensor": x[:0],
        "dataloader": DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4),
    }[form]
    with pytest.raises(ValueError, match=EMPTY):
        diagonal_fisher(model, data, "exact")


NONFINITE = r"(?i)nan|inf|finite"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", MODES)
def test_error_nonfinite_inputs(bad: float, mode: str) -> None:
    model, x, y = _small()
    x = x.clone()
    x[7, 2] = bad  # in the second batch
    with pytest.raises(ValueError, match=NONFINITE):
        diagonal_fisher(model, split_batches(x, y, 4), mode, generator=gen())


class BadOutput(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        # A finite input produces a non-finite logit for samples whose first feature is > 0.
        bad = (x[:, :1] > 0).to(out.dtype) * torch.tensor([1.0, 0.0, 0.0], dtype=out.dtype)
        return torch.where(bad > 0, torch.full_like(out, self.value), out)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("mode", MODES)
def test_error_nonfinite_model_output(value: float, mode: str) -> None:
    _, x, y = _small()
    x[:, 0] = -1.0
    x[6, 0] = 1.0
    model = BadOutput(value).to(DT)
    with pytest.raises(ValueError, match=NONFINITE):
        diagonal_fisher(model, split_batches(x, y, 4), mode, generator=gen())


@pytest.mark.parametrize("mode", ["empirical", "batched"])
def test_error_float_labels(mode: str) -> None:
    model, x, y = _small()
    with pytest.raises(ValueError, match=r"(?i)label|integer|dtype"):
        diagonal_fisher(model, (x, y.to(DT)), mode)


@pytest.mark.parametrize("bad", [3, 7, -1])
@pytest.mark.parametrize("mode", ["empirical", "batched"])
def test_error_labels_out_of_range(bad: int, mode: str) -> None:
    model, x, y = _small()
    y = y.clone()
    y[6] = bad
    with pytest.raises(ValueError, match=r"(?i)label|range"):
        diagonal_fisher(model, split_batches(x, y, 4), mode)


@pytest.mark.parametrize("shape", ["1d", "3d"])
@pytest.mark.parametrize("mode", MODES)
def test_error_bad_logit_shape(shape: str, mode: str) -> None:
    _, x, y = _small()
    torch.manual_seed(41)
    if shape == "1d":
        model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)).to(DT)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.Unflatten(1, (2, 3))).to(DT)
    with pytest.raises(ValueError, match=r"(?i)shape|dim|logits"):
        diagonal_fisher(model, (x, y), mode, generator=gen())


@pytest.mark.parametrize("mode", ["empirical", "batched"])
def test_error_labels_missing(mode: str) -> None:
    model, x, _ = _small()
    for data in (x, [x[:4], x[4:8], x[8:]]):
        with pytest.raises(ValueError, match=r"(?i)label"):
            diagonal_fisher(model, data, mode)


@pytest.mark.parametrize("k", [0, -3])
def test_error_max_samples_not_positive(k: int) -> None:
    model, x, y = _small()
    with pytest.raises(ValueError, match=r"(?i)max_samples"):
        diagonal_fisher(model, (x, y), "exact", max_samples=k)


@pytest.mark.parametrize("mode", MODES)
def test_error_batchnorm_without_running_stats(mode: str) -> None:
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).to(
        DT
    )
    _, x, y = _small()
    with pytest.raises(ValueError, match=r"(?i)batch.?norm|running"):
        diagonal_fisher(model, (x, y), mode, generator=gen())


def test_error_gaussian_target_shape() -> None:
    model, x, y = b_gauss_mlp()
    with pytest.raises(ValueError, match=r"(?i)shape"):
        diagonal_fisher(model, (x, y[:, :2]), "empirical", likelihood="gaussian")


def test_sample_gaussian_noise_rule_large_batches() -> None:
    """eps = torch.randn(f.shape, generator=g, dtype=f.dtype) per batch, with batches of 8 x 3
    outputs: large enough that a different draw (e.g. another dtype's stream) is detected."""
    model, x, y = b_gauss_mlp()
    batches = split_batches(x, y, 8)
    kw: dict[str, object] = {"likelihood": "gaussian", "sigma": 0.7}
    got = diagonal_fisher(model, batches, "sample", generator=gen(4), **kw)
    ref = reference_fisher(model, batches, "sample", generator=gen(4), **kw)
    assert_fisher_close(got, ref, model)
    got_pair = diagonal_fisher(model, x, "sample", batch_size=8, generator=gen(4), **kw)
    assert_fisher_close(got_pair, ref, model)
