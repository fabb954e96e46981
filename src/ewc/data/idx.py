"""Reader for the IDX format of MNIST and Fashion-MNIST, raw or gzip-compressed.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 dimensions, then the values in C order (big-endian for multi-byte types). Compression is
detected from the gzip magic bytes, never from the file name, so a renamed file still reads. Every
way a file can be damaged becomes one ``ValueError`` that names the file, because a silently
short or shifted array would corrupt a whole experiment without any visible error.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

__all__ = ["GZIP_MAGIC", "IDX_DTYPES", "check_pair", "decompress", "parse_idx", "read_idx"]

PathLike = str | os.PathLike[str]

GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> numpy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def decompress(data: bytes, name: str = "<bytes>") -> bytes:
    """Return ``data`` gunzipped if it starts with the gzip magic bytes, else unchanged."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ValueError(f"{name}: corrupt gzip data ({exc})") from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file into a native-endian, writable array."""
    if len(data) < 4:
        raise ValueError(f"{name}: truncated IDX file ({len(data)} bytes, no complete header)")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{name}: not an IDX file (magic number {data[:4].hex()}, expected 0000<type><ndim>)"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise ValueError(f"{name}: unsupported IDX dtype code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{name}: truncated IDX file ({len(data)} bytes, header needs {header} for {ndim} dims)"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # exact: no int64 overflow on a bad header
    got = len(data) - header
    if got < expected:
        raise ValueError(f"{name}: truncated IDX file: shape {dims} needs {expected} data bytes, found {got}")
    if got > expected:
        raise ValueError(
            f"{name}: {got - expected} trailing bytes after the {expected} data bytes of shape {dims}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw, detected by magic bytes) into a numpy array."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return parse_idx(decompress(data, name), name)


def check_pair(images: np.ndarray, labels: np.ndarray, name: str = "dataset") -> None:
    """Raise ``ValueError`` unless ``labels`` is 1-D with one label per image."""
    if labels.ndim != 1:
        raise ValueError(f"{name}: labels must be 1-D, got shape {labels.shape}")
    if images.ndim < 2:
        raise ValueError(f"{name}: images must have a leading sample axis, got shape {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: {images.shape[0]} images but {labels.shape[0]} labels (counts must match)")
