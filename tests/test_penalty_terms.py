"""The penalty's term API (keys, drop, pop/restore, anchors/precisions, memory) against references.

References are either float64 hand computations of λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² from
tensors chosen here, or, for "bit-identical" claims, a fresh regulariser consolidated with the
same anchors and Fishers in the same order.
"""

from __future__ import annotations

import pytest
import torch
from penalty_helpers import Params, random_tasks, set_params, snapshot, tiny_model
from torch import Tensor, nn

from ewc import EWC, L2

torch.set_num_threads(1)


def consolidate_all(reg: EWC, tasks: list[tuple[Params, Params]], keys: list | None = None) -> None:
    """Consolidate each (anchor, F) at its anchor, then put the parameters back."""
    now = snapshot(reg.model)
    for k, (anchor, fisher) in enumerate(tasks):
        set_params(reg.model, anchor)
        reg.consolidate(fisher_diag=fisher, **({} if keys is None else {"key": keys[k]}))
    set_params(reg.model, now)


def hand_value(model: nn.Module, lam: float, tasks: list[tuple[Params, Params]]) -> float:
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    total = sum(float((f[n].double() * (theta[n] - a[n].double()) ** 2).sum()) for a, f in tasks for n in a)
    return lam / 2.0 * total


def value_and_grads(reg: EWC | L2) -> tuple[Tensor, list[Tensor]]:
    reg.model.zero_grad(set_to_none=True)
    value = reg.penalty()
    value.backward()
    grads = [p.grad.clone() for p in reg.model.parameters()]
    reg.model.zero_grad(set_to_none=True)
    return value.detach(), grads


def assert_bit_identical(a: EWC | L2, b: EWC | L2) -> None:
    va, ga = value_and_grads(a)
    vb, gb = value_and_grads(b)
    assert torch.equal(va, vb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def fresh(model: nn.Module, tasks: list, mode: str = "separate", keys: list | None = None) -> EWC:
    reg = EWC(model, lam=3.0, mode=mode)
    consolidate_all(reg, tasks, keys)
    return reg


# ------------------------------------------------------------------------------------- keys


def test_default_keys_are_the_running_task_count() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3)
    assert fresh(model, tasks).keys == (0, 1, 2)
    assert fresh(model, tasks, mode="online").keys == (2,)  # the merged term: its latest key
    l2 = L2(model)
    l2.consolidate()
    l2.consolidate(key="b")
    l2.consolidate()
    assert l2.keys == (0, "b", 2)
    assert EWC(model).keys == ()


def test_explicit_keys_and_bad_or_duplicate_keys() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3)
    reg = fresh(model, tasks[:2], keys=["a", 7])
    assert reg.keys == ("a", 7)
    before = value_and_grads(reg)[0]
    for bad in (True, 1.5, ("t",)):
        with pytest.raises(ValueError, match="int or a str"):
            reg.consolidate(fisher_diag=tasks[2][1], key=bad)
    with pytest.raises(ValueError, match="already a term with key 7"):
        reg.consolidate(fisher_diag=tasks[2][1], key=7)
    with pytest.raises(ValueError, match="already a term with key 'a'"):
        reg.consolidate(fisher_diag=tasks[2][1], key="a")
    assert reg.keys == ("a", 7) and reg.num_tasks == 2 and torch.equal(value_and_grads(reg)[0], before)
    # the default after explicit int keys never collides
    reg.consolidate(fisher_diag=tasks[2][1])
    assert reg.keys == ("a", 7, 8)
    online = fresh(model, tasks[:2], mode="online", keys=[5, 5])  # online: the merged term is rekeyed
    assert online.keys == (5,) and online.num_tasks == 2


def test_ewc_checks_the_key_before_computing_a_fisher() -> None:
    model = tiny_model()
    reg = EWC(model)
    reg.consolidate(fisher_diag={n: torch.ones_like(p) for n, p in model.named_parameters()}, key=0)
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="already a term"):
        reg.consolidate(data, key=0)
    reg.consolidate(data, key=1)
    assert reg.keys == (0, 1)


# -------------------------------------------------------------------------- drop, pop, restore


@pytest.mark.parametrize("which", [0, 1, 2])
def test_drop_leaves_exactly_the_other_terms(which: int) -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3, seed=1)
    reg = fresh(model, tasks)
    reg.drop(which)
    rest = [t for k, t in enumerate(tasks) if k != which]
    assert reg.keys == tuple(k for k in range(3) if k != which) and reg.num_tasks == 2
    value, _ = value_and_grads(reg)
    assert value.item() == pytest.approx(hand_value(model, 3.0, rest), rel=1e-6)
    assert_bit_identical(reg, fresh(model, rest))
    reg.consolidate(fisher_diag=tasks[which][1])
    # the default key: the task count (2), or one past the largest key when that one is taken
    assert reg.keys[-1] == (2 if which == 2 else 3) and len(set(reg.keys)) == 3


def test_drop_the_last_term_gives_zero() -> None:
    model = tiny_model()
    reg = fresh(model, random_tasks(model, 1))
    reg.drop(0)
    assert reg.keys == () and reg.num_tasks == 0 and reg.penalty().item() == 0.0


def test_unknown_key_and_online_mode_are_clear_errors() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 2)
    reg = fresh(model, tasks)
    for call in (reg.drop, reg.pop, reg.anchors, reg.precisions):
        with pytest.raises(ValueError, match="no term with key 5"):
            call(5)
    online = fresh(model, tasks, mode="online")
    before = value_and_grads(online)[0]
    term = reg.pop(1)
    for call in (online.drop, online.pop, lambda k: online.restore(k, term)):
        with pytest.raises(ValueError, match="mode='separate'"):
            call(1)
    assert online.keys == (1,) and torch.equal(value_and_grads(online)[0], before)


def test_pop_then_restore_the_newest_term_is_bit_identical() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3, seed=2)
    reg, ref = fresh(model, tasks), fresh(model, tasks)
    term = reg.pop(2)
    assert set(term) == {"anchor", "fisher"}
    for n in tasks[2][0]:
        assert torch.equal(term["anchor"][n], tasks[2][0][n])
        assert torch.equal(term["fisher"][n], tasks[2][1][n])
    assert value_and_grads(reg)[0].item() == pytest.approx(hand_value(model, 3.0, tasks[:2]), rel=1e-6)
    reg.restore(2, term)
    assert reg.keys == (0, 1, 2) and reg.num_tasks == 3
    assert_bit_identical(reg, ref)


def test_restore_of_a_middle_term_appends_it() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3, seed=3)
    reg = fresh(model, tasks)
    before = value_and_grads(reg)[0]
    reg.restore("back", reg.pop(0))
    assert reg.keys == (1, 2, "back")
    reordered = fresh(model, [tasks[1], tasks[2], tasks[0]], keys=[1, 2, "back"])
    assert_bit_identical(reg, reordered)
    assert value_and_grads(reg)[0].item() == pytest.approx(before.item(), rel=1e-6)


def test_restore_copies_and_checks_its_input() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 2, seed=4)
    reg = fresh(model, tasks)
    term = reg.pop(1)
    with pytest.raises(ValueError, match="already a term with key 0"):
        reg.restore(0, term)
    bad = {"anchor": term["anchor"], "fisher": {n: -f for n, f in term["fisher"].items()}}
    with pytest.raises(ValueError, match="negative"):
        reg.restore(1, bad)
    with pytest.raises(ValueError, match="restored term must have keys"):
        reg.restore(1, {"anchor": term["anchor"]})
    with pytest.raises(ValueError, match="restored term must be a dict"):
        reg.restore(1, [term])
    assert reg.keys == (0,)
    reg.restore(1, term)
    value = value_and_grads(reg)[0]
    for f in term["fisher"].values():
        f.mul_(10.0)  # the caller's tensors are not the stored ones
    assert torch.equal(value_and_grads(reg)[0], value)
    assert value.item() == pytest.approx(hand_value(model, 3.0, tasks), rel=1e-6)


# ---------------------------------------------------------------------------------- reading


def test_anchors_and_precisions_per_key_and_merged() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 2, seed=5)
    reg = fresh(model, tasks, keys=["x", "y"])
    for key, (anchor, fisher) in zip(("x", "y"), tasks, strict=True):
        got_a, got_f = reg.anchors(key), reg.precisions(key)
        assert set(got_a) == set(got_f) == set(anchor)
        assert all(torch.equal(got_a[n], anchor[n]) and torch.equal(got_f[n], fisher[n]) for n in anchor)
    # no key, separate: the one quadratic the penalty evaluates, Σ F_k and the F-weighted mean anchor
    (a1, f1), (a2, f2) = tasks
    for n in a1:
        torch.testing.assert_close(reg.precisions()[n], f1[n] + f2[n])
        mean = (f1[n].double() * a1[n] + f2[n].double() * a2[n]) / (f1[n].double() + f2[n])
        torch.testing.assert_close(reg.anchors()[n].double(), mean)
    # online, γ = 0.5: one merged term, anchored at the latest parameters
    online = EWC(model, mode="online", gamma=0.5)
    consolidate_all(online, tasks)
    (key,) = online.keys
    for n in a1:
        torch.testing.assert_close(online.precisions()[n], 0.5 * f1[n] + f2[n])
        assert torch.equal(online.precisions(key)[n], online.precisions()[n])
        assert torch.equal(online.anchors()[n], a2[n])
    assert EWC(model).anchors() == {} and EWC(model).precisions() == {}


def test_reading_follows_a_model_moved_to_another_dtype() -> None:
    model = tiny_model()
    reg = fresh(model, random_tasks(model, 1))
    model.double()
    assert all(t.dtype == torch.float64 for t in reg.anchors(0).values())
    assert all(t.dtype == torch.float64 for t in reg.precisions().values())


def test_memory_bytes_counts_the_stored_terms() -> None:
    model = tiny_model()
    n_params = sum(p.numel() for p in model.parameters())
    tasks = random_tasks(model, 3)
    assert fresh(model, tasks).memory_bytes() == 3 * 2 * 4 * n_params
    assert fresh(model, tasks, mode="online").memory_bytes() == 2 * 4 * n_params
    assert EWC(model).memory_bytes() == 0


# ------------------------------------------------------------------------------------ state


def test_keys_travel_with_the_state() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3, seed=6)
    reg = fresh(model, tasks, keys=[4, "b", 9])
    reg.drop("b")
    state = reg.state_dict()
    assert state["keys"] == [4, 9] and state["num_tasks"] == 2
    other = EWC(model, lam=3.0)
    other.load_state_dict(state)
    assert other.keys == (4, 9)
    assert_bit_identical(other, reg)
    other.consolidate(fisher_diag=tasks[1][1])
    assert other.keys == (4, 9, 10)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_states_saved_without_keys_still_load(mode: str) -> None:
    model = tiny_model()
    reg = fresh(model, random_tasks(model, 3, seed=7), mode=mode)
    old = {k: v for k, v in reg.state_dict().items() if k != "keys"}  # the format before keys
    other = EWC(model, lam=3.0, mode=mode)
    other.load_state_dict(old)
    assert other.keys == ((0, 1, 2) if mode == "separate" else (2,))
    assert_bit_identical(other, reg)


@pytest.mark.parametrize(
    ("keys", "match"),
    [([0, 0], "duplicates"), ([0], "one key per task"), ("01", "list"), ([0, True], "int or a str")],
)
def test_bad_saved_keys_are_rejected_and_change_nothing(keys: object, match: str) -> None:
    model = tiny_model()
    state = fresh(model, random_tasks(model, 2)).state_dict()
    target = EWC(model, lam=3.0)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict({**state, "keys": keys})
    assert target.keys == () and target.num_tasks == 0


# ---------------------------------------------------------------- methods on top of the terms


def test_methods_key_terms_by_task_and_forget_a_returning_task() -> None:
    from ewc.methods import Compose, EWCMethod, L2Method, Method, ReplayMethod

    model = tiny_model()
    data = (torch.randn(8, 3), torch.tensor([0, 1] * 4))

    class T:  # the fields after_task reads
        x_train, y_train = data

    ewc = EWCMethod(lam=1.0)
    both = Compose(ewc, ReplayMethod(capacity=4))
    both.setup(model)
    for index in (3, 1):
        both.after_task(index, T())
    assert ewc.reg.keys == (3, 1)
    ewc.after_task(1, T())  # ends again without forget_task: one more term, the next free key
    assert ewc.reg.keys == (3, 1, 4)  # the default key: max(task count, largest int key + 1)
    ewc.reg.drop(4)
    both.forget_task(3)  # Compose forwards to its parts
    assert ewc.reg.keys == (1,)
    both.forget_task(7)  # a task without a term: nothing to drop
    assert ewc.reg.keys == (1,)
    online = EWCMethod(lam=1.0, mode="online")
    online.setup(model)
    online.after_task(0, T())
    online.after_task(1, T())
    online.forget_task(1)  # online: the merged term cannot be split; nothing happens
    assert online.reg.keys == (1,) and online.reg.num_tasks == 2
    l2 = L2Method(lam=1.0)
    l2.setup(model)
    l2.after_task(5, T())
    assert l2.reg.keys == (5,)
    l2.forget_task(5)
    assert l2.reg.keys == ()
    Method().forget_task(0)  # the default hook does nothing
