"""The replay memory: reservoir uniformity, balanced shares, capacity, reading, state, arguments."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ewc.memory import Memory

torch.set_num_threads(1)


def stream(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples whose x is their id (so stored samples can be traced back), labels id mod 3."""
    ids = torch.arange(start, start + n)
    return ids.float().unsqueeze(1), ids % 3


def stored_ids(memory: Memory, task: int | None = None) -> list[int]:
    x, _, _ = memory.get(task)
    return sorted(int(v) for v in x[:, 0])


def offer(memory: Memory, n: int, chunks: list[int], task: int = 0, start: int = 0) -> None:
    """Offer ids start..start+n-1 in chunks of irregular sizes."""
    assert sum(chunks) == n
    x, y = stream(n, start)
    at = 0
    for c in chunks:
        memory.add(x[at : at + c], y[at : at + c], task)
        at += c


def test_reservoir_keeps_every_stream_element_with_equal_probability() -> None:
    # 1000 independent memories of 10 slots over a stream of 50 (offered in chunks of 3, 10, 1,
    # 17, 19): each element must be stored with probability 10/50 = 0.2, i.e. 200 times in
    # expectation, standard deviation √(1000·0.2·0.8) ≈ 12.6. A 5σ band (±63) leaves a
    # false-failure chance of ~6e-7 per element, and the seeds are fixed, so the test is stable;
    # the position-dependent biases it is meant to catch (e.g. the first fill never evicted,
    # or the last chunk over-kept) move some element's count by several hundred.
    runs, capacity, n = 1000, 10, 50
    counts = torch.zeros(n)
    for seed in range(runs):
        memory = Memory(capacity, "reservoir", seed=seed)
        offer(memory, n, [3, 10, 1, 17, 19], task=seed % 3)
        ids = stored_ids(memory)
        assert len(ids) == capacity == len(set(ids))
        counts[ids] += 1
    expected, sd = runs * capacity / n, math.sqrt(runs * 0.2 * 0.8)
    assert float(counts.sum()) == runs * capacity
    assert float((counts - expected).abs().max()) < 5 * sd
    # The first ten (the initial fill) and the last ten (the latest chunk) are not favoured.
    assert float(counts[:10].mean()) == pytest.approx(expected, abs=2 * sd)
    assert float(counts[-10:].mean()) == pytest.approx(expected, abs=2 * sd)


def test_reservoir_fills_before_evicting_and_never_exceeds_capacity() -> None:
    memory = Memory(7, "reservoir", seed=1)
    x, y = stream(5)
    memory.add(x, y, 0)
    assert len(memory) == 5 and stored_ids(memory) == [0, 1, 2, 3, 4]
    gen = torch.Generator().manual_seed(0)
    start = 5
    for _ in range(30):
        n = int(torch.randint(0, 9, (1,), generator=gen))
        x, y = stream(n, start)
        memory.add(x, y, int(torch.randint(0, 4, (1,), generator=gen)))
        start += n
        assert len(memory) == min(7, start) == len(set(stored_ids(memory)))
        assert memory.seen == start
    # Every stored sample is an offered one, with its own label.
    x, y, _ = memory.get()
    assert torch.equal(y, x[:, 0].long() % 3)


def test_balanced_per_task_shares_and_rebalancing() -> None:
    memory = Memory(10, "balanced", "task", seed=0)
    offer(memory, 100, [40, 60], task=0)
    assert len(memory) == 10 and memory.tasks() == [0]
    offer(memory, 30, [30], task=1, start=100)
    assert [len(stored_ids(memory, k)) for k in (0, 1)] == [5, 5]
    offer(memory, 30, [12, 18], task=2, start=200)
    # 10 // 3 = 3 each, the remainder to the oldest task
    assert [len(stored_ids(memory, k)) for k in (0, 1, 2)] == [4, 3, 3]
    assert all(0 <= i < 100 for i in stored_ids(memory, 0))
    assert all(200 <= i < 230 for i in stored_ids(memory, 2))
    # A task with fewer samples than its share keeps them all; the others keep their share.
    offer(memory, 1, [1], task=3, start=300)
    assert [len(stored_ids(memory, k)) for k in (0, 1, 2, 3)] == [3, 3, 2, 1]
    assert len(memory) == 9 <= memory.capacity


def test_balanced_groups_stay_uniform_after_rebalancing() -> None:
    # Task 0 (40 samples) fills all 8 slots, then task 1 halves its share: each task-0 sample must
    # remain with probability 4/40 = 0.1 (100 of 1000 runs, sd ≈ 9.5), the initial fill included.
    runs, counts = 1000, torch.zeros(40)
    for seed in range(runs):
        memory = Memory(8, "balanced", "task", seed=seed)
        offer(memory, 40, [40], task=0)
        offer(memory, 5, [5], task=1, start=100)
        ids = stored_ids(memory, 0)
        assert len(ids) == 4
        counts[ids] += 1
    sd = math.sqrt(runs * 0.1 * 0.9)
    assert float((counts - 100).abs().max()) < 5 * sd
    assert float(counts[:8].mean()) == pytest.approx(100, abs=2 * sd)


def test_balanced_per_class() -> None:
    memory = Memory(9, "balanced", "class", seed=0)
    x, y = stream(60)  # labels 0, 1, 2 (20 each), interleaved
    memory.add(x, y, 0)
    _, stored_y, _ = memory.get()
    assert torch.bincount(stored_y).tolist() == [3, 3, 3]
    memory.add(torch.zeros(6, 1), torch.full((6,), 5), 1)  # a fourth class: 9 // 4 = 2, oldest gets 3
    _, stored_y, task = memory.get()
    assert torch.bincount(stored_y, minlength=6).tolist() == [3, 2, 2, 0, 0, 2]
    assert memory.tasks() == [0, 1] and set(task[stored_y == 5].tolist()) == {1}


def test_per_sample_task_indices() -> None:
    memory = Memory(100, "reservoir")
    x, y = stream(6)
    memory.add(x, y, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert memory.tasks() == [0, 1, 2]
    assert stored_ids(memory, 1) == [2, 3]


def test_sample_is_without_replacement_and_seeded() -> None:
    memory = Memory(20, "reservoir", seed=3)
    x, y = stream(20)
    memory.add(x, y, 4)
    xs, ys, ts = memory.sample(8, torch.Generator().manual_seed(5))
    assert len(set(xs[:, 0].tolist())) == 8 and torch.equal(ys, xs[:, 0].long() % 3)
    assert set(ts.tolist()) == {4}
    again = memory.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(again[0], xs)
    assert len(memory.sample(50)[0]) == 20  # at most what is stored


def test_nbytes_is_the_allocated_budget() -> None:
    memory = Memory(10, "reservoir")
    assert memory.nbytes == 0
    memory.add(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), 0)
    # per slot: 16 float32 inputs + int64 label, task and slot bookkeeping
    assert memory.nbytes == 10 * (16 * 4 + 3 * 8)


def test_state_dict_round_trip_continues_identically() -> None:
    a = Memory(6, "balanced", "task", seed=7)
    offer(a, 30, [30], task=0)
    offer(a, 20, [20], task=1, start=100)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = Memory(6, "balanced", "task", seed=999)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert stored_ids(b) == stored_ids(a) and b.seen == a.seen
    for m in (a, b):
        offer(m, 25, [25], task=2, start=200)
    for k in (0, 1, 2):
        assert stored_ids(b, k) == stored_ids(a, k)
    torch.testing.assert_close(a.sample(4)[0], b.sample(4)[0])
    # an empty memory round-trips too
    c = Memory(6)
    c.load_state_dict(Memory(6).state_dict())
    assert len(c) == 0 and c.nbytes == 0


def test_state_dict_mismatch_is_rejected() -> None:
    state = Memory(6, "balanced").state_dict()
    with pytest.raises(ValueError, match="state is for a memory"):
        Memory(5, "balanced").load_state_dict(state)
    with pytest.raises(ValueError, match="state is for a memory"):
        Memory(6, "reservoir").load_state_dict(state)
    with pytest.raises(ValueError, match="keys"):
        Memory(6, "balanced").load_state_dict({"x": None})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -3}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 5, "policy": "fifo"}, "policy"),
        ({"capacity": 5, "per": "sample"}, "balancing"),
        ({"capacity": 5, "seed": -1}, "seed"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Memory(**kwargs)


def test_bad_add_and_read_arguments() -> None:
    memory = Memory(5)
    with pytest.raises(ValueError, match="empty"):
        memory.get()
    with pytest.raises(ValueError, match="same number"):
        memory.add(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="int64"):
        memory.add(torch.zeros(2, 2), torch.zeros(2), 0)
    with pytest.raises(ValueError, match=">= 0"):
        memory.add(torch.zeros(2, 2), torch.tensor([0, -1]), 0)
    with pytest.raises(ValueError, match="one index per sample"):
        memory.add(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1, 2]))
    memory.add(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="do not match"):
        memory.add(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="n must be"):
        memory.sample(0)
