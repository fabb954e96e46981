"""A run owns its output directory: checked before any work, locked, and tied to its settings.

* :func:`claim` makes ``--out`` (or finds it), proves it writable by writing, fsyncing and removing a
  probe file (a read-only folder, a full disk or a path under a file fails here, in a second,
  not after minutes of training), and takes an exclusive lock on ``OUT/.ewc.lock`` for the rest
  of the process: a second run into the same folder fails at once with a message naming the
  holder. The lock is ``flock`` on an open descriptor, so the kernel drops it when the holder
  dies, however it dies (no stale locks to clean up after a SIGKILL).
* :func:`check_settings` ties the folder to the settings that made it (``OUT/run.json``): running
  the same command again resumes; a command with other settings is refused with the settings that
  differ, unless ``restart`` is given, which deletes the old progress and starts a new run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "SETTINGS_FILE", "OutDirInUse", "check_free", "check_settings", "claim", "release"]

LOCK_FILE = ".ewc.lock"
SETTINGS_FILE = "run.json"
SETTINGS_FORMAT = "ewc.run/1"

_HELD: dict[str, int] = {}  # resolved path → open descriptor holding the lock (this process)


class OutDirInUse(ValueError):
    """Another live process holds the output directory's lock."""


def make_dir(out: str | os.PathLike) -> Path:
    """``out`` as a directory, created if needed: a one-line ValueError for an empty path (which
    would be the working directory), a path that is a file, or one under a file or a broken link."""
    text = os.fspath(out)
    if not text.strip():
        raise ValueError(f"--out must name a directory, got {text!r}")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {text!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a component is a file, or a dangling symlink
        raise ValueError(f"--out {text!r} cannot be made: a part of it is a file or a broken link") from None
    return path


def claim(out: str | os.PathLike, command: str = "") -> Path:
    """Create/check ``out`` (:func:`make_dir`), prove it writable, and lock it for this process (see
    module doc).

    Raises a one-line ValueError for an empty path or a path that is a file, OSError (with the
    path and errno) where the folder cannot be made or written, and :class:`OutDirInUse` when
    another process holds it. Claiming a folder this process holds already is a no-op.
    """
    text = os.fspath(out)
    path = make_dir(out)
    key = str(path.resolve())
    if key in _HELD:
        return path
    _probe_write(path)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): the folder is checked, not locked
        pass
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutDirInUse(f"--out {text!r} is in use by another ewc run ({_holder(path)})") from None
        raise
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    holder["command"] = command or " ".join(sys.argv)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    _HELD[key] = fd
    return path


def check_free(out: str | os.PathLike) -> None:
    """Raise :class:`OutDirInUse` if another process holds ``out``'s lock; nothing is created.

    Cheap (no torch import, no folder made): the command line runs it before parsing its flags,
    so that a second run into a busy folder fails in well under a second.
    """
    path = Path(os.fspath(out))
    if not (path / LOCK_FILE).is_file() or str(path.resolve()) in _HELD:
        return
    try:
        import fcntl

        fd = os.open(path / LOCK_FILE, os.O_RDONLY)
    except (ImportError, OSError):
        return  # no flock, or an unreadable lock file: claim() gives the real error
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        holder = _holder(path)
        raise OutDirInUse(f"--out {os.fspath(out)!r} is in use by another ewc run ({holder})") from None
    finally:
        os.close(fd)


def release(out: str | os.PathLike) -> None:
    """Give up this process's lock on ``out`` (the process's end does it too)."""
    fd = _HELD.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)


def check_settings(
    out: str | os.PathLike, settings: dict[str, Any], *, restart: bool = False, progress: tuple[str, ...] = ()
) -> bool:
    """Tie ``out`` to ``settings`` (JSON values); True if it holds an earlier run of the same ones.

    A folder made with other settings is refused, naming each differing setting with its saved
    and new value, unless ``restart``: then ``run.json`` and the ``progress`` entries (glob patterns
    of files or folders of partial work, relative to ``out``) are deleted and the new settings recorded.
    """
    path = Path(out)
    file = path / SETTINGS_FILE
    now = json.loads(json.dumps(settings, default=str))  # the JSON view: tuples as lists, keys as strings
    saved = None
    if file.exists():
        try:
            saved = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{str(file)!r} is corrupt (not JSON): remove it or pass --restart") from None
        if not isinstance(saved, dict) or saved.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"{str(file)!r} is not an ewc run record ({SETTINGS_FORMAT})")
        if saved.get("settings") == now:
            return True
        if not restart:
            diff = differing(saved.get("settings") or {}, now)
            raise ValueError(
                f"--out {os.fspath(out)!r} holds a run with other settings ({'; '.join(diff)}): "
                "run the same command to resume it, choose another --out, or pass --restart to start over"
            )
    if restart:
        for pattern in progress:
            for target in path.glob(pattern):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        target.unlink()
    from ewc.state import atomic_write_bytes  # (torch: imported only once a run goes ahead)

    record = {"format": SETTINGS_FORMAT, "settings": now}
    atomic_write_bytes(file, json.dumps(record, indent=1).encode())
    return False


def differing(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved → now`` for every setting (dotted paths into nested ones) that differs."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in differing(a, b)]
        elif a != b:
            out.append(f"{key}: {json.dumps(a)} → {json.dumps(b)}")
    return out


def _probe_write(path: Path) -> None:
    """Write, fsync and remove a small file in ``path``: OSError (path, errno) if it cannot."""
    probe = path / f".ewc-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _holder(path: Path) -> str:
    """Who holds the lock, as its lock file says."""
    try:
        info = json.loads((path / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    parts = [f"pid {info.get('pid')}", f"on {info.get('host')}", f"since {info.get('since')}"]
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)
