"""``ewc.metrics`` on hand-made accuracy matrices.

Every expected value below is worked out by hand in the comments next to it (never by calling
the implementation), and the matrices are chosen so that the usual mistakes (transposed
convention, max over rows before a task was trained, max including the last row, clipping
forgetting at 0, pooling curve points of unequal length) give a different number.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import init_gloo

from ewc.metrics import (
    accuracy_from_counts,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    learning_curve_area,
    reduce_counts,
    summarize,
)

NAN = float("nan")
TOL = 1e-12

# R[i][j]: accuracy on task j after training on tasks 0..i.
R3 = [
    [0.90, 0.10, 0.20],
    [0.92, 0.80, 0.30],
    [0.60, 0.50, 0.95],
]
B3 = [0.10, 0.05, 0.20]

R4 = [
    [0.80, 0.70, 0.10, NAN],  # R[0][3] never measured (not needed by FWT)
    [0.60, 0.60, 0.20, 0.15],
    [0.85, 0.50, 0.90, 0.30],
    [0.50, 0.40, 0.95, 0.85],
]
B4 = [0.10, 0.50, 0.10, 0.25]

CURVES = [
    [0.1, 0.5, 0.7],
    [0.2, 0.4, 0.6, 0.9],  # longer than the others: its last point is beyond the default beta
    [0.0, 0.3, 0.8],
]


def close(got: float, want: float) -> bool:
    return type(got) is float and abs(got - want) < TOL


# ----------------------------------------------------------------------------------------------
# Hand-made 3 x 3
# ----------------------------------------------------------------------------------------------


def test_average_accuracy_3x3() -> None:
    # last row: (0.60 + 0.50 + 0.95) / 3 = 2.05 / 3
    assert close(average_accuracy(R3), 2.05 / 3)


def test_backward_transfer_3x3() -> None:
    # ((0.60 - 0.90) + (0.50 - 0.80)) / 2 = -0.30
    assert close(backward_transfer(R3), -0.30)


def test_forward_transfer_3x3() -> None:
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.10 - 0.05) + (0.30 - 0.20)) / 2 = 0.075
    assert close(forward_transfer(R3, B3), 0.075)


def test_forgetting_3x3() -> None:
    # j=0: max(0.90, 0.92) - 0.60 = 0.32 ; j=1: max(0.80) - 0.50 = 0.30 ; mean = 0.31
    # (differs from -BWT = 0.30 because the best accuracy on task 0 came after its training)
    assert close(forgetting(R3), 0.31)


# ----------------------------------------------------------------------------------------------
# Hand-made 4 x 4 (with a NaN above the diagonal)
# ----------------------------------------------------------------------------------------------


def test_average_accuracy_4x4() -> None:
    # (0.50 + 0.40 + 0.95 + 0.85) / 4 = 2.70 / 4 = 0.675
    assert close(average_accuracy(R4), 0.675)


def test_backward_transfer_4x4() -> None:
    # ((0.50 - 0.80) + (0.40 - 0.60) + (0.95 - 0.90)) / 3 = -0.45 / 3 = -0.15
    assert close(backward_transfer(R4), -0.15)


def test_forward_transfer_4x4() -> None:
    # ((0.70 - 0.50) + (0.20 - 0.10) + (0.30 - 0.25)) / 3 = 0.35 / 3
    assert close(forward_transfer(R4, B4), 0.35 / 3)


def test_forgetting_4x4() -> None:
    # j=0: max(R[0..2][0]) = max(0.80, 0.60, 0.85) = 0.85 ; 0.85 - 0.50 =  0.35
    # j=1: max(R[1..2][1]) = max(0.60, 0.50) = 0.60   ; 0.60 - 0.40 =  0.20
    #      (R[0][1] = 0.70 is before task 1 was trained and must not count: it would give 0.30)
    # j=2: max(R[2..2][2]) = 0.90                     ; 0.90 - 0.95 = -0.05
    #      (not clipped at 0, and the last row is not part of the max: either would give 0)
    # mean = (0.35 + 0.20 - 0.05) / 3 = 0.50 / 3
    assert close(forgetting(R4), 0.50 / 3)


def test_numpy_and_list_inputs_agree() -> None:
    arr = np.array(R4)
    assert close(average_accuracy(arr), 0.675)
    assert close(backward_transfer(arr), -0.15)
    assert close(forward_transfer(arr, np.array(B4)), 0.35 / 3)
    got32 = forgetting(arr.astype(np.float32))  # float32 input: float result, float32 rounding
    assert type(got32) is float and abs(got32 - 0.50 / 3) < 1e-6


def test_forgetting_is_at_least_minus_bwt() -> None:
    # max_{l in j..T-2} R[l][j] >= R[j][j], so every f_j >= R[j][j] - R[T-1][j]: F >= -BWT.
    rng = np.random.default_rng(0)
    for _ in range(50):
        R = rng.uniform(0.0, 1.0, size=(5, 5))
        assert forgetting(R) >= -backward_transfer(R) - 1e-12


# ----------------------------------------------------------------------------------------------
# T = 1 and NaN handling
# ----------------------------------------------------------------------------------------------


def test_single_task() -> None:
    R = [[0.7]]
    assert close(average_accuracy(R), 0.7)
    assert close(backward_transfer(R), 0.0)
    assert close(forgetting(R), 0.0)
    assert close(forward_transfer(R, [0.1]), 0.0)
    s = summarize(R, b=[0.1], curves=[[0.2, 0.6]])
    assert s["final_accuracies"] == [0.7]
    assert close(s["lca"], (0.2 + 0.6) / 2)
    assert (s["bwt"], s["forgetting"], s["fwt"]) == (0.0, 0.0, 0.0)


def test_nan_above_diagonal_is_allowed() -> None:
    R = [
        [0.9, NAN, NAN],
        [0.7, 0.8, NAN],
        [0.6, 0.5, 0.95],
    ]
    assert close(average_accuracy(R), 2.05 / 3)
    assert close(backward_transfer(R), -0.30)  # ((0.6-0.9) + (0.5-0.8)) / 2
    assert close(forgetting(R), 0.30)  # (0.9-0.6 + 0.8-0.5) / 2
    assert summarize(R)["fwt"] is None


def test_forward_transfer_needs_superdiagonal() -> None:
    R = [row[:] for row in R3]
    R[1][2] = NAN
    with pytest.raises(ValueError, match=r"R\[1\]\[2\] is NaN"):
        forward_transfer(R, B3)
    with pytest.raises(ValueError, match=r"R\[1\]\[2\] is NaN"):
        summarize(R, b=B3)
    # A NaN elsewhere above the diagonal does not matter to FWT.
    R = [row[:] for row in R3]
    R[0][2] = NAN
    assert close(forward_transfer(R, B3), 0.075)


@pytest.mark.parametrize("pos", [(0, 0), (2, 2), (2, 0), (1, 0)])
def test_nan_on_or_below_diagonal_rejected(pos: tuple[int, int]) -> None:
    R = [row[:] for row in R3]
    R[pos[0]][pos[1]] = NAN
    with pytest.raises(ValueError, match=rf"R\[{pos[0]}\]\[{pos[1]}\] is NaN"):
        average_accuracy(R)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("R", "match"),
    [
        ([0.5, 0.6], "2-D"),
        ([[[0.5]]], "2-D"),
        (0.5, "2-D"),
        ([], "empty"),
        ([[]], "empty"),
        (np.zeros((0, 0)), "empty"),
        ([[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]], "square"),
        ([[0.5], [0.5, 0.6]], "rectangular"),
        ([[0.5, "x"], [0.5, 0.6]], "rectangular"),
        ([[1.2, 0.1], [0.5, 0.6]], r"R\[0\]\[0\] = 1\.2"),
        ([[0.5, 0.1], [-0.1, 0.6]], r"R\[1\]\[0\]"),
        ([[0.5, math.inf], [0.5, 0.6]], r"R\[0\]\[1\] = inf"),  # inf is not NaN, even above
        ([[0.5, 1.5], [0.5, 0.6]], r"R\[0\]\[1\]"),  # above the diagonal, range still checked
    ],
)
def test_matrix_validation(R: object, match: str) -> None:
    for fn in (average_accuracy, backward_transfer, forgetting, summarize):
        with pytest.raises(ValueError, match=match):
            fn(R)  # type: ignore[arg-type]


def test_boundary_values_accepted() -> None:
    R = [[0.0, 1.0], [1.0, 0.0]]
    assert close(average_accuracy(R), 0.5)
    assert close(backward_transfer(R), 1.0)  # 1.0 - 0.0
    assert close(forgetting(R), -1.0)  # max(R[0][0]) - R[1][0] = 0 - 1


@pytest.mark.parametrize(
    ("b", "match"),
    [
        ([0.1, 0.2], "b has 2 entries"),
        ([0.1, 0.2, 0.3, 0.4], "b has 4 entries"),
        ([[0.1, 0.2, 0.3]], "1-D"),
        ([0.1, 1.2, 0.3], r"b\[1\] = 1\.2"),
        ([0.1, NAN, 0.3], r"b\[1\] = nan"),
    ],
)
def test_baseline_validation(b: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        forward_transfer(R3, b)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Learning curve area
# ----------------------------------------------------------------------------------------------


def test_lca_hand_made() -> None:
    # Z_0 = (0.1 + 0.2 + 0.0) / 3 = 0.1 ; Z_1 = (0.5 + 0.4 + 0.3) / 3 = 0.4
    # Z_2 = (0.7 + 0.6 + 0.8) / 3 = 0.7
    assert close(learning_curve_area(CURVES, beta=0), 0.1)
    assert close(learning_curve_area(CURVES, beta=1), (0.1 + 0.4) / 2)
    assert close(learning_curve_area(CURVES, beta=2), (0.1 + 0.4 + 0.7) / 3)
    # Default beta = last index of the shortest curve = 2 (the 0.9 of curve 1 is not used;
    # pooling all ten points would give 4.5 / 10 = 0.45 instead).
    assert close(learning_curve_area(CURVES), 0.4)
    assert close(learning_curve_area(np.array([[0.2, 0.4], [0.6, 1.0]])), (0.4 + 0.7) / 2)


def test_lca_unequal_task_weights() -> None:
    # Z_b averages over tasks first: Z_0 = (0.0 + 1.0) / 2 = 0.5, Z_1 = (0.5 + 1.0) / 2 = 0.75
    assert close(learning_curve_area([[0.0, 0.5], [1.0, 1.0, 1.0]]), (0.5 + 0.75) / 2)


@pytest.mark.parametrize(
    ("curves", "beta", "match"),
    [
        ([], None, "curves is empty"),
        ([[0.1, 0.2], []], None, r"curves\[1\] is empty"),
        ([[0.1, 0.2], [[0.1]]], None, r"curves\[1\] must be 1-D"),
        ([[0.1, 1.2]], None, r"curves\[0\]\[1\] = 1\.2"),
        ([[0.1, NAN]], None, r"curves\[0\]\[1\] = nan"),
        (CURVES, 3, "beta = 3 must be in 0..2"),
        (CURVES, -1, "beta = -1"),
        (CURVES, 1.0, "beta must be an int"),
    ],
)
def test_lca_validation(curves: object, beta: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        learning_curve_area(curves, beta=beta)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# summarize
# ----------------------------------------------------------------------------------------------


def test_summarize_keys_and_values() -> None:
    s = summarize(R4, b=B4, curves=[[0.1, 0.5, 0.7], [0.2, 0.4, 0.6, 0.9], [0.0, 0.3, 0.8], [0.3, 0.2, 0.1]])
    assert set(s) == {"average_accuracy", "bwt", "fwt", "forgetting", "lca", "final_accuracies"}
    assert close(s["average_accuracy"], 0.675)
    assert close(s["bwt"], -0.15)
    assert close(s["fwt"], 0.35 / 3)
    assert close(s["forgetting"], 0.50 / 3)
    # Z_0 = (0.1+0.2+0.0+0.3)/4 = 0.15, Z_1 = (0.5+0.4+0.3+0.2)/4 = 0.35, Z_2 = (0.7+0.6+0.8+0.1)/4 = 0.55
    assert close(s["lca"], (0.15 + 0.35 + 0.55) / 3)
    assert s["final_accuracies"] == [0.50, 0.40, 0.95, 0.85]
    assert isinstance(s["final_accuracies"], list)
    assert all(type(v) is float for v in s["final_accuracies"])

    bare = summarize(np.array(R3))
    assert set(bare) == set(s)
    assert bare["fwt"] is None and bare["lca"] is None
    assert close(bare["bwt"], -0.30)
    json.dumps(bare)  # plain Python types only


def test_summarize_curve_count_must_match() -> None:
    with pytest.raises(ValueError, match="curves has 3 learning curves but R has T = 4"):
        summarize(R4, curves=CURVES)


# ----------------------------------------------------------------------------------------------
# Counts: accuracy_from_counts and reduce_counts
# ----------------------------------------------------------------------------------------------


def test_accuracy_from_counts() -> None:
    assert close(accuracy_from_counts(3, 4), 0.75)
    assert close(accuracy_from_counts(torch.tensor(9), torch.tensor(12)), 0.75)
    assert close(accuracy_from_counts(0, 5), 0.0)
    assert close(accuracy_from_counts(5, 5), 1.0)
    for c, n, match in [
        (1, 0, "total must be > 0"),
        (5, 4, r"correct must be in \[0, total\]"),
        (-1, 4, r"correct must be in \[0, total\]"),
        (NAN, 4, "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            accuracy_from_counts(c, n)


def test_reduce_counts_without_process_group() -> None:
    assert not dist.is_initialized()
    got = reduce_counts(7, 10)
    assert got == (7, 10) and all(type(v) is int for v in got)
    got = reduce_counts(7.0, 10.0)
    assert got == (7.0, 10.0) and all(type(v) is float for v in got)
    assert reduce_counts(torch.tensor(3), torch.tensor(4)) == (3, 4)
    with pytest.raises(RuntimeError, match="process group"):
        reduce_counts(7, 10, distributed=True)


WORLD = 2
LOCAL = {0: (3, 10), 1: (45, 50)}  # per-rank (correct, total); ranks hold different amounts


def _reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, init_file, WORLD, 30)
    try:
        c, n = LOCAL[rank]
        result = {
            "auto": reduce_counts(c, n),  # distributed=None: the group is initialised
            "forced": reduce_counts(c, n, distributed=True),
            "float": reduce_counts(float(c) / 2, float(n) / 2),
            "tensor": reduce_counts(torch.tensor(c), torch.tensor(n)),
            "local": reduce_counts(c, n, distributed=False),
        }
        result["types"] = [type(v).__name__ for key in ("auto", "float") for v in result[key]]
        result["accuracy"] = accuracy_from_counts(*result["auto"])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_reduce_counts_two_gloo_processes() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_reduce_worker, args=(os.path.join(tmp, "pg_init"), tmp), nprocs=WORLD, join=True)
        results = []
        for rank in range(WORLD):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    for rank, r in enumerate(results):
        # Global sums: correct 3 + 45 = 48, total 10 + 50 = 60.
        assert r["auto"] == [48, 60], rank
        assert r["forced"] == [48, 60], rank
        assert r["tensor"] == [48, 60], rank
        assert r["float"] == [24.0, 30.0], rank  # (1.5 + 22.5, 5 + 25)
        assert r["types"] == ["int", "int", "float", "float"], rank
        assert r["local"] == list(LOCAL[rank]), rank
        # 48 / 60 = 0.8, not the mean of per-rank accuracies (0.3 + 0.9) / 2 = 0.6.
        assert abs(r["accuracy"] - 0.8) < TOL, rank
