"""Where the IDX files of MNIST and Fashion-MNIST come from, and how they are checked.

Search order for each dataset (the first directory that holds all four files wins):

1. ``root`` if the caller passes one (``root/<dataset>/`` then ``root/``);
2. ``$EWC_DATA`` (``$EWC_DATA/<dataset>/`` then ``$EWC_DATA/``);
3. the user cache ``$XDG_CACHE_HOME/ewc/<dataset>/`` (default ``~/.cache/ewc/<dataset>/``);
4. system directories: Debian's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``.

Missing files are downloaded into the cache (or ``root/<dataset>/``) from the standard mirrors
(``$EWC_MIRROR``, comma-separated base URLs, or the ``mirrors`` argument replaces them),
streamed into a temporary file next to the target and renamed into place only after the SHA-256
matches, so an interrupted or tampered download never leaves a file that looks valid.

Every file is checked when it is read: either its bytes are the published ``.gz`` (SHA-256 of the
upstream file) or its decompressed content is the known IDX content (SHA-256 of the uncompressed
bytes). The second check accepts re-compressed copies such as Debian's (whose gzip headers were
normalised) and uncompressed files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ewc.data.idx import decompress

__all__ = [
    "FILES",
    "MIRRORS",
    "SYSTEM_DIRS",
    "ChecksumError",
    "DataNotFoundError",
    "RemoteFile",
    "cache_dir",
    "download_file",
    "find_files",
    "read_verified",
    "search_dirs",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

DEFAULT_TIMEOUT = 30.0
_CHUNK = 1 << 16


class DataNotFoundError(FileNotFoundError):
    """The dataset files are neither on disk nor downloadable; the message says how to get them."""


class ChecksumError(ValueError):
    """A file's bytes do not match the published SHA-256."""


@dataclass(frozen=True)
class RemoteFile:
    """One published dataset file: its name, size and SHA-256 sums (gzip file and content)."""

    name: str  # e.g. "train-images-idx3-ubyte.gz"
    size: int  # bytes of the published .gz (a download is cut off beyond it)
    sha256: str  # of the published .gz
    content_sha256: str  # of the decompressed IDX bytes

    @property
    def raw_name(self) -> str:
        """The file name without ``.gz`` (for uncompressed copies)."""
        return self.name.removesuffix(".gz")


# Fashion-MNIST: ``sha256`` is that of the files in zalandoresearch/fashion-mnist, whose MD5s are
# in its README; ``content_sha256`` was computed from Debian's dataset-fashion-mnist. Debian's
# .gz files differ from upstream's only in the gzip header (file name dropped, mtime normalised):
# restoring the header reproduces the upstream files byte for byte (same MD5 and SHA-256).
# MNIST: the sums published by several independent projects (torchvision among them).
FILES: dict[str, tuple[RemoteFile, ...]] = {
    "fashion-mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    ),
}

# Base URLs tried in order; a file's URL is "<base>/<file name>". $EWC_MIRROR (comma-separated
# base URLs) or the ``mirrors`` argument replaces them.
MIRRORS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        "https://storage.googleapis.com/cvdf-datasets/mnist",
        "http://yann.lecun.com/exdb/mnist",
    ),
}

# Directories that system packages install the files into (searched last, never written to).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (),
}

_PRETTY = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}


def _check_name(dataset: str) -> None:
    if dataset not in FILES:
        raise ValueError(f"no downloadable files for dataset {dataset!r}; known: {sorted(FILES)}")


def cache_dir() -> Path:
    """The user cache for ewc: ``$XDG_CACHE_HOME/ewc``, default ``~/.cache/ewc``."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "ewc"


def search_dirs(dataset: str, root: PathLike | None = None) -> list[Path]:
    """The directories searched for ``dataset``'s files, in order (existing or not)."""
    _check_name(dataset)
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root) / dataset, Path(root)]
    env = os.environ.get("EWC_DATA")
    if env:
        dirs += [Path(env) / dataset, Path(env)]
    dirs.append(cache_dir() / dataset)
    dirs += list(SYSTEM_DIRS.get(dataset, ()))
    out: list[Path] = []
    for d in dirs:  # drop duplicates, keep order
        if d not in out:
            out.append(d)
    return out


def _find_in(directory: Path, f: RemoteFile) -> Path | None:
    for name in (f.name, f.raw_name):
        p = directory / name
        if p.is_file():
            return p
    return None


def _mirrors(dataset: str, mirrors: Sequence[str] | str | None) -> list[str]:
    if mirrors is None:
        env = os.environ.get("EWC_MIRROR", "").strip()
        mirrors = env if env else MIRRORS[dataset]
    if isinstance(mirrors, str):
        mirrors = mirrors.split(",")
    return [m.strip().rstrip("/") for m in mirrors if m.strip()]


def download_file(url: str, f: RemoteFile, dest_dir: PathLike, *, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download ``url`` into ``dest_dir/f.name``, verifying ``f.sha256`` before the atomic rename.

    Streams into a temporary file in ``dest_dir`` (so the final ``os.replace`` is atomic), never
    reads more than ``f.size`` bytes, and removes the temporary file on any failure. Raises
    ``ChecksumError`` on a hash mismatch and lets ``urllib.error.URLError``/``OSError`` through.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f.name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(_CHUNK):
                n += len(chunk)
                if n > f.size:
                    raise ChecksumError(f"{url}: more than the expected {f.size} bytes; not {f.name}")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # public data; mkstemp's 0o600 would hide it from other users
        digest = h.hexdigest()
        if digest != f.sha256:
            raise ChecksumError(
                f"{url}: SHA-256 mismatch for {f.name} ({n} bytes): got {digest}, expected {f.sha256}"
            )
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    log.info("downloaded %s -> %s", url, target)
    return target


def _how_to(dataset: str, searched: Sequence[Path], dest: Path) -> str:
    names = ", ".join(f.name for f in FILES[dataset])
    lines = ["Searched (in order): " + "; ".join(str(d) for d in searched) + "."]
    lines.append("To get the files, do one of:")
    if dataset == "fashion-mnist":
        lines.append(
            "  - sudo apt-get install dataset-fashion-mnist  (Debian/Ubuntu; installs "
            "/usr/share/datasets/fashion-mnist)"
        )
    lines.append(f"  - put the 4 files ({names}; gzip or not) in $EWC_DATA or $EWC_DATA/{dataset}")
    lines.append(
        f"  - run once with network access (they are downloaded into {dest} "
        "and checked against their SHA-256), or set $EWC_MIRROR to a mirror's base URL"
    )
    return "\n".join(lines)


def find_files(
    dataset: str,
    *,
    root: PathLike | None = None,
    download: bool = True,
    mirrors: Sequence[str] | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Path]:
    """Paths of ``dataset``'s four files, keyed by published file name; downloads what is missing.

    The first search directory holding all four files wins. Otherwise, with ``download``, the
    missing files are fetched into the download directory (``root/<dataset>`` or the user cache),
    keeping any already there. Raises ``DataNotFoundError`` (with instructions) when that fails for
    lack of network, and ``ChecksumError`` when every mirror served wrong bytes for a file.
    ``timeout`` (seconds) applies to each connection attempt and each read.
    """
    _check_name(dataset)
    files = FILES[dataset]
    dirs = search_dirs(dataset, root)
    for d in dirs:
        found = {f.name: _find_in(d, f) for f in files}
        if all(p is not None for p in found.values()):
            return {k: p for k, p in found.items() if p is not None}
    pretty = _PRETTY[dataset]
    dest = (Path(root) if root is not None else cache_dir()) / dataset
    if not download:
        raise DataNotFoundError(
            f"{pretty} files not found and download=False.\n" + _how_to(dataset, dirs, dest)
        )
    bases = _mirrors(dataset, mirrors)
    out: dict[str, Path] = {}
    for f in files:
        existing = _find_in(dest, f)
        if existing is not None:
            out[f.name] = existing
            continue
        errors: list[str] = []
        bad_hash: list[str] = []
        for base in bases:
            url = f"{base}/{f.name}"
            try:
                log.warning("downloading %s", url)
                out[f.name] = download_file(url, f, dest, timeout=timeout)
                break
            except ChecksumError as exc:
                bad_hash.append(str(exc))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{url}: {exc}")
        else:
            if bad_hash:
                raise ChecksumError(
                    f"{pretty}: no mirror served the published {f.name}:\n  " + "\n  ".join(bad_hash + errors)
                )
            tried = "\n  ".join(errors) if errors else "(no mirror configured)"
            raise DataNotFoundError(
                f"{pretty} files not found, and downloading {f.name} failed:\n  {tried}\n"
                + _how_to(dataset, dirs, dest)
            )
    return out


def read_verified(path: PathLike, f: RemoteFile) -> bytes:
    """The decompressed bytes of ``path``, checked against ``f``'s published SHA-256 sums.

    Accepts the published ``.gz`` byte for byte, or any file (gzip or raw) whose decompressed
    content has the published content hash. Raises ``ChecksumError`` naming the file otherwise.
    """
    name = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() == f.sha256:
        return decompress(data, name)
    content = decompress(data, name)
    digest = hashlib.sha256(content).hexdigest()
    if digest != f.content_sha256:
        raise ChecksumError(
            f"{name}: content SHA-256 {digest} does not match the published {f.raw_name} "
            f"({f.content_sha256}); the file is damaged or belongs to another dataset. "
            "Delete it (it is downloaded again) or point $EWC_DATA elsewhere."
        )
    return content
