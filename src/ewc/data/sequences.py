"""Continual-learning task sequences (permuted, split, rotated) built from a ``Dataset``.

Any classification data works (a registered name, a ``.npz`` file, torch datasets:
:func:`ewc.data.custom.load_data`): ``permuted`` shuffles the pixels of an image (one permutation
for every channel: a pixel keeps its colour) and the flattened features of any other input;
``split`` groups classes; ``rotated`` needs images (``[H, W]`` or ``[C, H, W]`` of uint8 or float
values) and refuses other inputs. Task inputs: uint8 pixels as float32 in [0, 1] (images
``[n, C, H, W]``; ``[N, H, W]`` data gets ``C = 1``), float and bool inputs as float32, other
integers (token ids) as int64, in the shape of one sample.

Every random choice (validation split, pixel permutations, subsamples) is drawn from its own
``numpy.random.SeedSequence(seed, spawn_key=(purpose, task))``, so the same ``seed`` always gives
the same sequence and task ``k`` does not depend on ``n_tasks`` (except the default rotation
angles, which are spread over ``n_tasks``). Each ``Task`` records its transform and the dataset
indices it uses, so a run can be reproduced and audited.

Tasks are built when they are read (:class:`ewc.data.tasks.TaskSequence`): making a sequence of
100 000 tasks costs no images, and a task's images are built when they are read, with the same
values as if every task had been built up front; validation and test parts are kept in the
sequence's bounded cache (``cache_bytes``), training parts are built on each read.

The validation part of a task is carved out of the dataset's *training* split (stratified by
class, the same images for every task); hyper-parameters are chosen on it. The test part comes
from the dataset's test split and is never used for choices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ewc.checks import check_int
from ewc.data.custom import DataInfo, data_info, load_data
from ewc.data.datasets import Dataset, stratified_split
from ewc.data.tasks import CACHE_BYTES, PartCache, Task, TaskSequence

__all__ = [
    "SEQUENCES",
    "Task",
    "TaskSequence",
    "check_sequence_data",
    "check_task_count",
    "make_sequence",
    "patch_permutation",
    "permute_patch",
    "permute_pixels",
    "rotate_images",
]

SEQUENCES: tuple[str, ...] = ("permuted", "split", "rotated")

# spawn_key purposes: one independent random stream per (purpose, task).
_VAL_SPLIT, _PERMUTATION, _SUB_TRAIN, _SUB_VAL, _SUB_TEST = range(5)


def _rng(seed: int, purpose: int, task: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(purpose, task)))


def permute_pixels(x: torch.Tensor, permutation: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with each row of its last ``len(permutation)`` elements reordered: output element
    ``i`` is input element ``perm[i]`` (written into ``out``, of ``x``'s shape, when given).
    Images ``[n, C, H, W]`` with a permutation of ``H·W``: the pixels of every channel; rows
    ``[n, D]`` with one of ``D``: the features."""
    perm = torch.as_tensor(np.asarray(permutation), dtype=torch.long)
    if x.numel() % max(1, len(perm)):
        raise ValueError(f"a permutation of {len(perm)} does not divide inputs of shape {tuple(x.shape)}")
    # rows × pixels, index_select along the last dim: no expanded index (3x faster than
    # x.flatten(2)[:, :, perm], 9x faster than index_select on the 3-D view)
    rows = x.reshape(-1, len(perm))
    if out is None:
        return rows.index_select(1, perm).reshape(x.shape)
    torch.index_select(rows, 1, perm, out=out.view(rows.shape))
    return out


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


def rotate_images(x: torch.Tensor, angle: float, *, clamp: bool = True) -> torch.Tensor:
    """Images ``[n, C, H, W]`` rotated counter-clockwise by ``angle`` degrees (bilinear, zero fill).

    A multiple of 360 returns ``x`` unchanged (exactly). 90 degrees equals ``np.rot90`` on square
    images. One sampling grid serves all images (they are treated as channels), so memory stays
    at the size of the output. ``clamp``: the result is clipped to [0, 1] (pixels scaled from
    uint8); without it, values keep their range (bilinear weights add up to at most 1).
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
    out = out.reshape(n, c, h, w)
    return out.clamp_(0.0, 1.0) if clamp else out


def _subsample(idx: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(idx) <= cap:
        return idx
    return np.sort(rng.choice(idx, size=cap, replace=False))


def _inputs(x: np.ndarray, idx: np.ndarray, channel: bool) -> torch.Tensor:
    """Rows ``idx`` of ``x`` as a task's inputs (see the module doc); ``channel``: add C = 1."""
    t = torch.from_numpy(np.ascontiguousarray(x[idx]))
    if x.dtype == np.uint8:
        t = t.to(torch.float32).div_(255.0)
    else:
        t = t.to(torch.float32 if x.dtype.kind in "fb" else torch.int64)
    return t.unsqueeze(1) if channel else t


def _labels(y: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y[idx], dtype=np.int64))


def check_task_count(
    kind: str, n_tasks: int, dataset: str, num_classes: int, classes_per_task: int = 2
) -> None:
    """A ValueError unless a ``kind`` sequence of ``dataset`` can have ``n_tasks`` tasks (a split
    sequence has one group of ``classes_per_task`` classes per task; the others have no limit)."""
    most = num_classes // classes_per_task
    if kind == "split" and n_tasks > most:
        raise ValueError(
            f"tasks must be at most {most} for a split sequence of {dataset} ({num_classes} classes, "
            f"{classes_per_task} per task), got {n_tasks}"
        )


def _check_rotatable(kind: str, name: str, is_image: bool, shape: tuple[int, ...], dtype: Any) -> None:
    if kind == "rotated" and not is_image:
        raise ValueError(
            f"rotated tasks need images (one sample [H, W] or [C, H, W] of uint8 or float values); "
            f"{name} has samples of shape {tuple(shape)}, dtype {dtype}: use permuted or split"
        )


def check_sequence_data(kind: str, n_tasks: int, data: str, classes_per_task: int = 2) -> DataInfo:
    """``data``'s :class:`~ewc.data.custom.DataInfo` (a registered name or a ``.npz`` path, read
    from its headers and labels only), or a ValueError unless a ``kind`` sequence of ``n_tasks``
    tasks can be made from it: the task count of a split sequence (:func:`check_task_count`),
    images for a rotated one."""
    info = data_info(data)
    check_task_count(kind, n_tasks, info.name, info.num_classes, classes_per_task)
    _check_rotatable(kind, info.name, info.is_image, info.input_shape, info.dtype)
    return info


class _Builder:
    """Builds task ``k`` of a sequence on demand; keeps permutations of the tasks read and images
    (in a :class:`PartCache`). Every value is the one the eager construction gave."""

    def __init__(self, ds: Dataset, kind: str, n_tasks: int, seed: int, options: dict[str, Any]):
        self.ds, self.kind, self.n_tasks, self.seed = ds, kind, n_tasks, seed
        self.first_identity = options["first_identity"]
        self.angles = options["angles"]
        self.per_task = options["classes_per_task"]
        self.caps = (options["max_train_per_task"], options["max_eval_per_task"])
        self.cache = PartCache(options["cache_bytes"])
        if ds.x_val is None:  # the validation part: a stratified share of the training split
            self.fit_idx, self.val_idx = stratified_split(
                ds.y_train, options["val_fraction"], _rng(seed, _VAL_SPLIT)
            )
            self.x_val, self.y_val = ds.x_train, ds.y_train
        else:  # or the dataset's own validation split
            self.fit_idx, self.val_idx = np.arange(len(ds.y_train)), np.arange(len(ds.y_val))
            self.x_val, self.y_val = ds.x_val, ds.y_val
        self.channel = ds.is_image and len(ds.image_shape) == 2  # [N, H, W] images: C = 1
        # a permutation moves the pixels of an image (every channel alike), else the features
        self.n_pixels = math.prod(ds.image_shape[-2:] if ds.is_image else ds.image_shape)
        itemsize = 4 if ds.x_train.dtype == np.uint8 or ds.x_train.dtype.kind in "fb" else 8
        self.sample_bytes = math.prod(ds.image_shape) * itemsize  # of a built input
        self._permutations: dict[int, np.ndarray] = {}
        self._split: dict[int, tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]] = {}
        self._base: dict[str, torch.Tensor] = {}
        # permuted / rotated tasks transform the same base images: one set of indices and labels
        self._shared = None if kind == "split" else self._parts(tuple(range(ds.num_classes)))

    def _parts(self, classes: tuple[int, ...]) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """The dataset rows of a task's train / val / test parts and their labels."""
        ds, test_idx = self.ds, np.arange(len(self.ds.y_test))
        if self.kind == "split":
            tr = self.fit_idx[np.isin(ds.y_train[self.fit_idx], classes)]
            va = self.val_idx[np.isin(self.y_val[self.val_idx], classes)]
            te = test_idx[np.isin(ds.y_test, classes)]
        else:
            tr, va, te = self.fit_idx, self.val_idx, test_idx
        # Subsamples do not depend on k: permuted/rotated tasks transform the same base images.
        max_train, max_eval = self.caps
        idx = {
            "train": _subsample(tr, max_train, _rng(self.seed, _SUB_TRAIN)),
            "val": _subsample(va, max_eval, _rng(self.seed, _SUB_VAL)),
            "test": _subsample(te, max_eval, _rng(self.seed, _SUB_TEST)),
        }
        labels = {
            "train": _labels(ds.y_train, idx["train"]),
            "val": _labels(self.y_val, idx["val"]),
            "test": _labels(ds.y_test, idx["test"]),
        }
        return idx, labels

    def _split_parts(self, k: int) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        if k not in self._split:  # at most num_classes // classes_per_task of them
            self._split[k] = self._parts(self._classes(k))
        return self._split[k]

    def _classes(self, k: int) -> tuple[int, ...]:
        if self.kind == "split":
            return tuple(range(k * self.per_task, (k + 1) * self.per_task))
        return tuple(range(self.ds.num_classes))

    def permutation(self, k: int) -> np.ndarray:
        if k not in self._permutations:
            identity = self.first_identity and k == 0
            perm = (
                np.arange(self.n_pixels)
                if identity
                else _rng(self.seed, _PERMUTATION, k).permutation(self.n_pixels)
            )
            self._permutations[k] = perm
        return self._permutations[k]

    def angle(self, k: int) -> float:
        return self.angles[k] if self.angles is not None else 180.0 * k / self.n_tasks

    def read(self, k: int, part: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Task ``k``'s images of ``part`` (see :meth:`TaskSequence.read`)."""
        idx, _ = self._shared if self._shared is not None else self._split_parts(k)
        return self.images(k, part, idx[part], out)

    def images(self, k: int, part: str, rows: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Task ``k``'s images of ``part`` (its ``rows`` of the dataset): from the cache, or built
        (into ``out`` if it fits and the part is not to be kept). Validation and test parts, read
        at every evaluation, are kept while the cache has room."""
        if part != "train":
            key = (k, part)
            if key in self.cache or self.cache.room(len(rows) * self.sample_bytes):
                return self.cache.get(key, partial(self._build_images, k, part, rows))
        return self._build_images(k, part, rows, out)

    def _build_images(
        self, k: int, part: str, rows: np.ndarray, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self._shared is None:  # split: each task its own rows (few tasks: their parts are kept)
            return _inputs(self._source(part), rows, self.channel)
        # Permuted / rotated tasks transform one base tensor per part, scaled once and kept, into
        # ``out`` or one new tensor: no temporaries of the part's size, which (built and freed T²
        # times by a run's evaluations, between small long-lived allocations) fragmented glibc's
        # heap until a 1000-task run held 6 GB.
        if part not in self._base:
            self._base[part] = _inputs(self._source(part), rows, self.channel)
        base = self._base[part]
        if out is None or out.shape != base.shape or out.dtype != base.dtype or not out.is_contiguous():
            out = torch.empty_like(base)
        if self.kind == "rotated":  # in chunks of 256 images (the same values as all at once)
            for i in range(0, len(base), 256):
                out[i : i + 256] = rotate_images(base[i : i + 256], self.angle(k), clamp=self.clamp)
            return out
        if self.first_identity and k == 0:
            return out.copy_(base)
        return permute_pixels(base, self.permutation(k), out=out)

    def _source(self, part: str) -> np.ndarray:
        return {"train": self.ds.x_train, "val": self.x_val, "test": self.ds.x_test}[part]

    @property
    def clamp(self) -> bool:
        """Rotated pixels stay in [0, 1] (uint8 data); float images keep their own range."""
        return self.ds.x_train.dtype == np.uint8

    def task(self, k: int) -> Task:
        classes = self._classes(k)
        idx, labels = self._shared if self._shared is not None else self._split_parts(k)
        transform: dict[str, Any] = {"kind": self.kind, "seed": self.seed, "dataset": self.ds.name}
        if self.kind == "permuted":
            identity = self.first_identity and k == 0
            transform.update(identity=identity, permutation=self.permutation(k).tolist())
        elif self.kind == "rotated":
            transform["angle"] = self.angle(k)
        else:
            transform["classes"] = list(classes)
        x = {part: partial(self.images, k, part, idx[part]) for part in ("train", "val", "test")}
        return Task(
            name=f"{self.kind}-{k}",
            index=k,
            x_train=x["train"],
            y_train=labels["train"],
            x_val=x["val"],
            y_val=labels["val"],
            x_test=x["test"],
            y_test=labels["test"],
            classes=classes,
            transform=transform,
            indices=dict(idx),
        )


def make_sequence(
    dataset: Dataset | str | tuple,
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
    cache_bytes: int = CACHE_BYTES,
) -> TaskSequence:
    """``n_tasks`` tasks of ``kind`` (one of ``SEQUENCES``) from ``dataset``: a ``Dataset``, a
    registered name, a ``.npz`` path or a ``(train, test[, val])`` tuple of torch datasets
    (:func:`ewc.data.custom.load_data`).

    - ``permuted``: a fixed random permutation per task of the pixels (images; the same in every
      channel) or of the flattened features (other inputs); task 0 is the identity when
      ``first_identity``. All tasks share the label set.
    - ``split``: disjoint class groups ``(0, 1), (2, 3), ...`` of ``classes_per_task`` classes;
      labels stay global. Needs ``n_tasks <= num_classes // classes_per_task``.
    - ``rotated``: a fixed rotation per task, ``angles`` (degrees) or evenly spaced in [0, 180);
      images only (a clear error for other inputs).

    ``val_fraction`` of each class of the training split becomes the validation part (a dataset
    with its own validation split uses that instead).
    ``max_train_per_task`` / ``max_eval_per_task`` subsample train / val and test for quick runs
    (the same base images for every permuted or rotated task).

    The result is a :class:`~ewc.data.tasks.TaskSequence`: task ``k`` is built when it is read,
    its images when they are read; validation and test parts are kept up to ``cache_bytes`` in
    all (0: none kept), training parts are built on each read.
    Labels are shared by the tasks of a permuted or rotated sequence (one tensor per part).
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
    if not isinstance(dataset, Dataset | str | os.PathLike | tuple | list):
        raise ValueError(
            f"dataset must be a Dataset, a dataset name, a .npz path or a (train, test) pair of torch "
            f"datasets, got {type(dataset).__name__}"
        )
    ds = load_data(dataset)
    _check_rotatable(kind, ds.name, ds.is_image, ds.image_shape, ds.x_train.dtype)
    if kind == "split" and n_tasks > ds.num_classes // classes_per_task:
        raise ValueError(
            f"split: {n_tasks} tasks of {classes_per_task} classes need {n_tasks * classes_per_task} "
            f"classes, {ds.name} has {ds.num_classes} (at most {ds.num_classes // classes_per_task} tasks)"
        )
    options = {
        "val_fraction": float(val_fraction),
        "first_identity": first_identity,
        "angles": angles,
        "classes_per_task": classes_per_task,
        "max_train_per_task": max_train_per_task,
        "max_eval_per_task": max_eval_per_task,
        "cache_bytes": cache_bytes,
    }
    builder = _Builder(ds, kind, n_tasks, seed, options)
    return TaskSequence(n_tasks, builder.task, cache=builder.cache, reader=builder.read)
