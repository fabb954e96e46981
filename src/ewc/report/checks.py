"""Reading and validating a run's ``results.json``: the one input of every report.

Only the parts of the schema the report draws from are checked, so a malformed file fails here
with the file and the offending key named, not deep inside a plot. A ``--seeds`` run's file (see
:mod:`ewc.report.seeds`) is checked as a run, then each seed's run under ``per_seed`` likewise,
and each method's ``stats``; a single run's file (with no ``per_seed``) is read as it always was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


def validate_results(results: Any, source: str) -> dict[str, Any]:
    """Check the parts of the schema the report relies on; raise ValueError naming ``source``."""

    def fail(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    if not isinstance(results, dict):
        raise fail(f"top level must be a JSON object, got {type(results).__name__}")
    other = _other_kind(results, source)
    if other:
        raise fail(other)
    for key, typ in (("config", dict), ("tasks", list), ("methods", dict)):
        if key not in results:
            raise fail(f"missing key {key!r}")
        if not isinstance(results[key], typ):
            raise fail(f"key {key!r} must be a {'object' if typ is dict else 'list'}")
    T = len(results["tasks"])
    if T == 0:
        raise fail("'tasks' is empty; need at least one task")
    for i, t in enumerate(results["tasks"]):
        if not isinstance(t, dict):
            raise fail(f"tasks[{i}] must be an object")
    if not results["methods"]:
        raise fail("'methods' is empty; need at least one method")
    for name, m in results["methods"].items():
        where = f"methods[{name!r}]"
        if not isinstance(m, dict):
            raise fail(f"{where} must be an object")
        if "accuracy_matrix" not in m:
            raise fail(f"{where}: missing key 'accuracy_matrix'")
        R = m["accuracy_matrix"]
        if not isinstance(R, list) or len(R) != T or any(not isinstance(r, list) or len(r) != T for r in R):
            raise fail(f"{where}['accuracy_matrix'] must be a {T} x {T} list of lists (one row per task)")
        curves = m.get("curves")
        if curves is None:
            continue
        if not isinstance(curves, dict):
            raise fail(f"{where}['curves'] must be an object")
        if "accuracy" in curves or "steps" in curves:
            for key in ("steps", "accuracy"):
                if not isinstance(curves.get(key), list):
                    raise fail(f"{where}['curves']: missing key {key!r}")
            if len(curves["steps"]) != len(curves["accuracy"]):
                raise fail(
                    f"{where}['curves']: 'steps' has {len(curves['steps'])} points but 'accuracy' has "
                    f"{len(curves['accuracy'])}"
                )
            for p, row in enumerate(curves["accuracy"]):
                if not isinstance(row, list) or len(row) != T:
                    raise fail(f"{where}['curves']['accuracy'][{p}] must list the accuracy of all {T} tasks")
        ts = curves.get("task_starts")
        if ts is not None and (not isinstance(ts, list) or len(ts) != T):
            raise fail(f"{where}['curves']['task_starts'] must have one step per task ({T})")
        band = curves.get("accuracy_ci95")
        if band is not None and (not isinstance(band, list) or len(band) != len(curves.get("steps", []))):
            raise fail(f"{where}['curves']['accuracy_ci95'] must have one row per point of 'steps'")
    if "per_seed" in results:
        _validate_seeds(results, fail, source)
    return results


def _validate_seeds(results: dict[str, Any], fail: Any, source: str) -> None:
    """The parts of a ``--seeds`` run: every seed's run, and each method's ``stats`` and ``seeds``."""
    per_seed = results["per_seed"]
    if not isinstance(per_seed, list) or not per_seed:
        raise fail("'per_seed' must be a non-empty list (one run per seed)")
    names = list(results["methods"])
    for k, run in enumerate(per_seed):
        where = f"per_seed[{k}]"
        if not isinstance(run, dict) or not isinstance(run.get("seed"), int):
            raise fail(f"{where} must be an object with an integer 'seed'")
        if not isinstance(run.get("methods"), dict) or list(run["methods"]) != names:
            raise fail(f"{where}['methods'] must hold the run's methods ({', '.join(names)})")
        inner = {
            "config": results["config"],
            "tasks": run.get("tasks", results["tasks"]),
            "methods": run["methods"],
        }
        validate_results(inner, f"{source}: {where}")
    seeds = [run["seed"] for run in per_seed]
    for name, m in results["methods"].items():
        where = f"methods[{name!r}]"
        stats = m.get("stats")
        if not isinstance(stats, dict) or m.get("seeds") != seeds:
            raise fail(f"{where} must have 'stats' (an object) and 'seeds' {seeds} (those of 'per_seed')")
        for key, st in stats.items():
            if not isinstance(st, dict) or not {"mean", "ci95", "n"} <= set(st):
                raise fail(f"{where}['stats'][{key!r}] must be an object with 'mean', 'ci95' and 'n'")
            if "values" in st and (not isinstance(st["values"], list) or len(st["values"]) != len(seeds)):
                raise fail(f"{where}['stats'][{key!r}]['values'] must hold one value per seed ({len(seeds)})")


def _other_kind(results: dict[str, Any], source: str) -> str | None:
    """What to say when ``results`` is the record of another command than ``ewc run``, else None."""
    if "tasks" in results and "methods" in results:
        return None
    name = results.get("experiment")
    if isinstance(name, str):
        cmd = f"ewc {name}" if name in ("stream", "rl") else f"ewc experiment {name}"
        again = " (it resumes from OUT/checkpoints)" if name == "rl" else ""
        command = results.get("command")
        how = f": {command}" if isinstance(command, str) else ""
        return (
            f"this is an `{cmd}` run, not an `ewc run`: `{cmd}` wrote its report.md itself; "
            f"to redraw it, run its command again{again}{how}"
        )
    if "rows" in results and isinstance(results.get("scenarios"), list) and results["scenarios"]:
        run_dir = Path(source).parent
        return (
            f"this is an `ewc compare` run: report one scenario's run with `ewc report "
            f"{run_dir / str(results['scenarios'][0])}` (comparison.md holds the table)"
        )
    return None


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``run_dir/results.json`` (``run_dir`` may also be the JSON file itself).

    Raises FileNotFoundError naming the path when it is missing and ValueError naming the file
    and the offending key when it is malformed.
    """
    p = Path(run_dir)
    path = p if p.suffix == ".json" or p.is_file() else p / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_results(results, str(path))
