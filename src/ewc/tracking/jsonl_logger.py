"""JSON lines in ``OUT/metrics.jsonl``: every call of every run, one line each (no extra needed).

The plainest tracker, readable with anything: each line is an object with ``run`` (the child's
path, ``""`` for the top run) and one of ``name`` (the first line: the top run's name),
``params``, ``metrics`` with ``step`` (null for a final value), ``artifact`` (the file's path
relative to OUT when inside it) or ``end`` (``finished`` / ``failed``). The file is rewritten by
every invocation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from ewc.tracking.base import TrackerSpec, register_tracker

__all__ = ["FILE", "JsonlLogger", "open_jsonl"]

FILE = "metrics.jsonl"


class JsonlLogger:
    """One run's lines in the command's file (children share the top run's file)."""

    def __init__(self, file: IO[str], out: Path, path: str = ""):
        self.file, self.out, self.path = file, out, path

    def _write(self, **entry: Any) -> None:
        self.file.write(json.dumps({"run": self.path, **entry}, default=str) + "\n")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write(params=dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._write(step=step, metrics=dict(metrics))

    def log_artifact(self, path: str | os.PathLike) -> None:
        path = Path(path).resolve()
        shown = path.relative_to(self.out) if path.is_relative_to(self.out) else path
        self._write(artifact=shown.as_posix())

    def child(self, name: str) -> JsonlLogger:
        return JsonlLogger(self.file, self.out, f"{self.path}/{name}" if self.path else name)

    def close(self, failed: bool = False) -> None:
        self._write(end="failed" if failed else "finished")
        if not self.path:
            self.file.close()
        else:
            self.file.flush()


def open_jsonl(out: Path, name: str) -> JsonlLogger:
    """The top run, writing ``OUT/metrics.jsonl`` afresh."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(open(out / FILE, "w", encoding="utf-8"), out)  # noqa: SIM115 (closed by close)
    logger._write(name=name)
    return logger


register_tracker(TrackerSpec("jsonl", open_jsonl, f"one JSON object per line in OUT/{FILE}"))
