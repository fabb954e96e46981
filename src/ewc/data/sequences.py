"""Continual-learning task sequences (permuted, split, rotated) built from a ``Dataset``.

Every random choice (validation split, pixel permutations, subsamples) is drawn from its own
``numpy.random.SeedSequence(seed, spawn_key=(purpose, task))``, so the same ``seed`` always gives
the same sequence and task ``k`` does not depend on ``n_tasks`` (except the default rotation
angles, which are spread over ``n_tasks``). Each ``Task`` records its transform and the dataset
indices it uses, so a run can be reproduced and audited.

The validation part of a task is carved out of the dataset's *training* split (stratified by
class, the same images for every task); hyper-parameters are chosen on it. The test part comes
from the dataset's test split and is never used for choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ewc.checks import check_int
from ewc.data.datasets import Dataset, load_dataset, stratified_split

__all__ = [
    "SEQUENCES",
    "Task",
    "make_sequence",
    "patch_permutation",
    "permute_patch",
    "permute_pixels",
    "rotate_images",
]

SEQUENCES: tuple[str, ...] = ("permuted", "split", "rotated")

# spawn_key purposes: one independent random stream per (purpose, task).
_VAL_SPLIT, _PERMUTATION, _SUB_TRAIN, _SUB_VAL, _SUB_TEST = range(5)


@dataclass(frozen=True, eq=False)
class Task:
    """One task: float32 images ``[n, 1, H, W]`` in [0, 1] and int64 global class labels.

    ``classes`` are the (global) labels the task draws from; ``transform`` describes the input
    transform (kind, seed, permutation or angle, class group); ``indices`` are the rows of the
    dataset used for train/val (into its train split) and test (into its test split).
    """

    name: str
    index: int
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_val: torch.Tensor = field(repr=False)
    y_val: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    classes: tuple[int, ...]
    transform: dict[str, Any] = field(default_factory=dict, repr=False)
    indices: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        extra = {k: v for k, v in self.transform.items() if k != "permutation"}
        return (
            f"Task(name={self.name!r}, index={self.index}, train={len(self.y_train)}, "
            f"val={len(self.y_val)}, test={len(self.y_test)}, classes={self.classes}, transform={extra})"
        )


def _rng(seed: int, purpose: int, task: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(purpose, task)))


def permute_pixels(x: torch.Tensor, permutation: np.ndarray) -> torch.Tensor:
    """Images ``[n, C, H, W]`` with the pixels reordered: output pixel ``i`` is input pixel ``perm[i]``."""
    perm = torch.as_tensor(np.asarray(permutation), dtype=torch.long)
    return x.flatten(2)[:, :, perm].reshape(x.shape)


def patch_permutation(height: int, width: int, size: int, rng: np.random.Generator | int) -> np.ndarray:
    """A pixel permutation of a ``height × width`` image that shuffles only a centred square.

    The ``size × size`` square starts at row ``(height − size) // 2`` and column
    ``(width − size) // 2``; every pixel outside it stays in place. The paper (Fig. 3) makes
    tasks of graded similarity this way: a small square gives similar tasks, a large one
    dissimilar tasks. ``rng`` is a numpy Generator or a seed.
    """
    height, width = check_int(height, "height", 1), check_int(width, "width", 1)
    size = check_int(size, "size", 1)
    if size > min(height, width):
        raise ValueError(f"patch size {size} does not fit in a {height}x{width} image")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(check_int(rng, "seed", 0))
    top, left = (height - size) // 2, (width - size) // 2
    grid = np.arange(height * width).reshape(height, width)
    inside = grid[top : top + size, left : left + size].ravel()
    perm = grid.ravel().copy()
    perm[inside] = gen.permutation(inside)
    return perm


def permute_patch(x: torch.Tensor, size: int, rng: np.random.Generator | int) -> torch.Tensor:
    """Images ``[n, C, H, W]`` with the pixels of the centred ``size × size`` square shuffled.

    One permutation (from :func:`patch_permutation`) is applied to every image and channel.
    """
    if x.dim() != 4:
        raise ValueError(f"expected images of shape [n, C, H, W], got {tuple(x.shape)}")
    return permute_pixels(x, patch_permutation(x.shape[2], x.shape[3], size, rng))


def rotate_images(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Images ``[n, C, H, W]`` rotated counter-clockwise by ``angle`` degrees (bilinear, zero fill).

    A multiple of 360 returns ``x`` unchanged (exactly). 90 degrees equals ``np.rot90`` on square
    images. One sampling grid serves all images (they are treated as channels), so memory stays
    at the size of the output.
    """
    if float(angle) % 360.0 == 0.0:
        return x.clone()
    n, c, h, w = x.shape
    a = math.radians(float(angle))
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, n * c, h, w], align_corners=False)
    flat = x.reshape(1, n * c, h, w)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, c, h, w).clamp_(0.0, 1.0)


def _subsample(idx: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(idx) <= cap:
        return idx
    return np.sort(rng.choice(idx, size=cap, replace=False))


def _images(x: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x[idx])).to(torch.float32).div_(255.0).unsqueeze(1)


def _labels(y: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.int64))


def make_sequence(
    dataset: Dataset | str,
    kind: str,
    n_tasks: int,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    first_identity: bool = True,
    angles: Sequence[float] | None = None,
    classes_per_task: int = 2,
    max_train_per_task: int | None = None,
    max_eval_per_task: int | None = None,
) -> list[Task]:
    """Build ``n_tasks`` tasks of ``kind`` (one of ``SEQUENCES``) from ``dataset`` (or its name).

    - ``permuted``: a fixed random pixel permutation per task; task 0 is the identity when
      ``first_identity``. All tasks share the label set.
    - ``split``: disjoint class groups ``(0, 1), (2, 3), ...`` of ``classes_per_task`` classes;
      labels stay global. Needs ``n_tasks <= num_classes // classes_per_task``.
    - ``rotated``: a fixed rotation per task, ``angles`` (degrees) or evenly spaced in [0, 180).

    ``val_fraction`` of each class of the training split becomes the validation part.
    ``max_train_per_task`` / ``max_eval_per_task`` subsample train / val and test for quick runs
    (the same base images for every permuted or rotated task).
    """
    if kind not in SEQUENCES:
        raise ValueError(f"unknown sequence kind {kind!r}; valid kinds: {', '.join(SEQUENCES)}")
    n_tasks = check_int(n_tasks, "n_tasks", 1)
    seed = check_int(seed, "seed", 0)
    classes_per_task = check_int(classes_per_task, "classes_per_task", 1)
    if max_train_per_task is not None:
        max_train_per_task = check_int(max_train_per_task, "max_train_per_task", 1)
    if max_eval_per_task is not None:
        max_eval_per_task = check_int(max_eval_per_task, "max_eval_per_task", 1)
    if not isinstance(val_fraction, int | float) or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if angles is not None:
        if kind != "rotated":
            raise ValueError(f"angles only applies to kind='rotated', not {kind!r}")
        angles = [float(a) for a in angles]
        if len(angles) != n_tasks or not all(math.isfinite(a) for a in angles):
            raise ValueError(f"angles must be {n_tasks} finite numbers (one per task), got {angles}")
    ds = load_dataset(dataset) if isinstance(dataset, str) else dataset
    if not isinstance(ds, Dataset):
        raise ValueError(f"dataset must be a Dataset or a dataset name, got {type(dataset).__name__}")
    if kind == "split" and n_tasks > ds.num_classes // classes_per_task:
        raise ValueError(
            f"split: {n_tasks} tasks of {classes_per_task} classes need {n_tasks * classes_per_task} "
            f"classes, {ds.name} has {ds.num_classes} (at most {ds.num_classes // classes_per_task} tasks)"
        )
    if kind == "rotated" and angles is None:
        angles = [180.0 * k / n_tasks for k in range(n_tasks)]

    fit_idx, val_idx = stratified_split(ds.y_train, float(val_fraction), _rng(seed, _VAL_SPLIT))
    test_idx = np.arange(len(ds.y_test))
    n_pixels = math.prod(ds.image_shape)
    tasks: list[Task] = []
    for k in range(n_tasks):
        if kind == "split":
            classes = tuple(range(k * classes_per_task, (k + 1) * classes_per_task))
            tr = fit_idx[np.isin(ds.y_train[fit_idx], classes)]
            va = val_idx[np.isin(ds.y_train[val_idx], classes)]
            te = test_idx[np.isin(ds.y_test, classes)]
        else:
            classes = tuple(range(ds.num_classes))
            tr, va, te = fit_idx, val_idx, test_idx
        # Subsamples do not depend on k: permuted/rotated tasks transform the same base images.
        tr = _subsample(tr, max_train_per_task, _rng(seed, _SUB_TRAIN))
        va = _subsample(va, max_eval_per_task, _rng(seed, _SUB_VAL))
        te = _subsample(te, max_eval_per_task, _rng(seed, _SUB_TEST))

        xs = [_images(ds.x_train, tr), _images(ds.x_train, va), _images(ds.x_test, te)]
        transform: dict[str, Any] = {"kind": kind, "seed": seed, "dataset": ds.name}
        if kind == "permuted":
            identity = first_identity and k == 0
            perm = np.arange(n_pixels) if identity else _rng(seed, _PERMUTATION, k).permutation(n_pixels)
            transform.update(identity=identity, permutation=perm.tolist())
            xs = [permute_pixels(x, perm) for x in xs]
        elif kind == "rotated":
            assert angles is not None
            transform["angle"] = angles[k]
            xs = [rotate_images(x, angles[k]) for x in xs]
        else:
            transform["classes"] = list(classes)
        tasks.append(
            Task(
                name=f"{kind}-{k}",
                index=k,
                x_train=xs[0],
                y_train=_labels(ds.y_train, tr),
                x_val=xs[1],
                y_val=_labels(ds.y_train, va),
                x_test=xs[2],
                y_test=_labels(ds.y_test, te),
                classes=classes,
                transform=transform,
                indices={"train": tr, "val": va, "test": te},
            )
        )
    return tasks
