"""The run's optimiser: the multi-tensor implementations give the per-tensor loop's parameters bit
for bit (what makes them a free speed-up: recorded runs still reproduce exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ewc.runtime import make_optimizer


@pytest.mark.parametrize(("name", "momentum"), [("adam", 0.0), ("sgd", 0.0), ("sgd", 0.9)])
def test_optimizer_matches_the_per_tensor_loop_bit_for_bit(name: str, momentum: float) -> None:
    torch.set_num_threads(1)

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))

    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 20, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(30)
    ]
    ours, ref = net(), net()
    opt = make_optimizer(name, ours.parameters(), 1e-2, momentum)
    if name == "adam":
        loop = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    else:
        loop = torch.optim.SGD(ref.parameters(), lr=1e-2, momentum=momentum, foreach=False)
    for x, y in batches:
        for model, o in ((ours, opt), (ref, loop)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    assert not torch.equal(next(ours.parameters()), next(net().parameters()))  # it did train
