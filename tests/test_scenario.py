"""An independent check of ewc.scenario on a split-like setup, against hand-written expectations.

Outputs are hand-made (``out[n, c] = 10 n + c``) so that every selected column can be read off a
value; every expected column list and target below is written out by hand from the definitions
in van de Ven, Tuytelaars & Tolias (2022), not computed with the module's own logic.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ewc.scenario import SCENARIOS, Scenario

torch.set_num_threads(1)

SPLIT = [(0, 1), (2, 3), (4, 5)]  # three split-MNIST-like tasks


def outputs(n: int, width: int = 6) -> torch.Tensor:
    """out[n, c] = 10 n + c: a column's index is the value's last digit."""
    return (10 * torch.arange(n).view(-1, 1) + torch.arange(width).view(1, -1)).float()


def labels(*ys: int) -> torch.Tensor:
    return torch.tensor(ys, dtype=torch.long)


def cols_of(logits: torch.Tensor) -> list[int]:
    """The output columns a selection came from (row 0 holds 0, 1, ..., width - 1)."""
    return [int(v) for v in logits[0].tolist()]


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def test_sizes_per_scenario():
    assert SCENARIOS == ("task", "domain", "class")
    for kind, outs in (("task", 6), ("class", 6), ("domain", 2)):
        s = Scenario(kind, SPLIT)
        assert s.kind == kind and s.num_classes == 6 and s.num_outputs == outs
    # domain: as many units as the largest task has classes
    assert Scenario("domain", [(0, 1, 2), (3, 4)]).num_outputs == 3
    # classes need not start at 0 nor be contiguous: the width covers the largest label
    assert Scenario("class", [(7, 3)]).num_outputs == 8


# ---------------------------------------------------------------------------------------------
# Task-incremental: one head per task, targets are positions in the task's class list
# ---------------------------------------------------------------------------------------------


def test_task_view_selects_the_tasks_columns():
    s = Scenario("task", SPLIT)
    out = outputs(3)
    for task, (a, b) in enumerate(SPLIT):
        logits, target = s.view(out, labels(a, b, b), task)
        assert logits.shape == (3, 2)
        assert cols_of(logits) == [a, b]
        assert torch.equal(logits[2], torch.tensor([20.0 + a, 20.0 + b]))
        assert target.tolist() == [0, 1, 1]


def test_task_view_keeps_the_tasks_class_order():
    s = Scenario("task", [(3, 1), (0, 2)])
    logits, target = s.view(outputs(2, 4), labels(1, 3), 0)
    assert cols_of(logits) == [3, 1]
    assert target.tolist() == [1, 0]


def test_task_view_ignores_seen():
    s = Scenario("task", SPLIT)
    logits, _ = s.view(outputs(1), labels(2), 1, seen=2)
    assert cols_of(logits) == [2, 3]


def test_task_cross_entropy_by_hand():
    """The loss on the active head is a 2-way softmax: -log(e^{z_y} / (e^{z_a} + e^{z_b}))."""
    s = Scenario("task", SPLIT)
    out = torch.tensor([[5.0, -1.0, 0.5, 2.0, 9.0, 9.0]])
    logits, target = s.view(out, labels(3), 1)
    expected = -math.log(math.exp(2.0) / (math.exp(0.5) + math.exp(2.0)))
    assert F.cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Class-incremental: one growing head over every class seen so far
# ---------------------------------------------------------------------------------------------


def test_class_view_grows_with_the_tasks():
    s = Scenario("class", SPLIT)
    out = outputs(3)
    logits, target = s.view(out, labels(0, 1, 1), 0)
    assert cols_of(logits) == [0, 1] and target.tolist() == [0, 1, 1]
    logits, target = s.view(out, labels(0, 3, 2), 1)
    assert cols_of(logits) == [0, 1, 2, 3] and target.tolist() == [0, 3, 2]
    logits, target = s.view(out, labels(5, 0, 3), 2)
    assert cols_of(logits) == [0, 1, 2, 3, 4, 5] and target.tolist() == [5, 0, 3]


def test_class_seen_widens_the_head():
    s = Scenario("class", SPLIT)
    out = outputs(2)
    # evaluating task 0 after training task 2: the head covers all classes seen, 0..5
    logits, target = s.view(out, labels(1, 0), 0, seen=2)
    assert cols_of(logits) == [0, 1, 2, 3, 4, 5] and target.tolist() == [1, 0]
    # labels of later tasks are valid once seen
    _, target = s.view(out, labels(4, 5), 0, seen=2)
    assert target.tolist() == [4, 5]
    # seen below the task never narrows it, seen past the last task is clipped
    assert cols_of(s.view(out, labels(2), 1, seen=0)[0]) == [0, 1, 2, 3]
    assert cols_of(s.view(out, labels(2), 1, seen=7)[0]) == [0, 1, 2, 3, 4, 5]
    assert cols_of(s.view(out, labels(0), 0, seen=1)[0]) == [0, 1, 2, 3]


def test_class_view_with_scattered_labels_sorts_the_union():
    s = Scenario("class", [(3, 1), (0, 2)])
    out = outputs(2, 4)
    logits, target = s.view(out, labels(3, 1), 0)
    assert cols_of(logits) == [1, 3] and target.tolist() == [1, 0]
    logits, target = s.view(out, labels(3, 0), 1)
    assert cols_of(logits) == [0, 1, 2, 3] and target.tolist() == [3, 0]


def test_class_rejects_unseen_classes():
    s = Scenario("class", SPLIT)
    with pytest.raises(ValueError, match=r"labels \[2\] are not classes of task 0"):
        s.view(outputs(2), labels(0, 2), 0)
    with pytest.raises(ValueError, match=r"\[4, 5\]"):
        s.view(outputs(3), labels(5, 4, 1), 1)


# ---------------------------------------------------------------------------------------------
# Domain-incremental: one shared head, a label is its position in its task's class list
# ---------------------------------------------------------------------------------------------


def test_domain_maps_labels_to_positions():
    s = Scenario("domain", SPLIT)
    out = outputs(3, 2)
    for task, (a, b) in enumerate(SPLIT):
        logits, target = s.view(out, labels(b, a, b), task)
        assert cols_of(logits) == [0, 1] and logits.shape == (3, 2)
        assert target.tolist() == [1, 0, 1]


def test_domain_positions_follow_the_class_list_order():
    s = Scenario("domain", [(0, 1, 2), (5, 3)])
    assert s.view(outputs(3, 3), labels(2, 0, 1), 0)[1].tolist() == [2, 0, 1]
    assert s.view(outputs(2, 3), labels(3, 5), 1)[1].tolist() == [1, 0]


def test_domain_permuted_like_tasks_keep_their_labels():
    s = Scenario("domain", [tuple(range(10))] * 3)
    y = labels(9, 0, 4)
    for task in range(3):
        logits, target = s.view(outputs(3, 10), y, task)
        assert torch.equal(target, y) and logits.shape == (3, 10)


def test_domain_wider_outputs_use_the_first_units():
    """A model with more units than the shared head: the head is still the first num_outputs."""
    s = Scenario("domain", SPLIT)
    out = outputs(2, 6)
    logits, target = s.view(out, labels(4, 5), 2)
    assert cols_of(logits) == [0, 1] and target.tolist() == [0, 1]
    assert torch.equal(s.head(out, 2), logits)


def test_domain_rejects_other_tasks_labels():
    s = Scenario("domain", SPLIT)
    with pytest.raises(ValueError, match="not classes of task 0"):
        s.view(outputs(1, 2), labels(2), 0)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCENARIOS)
def test_labels_outside_the_active_head(kind):
    s = Scenario(kind, SPLIT)
    out = outputs(1, s.num_outputs)
    with pytest.raises(ValueError, match="not classes of task 1"):
        s.view(out, labels(4), 1)
    with pytest.raises(ValueError, match="int64"):
        s.view(out, labels(6), 1)  # not a class of any task
    with pytest.raises(ValueError, match="int64"):
        s.view(out, labels(-1), 1)
    with pytest.raises(ValueError, match="int64"):
        s.view(out, torch.tensor([2.0]), 1)


@pytest.mark.parametrize("kind", SCENARIOS)
def test_wrong_output_width(kind):
    s = Scenario(kind, SPLIT)
    with pytest.raises(ValueError, match="outputs of shape"):
        s.view(outputs(2, s.num_outputs - 1), labels(2, 3), 1)
    with pytest.raises(ValueError, match="outputs of shape"):
        s.view(torch.zeros(s.num_outputs), labels(2), 1)


@pytest.mark.parametrize("kind", SCENARIOS)
def test_task_index_out_of_range(kind):
    s = Scenario(kind, SPLIT)
    out = outputs(1, s.num_outputs)
    for task in (-1, 3):
        with pytest.raises(ValueError, match="out of range"):
            s.view(out, labels(0), task)
        if kind != "domain":  # the shared head needs no task
            with pytest.raises(ValueError, match="out of range"):
                s.head(out, task)


def test_bad_scenario_names_and_classes():
    for kind in ("", "Task", "class-il", "shared-ish", None):
        with pytest.raises(ValueError, match="unknown scenario"):
            Scenario(kind, SPLIT)
    with pytest.raises(ValueError, match="unknown scenario"):
        Scenario.for_tasks("tasks", SPLIT)
    with pytest.raises(ValueError, match="at least one class"):
        Scenario("task", [])
    with pytest.raises(ValueError, match="at least one class"):
        Scenario("task", [(0, 1), ()])
    with pytest.raises(ValueError, match="distinct non-negative"):
        Scenario("class", [(0, 0)])
    with pytest.raises(ValueError, match="distinct non-negative"):
        Scenario("class", [(-1, 2)])


def test_empty_batch():
    s = Scenario("task", SPLIT)
    logits, target = s.view(torch.zeros(0, 6), labels(), 1)
    assert logits.shape == (0, 2) and target.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Choosing the scenario, the shared default, head() == view()'s logits
# ---------------------------------------------------------------------------------------------


def test_for_tasks_picks_the_natural_scenario():
    assert Scenario.for_tasks(None, [tuple(range(10))] * 4).kind == "domain"  # permuted / rotated
    assert Scenario.for_tasks(None, SPLIT).kind == "class"  # split
    assert Scenario.for_tasks(None, [(0, 1), (1, 2)]).kind == "class"  # overlapping, not equal
    for kind in SCENARIOS:  # an explicit choice wins
        assert Scenario.for_tasks(kind, SPLIT).kind == kind
        assert Scenario.for_tasks(kind, [(0, 1)] * 3).kind == kind


def test_shared_passes_everything_through():
    s = Scenario.shared(4)
    assert s.num_outputs == 4
    out, y = outputs(2, 4), labels(3, 0)
    logits, target = s.view(out, y, 0)
    assert logits is out and target is y
    assert s.head(out, 0) is out


@pytest.mark.parametrize("kind", SCENARIOS)
def test_head_agrees_with_view(kind):
    s = Scenario(kind, SPLIT)
    out = torch.randn(4, s.num_outputs)
    for task, classes in enumerate(SPLIT):
        y = torch.tensor([classes[i % 2] for i in range(4)])
        for seen in (None, 0, 1, 2):
            logits, _ = s.view(out, y, task, seen)
            assert torch.equal(s.head(out, task, seen), logits), (task, seen)


def test_view_keeps_the_gradient_path():
    s = Scenario("task", SPLIT)
    out = torch.zeros(1, 6, requires_grad=True)
    logits, target = s.view(out, labels(5), 2)
    F.cross_entropy(logits, target).backward()
    # d CE / d z = softmax - onehot, only on the active head's columns: [0.5, -0.5] on 4, 5
    assert out.grad.tolist() == [[0.0, 0.0, 0.0, 0.0, 0.5, -0.5]]


# ---------------------------------------------------------------------------------------------
# cross_entropy: each sample on its own task's head
# ---------------------------------------------------------------------------------------------


def test_cross_entropy_per_sample_tasks_task_il():
    """Two samples of task 0 and one of task 2, each on its own 2-unit head, by hand."""
    s = Scenario("task", SPLIT)
    out = torch.tensor([[1.0, 0.0, 9, 9, 9, 9], [0.0, 2.0, 9, 9, 9, 9], [7, 7, 7, 7, 0.0, 3.0]])
    y, task = labels(0, 0, 5), labels(0, 0, 2)

    def ce(z_y: float, z_other: float) -> float:
        return -z_y + math.log(math.exp(z_y) + math.exp(z_other))

    expected = (ce(1.0, 0.0) + ce(0.0, 2.0) + ce(3.0, 0.0)) / 3
    assert s.cross_entropy(out, y, task).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        s.cross_entropy(out, y, labels(0, 2))


def test_cross_entropy_per_sample_tasks_domain_and_class():
    out = torch.tensor([[1.0, 0.0, 0.5, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0, 0.0, 0.0]])
    y, task = labels(0, 3), labels(0, 1)
    # domain: both on the shared 2 units, label 3 is position 1 of task 1
    dom = Scenario("domain", SPLIT)
    expected = (-1.0 + math.log(math.e + 1) + (-2.0 + math.log(1 + math.exp(2.0)))) / 2
    assert dom.cross_entropy(out[:, :2], y, task).item() == pytest.approx(expected, rel=1e-6)
    # class: both on the head of every class up to the latest task in the batch (0..3)
    cls = Scenario("class", SPLIT)
    z0, z1 = [1.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, 1.0]
    expected = (
        -z0[0] + math.log(sum(math.exp(v) for v in z0)) - z1[3] + math.log(sum(math.exp(v) for v in z1))
    ) / 2
    assert cls.cross_entropy(out, y, task).item() == pytest.approx(expected, rel=1e-6)
    # an integer task gives the same as the plain view
    logits, target = cls.view(out, y, 1)
    assert cls.cross_entropy(out, y, 1).item() == pytest.approx(F.cross_entropy(logits, target).item())
