"""A user's own data: a ``.npz`` file or torch datasets, as a :class:`~ewc.data.datasets.Dataset`.

``.npz`` (``--data path.npz``): arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
optionally ``x_val``, ``y_val`` (then the validation part is that split instead of a stratified
share of the training split). Inputs ``x_*`` are ``[N, ...]`` of any shape, one dtype for all
splits: uint8 (pixels, scaled to [0, 1]), float or bool (as they are; finite), or other integers
(token ids, kept as int64). Images are ``[N, H, W]`` or ``[N, C, H, W]`` (channels first).
Labels ``y_*`` are 1-D integers ``0 .. C-1`` (any integer dtype); ``C`` is the largest label + 1.
A bad file is one clear error naming the missing array or the mismatched shapes;
:func:`inspect_npz` checks the names, shapes and dtypes from the arrays' headers and reads only
the labels, so a run's settings are refused before anything is trained.

Torch (:func:`from_torch`): any ``torch.utils.data.Dataset`` s of ``(input, label)`` pairs, read
once into arrays. :func:`load_data` takes a registered name, a ``.npz`` path, a ``Dataset`` or a
``(train, test[, val])`` tuple of torch datasets.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ewc.checks import Constraint
from ewc.data.datasets import DATASETS, Dataset, load_dataset

__all__ = [
    "NPZ_ARRAYS",
    "DataChoice",
    "DataInfo",
    "data_info",
    "data_record",
    "file_sha256",
    "from_torch",
    "inspect_npz",
    "is_npz_path",
    "load_data",
    "load_npz_data",
]

PathLike = str | os.PathLike[str]
#: the arrays a ``.npz`` dataset must hold (``x_val`` / ``y_val`` are optional, both or neither)
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_SPLITS = ("train", "val", "test")


def is_npz_path(value: Any) -> bool:
    """Whether ``value`` names a ``.npz`` file (by its suffix; the file is not opened)."""
    return isinstance(value, str | os.PathLike) and os.fspath(value).lower().endswith(".npz")


@dataclass(frozen=True)
class DataInfo:
    """What a run's settings are checked against before any data is loaded."""

    name: str  # the registered name or the path as given
    input_shape: tuple[int, ...]  # one sample's shape (images: (H, W) or (C, H, W))
    dtype: str  # of the inputs ("uint8" for the registered datasets)
    num_classes: int
    sizes: dict[str, int] | None = None  # rows per split (a .npz file's; None for a name)

    @property
    def is_image(self) -> bool:
        """The rule of :attr:`Dataset.is_image`."""
        dtype = np.dtype(self.dtype)
        return len(self.input_shape) in (2, 3) and (dtype == np.uint8 or dtype.kind in "fb")

    @property
    def task_shape(self) -> tuple[int, ...]:
        """One sample's shape in the tasks (and the model's ``input_shape``): [H, W] images get C = 1."""
        return (1, *self.input_shape) if self.is_image and len(self.input_shape) == 2 else self.input_shape

    @property
    def task_dtype(self) -> str:
        """The tasks' input dtype: float32, or int64 for integer inputs other than uint8 (token ids)."""
        dtype = np.dtype(self.dtype)
        return "float32" if dtype == np.uint8 or dtype.kind in "fb" else "int64"


def _header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` member, from its header (the data is not read)."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # a rare format version: read the array itself
            f.seek(0)
            a = np.load(f, allow_pickle=False)
            shape, dtype = a.shape, a.dtype
    return tuple(shape), np.dtype(dtype)


def inspect_npz(path: PathLike) -> DataInfo:
    """Check a ``.npz`` dataset (see the module doc) without reading its inputs; a clear error
    (``FileNotFoundError`` / ``ValueError``) naming the file and what is wrong."""
    where = os.fspath(path)
    if not Path(where).is_file():
        raise FileNotFoundError(f"no such data file: {where}")
    try:
        with zipfile.ZipFile(where) as zf:
            members = {n.removesuffix(".npy"): n for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in NPZ_ARRAYS if k not in members]
            if missing:
                has = ", ".join(sorted(members)) or "none"
                raise ValueError(f"{where}: missing array(s) {', '.join(missing)} (the file has: {has})")
            if ("x_val" in members) != ("y_val" in members):
                raise ValueError(f"{where}: has one of x_val, y_val but not the other: give both or neither")
            splits = [s for s in _SPLITS if f"x_{s}" in members]
            heads = {k: _header(zf, members[k]) for k in (f"{p}_{s}" for s in splits for p in "xy")}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{where}: not a readable .npz file ({err})") from None
    except ValueError as err:
        if str(err).startswith(where):
            raise
        raise ValueError(f"{where}: not a readable .npz file ({err})") from None
    shape0, dtype0 = heads["x_train"]
    for s in splits:
        (xs, xd), (ys, yd) = heads[f"x_{s}"], heads[f"y_{s}"]
        if len(xs) < 2 or xd.kind not in "uifb":
            raise ValueError(f"{where}: x_{s} must be a numeric array [N, ...], got {xd} of shape {xs}")
        if xs[1:] != shape0[1:]:
            raise ValueError(
                f"{where}: x_{s} has samples of shape {xs[1:]}, x_train {shape0[1:]}: "
                "every split needs one shape"
            )
        if xd != dtype0:
            raise ValueError(f"{where}: x_{s} is {xd}, x_train {dtype0}: every split needs one dtype")
        if len(ys) != 1 or yd.kind not in "ui":
            raise ValueError(f"{where}: y_{s} must be 1-D integer class labels, got {yd} of shape {ys}")
        if ys[0] != xs[0]:
            raise ValueError(f"{where}: x_{s} has {xs[0]} rows but y_{s} has {ys[0]} labels")
    if heads["x_train"][0][0] == 0 or heads["x_test"][0][0] == 0:
        raise ValueError(f"{where}: x_train and x_test need at least one row each")
    top = -1
    with np.load(where, allow_pickle=False) as npz:
        for s in splits:
            y = npz[f"y_{s}"]
            if y.size and int(y.min()) < 0:
                raise ValueError(f"{where}: y_{s} has negative labels (class indices must be 0 .. C-1)")
            top = max(top, int(y.max()) if y.size else -1)
    sizes = {s: int(heads[f"x_{s}"][0][0]) for s in splits}
    return DataInfo(where, tuple(int(d) for d in shape0[1:]), str(dtype0), top + 1, sizes)


def load_npz_data(path: PathLike) -> Dataset:
    """A user's ``.npz`` dataset (checked first with :func:`inspect_npz`); its name is the path."""
    info = inspect_npz(path)
    where = os.fspath(path)
    with np.load(where, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k[:2] in ("x_", "y_") and k[2:] in _SPLITS}
    for s in info.sizes or {}:
        arrays[f"y_{s}"] = arrays[f"y_{s}"].astype(np.int64)
    return Dataset(name=where, num_classes=info.num_classes, image_shape=info.input_shape, **arrays)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes (kept per path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _read_torch(dataset: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(input, label)`` item of a torch-style dataset as stacked arrays."""
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError(
            f"{what}: a dataset with len() and [i] is needed, got {type(dataset).__name__}"
        ) from None
    if n == 0:
        raise ValueError(f"{what}: the dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) < 2:
            raise ValueError(f"{what}[{i}]: expected an (input, label) pair, got {type(item).__name__}")
        x, y = _to_numpy(item[0]), _to_numpy(item[1])
        if xs and (x.shape != xs[0].shape or x.dtype != xs[0].dtype):
            raise ValueError(
                f"{what}[{i}]: input {x.dtype} {x.shape}, item 0's {xs[0].dtype} {xs[0].shape}: "
                "every input needs one shape and dtype"
            )
        if y.ndim != 0 or y.dtype.kind not in "ui":
            raise ValueError(
                f"{what}[{i}]: the label must be one integer class index, got {y.dtype} {y.shape}"
            )
        xs.append(x)
        ys.append(int(y))
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def from_torch(train: Any, test: Any, val: Any = None, *, name: str = "torch") -> Dataset:
    """A :class:`Dataset` from ``torch.utils.data.Dataset`` s (or anything with ``len`` and
    ``[i]``) whose items are ``(input, label)``: inputs tensors or arrays of one shape and dtype
    (images channels first), labels integers ``0 .. C-1``. ``val``: the validation split."""
    parts = {"train": train, "test": test, **({"val": val} if val is not None else {})}
    arrays: dict[str, np.ndarray] = {}
    for split, ds in parts.items():
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _read_torch(ds, f"{name} {split}")
    if min(int(arrays[f"y_{s}"].min()) for s in parts) < 0:
        raise ValueError(f"{name}: negative labels (class indices must be 0 .. C-1)")
    classes = max(int(arrays[f"y_{s}"].max()) for s in parts) + 1
    return Dataset(name=name, num_classes=classes, image_shape=arrays["x_train"].shape[1:], **arrays)


def load_data(data: Any, *, root: PathLike | None = None, **options: Any) -> Dataset:
    """``data`` as a :class:`Dataset`: a registered name (:func:`load_dataset`, given ``root``
    and ``options``), a ``.npz`` path, a ``Dataset``, or a ``(train, test[, val])`` tuple of
    torch datasets (:func:`from_torch`)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple | list) and len(data) in (2, 3):
        return from_torch(*data)
    if is_npz_path(data):
        return load_npz_data(data)
    if isinstance(data, str) and data in DATASETS:  # a registered name
        return load_dataset(data, root=root, **options)
    raise ValueError(
        f"unknown dataset {data!r}; valid names: {', '.join(DATASETS)}, or a path to a .npz file "
        "(or, in Python, a Dataset or a (train, test) pair of torch datasets)"
    )


def data_info(data: str) -> DataInfo:
    """Shapes and classes of a registered dataset (as it declares them) or a ``.npz`` file."""
    if is_npz_path(data):
        return inspect_npz(data)
    if data not in DATASETS:
        raise ValueError(
            f"unknown dataset {data!r}; valid names: {', '.join(DATASETS)}, or a path to a .npz file"
        )
    spec = DATASETS[data]
    return DataInfo(data, spec.image_shape, "uint8", spec.num_classes)


def data_record(data: str) -> dict[str, Any]:
    """What a run records about its data: the name, or the file's absolute path and SHA-256,
    with the input shape, dtype, classes and (for a file) the rows of each split."""
    info = data_info(data)
    if is_npz_path(data):
        record: dict[str, Any] = {"path": os.path.abspath(data), "sha256": file_sha256(data)}
    else:
        record = {"name": data}
    record.update(input_shape=list(info.input_shape), dtype=info.dtype, num_classes=info.num_classes)
    if info.sizes is not None:
        record["sizes"] = dict(info.sizes)
    return record


@dataclass(frozen=True)
class DataChoice(Constraint):
    """A registered dataset name or the path of a ``.npz`` file (checked when it is read)."""

    allow_none: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.allow_none
        return isinstance(value, str) and (value in DATASETS or (is_npz_path(value) and len(value) > 4))

    def describe(self) -> str:
        return f"one of {', '.join(DATASETS)}, or a path to a .npz file"
