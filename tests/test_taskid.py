"""Tests of ewc.taskid: the online task detector, stream builder and assignment metrics."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
import torch

from ewc.data import load_dataset, make_sequence
from ewc.taskid import TaskCapWarning, TaskDetector
from ewc.taskid_eval import assignment_metrics, best_matching, make_stream

torch.set_num_threads(1)

SCHEDULE = [0, 1, 2, 0, 3, 1, 4, 2, 0]


@pytest.fixture(scope="module")
def sequences() -> dict[str, list]:
    ds = load_dataset("mnist-10k")
    return {kind: make_sequence(ds, kind, 5, seed=0) for kind in ("permuted", "split")}


def _run(det: TaskDetector, batches) -> list[int]:
    return [det.update(x) for x, _ in batches]


@pytest.mark.parametrize("kind", ["permuted", "split"])
def test_streams_with_returns_meet_targets(sequences, kind: str) -> None:
    """Acceptance targets at small scale: 2 streams of 5 tasks with returns, batch size 32.

    False alarms are pooled over the two streams: split seed 3 has one odd early batch (a
    tentative id, retracted at the next batch: 2 id changes in ~12 500 samples).
    """
    false_alarms, samples = 0, 0
    for seed in (0, 3):
        batches, true = make_stream(sequences[kind], SCHEDULE, 32, seed=seed, min_len=20, max_len=60)
        m = assignment_metrics(true, _run(TaskDetector(), batches), 32)
        assert m["accuracy"] >= 0.99, m
        assert m["mean_delay"] <= 2, m
        assert m["tasks_found"] == m["tasks_true"] == 5, m
        assert m["split_tasks"] == 0, m
        false_alarms += m["false_alarms"]
        samples += 32 * m["n_batches"]
    assert false_alarms * 10_000 / samples <= 1.0


def test_long_stationary_segment_makes_one_task(sequences) -> None:
    x = sequences["split"][2].x_train
    g = torch.Generator().manual_seed(0)
    det = TaskDetector()
    ids = [det.update(x[torch.randint(len(x), (32,), generator=g)]) for _ in range(300)]
    assert set(ids) == {0} and det.num_tasks == 1 and det.retracted == 0


def test_iid_noise_is_one_task_and_odd_batch_is_retracted() -> None:
    g = torch.Generator().manual_seed(0)
    det = TaskDetector()
    ids = [det.update(torch.rand(32, 784, generator=g)) for _ in range(50)]
    assert set(ids) == {0}
    odd = det.update(torch.randn(32, 784, generator=g) * 5)  # one odd batch: tentative new id
    assert odd == 1 and det.tentative
    assert det.update(torch.rand(32, 784, generator=g)) == 0  # back: the tentative id is retracted
    assert det.num_tasks == 1 and det.retracted == 1 and det.history[-1]["retracted"] == 1


def test_noise_stream_is_capped_with_a_warning() -> None:
    g = torch.Generator().manual_seed(1)
    det = TaskDetector(max_tasks=4)
    ids: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):  # a different noise distribution every 2 batches: each one confirmed
            shift = torch.randn(1, 784, generator=g) * 3
            ids += [det.update(torch.rand(32, 784, generator=g) + shift) for _ in range(2)]
    assert det.num_tasks == 4 and max(ids) == 3 and det.cap_hits > 0
    cap = [w for w in caught if issubclass(w.category, TaskCapWarning)]
    assert len(cap) == 1 and "max_tasks=4" in str(cap[0].message)


def test_every_batch_different_noise_does_not_grow_ids() -> None:
    g = torch.Generator().manual_seed(2)
    det = TaskDetector()
    for _ in range(100):
        det.update(torch.rand(32, 784, generator=g) * 3 * torch.rand(1, generator=g) + torch.randn(1, 784))
    assert det.num_tasks <= 2 and det.cap_hits == 0


def test_bad_input() -> None:
    g = torch.Generator().manual_seed(0)
    det = TaskDetector()
    assert det.update(torch.zeros(0, 784)) == -1  # empty before any task
    assert det.update(torch.rand(32, 784, generator=g)) == 0
    with pytest.raises(ValueError, match="feature dimension changed mid-stream: .* 784 .* 100"):
        det.update(torch.rand(32, 100, generator=g))
    x = torch.rand(32, 1, 28, 28, generator=g)  # image shape is flattened: same 784 features
    x[3, 0, 5, 5] = float("nan")
    x[7, 0, 0, 0] = float("inf")
    assert det.update(x) == 0
    assert det.n_dropped == 2 and det.history[-1]["n"] == 30
    assert det.update(torch.full((4, 784), float("nan"))) == 0  # all rows dropped: an empty batch
    assert det.n_dropped == 6 and det.history[-1]["event"] == "empty"
    assert det.update(torch.zeros(0, 784)) == 0
    strict = TaskDetector(nan_policy="raise")
    with pytest.raises(ValueError, match="NaN or inf"):
        strict.update(x)
    with pytest.raises(ValueError, match="scalar"):
        strict.update(torch.tensor(1.0))
    for bad in ({"hazard": 0.0}, {"hazard": 1.0}, {"max_tasks": 0}, {"nan_policy": "x"}, {"proj_dim": 0}):
        with pytest.raises(ValueError):
            TaskDetector(**bad)
    with pytest.raises(ValueError, match=r"^hazard must be a finite number in \(0, 1\), got 1.0$"):
        TaskDetector(hazard=1)
    with pytest.raises(ValueError, match=r"^kappa0 must be a finite number > 0, got -2.0$"):
        TaskDetector(kappa0=-2)
    with pytest.raises(ValueError, match=r"^var_floor must be a finite number >= 0, got nan$"):
        TaskDetector(var_floor=float("nan"))


@pytest.mark.parametrize("features", ["linear", "cos"])
def test_state_dict_resume_is_exact(sequences, features: str) -> None:
    batches, _ = make_stream(sequences["permuted"], [0, 1, 0, 2], 32, seed=1, min_len=8, max_len=12)
    full = TaskDetector(features=features)
    ids_full = _run(full, batches)
    half = len(batches) // 2
    first = TaskDetector(features=features)
    ids = _run(first, batches[:half])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = TaskDetector(hazard=0.3)  # the saved configuration wins
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.hazard == full.hazard and resumed.features == features
    ids += _run(resumed, batches[half:])
    assert ids == ids_full
    torch.testing.assert_close(resumed.loglik_table(), full.loglik_table(), rtol=0, atol=0, equal_nan=True)


def test_loglik_table_for_plotting(sequences) -> None:
    batches, true = make_stream(sequences["permuted"], [0, 1, 0], 32, seed=0, min_len=3, max_len=3)
    det = TaskDetector()
    _run(det, batches)
    table = det.loglik_table()
    assert table.shape == (9, 3)  # two known tasks + "new"
    assert torch.isnan(table[:3, 1]).all() and torch.isfinite(table[4:, :2]).all()
    assert torch.isfinite(table[:, -1]).all()
    assert [h["task"] for h in det.history] == true


def test_make_stream_is_reproducible(sequences) -> None:
    tasks = sequences["split"]
    a, ta = make_stream(tasks, [0, 1, 0], 16, seed=5, min_len=2, max_len=4)
    b, tb = make_stream(tasks, [0, 1, 0], 16, seed=5, min_len=2, max_len=4)
    assert ta == tb and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )
    segs = [len(list(g)) for _, g in itertools.groupby(ta)]
    assert len(segs) == 3 and all(2 <= s <= 4 for s in segs)
    for (x, y), t in zip(a, ta, strict=True):
        assert x.shape == (16, 1, 28, 28) and set(y.tolist()) <= set(tasks[t].classes)
    with pytest.raises(ValueError, match="schedule entry 7"):
        make_stream(tasks, [7], 16)


def test_best_matching_is_exact() -> None:
    rng = np.random.default_rng(0)
    for shape in [(3, 3), (4, 2), (2, 5), (5, 5), (1, 1)]:
        c = rng.integers(0, 20, size=shape).astype(float)
        pairs = best_matching(c)
        assert len(pairs) == min(shape)
        assert len({r for r, _ in pairs}) == len({col for _, col in pairs}) == len(pairs)
        n, m = shape
        if n <= m:
            brute = min(sum(c[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            brute = min(sum(c[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert sum(c[r, col] for r, col in pairs) == pytest.approx(brute)


def test_assignment_metrics_by_hand() -> None:
    true = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    inferred = [5, 5, 7, 5, 5, 9, 9, 9, 5, 5]  # one odd batch, one batch of delay
    m = assignment_metrics(true, inferred, batch_size=10)
    assert m["matching"] == {0: 5, 1: 9}
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["mean_delay"] == pytest.approx(0.5) and m["max_delay"] == 1
    # changes at 2, 3 (odd batch), 5 (late detection of task 1) and 8 (return of task 0)
    assert m["false_alarms"] == 2 and m["false_alarms_per_10k"] == pytest.approx(2 * 10_000 / 100)
    assert m["tasks_true"] == 2 and m["tasks_found"] == 3 and m["split_tasks"] == 1
    perfect = assignment_metrics(true, [3 if t else 4 for t in true])
    assert perfect["accuracy"] == 1.0 and perfect["false_alarms"] == 0 and perfect["mean_delay"] == 0


def test_score_leaves_the_detector_unchanged() -> None:
    """score() reads the per-task likelihoods of a batch without counting, switching or learning."""
    torch.set_num_threads(1)
    det = TaskDetector(seed=0)
    with pytest.raises(ValueError, match="seen no data"):
        det.score(torch.rand(4, 10))
    assert det.predict(torch.rand(4, 10)) == -1  # no task yet
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 10, generator=gen), 3.0 + torch.rand(64, 10, generator=gen)
    for _ in range(5):
        det.update(a)
    for _ in range(5):
        det.update(b)
    before = det.state_dict()
    probe = torch.cat([b[:8], torch.full((2, 10), float("nan"))])
    ll, new = det.score(probe)
    assert det.predict(probe) == int(torch.argmax(ll))
    _assert_same_state(det.state_dict(), before)  # nothing counted (the NaN rows), nothing learned
    assert ll.shape == (det.num_tasks,) and isinstance(new, float)
    assert int(torch.argmax(ll)) == det.update(b[8:16])  # the task the detector itself assigns


def _assert_same_state(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same_state(u, v)
    else:
        assert a == b


def _label_loglik_by_hand(history: list[int], batch: list[int], classes: int, a: float) -> float:
    """Sequential Dirichlet-multinomial predictive: Π_i (n_c + a) / (N + C a), one label at a time."""
    counts = [0] * classes
    for c in history:
        counts[c] += 1
    total = 0.0
    for c in batch:
        total += np.log((counts[c] + a) / (sum(counts) + classes * a))
        counts[c] += 1
    return float(total)


def test_label_term_is_the_dirichlet_multinomial_predictive() -> None:
    g = torch.Generator().manual_seed(0)
    det = TaskDetector(proj_dim=None, label_prior=0.7)
    x1, y1 = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    det.update(x1, y1)
    x2, y2 = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)  # new classes 3, 4
    ll_xy, new_xy = det.score(x2, y2)
    ll_x, new_x = det.score(x2)
    assert ll_xy[0] - ll_x[0] == pytest.approx(
        _label_loglik_by_hand(y1.tolist(), y2.tolist(), 5, 0.7), rel=1e-9
    )
    assert new_xy - new_x == pytest.approx(_label_loglik_by_hand([], y2.tolist(), 5, 0.7), rel=1e-9)


def test_labels_separate_tasks_that_inputs_cannot() -> None:
    """Same input distribution, disjoint label sets: one id without labels, two with them."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(32, 20, generator=g),
            torch.randint(5 * (i // 20), 5 * (i // 20) + 5, (32,), generator=g),
        )
        for i in range(40)
    ]
    # raw inputs: a 128-dim projection of 20 features would add an Occam penalty (~180 nats) for
    # a fresh input model that outweighs the ~110-nat label evidence of this small example
    without, with_labels = TaskDetector(proj_dim=None), TaskDetector(proj_dim=None)
    ids_x = [without.update(x) for x, _ in batches]
    ids_xy = [with_labels.update(x, y) for x, y in batches]
    assert set(ids_x) == {0}
    assert ids_xy == [0] * 20 + [1] * 20


def test_bad_labels_raise() -> None:
    det = TaskDetector()
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="one label per row"):
        det.update(x, torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        det.update(x, torch.zeros(8))
    with pytest.raises(ValueError, match=">= 0"):
        det.update(x, -torch.ones(8, dtype=torch.long))
    assert det.num_tasks == 0 and det.n_batches == 0


def test_nan_rows_drop_their_labels_too() -> None:
    det = TaskDetector(proj_dim=None)
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    det.update(x, torch.tensor([0, 0, 5, 1, 1, 1]))
    assert det.n_dropped == 1
    assert det.state_dict()["labels"].tolist() == [[2.0, 3.0]]  # label 5 left with its NaN row
