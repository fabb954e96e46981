"""Weights & Biases: offline run files under ``OUT/wandb`` unless the user has configured W&B.

Offline unless ``WANDB_MODE`` is set (``WANDB_MODE=online`` after ``wandb login`` sends the runs to
the server; ``wandb sync OUT/wandb/offline-run-*`` uploads offline ones later). ``WANDB_DIR``
replaces OUT as the folder, ``WANDB_PROJECT`` the project (``ewc``). The top run and one run per
child share a W&B group (the command's run name and a fresh id); a child's name is its path
(``task/ewc``). Parameters are the run's config (nested as given). A metric ``GROUP/NAME`` is
plotted against ``GROUP/step`` (``define_metric``: each group keeps its own axis, as the other
trackers' steps do); a final value goes to the run's summary. An artifact is copied into the
run's ``files`` folder (``run.save``), so an offline run is complete in itself. Console capture
and system-metric sampling are off (runs are written from a finished record).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ewc.tracking.base import TrackerSpec, register_tracker, require

__all__ = ["WandbLogger", "open_wandb"]

PROJECT = "ewc"


class WandbLogger:
    """One W&B run (``wandb.init(reinit="create_new")``: several can be open at once)."""

    def __init__(self, name: str, group: str, folder: Path, mode: str | None, path: str = ""):
        """``path``: a child's names from the top run down (empty: the top run)."""
        wandb = require("wandb", "wandb")
        self.group, self.folder, self.mode, self.path = group, folder, mode, path
        settings = wandb.Settings(console="off", x_disable_stats=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=path or name,
            group=group,
            job_type="run" if path else "command",
            dir=str(folder),
            mode=mode,
            reinit="create_new",
            settings=settings,
        )
        self.axes: set[str] = set()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None:
            self.run.summary.update(dict(metrics))
            return
        groups: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            group = key.rpartition("/")[0]
            groups.setdefault(group, {})[key] = value
        for group, values in groups.items():
            axis = f"{group}/step" if group else "step"
            if axis not in self.axes:
                self.run.define_metric(axis)
                self.run.define_metric(f"{group}/*" if group else "*", step_metric=axis)
                self.axes.add(axis)
            self.run.log({axis: step, **values})

    def log_artifact(self, path: str | os.PathLike) -> None:
        path = Path(path)
        target = Path(self.run.dir) / path.name
        shutil.copyfile(path, target)
        self.run.save(str(target), base_path=self.run.dir, policy="now")

    def child(self, name: str) -> WandbLogger:
        path = f"{self.path}/{name}" if self.path else name
        return WandbLogger(name, self.group, self.folder, self.mode, path)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_wandb(out: Path, name: str) -> WandbLogger:
    """The top run: offline in ``OUT/wandb`` unless ``WANDB_MODE`` / ``WANDB_DIR`` say otherwise."""
    require("wandb", "wandb")
    folder = Path(os.environ.get("WANDB_DIR") or out)
    folder.mkdir(parents=True, exist_ok=True)
    mode = None if os.environ.get("WANDB_MODE") else "offline"
    return WandbLogger(name, f"{name}-{secrets.token_hex(4)}", folder, mode)


register_tracker(
    TrackerSpec(
        "wandb",
        open_wandb,
        "offline run files in OUT/wandb (online if WANDB_MODE says so)",
        module="wandb",
        extra="wandb",
    )
)
