"""What each command sends to its trackers (``--track``): the values of its record, replayed.

A command opens its trackers before it trains (a missing extra or an unreachable store fails
at once) and logs its record when it has been written: the trackers receive exactly the values
of ``results.json`` (with their steps), the same for any ``--jobs`` (the workers' results come
back to this process) and once per invocation (a resumed run logs its whole record, not the
part before a kill twice). Per run:

- ``ewc run`` (and each scenario of ``ewc compare``): the config; per method a child run with
  its parameters, ``train/task_loss`` and ``train/penalty`` and ``eval/acc_task_J`` at every
  evaluation point (step: training step; a task's first point, taken where the previous task's
  last one was and equal to it, is sent once: MLflow would keep one or both of two identical
  entries, depending on their milliseconds), ``matrix/acc_task_J`` after each task (step: the task
  just learned, the accuracy matrix's row), and the method's final numbers (ACC, BWT, FWT,
  forgetting, LCA, seconds, memory); the files (results.json, report, figures, CSV);
- ``ewc stream``: the config, the true task of each batch, the assignment metrics; per learner
  its per-batch prequential accuracy and task id, its test accuracies and final numbers;
- ``ewc rl``: the config, the normalisation and the summary; per method and seed its
  evaluations (step: env step), visits (step: visit) and final scores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ewc.tracking import Logger, Tracking, open_tracking
from ewc.tracking.base import safe_name

__all__ = [
    "as_tracking",
    "log_compare",
    "log_rl",
    "log_sequence",
    "log_stream",
    "numbers",
    "open_for",
    "task_key",
]


def open_for(command: str, track: Iterable[str], out: str | os.PathLike | None) -> Tracking:
    """The trackers of a command run into ``out`` (no names: a Tracking that logs nothing)."""
    where = safe_name(Path(out).resolve().name) if out is not None else "run"
    return open_tracking(tuple(track), out, f"{command}-{where}")


def task_key(j: int, tasks: int) -> str:
    """``task_J``, J zero-padded to the width of the last index (trackers sort names as text)."""
    return f"task_{j:0{len(str(max(tasks - 1, 0)))}d}"


def numbers(record: Mapping[str, Any], prefix: str = "", nested: bool = True) -> dict[str, float]:
    """The numbers of ``record`` (bools, None, text and lists left out); with ``nested``, those
    of nested objects too, named ``a/b``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{safe_name(str(key))}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
        elif nested and isinstance(value, Mapping):
            out.update(numbers(value, name + "/"))
    return out


def as_tracking(log: Logger | None) -> Tracking:
    """``log`` as a :class:`Tracking` (None: one that logs nothing)."""
    if log is None:
        return Tracking()
    return log if isinstance(log, Tracking) else Tracking([log])


def _files(out_dir: Path | None, names: Iterable[str | os.PathLike]) -> list[Path]:
    if out_dir is None:
        return []
    return [Path(out_dir) / n for n in names if (Path(out_dir) / n).is_file()]


def log_sequence(log: Logger | None, results: Mapping[str, Any], files: Iterable[Path] = ()) -> None:
    """``ewc run``'s record (see the module docstring)."""
    log = as_tracking(log)
    if not log:
        return
    log.log_params(results["config"])
    tasks = len(results["tasks"])
    for method, res in results["methods"].items():
        with log.child(method) as run:
            run.log_params({"method": method, **res.get("params", {})})
            curves = res.get("curves") or {}
            steps = curves.get("steps", [])
            losses, penalties = curves.get("task_loss", []), curves.get("penalty", [])
            has_train = len(losses) == len(penalties) == len(steps)  # (absent in older records)
            for p, step in enumerate(steps):
                accs = curves["accuracy"][p]
                if not (p and step == steps[p - 1] and accs == curves["accuracy"][p - 1]):
                    run.log_metrics({f"eval/acc_{task_key(j, tasks)}": a for j, a in enumerate(accs)}, step)
                if has_train:
                    run.log_metrics({"train/task_loss": losses[p], "train/penalty": penalties[p]}, step)
            for i, row in enumerate(res["accuracy_matrix"]):
                run.log_metrics({f"matrix/acc_{task_key(j, tasks)}": v for j, v in enumerate(row)}, i)
            run.log_metrics(numbers(res, nested=False))
    for path in files:
        log.log_artifact(path)


def sequence_files(out_dir: Path | None, report: Mapping[str, Any] | None) -> list[Path]:
    """results.json and the report's files (as :func:`ewc.report.write_report` returned them)."""
    return _files(out_dir, ["results.json", *[Path(p).name for p in (report or {}).values()]])


def log_compare(log: Logger | None, record: Mapping[str, Any], out_dir: Path | None) -> None:
    """``ewc compare``'s own record (each scenario's run went to its child, by ``ewc run``'s rules)."""
    log = as_tracking(log)
    if not log:
        return
    log.log_params({k: v for k, v in record.items() if k not in ("rows", "runs", "seconds", "table")})
    log.log_metrics({"seconds": record["seconds"]})
    for path in _files(out_dir, ["results.json", "comparison.md", "comparison.csv", "summary.png"]):
        log.log_artifact(path)


def log_stream(log: Logger | None, record: Mapping[str, Any], out_dir: Path | None) -> None:
    """``ewc stream``'s record (see the module docstring)."""
    log = as_tracking(log)
    if not log:
        return
    log.log_params(record["config"])
    for b, task in enumerate(record.get("true_ids") or []):
        log.log_metrics({"stream/true_task": task}, b)
    log.log_metrics(numbers({"assignment": record.get("assignment") or {}, "seconds": record.get("seconds")}))
    for learner in record["learners"]:
        with log.child(f"{learner['method']}-{learner['task_ids']}") as run:
            run.log_params(
                {"method": learner["method"], "task_ids": learner["task_ids"], "label": learner["label"]}
            )
            for b, (correct, task) in enumerate(zip(learner["prequential"], learner["ids"], strict=True)):
                run.log_metrics({"stream/prequential": correct, "stream/task_id": task}, b)
            tests = {
                f"test/acc_{safe_name(n)}": a
                for n, a in zip(record["tests"], learner["test_accuracy"], strict=True)
            }
            run.log_metrics({**numbers(learner, nested=False), **tests})
    for path in _files(out_dir, ["results.json", "report.md", "timeline.png"]):
        log.log_artifact(path)


def log_rl(log: Logger | None, record: Mapping[str, Any], out_dir: Path | None) -> None:
    """``ewc rl``'s record (see the module docstring)."""
    from ewc.rl.protocol import mean_total

    log = as_tracking(log)
    if not log:
        return
    log.log_params(record["config"])
    log.log_metrics(numbers({"normalisation": record["normalisation"], "summary": record["summary"]}))
    for method, runs in record["runs"].items():
        for run_record in runs:
            with log.child(f"{method}-s{run_record['seed']}") as run:
                run.log_params({"method": method, "seed": run_record["seed"]})
                rec = run_record["record"]
                for e in rec["evaluations"]:
                    values = {"eval/total": e.get("total")}
                    values.update(numbers(e.get("scores", {}), "eval/score_"))
                    values.update(numbers(e.get("normalised") or {}, "eval/normalised_"))
                    run.log_metrics(values, e["env_step"])
                for v, visit in enumerate(rec.get("visits", [])):
                    run.log_metrics(numbers(visit, "visit/"), v)
                finals = {k: run_record[k] for k in ("final_total", "env_steps_per_s", "updates_per_s")}
                finals["mean_total"] = mean_total(run_record)
                nested = {k: run_record[k] for k in ("final_normalised", "final_scores", "forgetting")}
                run.log_metrics({**numbers(finals), **numbers(nested)})
    figures = sorted(p.name for p in Path(out_dir).glob("*.png")) if out_dir is not None else []
    for path in _files(out_dir, ["results.json", "report.md", *figures]):
        log.log_artifact(path)
