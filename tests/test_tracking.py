"""Experiment tracking (--track): every tracker exercised for real and read back with its own
library (tests/tracking_readers.py), against what was given (the contract) and against
results.json (``ewc run``, ``compare``, ``stream``, ``rl``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from penalty_helpers import random_tasks, set_params, snapshot, tiny_model  # noqa: E402
from tracking_readers import read_jsonl, read_mlflow, read_tensorboard, read_wandb  # noqa: E402

from ewc import EWC  # noqa: E402
from ewc.cli import main  # noqa: E402
from ewc.data import load_dataset, make_sequence  # noqa: E402
from ewc.deferred import added_value, defer  # noqa: E402
from ewc.methods import Method  # noqa: E402
from ewc.models import build_model  # noqa: E402
from ewc.tracking import TRACKERS, MissingExtra, open_tracking  # noqa: E402
from ewc.train import TrainConfig, run_method  # noqa: E402

torch.set_num_threads(1)

READERS = {
    "tensorboard": lambda out, tmp: read_tensorboard(out),
    "mlflow": read_mlflow,
    "wandb": lambda out, tmp: read_wandb(out),
    "jsonl": lambda out, tmp: read_jsonl(out),
}
#: trackers with no place for a final value but a metric at step 0
FINAL_AT_STEP_0 = {"tensorboard", "mlflow"}


def offline(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """W&B offline, quiet, with its config, cache and data folders under tmp; no MLflow server."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp / "wandb-home" / var.lower()))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline(monkeypatch, tmp_path)


def _png(path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------ the contract

PARAMS = {"lr": 0.001, "hidden": [16, 16], "nested": {"a": 1, "b": "x"}, "flag": True, "none": None}
#: each tracker's view of PARAMS (written out by hand: flat keys, and text where it keeps text)
PARAMS_SEEN = {
    "jsonl": PARAMS,
    "wandb": PARAMS,
    "mlflow": {
        "lr": "0.001",
        "hidden": "[16, 16]",
        "nested.a": "1",
        "nested.b": "x",
        "flag": "True",
        "none": "None",
    },
    "tensorboard": {
        "lr": 0.001,
        "hidden": "[16, 16]",
        "nested.a": 1.0,
        "nested.b": "x",
        "flag": True,
        "none": "None",
    },
}


def test_every_tracker_has_a_reader() -> None:
    assert set(TRACKERS) == set(READERS) == set(PARAMS_SEEN)


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_every_tracker_stores_what_it_is_given(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    png = _png(out / "fig.png")
    md = out / "report.md"
    md.write_text("# Report\n\nACC 0.5\n")
    js = out / "results.json"
    js.write_text(json.dumps({"a": [1, 2]}))
    with open_tracking([name], out, "contract") as t:
        t.log_params(PARAMS)
        t.log_metrics({"train/loss": 2.5, "train/penalty": 0.125}, step=3)
        t.log_metrics({"train/loss": 1 / 3, "skipped": None}, step=7)
        t.log_metrics({"acc": 0.75})
        child = t.child("sgd")
        child.log_params({"method": "sgd"})
        child.log_metrics({"eval/acc_task_0": 0.1 + 0.2}, step=0)
        with child.child("inner") as inner:
            inner.log_metrics({"x/y": 123456.789}, step=10**9)
        child.close()
        for f in (png, md, js):
            t.log_artifact(f)
    runs = READERS[name](out, tmp_path / "download")
    assert set(runs) == {"", "sgd", "sgd/inner"}
    top = runs[""]
    assert top["params"] == PARAMS_SEEN[name]
    expected = {"train/loss": [(3, 2.5), (7, 1 / 3)], "train/penalty": [(3, 0.125)]}
    if name in FINAL_AT_STEP_0:
        assert top["metrics"] == {**expected, "acc": [(0, 0.75)]}
    else:
        assert (top["metrics"], top["final"]) == (expected, {"acc": 0.75})
    assert runs["sgd"]["metrics"] == {"eval/acc_task_0": [(0, 0.1 + 0.2)]}  # not rounded
    assert runs["sgd/inner"]["metrics"] == {"x/y": [(10**9, 123456.789)]}
    if name != "tensorboard":
        assert runs["sgd"]["params"] == {"method": "sgd"}
        assert all(r["status"] == "finished" for r in runs.values())
    art = top["artifacts"]
    if name == "tensorboard":  # images as their bytes, Markdown as text, other text in a code block
        assert art == {
            "fig.png": png.read_bytes(),
            "report.md": md.read_text(),
            "results.json": f"```\n{js.read_text()}\n```",
        }
    else:
        assert art == {f.name: f.read_bytes() for f in (png, md, js)}


def test_a_failure_ends_the_open_runs_as_failed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), open_tracking(["jsonl", "mlflow"], tmp_path, "x") as t:
        t.child("a").log_metrics({"m/v": 1.0}, step=1)
        raise RuntimeError("boom")
    for runs in (read_jsonl(tmp_path), read_mlflow(tmp_path, tmp_path / "dl")):
        assert {k: r["status"] for k, r in runs.items()} == {"": "failed", "a": "failed"}


def test_tensorboard_and_jsonl_are_rewritten_by_each_invocation(tmp_path: Path) -> None:
    for value in (1.0, 2.0):
        with open_tracking(["tensorboard", "jsonl"], tmp_path, "x") as t:
            t.log_metrics({"m/v": value}, step=0)
    for runs in (read_tensorboard(tmp_path), read_jsonl(tmp_path)):
        assert runs[""]["metrics"] == {"m/v": [(0, 2.0)]}


def test_a_missing_extra_or_unknown_name_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"--track mlflow needs mlflow: pip install 'ewc\[mlflow\]'"):
        open_tracking(["jsonl", "mlflow"], tmp_path, "x")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened
    run = ["run", "permuted", "--tasks", "2", "--methods", "sgd"]
    assert main([*run, "--track", "mlflow", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "ewc: error: --track mlflow needs mlflow: pip install 'ewc[mlflow]'"
    assert not (tmp_path / "a").exists()  # refused with the config, before --out is made
    assert main([*run, "--track", "tensorboard,nope", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ewc: error: track must be distinct names from ") and "'nope'" in err
    assert err.count("\n") == 1


# --------------------------------------------------------------------------------- ewc run

RUN = [
    "run",
    "permuted",
    "--tasks",
    "2",
    "--methods",
    "sgd,ewc",
    "--epochs",
    "2",
    "--max-train-per-task",
    "200",
    "--hidden",
    "16",
    "--eval-every",
    "3",
    "--curve-samples",
    "100",
    "--fisher-samples",
    "100",
    "--threads",
    "1",
    "--quiet",
]
TIMINGS = {"seconds", "train_seconds"}


def _numbers(entry: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def expected_method_run(res: dict[str, Any], tasks: int) -> tuple[dict[str, list], dict[str, float]]:
    """What a method's child run must hold, from its entry in results.json: (stepped metrics,
    final values). Task J is named task_J, J padded to the width of the last index; a point
    that repeats the one before (a task's start, where the previous one ended) is logged once."""
    width = len(str(tasks - 1))
    c = res["curves"]
    points = list(zip(c["steps"], c["accuracy"], strict=True))
    points = [pt for p, pt in enumerate(points) if p == 0 or pt != points[p - 1]]
    metrics: dict[str, list] = {}
    for j in range(tasks):
        metrics[f"eval/acc_task_{j:0{width}d}"] = sorted((s, row[j]) for s, row in points)
        metrics[f"matrix/acc_task_{j:0{width}d}"] = [
            (i, row[j]) for i, row in enumerate(res["accuracy_matrix"])
        ]
    for key in ("task_loss", "penalty"):
        metrics[f"train/{key}"] = sorted(
            (s, v) for s, v in zip(c["steps"], c[key], strict=True) if v is not None
        )
    return metrics, _numbers(res)


def check_method_run(name: str, run: dict[str, Any], res: dict[str, Any], tasks: int) -> None:
    metrics, final = expected_method_run(res, tasks)
    if name in FINAL_AT_STEP_0:
        assert run["metrics"] == {**metrics, **{k: [(0, v)] for k, v in final.items()}}
    else:
        assert (run["metrics"], run["final"]) == (metrics, final)


def check_sequence_runs(
    name: str, runs: dict[str, Any], results: dict[str, Any], out: Path, prefix: str = ""
) -> None:
    """The runs under ``prefix`` hold the record of the ``ewc run`` in ``out`` (results.json)."""
    tasks = len(results["tasks"])
    for method, res in results["methods"].items():
        check_method_run(name, runs[prefix + method], res, tasks)
    top = runs[prefix.rstrip("/")]
    files = ["results.json", "report.md", "metrics.csv", "curves.png", "matrix.png", "summary.png"]
    if name == "tensorboard":
        assert set(top["artifacts"]) == set(files)
        assert top["artifacts"]["curves.png"] == (out / "curves.png").read_bytes()
        assert top["artifacts"]["report.md"] == (out / "report.md").read_text()
        assert json.loads(top["artifacts"]["results.json"].strip("`\n")) == results
    else:
        assert top["artifacts"] == {f: (out / f).read_bytes() for f in files}
    if name in ("jsonl", "wandb"):
        assert top["params"] == results["config"]
    elif name == "mlflow":
        assert top["params"]["lam"] == repr(results["config"]["lam"])
        assert top["params"]["hidden"] == "[16]" and top["params"]["versions.torch"] == torch.__version__
        assert {
            r["params"]["method"] for k, r in runs.items() if k.startswith(prefix) and k != prefix.rstrip("/")
        } == set(results["methods"])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ewc run`` with all four trackers at once (--jobs 1)."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, root)
        assert main([*RUN, "--track", "tensorboard,mlflow,wandb,jsonl", "--out", str(root / "run")]) == 0
    return root / "run"


def test_run_tracks_everything_in_every_tracker(tracked_run: Path, tmp_path: Path) -> None:
    """Each tracker, read back with its own library, holds the values of results.json."""
    out = tracked_run
    results = json.loads((out / "results.json").read_text())
    ewc_curves = results["methods"]["ewc"]["curves"]
    assert any(p is not None and p > 0 for p in ewc_curves["penalty"])  # something to compare
    assert all(p in (None, 0.0) for p in results["methods"]["sgd"]["curves"]["penalty"])
    for name in ("tensorboard", "mlflow", "wandb", "jsonl"):
        runs = READERS[name](out, tmp_path / "dl")
        assert set(runs) == {"", "sgd", "ewc"}, name
        check_sequence_runs(name, runs, results, out)
    wandb_runs = read_wandb(out)
    assert len({r["group"] for r in wandb_runs.values()}) == 1  # one group for the command


def test_jobs_one_and_two_log_the_same(tracked_run: Path, tmp_path: Path) -> None:
    """Workers train, this process logs: the logs of --jobs 1 and 2 are the same."""
    assert main([*RUN, "--jobs", "2", "--track", "jsonl", "--out", str(tmp_path / "j2")]) == 0
    logs = {}
    for jobs, out in ((1, tracked_run), (2, tmp_path / "j2")):
        runs = read_jsonl(out)
        check_sequence_runs("jsonl", runs, json.loads((out / "results.json").read_text()), out)
        for run in runs.values():
            run["final"] = {k: v for k, v in run["final"].items() if k not in TIMINGS}
            run["artifacts"] = sorted(run["artifacts"])
        for key in ("jobs", "created"):
            runs[""]["params"].pop(key)
        logs[jobs] = runs
    assert logs[1] == logs[2]


def test_a_resumed_run_logs_its_whole_record_once(tmp_path: Path) -> None:
    """The same command again (everything finished: the jobs' results come from OUT/progress)
    logs the record again, whole; a changed --track does not refuse the folder."""
    out = tmp_path / "run"
    assert main([*RUN, "--track", "jsonl", "--out", str(out)]) == 0
    first = read_jsonl(out)
    assert main([*RUN, "--track", "tensorboard,jsonl", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert read_jsonl(out)["ewc"]["metrics"] == first["ewc"]["metrics"]
    check_sequence_runs("tensorboard", read_tensorboard(out), results, out)


# ------------------------------------------------------------------- ewc compare / stream / rl


def test_compare_tracks_each_scenario_as_a_child(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    cmp = ["compare", *RUN[1:], "--scenarios", "task,domain", "--no-search"]
    assert main([*cmp, "--track", "mlflow,jsonl", "--out", str(out)]) == 0
    for name in ("mlflow", "jsonl"):
        runs = READERS[name](out, tmp_path / "dl")
        assert set(runs) == {"", "task", "task/sgd", "task/ewc", "domain", "domain/sgd", "domain/ewc"}
        for sc in ("task", "domain"):
            results = json.loads((out / sc / "results.json").read_text())
            check_sequence_runs(name, runs, results, out / sc, prefix=f"{sc}/")
        files = ["results.json", "comparison.md", "comparison.csv", "summary.png"]
        assert runs[""]["artifacts"] == {f: (out / f).read_bytes() for f in files}
        assert all(r["status"] == "finished" for r in runs.values())


STREAM = [
    "stream",
    "--tasks",
    "3",
    "--schedule",
    "0 1 0 2",
    "--hidden",
    "16",
    "--min-len",
    "8",
    "--max-len",
    "12",
]
STREAM += ["--max-train-per-task", "300", "--threads", "1"]


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a nested record, named a/b/c (spaces as _)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = prefix + str(k).replace(" ", "_")
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = v
    return out


def test_stream_tracks_each_learner(tmp_path: Path) -> None:
    out = tmp_path / "stream"
    assert main([*STREAM, "--track", "tensorboard,jsonl", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["track"] == ["tensorboard", "jsonl"]
    for name in ("tensorboard", "jsonl"):
        runs = READERS[name](out, tmp_path / "dl")
        assert set(runs) == {"", "ewc-inferred", "ewc-true", "sgd-inferred"}
        top_final = _flat({"assignment": record["assignment"], "seconds": record["seconds"]})
        top_steps = {"stream/true_task": list(enumerate(record["true_ids"]))}
        if name in FINAL_AT_STEP_0:
            assert runs[""]["metrics"] == {**top_steps, **{k: [(0, v)] for k, v in top_final.items()}}
        else:
            assert (runs[""]["metrics"], runs[""]["final"]) == (top_steps, top_final)
        for learner in record["learners"]:
            run = runs[f"{learner['method']}-{learner['task_ids']}"]
            steps = {
                "stream/prequential": list(enumerate(learner["prequential"])),
                "stream/task_id": list(enumerate(learner["ids"])),
            }
            final = {
                k: v for k, v in learner.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            final.update(
                {
                    f"test/acc_{t.replace(' ', '_')}": a
                    for t, a in zip(record["tests"], learner["test_accuracy"], strict=True)
                }
            )
            if name in FINAL_AT_STEP_0:
                assert run["metrics"] == {**steps, **{k: [(0, v)] for k, v in final.items()}}
            else:
                assert (run["metrics"], run["final"]) == (steps, final)
        files = {"results.json", "report.md", "timeline.png"}
        assert set(runs[""]["artifacts"]) == files
        assert runs[""]["artifacts"]["timeline.png"] == (out / "timeline.png").read_bytes()


def test_rl_tracks_each_method_and_seed(tmp_path: Path) -> None:
    pytest.importorskip("minatar")  # installed by `make install` (an extra of the rl tests)
    out = tmp_path / "rl"
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"breakout": 2.0, "space_invaders": 5.0}))
    rl = ["rl", "--games", "breakout,space_invaders", "--visits", "2", "--steps-per-visit", "200"]
    rl += ["--eval-every", "100", "--eval-episodes", "1", "--hidden", "16", "--conv-channels", "4"]
    rl += ["--learning-starts", "32", "--fisher-samples", "32", "--replay-capacity", "500", "--seeds", "0"]
    rl += ["--methods", "dqn,ewc", "--jobs", "1", "--no-perturb", "--reference", str(reference)]
    assert main([*rl, "--track", "wandb,jsonl", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    for name in ("wandb", "jsonl"):
        runs = READERS[name](out, tmp_path / "dl")
        assert set(runs) == {"", "dqn-s0", "ewc-s0"}
        assert runs[""]["final"] == _flat(
            {"normalisation": record["normalisation"], "summary": record["summary"]}
        )
        assert runs[""]["params"] == record["config"]
        for method, scored in record["runs"].items():
            (one,) = scored
            run = runs[f"{method}-s0"]
            steps: dict[str, list] = {}
            for e in one["record"]["evaluations"]:
                values = {"eval/total": e["total"], **_flat(e["scores"], "eval/score_")}
                values.update(_flat(e["normalised"], "eval/normalised_"))
                for k, v in values.items():
                    if v is not None:
                        steps.setdefault(k, []).append((e["env_step"], v))
            for v, visit in enumerate(one["record"]["visits"]):
                for k, x in _flat(visit, "visit/").items():
                    steps.setdefault(k, []).append((v, x))
            assert run["metrics"] == {k: sorted(v) for k, v in steps.items()}
            keys = ("final_total", "mean_total", "env_steps_per_s", "updates_per_s")
            final = _flat({k: one[k] for k in keys})
            final.update(_flat({k: one[k] for k in ("final_normalised", "final_scores", "forgetting")}))
            assert run["final"] == final
            assert run["params"] == {"method": method, "seed": 0}
        assert set(runs[""]["artifacts"]) == {"results.json", "report.md", "total_score.png", "per_game.png"}


# ------------------------------------------------------------- the values the loop records


class _Constant:
    """A deferred addend: its value is computed when read."""

    def __init__(self, value: float):
        self.c = value

    def value(self) -> torch.Tensor:
        return torch.tensor(self.c)


class _AddsConstant(Method):
    """Adds ``c`` to the task loss (deferred like EWC's penalty, or not) and keeps every task loss."""

    name = "adds-constant"

    def __init__(self, c: float, deferred: bool):
        self.c, self.deferred, self.seen = c, deferred, []

    def loss(self, task_loss: torch.Tensor, batch: Any = None) -> torch.Tensor:
        self.seen.append(float(task_loss))
        if self.deferred:
            return task_loss + defer(torch.zeros(()), [_Constant(self.c)], pure=True)
        return task_loss + self.c


@pytest.mark.parametrize("deferred", [True, False])
def test_the_loop_records_mean_task_loss_and_last_penalty_at_each_point(deferred: bool) -> None:
    tasks = make_sequence(load_dataset("mnist-10k"), "permuted", 2, seed=0, max_train_per_task=64)
    config = TrainConfig(epochs=4, batch_size=64, eval_every=3, hidden=(16,), threads=1, progress=False)
    method = _AddsConstant(0.3125, deferred)
    curves = run_method(tasks, method, config)["curves"]
    steps = curves["steps"]
    assert steps == [0, 3, 4, 4, 7, 8]  # one batch per epoch; a point every 3 and at each task's end
    starts = [p == 0 or steps[p] == steps[p - 1] for p in range(len(steps))]
    # None at a task's start (no batch since the last point), else the mean since the last point
    assert [v is None for v in curves["task_loss"]] == [v is None for v in curves["penalty"]] == starts
    want = [
        sum(method.seen[steps[p - 1] : steps[p]]) / (steps[p] - steps[p - 1])
        for p, s in enumerate(starts)
        if not s
    ]
    assert [v for v in curves["task_loss"] if v is not None] == pytest.approx(want, rel=1e-12)
    assert method.seen[0] == pytest.approx(_first_loss(tasks[0], config), rel=1e-6)
    penalties = [v for v in curves["penalty"] if v is not None]
    if deferred:  # the addend's value itself
        assert penalties == [0.3125] * len(want)
    else:  # loss − task loss, both rounded to float32
        assert penalties == pytest.approx([0.3125] * len(want), abs=1e-6)


def _first_loss(task: Any, config: TrainConfig) -> float:
    """The cross-entropy of the seeded initial model on the first batch (the whole task here)."""
    torch.manual_seed(config.seed)
    model = build_model("mlp", tuple(task.x_train.shape[1:]), 10, hidden=config.hidden, dropout=0.0)
    return float(torch.nn.functional.cross_entropy(model(task.x_train), task.y_train))


def test_added_value_is_the_penalty_not_a_difference_of_rounded_sums() -> None:
    model = tiny_model(0)
    terms = random_tasks(model, 2, 0)
    reg = EWC(model, lam=1.7)
    start = snapshot(model)
    for anchor, fisher in terms:
        set_params(model, anchor)
        reg.consolidate(fisher_diag=fisher)
    set_params(model, start)
    want = sum(
        1.7 / 2 * float((f[n].double() * (p.detach().double() - a[n].double()) ** 2).sum())
        for a, f in terms
        for n, p in model.named_parameters()
    )
    task_loss = model(torch.randn(8, 3)).pow(2).mean() + 1e6  # a float32 sum would round p away
    loss = task_loss + reg.penalty()
    loss.backward()
    assert added_value(loss, task_loss) == pytest.approx(want, rel=1e-6)
    assert float(loss) - float(task_loss) != pytest.approx(want, rel=1e-3)
    assert added_value(task_loss * 2, task_loss) == float(task_loss * 2) - float(task_loss)
