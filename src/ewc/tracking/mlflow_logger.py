"""MLflow through its client (``MlflowClient``; no global active run): a local store under ``OUT``
unless ``MLFLOW_TRACKING_URI`` is set.

The local store is SQLite, ``OUT/mlflow.db``, with the artifacts in ``OUT/mlartifacts`` (see them
with ``mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db``); the experiment is
``MLFLOW_EXPERIMENT_NAME`` or ``ewc``. The top run is the command; each child is a nested run
(tag ``mlflow.parentRunId``). Parameters are flattened (``train.lam``), values as text (MLflow's
limit: 6000 characters, longer ones cut). A final value is a metric at step 0. Metrics are sent
in batches (``log_batch``) when a batch is full and at the run's end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ewc.tracking.base import TrackerSpec, flatten, register_tracker, require

__all__ = ["MLflowLogger", "open_mlflow"]

EXPERIMENT = "ewc"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value
PARAMS_PER_BATCH = 100  # MLflow's limits on one log_batch call
METRICS_PER_BATCH = 1000


class MLflowLogger:
    """One MLflow run, written through ``client``."""

    def __init__(self, client: Any, experiment_id: str, run_id: str):
        self.client, self.experiment_id, self.run_id = client, experiment_id, run_id
        self.pending: list[Any] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=flat[i : i + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if len(self.pending) >= METRICS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:METRICS_PER_BATCH], self.pending[METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path))

    def child(self, name: str) -> MLflowLogger:
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id}
        )
        return MLflowLogger(self.client, self.experiment_id, run.info.run_id)

    def close(self, failed: bool = False) -> None:
        try:
            self._flush()
        finally:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def open_mlflow(out: Path, name: str) -> MLflowLogger:
    """The top run in ``MLFLOW_TRACKING_URI``'s store, else in ``sqlite:///OUT/mlflow.db``."""
    require("mlflow", "mlflow")
    from mlflow.tracking import MlflowClient

    out = Path(out).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    local = not os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=uri)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = (out / "mlartifacts").as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=name)
    return MLflowLogger(client, experiment_id, run.info.run_id)


register_tracker(
    TrackerSpec(
        "mlflow",
        open_mlflow,
        "runs in OUT/mlflow.db (artifacts in OUT/mlartifacts), or MLFLOW_TRACKING_URI's store",
        module="mlflow",
        extra="mlflow",
    )
)
