"""TensorBoard through ``torch.utils.tensorboard``: event files under ``OUT/tensorboard``.

The top run writes into ``OUT/tensorboard`` and each child into a sub-folder (``ewc``, ``sgd``,
...), so ``tensorboard --logdir OUT/tensorboard`` overlays the methods. Metrics are scalars in
double precision (the values of results.json, not rounded to float32) at their step (0 for a
final value); parameters go to the HParams dashboard; a PNG artifact is an image (its bytes as
written), a text file (``.md`` as Markdown, other text in a code block) a text summary; other
files are not copied (they stay in OUT). The folder is rewritten by every invocation (a resumed
or repeated command logs its whole record again).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ewc.tracking.base import TrackerSpec, flatten, register_tracker, require, safe_name

__all__ = ["TEXT_SUFFIXES", "TensorBoardLogger", "open_tensorboard"]

#: artifacts written as text summaries (others than PNG and these are not copied)
TEXT_SUFFIXES = (".md", ".json", ".csv", ".txt")
FOLDER = "tensorboard"


class TensorBoardLogger:
    """One TensorBoard run: an event-file writer in ``log_dir``."""

    def __init__(self, log_dir: Path):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        self.writer.file_writer.add_summary(hparams_pb(flatten(params)))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step or 0, new_style=True, double_precision=True)

    def log_artifact(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.suffix.lower() == ".png":
            self.writer.file_writer.add_summary(_png_summary(path.name, path.read_bytes()))
        elif path.suffix.lower() in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            self.writer.add_text(path.name, text if path.suffix.lower() == ".md" else f"```\n{text}\n```")

    def child(self, name: str) -> TensorBoardLogger:
        return TensorBoardLogger(self.log_dir / safe_name(name))

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _png_summary(tag: str, png: bytes) -> Any:
    """An image summary holding the PNG's bytes as they are (no decoding, no re-encoding)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError(f"{tag}: not a PNG file")
    width, height = struct.unpack(">II", png[16:24])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(png[25], 4)  # the IHDR colour type
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def open_tensorboard(out: Path, name: str) -> TensorBoardLogger:
    """The top run in ``OUT/tensorboard`` (an earlier invocation's folder is replaced)."""
    require("tensorboard", "tensorboard")
    root = Path(out) / FOLDER
    if root.is_dir() and not root.is_symlink():
        shutil.rmtree(root)
    return TensorBoardLogger(root)


register_tracker(
    TrackerSpec(
        "tensorboard",
        open_tensorboard,
        "event files in OUT/tensorboard (one sub-folder per method)",
        module="tensorboard",
        extra="tensorboard",
    )
)
