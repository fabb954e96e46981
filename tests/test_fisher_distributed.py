"""``diagonal_fisher`` under torch.distributed (two gloo processes on CPU).

Each rank holds a different part of one data set; with the process group initialised the
per-sample sums and the sample count are all-reduced, so every rank must return the Fisher of
the whole data set, equal to the single-process Fisher and to the per-sample reference.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_fisher_close, init_gloo, reference_fisher, rel_err, split_batches
from torch import nn

from ewc.fisher import diagonal_fisher

DT = torch.float64
WORLD = 2
N = 24
BS = 4  # every rank's part is made of whole batches, so "batched" agrees with one process
MODES = ("exact", "empirical", "batched")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend unavailable"
)


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(100)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.BatchNorm1d(7), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).to(DT)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 5, dtype=DT) * 1.5 + 0.5)
    model.eval()
    x = torch.randn(N, 5, dtype=DT)
    y = torch.randint(0, 3, (N,))
    y_gauss = torch.randn(N, 3, dtype=DT)
    return model, x, y, y_gauss


# Each split gives the [start, stop) range of every rank; both are multiples of BS.
SPLITS = {"halves": [(0, 12), (12, 24)], "unequal": [(0, 16), (16, 24)]}


def _worker(rank: int, init_file: str, expected_file: str) -> None:
    init_gloo(rank, init_file, WORLD, 60)
    try:
        model, x, y, y_gauss = _problem()
        expected = torch.load(expected_file)
        full = split_batches(x, y, BS)
        for split, ranges in SPLITS.items():
            lo, hi = ranges[rank]
            local = split_batches(x[lo:hi], y[lo:hi], BS)
            for mode in MODES:
                tag = f"rank {rank}, {split}, {mode}"
                ref_full = reference_fisher(model, full, mode)
                got_auto = diagonal_fisher(model, local, mode)  # distributed=None: auto
                got_true = diagonal_fisher(model, local, mode, distributed=True)
                got_pair = diagonal_fisher(model, (x[lo:hi], y[lo:hi]), mode, batch_size=BS)
                for name, got in (("auto", got_auto), ("True", got_true), ("pair", got_pair)):
                    try:
                        assert_fisher_close(got, ref_full, model)
                        # Same as the single-process engine on the whole data set.
                        assert_fisher_close(got, expected[mode], model, tol=1e-9)
                    except AssertionError as e:
                        raise AssertionError(f"{tag}, distributed={name}: {e}") from e

                got_local = diagonal_fisher(model, local, mode, distributed=False)
                ref_local = reference_fisher(model, local, mode)
                try:
                    assert_fisher_close(got_local, ref_local, model)
                except AssertionError as e:
                    raise AssertionError(f"{tag}, distributed=False: {e}") from e
                # The local Fisher really is different from the global one.
                assert max(rel_err(got_local[k], ref_full[k]) for k in ref_full) > 1e-3, tag

        # Gaussian likelihood too (exact only needs x; empirical uses the targets).
        lo, hi = SPLITS["unequal"][rank]
        for mode in ("exact", "empirical"):
            got = diagonal_fisher(model, (x[lo:hi], y_gauss[lo:hi]), mode, likelihood="gaussian", sigma=0.8)
            ref = reference_fisher(
                model, split_batches(x, y_gauss, BS), mode, likelihood="gaussian", sigma=0.8
            )
            try:
                assert_fisher_close(got, ref, model)
            except AssertionError as e:
                raise AssertionError(f"rank {rank}, gaussian {mode}: {e}") from e
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_matches_single_process() -> None:
    model, x, y, _ = _problem()
    assert not dist.is_initialized()
    expected = {
        mode: diagonal_fisher(model, split_batches(x, y, BS), mode, distributed=False) for mode in MODES
    }
    # Without a process group, distributed=None is the plain single-process Fisher.
    for mode in MODES:
        plain = diagonal_fisher(model, split_batches(x, y, BS), mode)
        assert_fisher_close(plain, expected[mode], model, tol=1e-12)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        expected_file = os.path.join(tmp, "expected.pt")
        torch.save(expected, expected_file)
        mp.spawn(_worker, args=(init_file, expected_file), nprocs=WORLD, join=True)
