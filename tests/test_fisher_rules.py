"""Standard layers must get their fast per-layer rule, registered layers their user rule, anything else
the torch.func fallback."""

import pytest
import torch
from torch import nn

from ewc import fisher_rules as R


class MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # overridden: the Linear rule may not apply
        return super().forward(x) * 2


class PlainConv(nn.Conv2d):  # keeps forward and _conv_forward: the conv rule applies
    pass


class OwnConvForward(nn.Conv2d):  # overrides a method the conv rule follows
    def _conv_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, w, b)


@pytest.mark.parametrize(
    ("module", "rule"),
    [
        (nn.Linear(3, 4), R.LinearRule),
        (nn.modules.linear.NonDynamicallyQuantizableLinear(3, 4), R.LinearRule),
        (nn.Conv1d(2, 4, 3), R.ConvRule),
        (nn.Conv2d(2, 4, 3, groups=2), R.ConvRule),
        (nn.Conv3d(2, 4, 3), R.ConvRule),
        (nn.Embedding(5, 3), R.EmbeddingRule),
        (nn.LayerNorm(4), R.LayerNormRule),
        (nn.GroupNorm(2, 4), R.GroupNormRule),
        (nn.BatchNorm1d(4), R.BatchNormRule),
        (nn.BatchNorm2d(4), R.BatchNormRule),
        (MyLinear(3, 4), R.FuncRule),
        (nn.ConvTranspose2d(2, 4, 3), R.FuncRule),
        (nn.Embedding(5, 3, max_norm=1.0), R.FuncRule),
        (nn.Bilinear(2, 3, 4), R.FuncRule),
        (nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), R.FuncRule),
        (PlainConv(2, 4, 3), R.ConvRule),
        (OwnConvForward(2, 4, 3), R.FuncRule),
        (nn.SyncBatchNorm(4), R.FuncRule),  # overrides _BatchNorm.forward
        (nn.Embedding(5, 3, scale_grad_by_freq=True), R.FuncRule),
        (nn.InstanceNorm2d(3, affine=True), R.FuncRule),
    ],
)
def test_rule_choice(module: nn.Module, rule: type) -> None:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    assert type(R.rule_for(module, names)) is rule


class Scale(nn.Module):
    """A user's layer: y = x * weight + bias, one weight and bias per feature (the last axis)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class ScaleRule(R.Rule):
    """Per-sample gradients of Scale: Σ over positions of g·x (weight) and of g (bias)."""

    def per_sample(self, module: nn.Module, call: R.Call, n: slice | None = None) -> dict[str, torch.Tensor]:
        x, g = call.args[0], call.grads[0]  # x [N, ..., d]; g [K, N, ..., d]
        if n is not None:
            x, g = x[n], g[:, n]
        k, nb, d = g.shape[0], g.shape[1], g.shape[-1]
        return {
            "weight": (g * x).reshape(k, nb, -1, d).sum(2),
            "bias": g.reshape(k, nb, -1, d).sum(2),
        }


class WithScale(nn.Module):
    """Linear → Scale → tanh → Linear, Scale called ``calls`` times (twice: shared contributions)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.a, self.s, self.b, self.calls = nn.Linear(5, 6), Scale(6), nn.Linear(6, 3), calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        for _ in range(self.calls):
            h = torch.tanh(self.s(h))
        return self.b(h)


@pytest.fixture
def own_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations go into a copy of the rule table, dropped after the test."""
    monkeypatch.setattr(R, "RULES", dict(R.RULES))


@pytest.mark.parametrize("calls", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("mode", ["exact", "sample", "empirical"])
def test_registered_rule_matches_reference(
    own_table: None, mode: str, calls: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's rule, registered for a user's layer, is used and gives the per-sample Fisher."""
    from conftest import assert_fisher_close, reference_fisher, split_batches

    from ewc import diagonal_fisher

    R.register_rule(Scale, ScaleRule)
    assert type(R.rule_for(Scale(2), ["weight", "bias"])) is ScaleRule
    used = []
    original = ScaleRule.per_sample
    monkeypatch.setattr(ScaleRule, "per_sample", lambda self, *a: used.append(1) or original(self, *a))
    torch.manual_seed(8)
    model = WithScale(calls).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    batches = split_batches(x, y, 4)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    got = diagonal_fisher(model, batches, mode, generator=gen())
    assert used
    assert_fisher_close(got, reference_fisher(model, batches, mode, generator=gen()), model)


def test_registered_rule_follows_forward(own_table: None) -> None:
    """Subclasses of a registered type get its rule unless they override its forward."""

    class Kept(Scale):
        pass

    class Overridden(Scale):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) ** 2

    R.register_rule(Scale, ScaleRule)
    names = ["weight", "bias"]
    assert type(R.rule_for(Kept(2), names)) is ScaleRule
    assert type(R.rule_for(Overridden(2), names)) is R.FuncRule


def test_register_rule_errors(own_table: None) -> None:
    with pytest.raises(ValueError, match="Linear already has a rule"):
        R.register_rule(nn.Linear, ScaleRule)
    R.register_rule(Scale, ScaleRule)
    with pytest.raises(ValueError, match="Scale already has a rule"):
        R.register_rule(Scale, ScaleRule)
    with pytest.raises(TypeError, match="subclass of nn.Module"):
        R.register_rule(int, ScaleRule)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subclass of nn.Module"):
        R.register_rule(Scale(2), ScaleRule)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subclass of ewc.fisher_rules.Rule"):
        R.register_rule(MyLinear, lambda names: ScaleRule(names))  # type: ignore[arg-type]

    class Helper(ScaleRule):
        follows = ("forward", "_helper")

    with pytest.raises(TypeError, match="_helper"):
        R.register_rule(MyLinear, Helper)


class InPlace(nn.Module):
    """In-place ops on a Linear output the hooks hold (add_, then ReLU(inplace))."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.add_(1.0)
        return self.c(torch.tanh(self.b(self.act(h))))


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_in_place_ops_after_capture(mode: str) -> None:
    from conftest import assert_fisher_close, reference_fisher, split_batches

    from ewc import diagonal_fisher

    torch.manual_seed(3)
    model = InPlace().double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    batches = split_batches(x, y, 5)
    assert_fisher_close(diagonal_fisher(model, batches, mode), reference_fisher(model, batches, mode), model)


CONV_GEOMETRIES = {
    "2d_stride_dilation": lambda: nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2),
    "2d_groups_rect": lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2),
    "2d_same_reflect": lambda: nn.Conv2d(1, 3, 4, padding="same", padding_mode="reflect"),
    "2d_circular_no_bias": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False),
    "2d_valid_5x5": lambda: nn.Conv2d(1, 2, 5, padding="valid"),
    "1d_same_dilated": lambda: nn.Conv1d(3, 4, 3, padding="same", dilation=2),
    "1d_replicate_stride": lambda: nn.Conv1d(2, 4, 4, stride=3, padding=2, padding_mode="replicate"),
    "3d": lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1),
}


class ConvHead(nn.Module):
    """One convolution under test, then tanh and a Linear head on the flattened output."""

    def __init__(self, conv: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            out = conv(torch.zeros(1, *shape))
        self.head = nn.Linear(out[0].numel(), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("thin", [R.THIN_PATCH, 0], ids=["thin_path", "grouped_path"])
@pytest.mark.parametrize("mode", ["exact", "empirical"])
@pytest.mark.parametrize("geometry", list(CONV_GEOMETRIES))
def test_conv_paths_match_reference(
    geometry: str, mode: str, thin: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways to the per-sample conv weight gradients (unfold + bmm for thin convolutions when
    gradients arrive in several passes, one grouped convolution_backward otherwise) agree with the
    per-sample loop for every padding kind, stride, dilation, groups and dimension."""
    from conftest import assert_fisher_close, reference_fisher, split_batches

    from ewc import diagonal_fisher

    torch.manual_seed(5)
    conv = CONV_GEOMETRIES[geometry]()
    shape = (conv.in_channels, *([7] * len(conv.kernel_size)))
    model = ConvHead(conv, shape).double()
    x, y = torch.randn(11, *shape, dtype=torch.float64), torch.randint(0, 3, (11,))
    batches = split_batches(x, y, 6)
    monkeypatch.setattr(R, "THIN_PATCH", thin)
    monkeypatch.setattr(R, "THIN_MIN_OUT", 1)  # the thin path on every geometry (few channels)
    used = []
    original = R.ConvRule._thin
    monkeypatch.setattr(R.ConvRule, "_thin", lambda self, *a: used.append(1) or original(self, *a))
    got = diagonal_fisher(model, batches, mode)
    assert_fisher_close(got, reference_fisher(model, batches, mode), model)
    thin_expected = thin > 0 and mode == "exact" and not geometry.startswith("3d")
    assert bool(used) == thin_expected


@pytest.mark.parametrize(
    ("conv", "passes", "thin"),
    [
        (nn.Conv2d(1, 32, 3, padding=1), 9, True),  # a first layer, exact Fisher
        (nn.Conv2d(3, 8, 3), 2, True),  # patch 27, 8 outputs
        (nn.Conv1d(2, 16, 5), 9, True),
        (nn.Conv2d(1, 32, 3, padding=1), 1, False),  # one pass: the unfold is not repaid
        (nn.Conv2d(8, 16, 3), 9, False),  # patch 72
        (nn.Conv2d(32, 32, 3, groups=32), 9, False),  # depthwise: a batched matrix-vector product
        (nn.Conv2d(4, 8, 3, groups=2), 9, False),  # 4 outputs per group
        (nn.Conv3d(1, 8, 3), 9, False),  # no 3-D unfold
    ],
)
def test_thin_path_choice(conv: nn.Module, passes: int, thin: bool) -> None:
    call = R.Call((torch.zeros(1),), {}, [])
    call.passes = passes
    assert R.ConvRule._is_thin(conv, call) is thin


def test_thin_conv_unfolds_once_per_call() -> None:
    """The unfolded input is built once for a call and reused by all K passes of ``exact``."""
    from ewc import diagonal_fisher

    torch.manual_seed(6)
    model = ConvHead(nn.Conv2d(1, 8, 3, padding=1), (1, 6, 6))
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    calls = []
    original = R.ConvRule._unfold
    R_unfold = lambda self, *a: calls.append(1) or original(self, *a)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R.ConvRule, "_unfold", R_unfold)
        diagonal_fisher(model, [(x[:5], y[:5]), (x[5:], y[5:])], "exact")
    assert len(calls) == 2  # one per batch, not one per class (K = 2 passes each)


@pytest.mark.parametrize("thin", [R.THIN_PATCH, 0], ids=["thin_path", "grouped_path"])
@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_conv_under_autocast_bfloat16(mode: str, thin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 output gradients meet a float32 input (autocast keeps the first layer's input
    float32): both paths run, and the sums stay float32 and close to float32's."""
    from conftest import rel_err

    from ewc import diagonal_fisher

    monkeypatch.setattr(R, "THIN_PATCH", thin)
    torch.manual_seed(7)
    model = ConvHead(nn.Conv2d(1, 8, 3, padding=1), (1, 6, 6))
    x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
    plain = diagonal_fisher(model, (x, y), mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = diagonal_fisher(model, (x, y), mode)
    for k in plain:
        assert low[k].dtype == torch.float32
        assert rel_err(low[k], plain[k]) < 0.3, k


def test_chunk_budgets_grow_off_the_cpu() -> None:
    """Cache-sized chunks on the CPU; on an accelerator (here the meta device stands in for one)
    at least DEVICE_CHUNK_BYTES, so that a batch is a few kernel launches, not thousands."""
    from ewc.fisher_rule_base import DEVICE_CHUNK_BYTES, chunks

    per_sample = 2**20
    assert len(chunks(256, per_sample, 8 * 2**20)) == 32
    assert len(chunks(256, per_sample, 8 * 2**20, like=torch.empty(1))) == 32
    off = chunks(256, per_sample, 8 * 2**20, like=torch.empty(1, device="meta"))
    assert len(off) == -(-256 * per_sample // DEVICE_CHUNK_BYTES) == 1
    assert off == [slice(0, 256)]
