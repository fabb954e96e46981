"""Standard layers must get their fast per-layer rule, anything else the torch.func fallback."""

import pytest
import torch
from torch import nn

from ewc import fisher_rules as R


class MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # overridden: the Linear rule may not apply
        return super().forward(x) * 2


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
    ],
)
def test_rule_choice(module: nn.Module, rule: type) -> None:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    assert type(R.rule_for(module, names)) is rule


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
