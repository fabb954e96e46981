"""Download path of ewc.data.sources, against an HTTP server the test runs on 127.0.0.1.

Nothing here reaches the internet: every mirror is a local server (or a closed local port).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ewc.data import ChecksumError, DataNotFoundError, load_dataset, sources


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EWC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("EWC_MIRROR", "http://127.0.0.1:9")  # never the real mirrors
    monkeypatch.setitem(sources.SYSTEM_DIRS, "fashion-mnist", (tmp_path / "no-system-dir",))


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """A tiny fake 'mnist' whose published .gz files and sums replace the real ones."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (10, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(np.arange(10) % 10),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (5, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.arange(5)),
    }
    files = {k: gzip.compress(v, mtime=0) for k, v in contents.items()}
    entries = tuple(
        sources.RemoteFile(k, len(v), hashlib.sha256(v).hexdigest(), hashlib.sha256(contents[k]).hexdigest())
        for k, v in files.items()
    )
    monkeypatch.setitem(sources.FILES, "mnist", entries)
    return files


class Server:
    """A static file server on 127.0.0.1 in a thread; records the paths requested."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers: list[Server] = []

    def start(files: dict[str, bytes], sub: str = "www") -> Server:
        root = tmp_path / sub
        root.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (root / name).write_bytes(data)
        servers.append(Server(root))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def test_download_success_is_atomic(
    published: dict[str, bytes], serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = serve(published)
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        src, dst = Path(src), Path(dst)
        assert not dst.exists()  # the target appears only through the rename
        assert hashlib.sha256(src.read_bytes()).hexdigest() == next(
            f.sha256 for f in sources.FILES["mnist"] if f.name == dst.name
        )
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(sources.os, "replace", spy)
    paths = sources.find_files("mnist", mirrors=[server.url], timeout=5)
    cache = sources.cache_dir() / "mnist"
    assert {p.parent for p in paths.values()} == {cache}
    for name, data in published.items():
        assert (cache / name).read_bytes() == data
        assert (cache / name).stat().st_mode & 0o777 == 0o644
    assert len(renames) == 4 and all(src.parent == dst.parent == cache for src, dst in renames)
    assert sorted(p.name for p in cache.iterdir()) == sorted(published)  # no temp files left
    # Now on disk: loading needs no server, and nothing is fetched again.
    n = len(server.requests)
    ds = load_dataset("mnist", download=True, mirrors=[server.url])
    assert ds.x_train.shape == (10, 28, 28) and ds.y_test.tolist() == [0, 1, 2, 3, 4]
    assert len(server.requests) == n


def test_download_via_env_mirror_and_root(
    published: dict[str, bytes], serve, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = serve(published)
    monkeypatch.setenv("EWC_MIRROR", f"{_closed_port_url()}, {server.url}/")  # first mirror is down
    ds = load_dataset("mnist", root=tmp_path / "data", timeout=5)
    assert ds.x_test.shape == (5, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(published)
    assert not (sources.cache_dir() / "mnist").exists()  # root replaces the cache as destination


def test_only_missing_files_are_downloaded(published: dict[str, bytes], serve) -> None:
    server = serve(published)
    cache = sources.cache_dir() / "mnist"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(published["train-images-idx3-ubyte.gz"])
    sources.find_files("mnist", mirrors=[server.url], timeout=5)
    assert sorted(server.requests) == sorted(f"/{n}" for n in published if n != "train-images-idx3-ubyte.gz")


def test_wrong_hash_leaves_no_file(published: dict[str, bytes], serve) -> None:
    tampered = dict(published)
    tampered["train-labels-idx1-ubyte.gz"] = gzip.compress(b"\x00\x00\x08\x01" + bytes(4) + b"x", mtime=0)
    server = serve(tampered)
    with pytest.raises(ChecksumError, match="SHA-256 mismatch for train-labels-idx1-ubyte.gz"):
        sources.find_files("mnist", mirrors=[server.url], timeout=5)
    cache = sources.cache_dir() / "mnist"
    assert not (cache / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_oversized_download_is_cut_off(published: dict[str, bytes], serve, tmp_path: Path) -> None:
    f = sources.FILES["mnist"][0]
    server = serve({f.name: published[f.name] + bytes(100_000)})
    with pytest.raises(ChecksumError, match="more than the expected"):
        sources.download_file(f"{server.url}/{f.name}", f, tmp_path / "dest", timeout=5)
    assert list((tmp_path / "dest").iterdir()) == []


def test_bad_mirror_then_good_mirror(published: dict[str, bytes], serve) -> None:
    bad = serve({k: b"not the file" for k in published}, sub="bad")
    empty = serve({}, sub="empty")  # 404 for everything
    good = serve(published, sub="good")
    paths = sources.find_files("mnist", mirrors=[empty.url, bad.url, good.url], timeout=5)
    assert all(p.read_bytes() == published[name] for name, p in paths.items())
    assert len(good.requests) == 4


def test_server_down_raises_data_not_found_with_howto(published: dict[str, bytes]) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", mirrors=[_closed_port_url()], timeout=2)
    msg = str(info.value)
    assert "downloading train-images-idx3-ubyte.gz failed" in msg
    assert "$EWC_DATA" in msg and "network" in msg
    assert str(sources.cache_dir() / "mnist") in msg
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", mirrors=[_closed_port_url()], timeout=2)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    cache = sources.cache_dir() / "mnist"
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-written


def test_timeout_is_honoured(published: dict[str, bytes], tmp_path: Path) -> None:
    # A server that accepts the connection (backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(DataNotFoundError, match="timed out"):
            sources.find_files("mnist", mirrors=[url], timeout=0.5)
        assert time.monotonic() - start < 10
    cache = sources.cache_dir() / "mnist"
    assert not cache.exists() or not list(cache.iterdir())
