"""A task that ends again (a loop that revisits tasks) adds a term, as before the term keys."""

from __future__ import annotations

import pytest
import torch

from ewc.data import Task
from ewc.methods import make_method


@pytest.mark.parametrize("name", ["ewc", "l2", "online-ewc"])
def test_a_task_ending_twice_adds_a_term_under_the_next_key(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    task = Task("t", 0, x, y, x, y, x, y, (0, 1, 2))
    method = make_method(name)
    method.setup(model)
    for index in (0, 1, 0):
        method.before_task(index, task)
        method.after_task(index, task)
        with torch.no_grad():
            model[0].weight.add_(0.1)
    if name == "online-ewc":
        assert len(method.reg.keys) == 1
    else:
        assert method.reg.keys == (0, 1, 2)  # the third term takes the next free key
        method.forget_task(0)  # a returning task drops the term it owns by its index
        assert method.reg.keys == (1, 2)
    assert float(method.loss(torch.zeros(())).detach()) > 0


def test_restore_needs_a_key() -> None:
    from ewc.penalty import EWC

    model = torch.nn.Linear(3, 2)
    reg = EWC(model, fisher="empirical")
    reg.consolidate((torch.randn(4, 3), torch.randint(0, 2, (4,))))
    term = reg.pop(0)
    with pytest.raises(ValueError, match="restore needs the term's key"):
        reg.restore(None, term)  # type: ignore[arg-type]
    assert reg.keys == ()
