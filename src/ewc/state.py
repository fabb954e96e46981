"""Crash-safe saving and code-free loading of checkpoints.

``atomic_save`` never leaves a half-written file at the target path: a crash or an error
mid-save leaves the previous checkpoint exactly as it was. ``safe_load`` only accepts tensors
and plain Python containers (``torch.load(weights_only=True)``), so loading a checkpoint from an
untrusted source cannot run code, and it turns the many ways a damaged file can fail into one
``ValueError`` that names the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import pickletools
import re
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_save", "safe_load"]

PathLike = str | os.PathLike[str]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is racy in threaded code.
_UMASK = _read_umask()

# Substrings of torch's weights_only errors that mean "this pickle wants to build objects or call
# functions outside the allowlist", i.e. it needs code execution, as opposed to damaged bytes.
_REFUSAL_MARKERS = (
    "was not an allowed global",
    "is blocked",
    "Trying to call reduce",
    "Can only ",
    "must be imported",
    "Unsupported global",
)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically: the target is either the old file or the new one."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Let ``write`` fill a file that replaces ``path`` atomically.

    The content goes to a temporary file in the target's directory, flushed and fsynced, then
    renamed over the target with ``os.replace`` (atomic on POSIX and Windows), and finally the
    directory is fsynced so the rename itself survives a power loss. On any error the temporary
    file is removed and the previous target is left untouched. A new file gets the usual
    ``0o666 & ~umask`` permissions; an existing target keeps its mode.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(exc)  # torch.save wraps a full disk in a RuntimeError
        if cause is not None and (cause is not exc or cause.filename is None):
            raise OSError(cause.errno, cause.strerror, cause.filename or target) from exc
        raise
    _fsync_directory(directory)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, its cause or its context), if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _fsync_directory(directory: str) -> None:
    """Persist a rename in ``directory``; a no-op where directories cannot be opened (Windows)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as exc:
        # Some file systems do not support fsync on directories; that is not a failed save.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(dfd)


def safe_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by ``torch.save`` without ever executing code from it.

    Uses ``torch.load(..., weights_only=True)``: only tensors, primitives and plain containers
    are rebuilt. Raises ``FileNotFoundError`` if ``path`` does not exist, and ``ValueError`` if
    the file is corrupt or truncated, or if it holds objects whose unpickling would need code
    execution (those are refused, never run).
    """
    target = os.fspath(path)
    if not os.path.exists(target):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", target)
    if os.path.isfile(target) and os.path.getsize(target) == 0:
        raise ValueError(f"checkpoint {target!r} is corrupt or truncated: the file is empty")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write before refusing them anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(target, map_location=map_location, weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # torch reports damaged files as RuntimeError, EOFError, ...
        needs_code = _needs_code(exc, target)
        if needs_code is not None:
            raise ValueError(
                f"refused to load {target!r}: unpickling it would need code execution "
                f"({needs_code}); only tensors and plain containers are accepted"
            ) from None
        raise ValueError(
            f"checkpoint {target!r} is corrupt or truncated ({type(exc).__name__}: {exc})"
        ) from exc


_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
)
_CODE_OPS = frozenset({"REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})


def _needs_code(exc: Exception, target: str) -> str | None:
    """Why a failed load was a refusal (the pickle wants code run), or None if it is damage."""
    if isinstance(exc, pickle.UnpicklingError):
        message = str(exc)
        if any(marker in message for marker in _REFUSAL_MARKERS):
            found = re.search(r"GLOBAL (\S+)", message)
            return f"it references {found.group(1)}" if found else "it builds arbitrary objects"
    if zipfile.is_zipfile(target):
        return None
    # A bare pickle (not torch's zip format) that torch's restricted unpickler could not even
    # parse, e.g. protocol 4+: scan its opcodes, which executes nothing.
    strings: list[str] = []
    try:
        with open(target, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name in _STRING_OPS:
                    strings.append(str(arg))
                elif op.name in ("GLOBAL", "INST"):
                    return f"it references {str(arg).replace(' ', '.')}"
                elif op.name == "STACK_GLOBAL":
                    name = ".".join(strings[-2:]) if len(strings) >= 2 else "a global"
                    return f"it references {name}"
                elif op.name in _CODE_OPS:
                    return f"it uses the {op.name} opcode"
    except Exception:
        return None
    return None


def tensor_bytes(tree: Any) -> int:
    """Bytes held by the tensors in a nested dict / list / tuple (e.g. a state dict)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, Mapping):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0
