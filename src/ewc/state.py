"""Crash-safe saving, code-free loading of checkpoints, and checks of what was loaded.

``atomic_save`` never leaves a half-written file at the target path: a crash or an error
mid-save leaves the previous checkpoint exactly as it was. ``safe_load`` only accepts tensors
and plain Python containers (``torch.load(weights_only=True)``), so loading a checkpoint from an
untrusted source cannot run code, and it turns the many ways a damaged file can fail into one
``ValueError`` that names the file. ``check_finite_state`` and ``check_model_state`` check a loaded
state before anything is loaded from it: every ``load_state_dict`` of the package checks first
and changes nothing on error (PyTorch's own ``Module.load_state_dict`` copies the tensors that
fit before it raises on those that do not).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
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
from torch import nn

__all__ = ["atomic_save", "check_finite_state", "check_model_state", "safe_load"]

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


def atomic_save(obj: Any, path: PathLike, *, durable: bool = True) -> None:
    """``torch.save(obj, path)``, atomically: the target is either the old file or the new one
    (``durable=False``: without the fsyncs, for scratch files that need not survive a power loss)."""
    atomic_write(path, lambda fh: torch.save(obj, fh), durable=durable)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any], *, durable: bool = True) -> None:
    """Let ``write`` fill a file that replaces ``path`` atomically.

    The content goes to a temporary file in the target's directory, flushed and fsynced, then
    renamed over the target with ``os.replace`` (atomic on POSIX and Windows), and finally the
    directory is fsynced so the rename itself survives a power loss. On any error the temporary
    file is removed and the previous target is left untouched. A new file gets the usual
    ``0o666 & ~umask`` permissions; an existing target keeps its mode. ``durable=False`` skips
    both fsyncs (the rename is still atomic for every reader while the machine runs).
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
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(exc)  # torch.save wraps a full disk in a RuntimeError
        if cause is not None and cause.errno is not None and (cause is not exc or cause.filename is None):
            raise OSError(cause.errno, cause.strerror, cause.filename or target) from exc
        raise
    if durable:
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


def json_digest(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON (sorted keys; other types by ``str``): the name of
    a run's or a job's settings, for progress files that only the same settings may resume."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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


def _key(path: tuple[Any, ...]) -> str:
    return "".join(f"[{k!r}]" for k in path)


def check_finite_state(tree: Any, what: str, *, allow_inf: bool = False) -> None:
    """A ValueError naming the key (``what['a'][0]``) of the first floating tensor of a nested
    dict / list / tuple that holds NaN or ±inf (``allow_inf``: NaN only, e.g. a -inf mask)."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                bad = torch.isnan(node) if allow_inf else ~torch.isfinite(node)
                if bool(bad.any()):
                    kind = "NaN" if allow_inf else "NaN or infinite"
                    raise ValueError(
                        f"{what}{_key(path)} must be finite, got {int(bad.sum())} {kind} value(s)"
                    )
        elif isinstance(node, Mapping):
            stack.extend((path + (k,), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list | tuple):
            stack.extend((path + (i,), v) for i, v in reversed(list(enumerate(node))))


def check_model_state(model: nn.Module, state: Any, what: str) -> None:
    """A ValueError naming ``what`` and the key unless ``model.load_state_dict(state)`` fits: the
    model's keys exactly, each tensor of its shape and kind (floating or not), parameters finite
    and buffers free of NaN (a buffer may hold ±inf: an attention mask)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a dict of tensors, got {type(state).__name__}")
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    if missing:
        raise ValueError(
            f"{what} is missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    extra = [k for k in state if k not in mine]
    if extra:
        raise ValueError(f"{what} has keys the model does not: {extra[:5]}")
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for k, ref in mine.items():
        t = state[k]
        if not isinstance(ref, torch.Tensor):
            continue  # a module's extra state: its own load checks it
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}[{k!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{what}[{k!r}] must have shape {tuple(ref.shape)}, got {tuple(t.shape)}")
        if t.is_floating_point() != ref.is_floating_point() or t.is_complex() != ref.is_complex():
            raise ValueError(f"{what}[{k!r}] must be a tensor of dtype {ref.dtype}, got {t.dtype}")
        check_finite_state(t, f"{what}[{k!r}]", allow_inf=k not in params)
