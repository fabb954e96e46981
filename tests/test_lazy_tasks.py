"""Task sequences are built when read: time and memory grow with the tasks used, not with --tasks;
requests that cannot fit are refused at once.

Task ``k`` read from a sequence equals task ``k`` built eagerly (the recipe in ewc.data.sequences,
and fingerprints of the tasks the eager code built before, so existing seeds keep their data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc.cli import main
from ewc.data import Dataset, Task, TaskSequence, load_dataset, make_sequence
from ewc.data.tasks import PartCache
from ewc.experiments.sequence import RunConfig
from ewc.experiments.stream import Config, sequence_stream
from ewc.train import TrainConfig, run_method


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of running on) when the block takes longer than ``seconds``."""

    def fail(*_: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    if not hasattr(signal, "setitimer"):  # no SIGALRM (Windows): no deadline
        yield
        return
    old = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def mnist10k() -> Dataset:
    return load_dataset("mnist-10k")


def _eager_permuted(ds: Dataset, task: Task, seed: int, k: int) -> dict[str, torch.Tensor]:
    """Task k's images by the documented recipe: the dataset rows, scaled, pixels permuted by
    ``SeedSequence(seed, spawn_key=(1, k))`` (task 0: the identity)."""
    perm = (
        np.arange(784)
        if k == 0
        else np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, k))).permutation(784)
    )
    out = {}
    for part, split in (("train", "train"), ("val", "train"), ("test", "test")):
        x = getattr(ds, f"x_{split}")[task.indices[part]].astype(np.float32) / 255.0
        out[part] = torch.from_numpy(x.reshape(len(x), 784)[:, perm].reshape(-1, 1, 28, 28).copy())
    return out


def test_a_100000_task_sequence_is_made_at_once(mnist10k: Dataset) -> None:
    with deadline(10):
        start = time.perf_counter()
        tasks = make_sequence(mnist10k, "permuted", 100_000, seed=3, max_train_per_task=100)
        made = time.perf_counter() - start
        last = tasks[-1]
        assert last.index == 99_999 and last.name == "permuted-99999"
        x = last.x_test
    assert isinstance(tasks, TaskSequence) and len(tasks) == 100_000
    assert made < 2.0, f"making the sequence took {made:.2f} s"
    assert x.shape == (2000, 1, 28, 28)
    assert tasks.cache is not None and tasks.cache.bytes == x.nelement() * 4  # only that part built


@pytest.mark.parametrize("k", [0, 1, 2, 777, 99_999])
def test_task_k_read_lazily_equals_task_k_built_eagerly(mnist10k: Dataset, k: int) -> None:
    tasks = make_sequence(mnist10k, "permuted", 100_000, seed=3, max_train_per_task=100, max_eval_per_task=50)
    task = tasks[k]
    eager = _eager_permuted(mnist10k, task, 3, k)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(task, f"x_{part}"), eager[part]), part
    assert task.transform["identity"] == (k == 0)
    few = make_sequence(mnist10k, "permuted", k + 1, seed=3, max_train_per_task=100, max_eval_per_task=50)
    for attr in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(few[k], attr), getattr(task, attr)), attr  # k does not see n_tasks


#: sha256 (first 16 hex digits) of every part of every task, as the eager code (before lazy
#: sequences) built them: seed 7, max_train_per_task 60, max_eval_per_task 30
BEFORE = {
    ("permuted", 4): ["b19f6ebfdf021717", "651f030c30e4dbd1", "566d4c6412e41060", "616d9df62f82a7b0"],
    ("rotated", 3): ["b19f6ebfdf021717", "e42dc51d4c04aefc", "3b25a560caec0b0a"],
    ("split", 5): [
        "1a9f6242f272349f",
        "c8daff6c0c8fb99c",
        "eb7eee60dcbdd2dd",
        "20adfcc5d815a686",
        "5f124ccc62d0a970",
    ],
}


@pytest.mark.parametrize(("kind", "n"), list(BEFORE))
def test_tasks_have_the_values_the_eager_code_built(mnist10k: Dataset, kind: str, n: int) -> None:
    tasks = make_sequence(mnist10k, kind, n, seed=7, max_train_per_task=60, max_eval_per_task=30)
    digests = []
    for task in tasks:
        h = hashlib.sha256()
        for attr in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            h.update(getattr(task, attr).numpy().tobytes())
        digests.append(h.hexdigest()[:16])
    assert digests == BEFORE[(kind, n)]


def test_the_cache_is_bounded_and_what_it_does_not_keep_is_rebuilt_equal(mnist10k: Dataset) -> None:
    part = 50 * 784 * 4  # one task's test part of 50 images
    tasks = make_sequence(mnist10k, "permuted", 1000, max_eval_per_task=50, cache_bytes=3 * part)
    first = tasks[5].x_test
    assert tasks[5].x_test is first  # kept: read again without building
    built = [tasks[k].x_test for k in range(100)]
    assert tasks.cache is not None and tasks.cache.bytes == 3 * part and len(tasks.cache) == 3
    assert built[5] is first and built[0] is tasks[0].x_test and built[1] is tasks[1].x_test  # kept
    again = tasks[50].x_test
    assert again is not built[50] and torch.equal(again, built[50])  # not kept: rebuilt, equal
    assert tasks[0].x_train is not tasks[0].x_train  # training parts are built on every read
    assert torch.equal(tasks[0].x_train, tasks[0].x_train) and tasks.cache.bytes == 3 * part
    none = make_sequence(mnist10k, "permuted", 10, max_eval_per_task=50, cache_bytes=0)
    assert torch.equal(none[5].x_test, first) and none.cache is not None and none.cache.bytes == 0


def test_part_cache_keeps_until_full_then_nothing_more() -> None:
    cache = PartCache(3 * 4)
    built: list[str] = []

    def build(key: str, n: int = 1) -> torch.Tensor:
        return cache.get(key, lambda: built.append(key) or torch.zeros(n))

    for key in "abcd":
        build(key)
    assert len(cache) == 3 and cache.bytes == 12 and "d" not in cache
    for key in "abcd":
        build(key)
    assert built == ["a", "b", "c", "d", "d"]  # a, b, c kept; d rebuilt
    assert build("big", 100).shape == (100,) and "big" not in cache
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError, match="cache_bytes must be a non-negative integer"):
        PartCache(-1)


def test_reading_many_tasks_keeps_memory_bounded(mnist10k: Dataset) -> None:
    """Reading the test parts of 200 tasks twice (as a run evaluates every task) stays within the
    cache plus a few parts; freed parts do not pile up in the heap."""

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux)")
    tasks = make_sequence(mnist10k, "permuted", 200, max_train_per_task=10, cache_bytes=32 * 2**20)
    assert tasks[0].x_test.shape == (2000, 1, 28, 28)
    before = rss_mb()
    for _ in range(2):
        for k in range(200):
            assert tasks[k].x_test.shape == (2000, 1, 28, 28)
    grown = rss_mb() - before
    assert grown < 32 + 100, f"RSS grew by {grown:.0f} MB reading 200 test parts of 6 MB twice"


def test_sequence_indexing_and_validation_view(mnist10k: Dataset) -> None:
    tasks = make_sequence(mnist10k, "permuted", 4, max_train_per_task=20, max_eval_per_task=10)
    assert [t.index for t in tasks] == [0, 1, 2, 3] and [t.index for t in tasks[1:3]] == [1, 2]
    assert tasks[-1].index == 3
    with pytest.raises(IndexError, match="task index 4 is out of range for 4 tasks"):
        tasks[4]
    val = tasks.validation()
    assert len(val) == 4 and torch.equal(val[2].x_test, tasks[2].x_val)
    assert torch.equal(val[2].y_test, tasks[2].y_val) and torch.equal(val[2].x_train, tasks[2].x_train)
    eager = dataclasses.replace(tasks[2])  # replace reads every part: a task of tensors
    assert isinstance(eager.__dict__["_x_train"], torch.Tensor) and torch.equal(eager.x_test, tasks[2].x_test)
    assert torch.equal(eager.validation().x_test, tasks[2].x_val)
    with pytest.raises(ValueError, match="x_train must be a tensor or a function that builds one"):
        Task("t", 0, "images", *[torch.zeros(1)] * 5, (0,))


def test_run_method_on_a_lazy_sequence_equals_the_eager_run(mnist10k: Dataset) -> None:
    tasks = make_sequence(
        mnist10k, "permuted", 3, max_train_per_task=200, max_eval_per_task=100, cache_bytes=0
    )
    eager = [dataclasses.replace(t) for t in tasks]
    config = TrainConfig(epochs=1, hidden=(32,), batch_size=50, eval_every=2, curve_samples=30, threads=1)
    lazy_res, eager_res = run_method(tasks, "ewc", config), run_method(eager, "ewc", config)
    for key in ("accuracy_matrix", "curves", "baseline_accuracy", "average_accuracy"):
        assert lazy_res[key] == eager_res[key], key


def test_a_stream_builds_only_the_tasks_it_streams() -> None:
    config = Config(
        tasks=100_000, schedule=(0, 1), hidden=(16,), min_len=8, max_len=12, max_train_per_task=300, threads=1
    )
    with deadline(30):
        stream = sequence_stream(config)
    assert [name for name, _, _ in stream.tests] == ["task 0", "task 1"]
    assert stream.in_dim == 784 and set(stream.true_ids or []) == {0, 1}


def test_requests_that_cannot_fit_are_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"tasks must be an integer in \[1, 1000\], got 100000"):
        RunConfig(sequence="permuted", tasks=100_000)
    assert RunConfig(sequence="permuted", tasks=1000).tasks == 1000
    split = "tasks must be at most 5 for a split sequence of mnist-10k (10 classes, 2 per task), got 6"
    with pytest.raises(ValueError, match=re.escape(split)):
        RunConfig(sequence="split", tasks=6)
    with pytest.raises(ValueError, match=re.escape(split)):
        Config(sequence="split", tasks=6, schedule=(0, 1))
    assert Config(tasks=100_000, schedule=(0, 1)).tasks == 100_000  # permuted: any number of tasks
    with deadline(30):
        assert main(["run", "split", "--tasks", "6", "--out", str(tmp_path / "run")]) == 2
        assert main(["stream", "--sequence", "split", "--tasks", "6", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.count(split) == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()


def test_joint_fills_its_union_one_task_at_a_time(mnist10k: Dataset) -> None:
    from ewc.methods.base import Joint

    tasks = make_sequence(mnist10k, "permuted", 3, max_train_per_task=40, max_eval_per_task=10)
    x, y, ids = Joint().train_data(2, tasks)
    assert torch.equal(x, torch.cat([t.x_train for t in tasks])) and x.is_contiguous()
    assert torch.equal(y, torch.cat([t.y_train for t in tasks]))
    assert ids.tolist() == [0] * 40 + [1] * 40 + [2] * 40


@pytest.mark.parametrize("kind", ["permuted", "rotated"])
def test_read_builds_a_part_into_the_callers_buffer(mnist10k: Dataset, kind: str) -> None:
    """A run reads test part after test part into one buffer: no allocation per evaluation."""
    part = 20 * 784 * 4
    tasks = make_sequence(mnist10k, kind, 50, max_eval_per_task=20, cache_bytes=2 * part)
    buf = torch.empty(20, 1, 28, 28)
    kept = tasks.read(0, "test", out=buf)  # kept by the cache: returned as it is, buf untouched
    assert kept is not buf and kept is tasks.read(0, "test") and kept is tasks[0].x_test
    assert tasks.read(1, "test") is tasks[1].x_test  # the cache is full now
    for k in (2, 30, 49):
        x = tasks.read(k, "test", out=buf)
        assert x is buf and torch.equal(x, tasks[k].x_test)
    assert torch.equal(tasks.read(-1, "train", out=torch.empty(1)), tasks[49].x_train)  # no fit: new
    assert torch.equal(tasks.validation().read(4, "test", out=torch.empty(20, 1, 28, 28)), tasks[4].x_val)
    with pytest.raises(ValueError, match="part must be one of train, val, test, got 'x'"):
        tasks.read(0, "x")
    with pytest.raises(IndexError, match="task index 50 is out of range for 50 tasks"):
        tasks.read(50, "test")
    plain = TaskSequence(3, tasks.__getitem__)  # a sequence without a reader reads the task's field
    assert torch.equal(plain.read(2, "val", out=buf), tasks[2].x_val)


def test_release_freed_memory_is_safe_to_call() -> None:
    from ewc.runtime import release_freed_memory

    x = torch.ones(10**6)
    del x
    release_freed_memory()
    release_freed_memory()
