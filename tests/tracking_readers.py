"""Tracked runs read back with each tracker's own library: the tests' independent reference.

Every reader returns ``{run path: Run}`` (the top run is ``""``, a child ``"sgd"``, a grandchild
``"task/sgd"``), where a Run holds

- ``params``: as the tracker stores them (TensorBoard: HParams values; MLflow: text; W&B: the
  config, nested; jsonl: as given);
- ``metrics``: ``{key: sorted [(step, value)]}`` of the stepped values (TensorBoard and MLflow:
  final values too, at step 0: they have no other place for them);
- ``final``: ``{key: value}`` of the final values where the tracker keeps them apart (W&B's
  summary, jsonl's null step);
- ``artifacts``: ``{file name: bytes}`` (TensorBoard: PNGs as their bytes, text as text; jsonl:
  the file its line names, relative to OUT);
- ``status``: how the run ended (``finished`` / ``failed``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

Run = dict[str, Any]


def _run() -> Run:
    return {"params": {}, "metrics": {}, "final": {}, "artifacts": {}, "status": None}


def _sorted(metrics: dict[str, list]) -> dict[str, list]:
    return {k: sorted(v) for k, v in metrics.items()}


def read_tensorboard(out: Path) -> dict[str, Run]:
    """Event files under ``OUT/tensorboard``, through tensorboard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    root = out / "tensorboard"
    runs: dict[str, Run] = {}
    for folder in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        ea = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
        ea.Reload()
        run = _run()
        for tag in ea.Tags()["tensors"]:
            plugin = ea.SummaryMetadata(tag).plugin_data.plugin_name
            events = ea.Tensors(tag)
            if plugin == "scalars":
                values = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events]
                run["metrics"][tag] = values
            elif plugin == "text":
                text = tensor_util.make_ndarray(events[-1].tensor_proto).item().decode()
                run["artifacts"][tag.removesuffix("/text_summary")] = text
        for tag in ea.Tags()["images"]:
            run["artifacts"][tag] = ea.Images(tag)[-1].encoded_image_string
        try:
            content = ea.PluginTagToContent("hparams")
        except KeyError:
            content = {}
        for blob in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(blob)
            if data.HasField("session_start_info"):
                for k, v in data.session_start_info.hparams.items():
                    run["params"][k] = getattr(v, v.WhichOneof("kind"))
        run["metrics"] = _sorted(run["metrics"])
        name = folder.relative_to(root).as_posix()
        runs["" if name == "." else name] = run
    return runs


def read_mlflow(out: Path, tmp: Path) -> dict[str, Run]:
    """The runs of experiment ``ewc`` in ``sqlite:///OUT/mlflow.db``, through MlflowClient."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ewc")
    found = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=10_000)}

    def path(r: Any) -> str:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent is None:
            return ""
        above = path(found[parent])
        return f"{above}/{r.info.run_name}" if above else r.info.run_name

    runs: dict[str, Run] = {}
    for run_id, r in found.items():
        run = _run()
        run["params"] = dict(r.data.params)
        for key in r.data.metrics:
            run["metrics"][key] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        run["metrics"] = _sorted(run["metrics"])
        for f in client.list_artifacts(run_id):
            local = client.download_artifacts(run_id, f.path, str(tmp))
            run["artifacts"][f.path] = Path(local).read_bytes()
        run["status"] = r.info.status.lower()
        assert path(r) not in runs, f"two runs at {path(r)!r}"
        runs[path(r)] = run
    return runs


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of an offline run's transaction log (``run-ID.wandb``), as wandb's own reader
    (``wandb leet inspect --json``) prints them."""
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def read_wandb(folder: Path) -> dict[str, Run]:
    """The offline runs in ``FOLDER/wandb``: config, history (each ``GROUP/*`` against
    ``GROUP/step``), summary values set apart from the history, saved files, exit code."""
    runs: dict[str, Run] = {}
    for run_dir in sorted((folder / "wandb").glob("offline-run-*")):
        run, name, group, top = _run(), None, None, False
        history: dict[str, list] = {}
        summary: dict[str, Any] = {}
        files: list[str] = []
        for rec in wandb_records(run_dir):
            kind = rec["type"]
            if kind == "run":
                name, group = rec["run"]["display_name"], rec["run"].get("run_group")
                top = rec["run"].get("job_type") == "command"  # a child's is "run"
                run["params"].update(rec["run"].get("config", {}).get("update", {}))
            elif kind == "config":
                run["params"].update(rec["config"].get("update", {}))
            elif kind == "history":
                item = rec["history"]["item"]
                for key, value in item.items():
                    if key.startswith("_") or key.endswith("/step") or key == "step":
                        continue
                    g = key.rpartition("/")[0]
                    history.setdefault(key, []).append((item[f"{g}/step" if g else "step"], value))
            elif kind == "summary":
                summary.update(rec["summary"].get("update", {}))
            elif kind == "files":
                files += [f["path"] for f in rec["files"]["files"] if f.get("type") != "WANDB"]
            elif kind == "exit":
                run["status"] = "finished" if rec["exit"].get("exit_code", 0) == 0 else "failed"
        run["params"].pop("_wandb", None)
        run["metrics"] = _sorted(history)
        steps = {f"{k.rpartition('/')[0]}/step" for k in history}
        run["final"] = {
            k: v for k, v in summary.items() if not k.startswith("_") and k not in history and k not in steps
        }
        run["artifacts"] = {f: (run_dir / "files" / f).read_bytes() for f in files}
        run["group"] = group
        runs["" if top else name] = run
    return runs


def read_jsonl(out: Path) -> dict[str, Run]:
    """``OUT/metrics.jsonl``, line by line."""
    runs: dict[str, Run] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        run = runs.setdefault(entry["run"], _run())
        if "params" in entry:
            run["params"].update(entry["params"])
        elif "metrics" in entry and entry["step"] is None:
            run["final"].update(entry["metrics"])
        elif "metrics" in entry:
            for k, v in entry["metrics"].items():
                run["metrics"].setdefault(k, []).append((entry["step"], v))
        elif "artifact" in entry:
            run["artifacts"][Path(entry["artifact"]).name] = (out / entry["artifact"]).read_bytes()
        elif "end" in entry:
            run["status"] = entry["end"]
    for run in runs.values():
        run["metrics"] = _sorted(run["metrics"])
    return runs
