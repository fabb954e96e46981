"""Tests for ewc.data: IDX reader, source search, datasets and task sequences (no network)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc.data import (
    DATASETS,
    SEQUENCES,
    ChecksumError,
    DataNotFoundError,
    Dataset,
    check_pair,
    load_dataset,
    make_sequence,
    patch_permutation,
    permute_patch,
    read_idx,
    sources,
)
from ewc.data import datasets as datasets_mod
from ewc.data.sequences import rotate_images

torch.set_num_threads(1)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the user's cache, $EWC_DATA or $EWC_MIRROR, and no mirror but a dead port."""
    monkeypatch.delenv("EWC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("EWC_MIRROR", "http://127.0.0.1:9")  # discard port: refused, never the internet


# ----------------------------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------------------------

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as an IDX file (independent of the reader under test)."""
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    header = bytes([0, 0, _CODES[dt], arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(dt).tobytes()


def write(path: Path, data: bytes, *, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip_images_and_labels(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    # Names deliberately lie about compression: detection must use the magic bytes.
    got_x = read_idx(write(tmp_path / ("img" if gz else "img.gz"), idx_bytes(images), gz=gz))
    got_y = read_idx(write(tmp_path / ("lab" if gz else "lab.gz"), idx_bytes(labels), gz=gz))
    assert got_x.dtype == np.uint8 and got_x.shape == (7, 5, 4)
    assert got_y.dtype == np.uint8 and got_y.shape == (7,)
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)
    assert got_x.flags.writeable


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.float32])
def test_read_idx_multibyte_dtypes_are_big_endian(tmp_path: Path, dtype: type) -> None:
    arr = (np.arange(-6, 6).reshape(3, 4) * 37).astype(dtype)
    got = read_idx(write(tmp_path / "a.idx", idx_bytes(arr)))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, arr)


def _bad(tmp_path: Path, data: bytes, match: str, *, gz: bool = False) -> None:
    path = write(tmp_path / "broken-file.idx", data, gz=gz)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert "broken-file.idx" in str(info.value)


def test_read_idx_wrong_magic(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((2, 3), np.uint8))
    _bad(tmp_path, b"\x01" + good[1:], "not an IDX file")
    _bad(tmp_path, good[:2] + b"\x07" + good[3:], "unsupported IDX dtype code 0x07")
    _bad(tmp_path, good[:3] + b"\x00", "0 dimensions")


def test_read_idx_truncated(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((4, 3, 3), np.uint8))
    _bad(tmp_path, good[:-1], "truncated IDX file")
    _bad(tmp_path, good[:-1], "truncated IDX file", gz=True)
    _bad(tmp_path, good[:9], "truncated IDX file")  # inside the dims
    _bad(tmp_path, good[:2], "truncated IDX file")


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros(5, np.uint8))
    _bad(tmp_path, good + b"\x00\x01", "2 trailing bytes")


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)), mtime=0)
    _bad(tmp_path, packed[:-12], "corrupt gzip")  # stream cut short
    flipped = bytearray(packed)
    flipped[len(packed) // 2] ^= 0xFF
    _bad(tmp_path, bytes(flipped), "corrupt gzip")  # CRC or deflate error
    _bad(tmp_path, packed + b"junk", "corrupt gzip")  # garbage after the stream


def test_check_pair() -> None:
    x = np.zeros((3, 2, 2), np.uint8)
    check_pair(x, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="3 images but 4 labels"):
        check_pair(x, np.zeros(4, np.int64), "train")
    with pytest.raises(ValueError, match="1-D"):
        check_pair(x, np.zeros((3, 1), np.int64))


# ----------------------------------------------------------------------------------------------
# Sources: search order and verification (fake files; no network)
# ----------------------------------------------------------------------------------------------


def fake_files(n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict[str, bytes]:
    """Uncompressed IDX contents of a tiny MNIST-like dataset, keyed by published file name."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte.gz": idx_bytes((np.arange(n_train) % 10).astype(np.uint8)),
        "t10k-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte.gz": idx_bytes((np.arange(n_test) % 10).astype(np.uint8)),
    }


def register_fake(
    monkeypatch: pytest.MonkeyPatch, dataset: str, contents: dict[str, bytes]
) -> dict[str, bytes]:
    """Point sources.FILES[dataset] at ``contents``; return the published (gzip) bytes."""
    published = {name: gzip.compress(data, mtime=0) for name, data in contents.items()}
    entries = tuple(
        sources.RemoteFile(
            name,
            len(published[name]),
            hashlib.sha256(published[name]).hexdigest(),
            hashlib.sha256(data).hexdigest(),
        )
        for name, data in contents.items()
    )
    monkeypatch.setitem(sources.FILES, dataset, entries)
    return published


def put(directory: Path, published: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in published.items():
        (directory / name).write_bytes(data)
    return directory


def test_cache_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sources.cache_dir() == tmp_path / "xdg" / "ewc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.cache_dir() == tmp_path / "home" / ".cache" / "ewc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says: ignore it
    assert sources.cache_dir() == tmp_path / "home" / ".cache" / "ewc"


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    published = register_fake(monkeypatch, "fashion-mnist", fake_files())
    env, system, root = tmp_path / "env", tmp_path / "system", tmp_path / "root"
    monkeypatch.setenv("EWC_DATA", str(env))
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion-mnist", (system,))
    cache = sources.cache_dir() / "fashion-mnist"
    assert sources.search_dirs("fashion-mnist", root) == [
        root / "fashion-mnist",
        root,
        env / "fashion-mnist",
        env,
        cache,
        system,
    ]

    def found() -> Path:
        paths = sources.find_files("fashion-mnist", download=False)
        assert sorted(paths) == sorted(published)
        (parent,) = {p.parent for p in paths.values()}
        return parent

    with pytest.raises(DataNotFoundError):
        found()
    put(system, published)
    assert found() == system
    put(cache, published)
    assert found() == cache
    put(env, published)
    assert found() == env
    put(env / "fashion-mnist", published)
    assert found() == env / "fashion-mnist"
    put(root, published)
    assert (
        sources.find_files("fashion-mnist", root=root, download=False)["t10k-labels-idx1-ubyte.gz"].parent
        == root
    )
    # A directory with only 3 of the 4 files is skipped as a whole.
    (env / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert found() == env


def test_search_accepts_uncompressed_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    contents = fake_files()
    register_fake(monkeypatch, "mnist", contents)
    monkeypatch.setenv("EWC_DATA", str(tmp_path / "env"))
    put(tmp_path / "env", {name.removesuffix(".gz"): data for name, data in contents.items()})
    paths = sources.find_files("mnist", download=False)
    assert paths["train-images-idx3-ubyte.gz"].name == "train-images-idx3-ubyte"
    ds = load_dataset("mnist", download=False)
    assert ds.x_train.shape == (12, 28, 28) and ds.x_test.shape == (6, 28, 28)


def test_not_found_message_says_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EWC_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion-mnist", (tmp_path / "sys",))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "$EWC_DATA" in msg and "network" in msg
    for d in (tmp_path / "nowhere", sources.cache_dir() / "fashion-mnist", tmp_path / "sys"):
        assert str(d) in msg
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", download=False)
    assert "apt-get" not in str(info.value)  # there is no Debian package for MNIST


def test_read_verified(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    contents = fake_files()
    published = register_fake(monkeypatch, "mnist", contents)
    f = sources.FILES["mnist"][0]
    data = contents[f.name]
    exact = write(tmp_path / "exact.gz", published[f.name])
    assert sources.read_verified(exact, f) == data
    # Re-compressed differently (as Debian's files are) or not compressed: content hash decides.
    recompressed = write(tmp_path / "re.gz", gzip.compress(data, compresslevel=1, mtime=123))
    assert recompressed.read_bytes() != published[f.name]
    assert sources.read_verified(recompressed, f) == data
    assert sources.read_verified(write(tmp_path / "raw", data), f) == data
    damaged = bytearray(data)
    damaged[-1] ^= 1
    with pytest.raises(ChecksumError, match="damaged") as info:
        sources.read_verified(write(tmp_path / "bad.gz", bytes(damaged), gz=True), f)
    assert "bad.gz" in str(info.value)


def test_load_file_dataset_rejects_wrong_content(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    register_fake(monkeypatch, "mnist", fake_files(seed=0))
    other = {k: gzip.compress(v) for k, v in fake_files(seed=1).items()}
    monkeypatch.setenv("EWC_DATA", str(put(tmp_path / "env", other)))
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", download=False)


def test_load_file_dataset_via_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    contents = fake_files(n_train=20, n_test=10)
    published = register_fake(monkeypatch, "mnist", contents)
    put(tmp_path / "root" / "mnist", published)
    ds = load_dataset("mnist", root=tmp_path / "root", download=False)
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.image_shape == (28, 28)
    assert ds.y_train.dtype == np.int64 and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.y_train, np.arange(20) % 10)
    pixels = np.frombuffer(contents["t10k-images-idx3-ubyte.gz"][16:], np.uint8)
    np.testing.assert_array_equal(ds.x_test.reshape(-1), pixels)


@pytest.mark.skipif(
    not all((DEBIAN_FASHION / f.name).is_file() for f in sources.FILES["fashion-mnist"]),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package() -> None:
    ds = load_dataset("fashion-mnist", download=False)  # only the system dir can hold it here
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    assert ds.y_train[0] == 9  # the first training image is an ankle boot


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist10k() -> Dataset:
    return load_dataset("mnist-10k")


def test_mnist10k_shapes_and_classes(mnist10k: Dataset) -> None:
    ds = mnist10k
    assert ds.name == "mnist-10k" and ds.num_classes == 10 and ds.image_shape == (28, 28)
    assert ds.x_train.shape == (8000, 28, 28) and ds.x_test.shape == (2000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert set(np.unique(ds.y_train)) == set(range(10)) and set(np.unique(ds.y_test)) == set(range(10))
    # Full MNIST counts of the first 10 000 training digits, split 80/20 per class.
    counts = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    np.testing.assert_array_equal(counts, [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978])
    assert 0 < ds.x_train.mean() < 255 and ds.x_train.max() == 255
    # Shuffled: the labels are not sorted by class.
    assert len(np.unique(ds.y_train[:50])) == 10
    assert not ds.x_train.flags.writeable
    assert "train=8000" in repr(ds)


def test_mnist10k_deterministic(mnist10k: Dataset) -> None:
    again = load_dataset()
    for attr in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, attr), getattr(mnist10k, attr))


def _embedded() -> Path:
    return Path(datasets_mod.__file__).with_name("mnist10k.npz")


def test_npz_loader_detects_corruption(tmp_path: Path) -> None:
    src = _embedded()
    digest = datasets_mod.MNIST10K_DIGEST
    ok = datasets_mod.load_npz_dataset(src, "x", digest=digest)
    assert len(ok.y_train) == 8000
    # Damaged zip bytes.
    data = bytearray(src.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        datasets_mod.load_npz_dataset(bad, "x", digest=digest)
    # A well-formed npz whose arrays differ by one pixel.
    tampered = tmp_path / "tampered.npz"
    arrays = {k: np.array(getattr(ok, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
    arrays["x_train"][0, 0, 0] ^= 1
    np.savez_compressed(tampered, **arrays)
    with pytest.raises(ValueError, match="do not match the recorded SHA-256"):
        datasets_mod.load_npz_dataset(tampered, "x", digest=digest)
    # Missing array / wrong dtype.
    np.savez(tmp_path / "partial.npz", x_train=arrays["x_train"])
    with pytest.raises(ValueError, match="missing arrays"):
        datasets_mod.load_npz_dataset(tmp_path / "partial.npz", "x")
    arrays["y_train"] = arrays["y_train"].astype(np.int32)
    np.savez(tmp_path / "dtype.npz", **arrays)
    with pytest.raises(ValueError, match="int64"):
        datasets_mod.load_npz_dataset(tmp_path / "dtype.npz", "x")


def test_embedded_npz_is_a_plain_npz() -> None:
    with zipfile.ZipFile(_embedded()) as zf:
        assert sorted(zf.namelist()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
        assert zf.testzip() is None


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(ValueError, match="valid names: mnist-10k, fashion-mnist, mnist, digits"):
        load_dataset("cifar-10")
    assert tuple(DATASETS) == ("mnist-10k", "fashion-mnist", "mnist", "digits")


def test_digits_without_sklearn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    with pytest.raises(ModuleNotFoundError, match="scikit-learn"):
        load_dataset("digits")


def test_digits_with_sklearn() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn not installed (optional extra)")
    ds = load_dataset("digits")
    assert ds.image_shape == (8, 8) and len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.dtype == np.uint8 and ds.x_train.max() == 255
    assert set(np.unique(ds.y_test)) == set(range(10))


def test_dataset_validates_arrays() -> None:
    x = np.zeros((4, 3, 3), np.uint8)
    y = np.arange(4, dtype=np.int64)
    Dataset("t", x, y, x, y, 4, (3, 3))
    with pytest.raises(ValueError, match="uint8"):
        Dataset("t", x.astype(np.float32), y, x, y, 4, (3, 3))
    with pytest.raises(ValueError, match="int64"):
        Dataset("t", x, y.astype(np.int32), x, y, 4, (3, 3))
    with pytest.raises(ValueError, match="labels outside"):
        Dataset("t", x, y, x, y, 3, (3, 3))
    with pytest.raises(ValueError, match="image shape"):
        Dataset("t", x, y, x, y, 4, (2, 3))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        Dataset("t", x, y[:3], x, y, 4, (3, 3))
    ds = Dataset("t", x, y, x, y, 4, (3, 3))
    assert x.flags.writeable and not ds.x_train.flags.writeable  # the caller's array is untouched


# ----------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.flatten(1).numpy()}


def _plain(ds: Dataset, idx: np.ndarray, split: str = "train") -> torch.Tensor:
    x = getattr(ds, f"x_{split}")[idx]
    return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)


def test_task_tensors(mnist10k: Dataset) -> None:
    tasks = make_sequence(mnist10k, "permuted", 2, max_train_per_task=300, max_eval_per_task=100)
    t = tasks[1]
    assert t.index == 1 and t.name == "permuted-1"
    for x, y in ((t.x_train, t.y_train), (t.x_val, t.y_val), (t.x_test, t.y_test)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and len(x) == len(y)
        assert y.dtype == torch.int64 and 0.0 <= x.min() and x.max() <= 1.0
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (300, 100, 100)
    assert "permuted-1" in repr(t)


def test_permuted(mnist10k: Dataset) -> None:
    tasks = make_sequence(mnist10k, "permuted", 3, seed=5, max_train_per_task=500)
    t0, t1, t2 = tasks
    assert t0.transform["identity"] and not t1.transform["identity"]
    np.testing.assert_array_equal(t0.transform["permutation"], np.arange(784))
    torch.testing.assert_close(t0.x_train, _plain(mnist10k, t0.indices["train"]), rtol=0, atol=0)
    assert t0.classes == t1.classes == t2.classes == tuple(range(10))
    assert set(t0.y_test.tolist()) == set(t1.y_test.tolist()) == set(range(10))
    p1, p2 = np.array(t1.transform["permutation"]), np.array(t2.transform["permutation"])
    assert sorted(p1) == list(range(784)) and not np.array_equal(p1, p2)
    assert not np.array_equal(p1, np.arange(784))
    # Same images (the split is shared), pixels reordered exactly as recorded.
    np.testing.assert_array_equal(t1.indices["test"], t0.indices["test"])
    torch.testing.assert_close(t1.x_test.flatten(1), t0.x_test.flatten(1)[:, p1], rtol=0, atol=0)
    assert not torch.equal(t1.x_test, t0.x_test)
    # Without first_identity, task 0 is permuted too and later tasks do not change.
    u0, u1 = make_sequence(mnist10k, "permuted", 2, seed=5, first_identity=False, max_train_per_task=500)
    assert not u0.transform["identity"] and not torch.equal(u0.x_test, t0.x_test)
    assert u1.transform["permutation"] == t1.transform["permutation"]


def test_split(mnist10k: Dataset) -> None:
    tasks = make_sequence(mnist10k, "split", 5)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    seen: set[int] = set()
    for t in tasks:
        labels = set(t.y_train.tolist()) | set(t.y_val.tolist()) | set(t.y_test.tolist())
        assert labels == set(t.classes)  # global class ids, all present
        assert not labels & seen
        seen |= labels
    # The split tasks partition the whole test set.
    assert sum(len(t.y_test) for t in tasks) == len(mnist10k.y_test)
    three = make_sequence(mnist10k, "split", 3, classes_per_task=3)
    assert [t.classes for t in three] == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    with pytest.raises(ValueError, match="at most 5 tasks"):
        make_sequence(mnist10k, "split", 6)
    with pytest.raises(ValueError, match="at most 3 tasks"):
        make_sequence(mnist10k, "split", 4, classes_per_task=3)


def test_rotated(mnist10k: Dataset) -> None:
    tasks = make_sequence(mnist10k, "rotated", 4, max_train_per_task=200, max_eval_per_task=50)
    assert [t.transform["angle"] for t in tasks] == [0.0, 45.0, 90.0, 135.0]
    t0 = tasks[0]
    torch.testing.assert_close(t0.x_train, _plain(mnist10k, t0.indices["train"]), rtol=0, atol=0)
    torch.testing.assert_close(t0.x_test, _plain(mnist10k, t0.indices["test"], "test"), rtol=0, atol=0)
    # 90 degrees on a square grid is np.rot90 (counter-clockwise), up to float rounding.
    rot90 = torch.from_numpy(np.rot90(t0.x_test.numpy(), k=1, axes=(2, 3)).copy())
    torch.testing.assert_close(tasks[2].x_test, rot90, rtol=0, atol=1e-5)
    assert (tasks[1].x_test - t0.x_test).abs().mean() > 0.05
    assert tasks[1].x_test.min() >= 0 and tasks[1].x_test.max() <= 1
    custom = make_sequence(mnist10k, "rotated", 2, angles=[10, -30], max_train_per_task=10)
    assert [t.transform["angle"] for t in custom] == [10.0, -30.0]
    x = t0.x_test[:3]
    torch.testing.assert_close(rotate_images(rotate_images(x, 90), -90), x, rtol=0, atol=1e-5)
    assert torch.equal(rotate_images(x, 360), x)


def test_patch_permutation_moves_only_the_centred_square() -> None:
    perm = patch_permutation(28, 28, 8, 0)
    assert sorted(perm.tolist()) == list(range(28 * 28))
    grid = np.arange(28 * 28).reshape(28, 28)
    inside = np.zeros((28, 28), dtype=bool)
    inside[10:18, 10:18] = True  # (28 - 8) // 2 = 10
    np.testing.assert_array_equal(perm.reshape(28, 28)[~inside], grid[~inside])
    assert set(perm.reshape(28, 28)[inside].tolist()) == set(grid[inside].tolist())
    assert (perm.reshape(28, 28)[inside] != grid[inside]).sum() > 50  # really shuffled
    # Same seed, same permutation; a Generator works too; odd margins round the offset down.
    np.testing.assert_array_equal(perm, patch_permutation(28, 28, 8, np.random.default_rng(0)))
    assert not np.array_equal(perm, patch_permutation(28, 28, 8, 1))
    np.testing.assert_array_equal(patch_permutation(5, 4, 1, 3), np.arange(20))
    assert set(patch_permutation(5, 5, 2, 0).reshape(5, 5)[1:3, 1:3].ravel()) == {6, 7, 11, 12}


def test_permute_patch_images() -> None:
    x = torch.rand(3, 2, 6, 6)
    y = permute_patch(x, 4, 7)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :, [0, 5]], x[:, :, [0, 5]], rtol=0, atol=0)  # border rows
    torch.testing.assert_close(y[..., [0, 5]], x[..., [0, 5]], rtol=0, atol=0)  # border columns
    centre = lambda t: t[:, :, 1:5, 1:5].flatten(2)  # noqa: E731
    torch.testing.assert_close(centre(y).sort(-1).values, centre(x).sort(-1).values, rtol=0, atol=0)
    torch.testing.assert_close(permute_patch(x, 6, 7).sum((2, 3)), x.sum((2, 3)))  # whole image
    for bad, match in [(0, "size"), (7, "does not fit"), (True, "size")]:
        with pytest.raises(ValueError, match=match):
            permute_patch(x, bad, 0)
    with pytest.raises(ValueError, match="seed"):
        permute_patch(x, 2, -1)
    with pytest.raises(ValueError, match="shape"):
        permute_patch(x[0], 2, 0)


@pytest.mark.parametrize("kind", SEQUENCES)
def test_train_val_test_disjoint(mnist10k: Dataset, kind: str) -> None:
    tasks = make_sequence(mnist10k, kind, 2, val_fraction=0.2)
    for t in tasks:
        tr, va = set(t.indices["train"].tolist()), set(t.indices["val"].tolist())
        assert tr and va and not tr & va
        assert _rows(t.x_val).isdisjoint(_rows(t.x_train))  # no val image is a train image
        assert _rows(t.x_test).isdisjoint(_rows(t.x_train))
    # Stratified validation part: about 20 % of every class.
    t = tasks[0]
    frac = np.bincount(t.y_val.numpy(), minlength=10) / np.bincount(mnist10k.y_train, minlength=10)
    present = frac[list(t.classes)]
    assert np.all(np.abs(present - 0.2) < 0.01)


@pytest.mark.parametrize("kind", SEQUENCES)
def test_same_seed_same_sequence(mnist10k: Dataset, kind: str) -> None:
    kw = {"max_train_per_task": 300, "max_eval_per_task": 100}
    a = make_sequence(mnist10k, kind, 3, seed=11, **kw)
    b = make_sequence(mnist10k, kind, 3, seed=11, **kw)
    c = make_sequence(mnist10k, kind, 3, seed=12, **kw)
    for ta, tb in zip(a, b, strict=True):
        for attr in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            assert torch.equal(getattr(ta, attr), getattr(tb, attr)), attr
        assert ta.transform == tb.transform and ta.classes == tb.classes
    assert not torch.equal(a[1].x_train, c[1].x_train)  # another seed, another sequence
    # The subsample itself depends on the seed (not only through the validation split).
    s1 = make_sequence(mnist10k, kind, 1, seed=1, val_fraction=0.0, max_train_per_task=50)
    s2 = make_sequence(mnist10k, kind, 1, seed=2, val_fraction=0.0, max_train_per_task=50)
    assert len(s1[0].y_val) == 0 and not np.array_equal(s1[0].indices["train"], s2[0].indices["train"])


def test_task_k_does_not_depend_on_n_tasks(mnist10k: Dataset) -> None:
    short = make_sequence(mnist10k, "permuted", 2, seed=3, max_train_per_task=100)
    long = make_sequence(mnist10k, "permuted", 4, seed=3, max_train_per_task=100)
    assert torch.equal(short[1].x_train, long[1].x_train)


def test_sequence_from_name() -> None:
    (t,) = make_sequence("mnist-10k", "split", 1, max_train_per_task=20)
    assert t.classes == (0, 1) and len(t.y_train) == 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "shuffled"}, "valid kinds: permuted, split, rotated"),
        ({"n_tasks": 0}, "n_tasks must be a positive integer, got 0"),
        ({"n_tasks": 2.0}, "n_tasks must be a positive integer, got 2.0"),
        ({"n_tasks": True}, "n_tasks must be a positive integer, got True"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
        ({"seed": -1}, "seed must be"),
        ({"classes_per_task": 0}, "classes_per_task must be"),
        ({"max_train_per_task": 0}, "max_train_per_task must be"),
        ({"max_eval_per_task": 0}, "max_eval_per_task must be"),
        ({"kind": "rotated", "angles": [0.0]}, "angles must be 2 finite numbers"),
        ({"kind": "rotated", "angles": [0.0, float("nan")]}, "angles must be 2 finite numbers"),
        ({"angles": [0.0, 1.0]}, "angles only applies to kind='rotated'"),
        ({"dataset": 3}, "dataset must be a Dataset"),
        ({"dataset": "imagenet"}, "unknown dataset"),
    ],
)
def test_bad_arguments(mnist10k: Dataset, kwargs: dict, match: str) -> None:
    args = {"dataset": mnist10k, "kind": "permuted", "n_tasks": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        make_sequence(args.pop("dataset"), args.pop("kind"), args.pop("n_tasks"), **args)


def _load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_mnist10k.py"
    spec = importlib.util.spec_from_file_location("make_mnist10k", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_conversion_is_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pixels stored as round(p / 255, 3), like the npm package, come back as exactly p."""
    script = _load_script()
    monkeypatch.setattr(script, "COUNTS", (2,) * 10)
    pixels = np.arange(2 * 784) % 256
    tarball = tmp_path / "fake.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for digit in range(10):
            payload = json.dumps({"data": [round(int(p) / 255, 3) for p in pixels]}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    images, labels = script.read_digits(tarball)
    assert images.dtype == np.uint8 and images.shape == (20, 28, 28)
    np.testing.assert_array_equal(images[0].reshape(-1), pixels[:784])
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    monkeypatch.setattr(script, "COUNTS", (3,) * 10)
    with pytest.raises(SystemExit, match="class counts"):
        script.read_digits(tarball)
