"""``--lam auto``: a method's strength (EWC's λ, L2's λ, SI's c, MAS's λ) chosen on the validation
parts by a short screen and a final among full runs, at a cost of about 3 runs of the whole
sequence, the run with the chosen strength included.

1. **Screen.** Every value of the method's bracket (one per decade, ``MethodSpec.bracket``) trains
   the first two tasks for a fraction of each task's steps (fewer epochs, then a seeded share of
   its training part) and of the samples of its other per-task work (EWC's Fisher, MAS's
   importances), scored by validation ACC. The screen costs ``budget`` task-lengths: no strength
   acts before a task has been learned, so the first task is trained once and every value starts
   its second task from that state (``run_method``'s ``prefix``).
2. **Final.** λ = 0 (plain fine-tuning) and the screen's :data:`FINALISTS` best values (ties: the
   larger) each train the whole sequence at full length, again from one shared first task. Each is
   the method's real test run, also scored on the validation parts. The best finalist's gain over
   λ = 0 in validation ACC decides (:func:`decide`): beyond the noise margin, it is chosen
   ("helps"); otherwise "no λ helps" and λ = 0 is chosen. The chosen run is the method's test run:
   nothing is run again.

Why a final at full length: a run that trains part of each task's steps forgets less and drifts
less from its anchors, so short runs favour weaker strengths and λ = 0 (docs/results.md,
"A λ that transfers", measured over seven seeds): the screen only ranks, full runs decide. Cost in
task-lengths of a T-task run: ``budget`` + 1 + (FINALISTS + 1)·(T − 1), i.e. 3 − (2 − budget)/T runs
(2.96 for 5 tasks at the default budget 1.8). The search never reads the test parts: the
screen runs on the validation parts in place of the test parts, and the final's choice reads only
their validation ACC. The cost (optimizer steps and seconds of all runs, the shared first tasks
counted once) is recorded with the choice (docs/methods.md, "λ chosen by a search").
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewc.data import Task
from ewc.executors import Executor
from ewc.experiments.common import write_json
from ewc.experiments.jobs import job_files, job_tag, run_all
from ewc.methods import AUTO, METHOD_SPECS
from ewc.scenario import Scenario
from ewc.snapshots import evaluate_snapshots
from ewc.train import TrainConfig, method_params

__all__ = [
    "DEFAULT_BUDGET",
    "FINALISTS",
    "MIN_GAIN",
    "SCREEN_TASKS",
    "auto_methods",
    "check_auto",
    "decide",
    "finish_cost",
    "noise_margin",
    "probe_config",
    "screen_training",
    "screen_fraction",
    "search_auto",
    "shortlist",
]

#: the screen's cost in task-lengths (one task trained in full): with the final about 3× one run
DEFAULT_BUDGET = 1.8
#: the values of the bracket that go on to the final, where λ = 0 joins them
FINALISTS = 2
#: the tasks the screen trains (the first is shared by every value; a second shows forgetting)
SCREEN_TASKS = 2
#: a method's parameters that count the samples of its per-task work besides the steps (EWC's
#: Fisher, MAS's importances): a screen that trains a fraction of the steps uses that fraction of them
SAMPLE_PARAMS = ("fisher_samples", "max_samples")
#: the least gain in validation ACC over λ = 0 that counts as help, whatever the validation size:
#: about three times EWC's seed-to-seed standard deviation of ACC (docs/results.md, 5 seeds)
MIN_GAIN = 0.01


def screen_fraction(n_values: int, budget: float = DEFAULT_BUDGET) -> float:
    """The share of each task's steps the screen trains: ``budget`` task-lengths over the first
    task (once) and ``n_values`` second tasks, at most 1."""
    if n_values < 1 or budget <= 0:
        raise ValueError(f"need λ values and a positive budget, got {n_values}, {budget}")
    return min(1.0, budget / (1 + n_values * (SCREEN_TASKS - 1)))


def screen_training(fraction: float, epochs: int) -> tuple[int, float]:
    """(epochs, share of each task's training data) of a screen's run that trains ``fraction`` of a run's
    steps per task: the fewest epochs that do, so each run sees as much of the data as it can."""
    work = fraction * epochs  # epochs' worth of steps per task
    if work >= epochs:
        return epochs, 1.0
    fewest = max(1, math.ceil(work - 1e-9))
    return fewest, work / fewest


def noise_margin(acc: float, n_samples: int) -> float:
    """The gain over λ = 0 that validation noise can give: two standard errors of an accuracy near
    ``acc`` measured on ``n_samples`` samples (both λ are scored on the same samples, so their
    difference varies less than two independent accuracies would), at least :data:`MIN_GAIN`."""
    p = min(max(acc, 0.0), 1.0)
    return max(MIN_GAIN, 2.0 * math.sqrt(p * (1.0 - p) / max(1, n_samples)))


def shortlist(lams: Sequence[float], accs: Sequence[float], k: int = FINALISTS) -> list[float]:
    """The ``k`` values with the best screen ACC (ties: the larger value, the likelier to act where
    a short run cannot tell the weak ones from λ = 0), in increasing order."""
    ranked = sorted(zip(lams, accs, strict=True), key=lambda t: (-t[1], -t[0]))
    return sorted(lam for lam, _ in ranked[:k])


def decide(final: dict[str, Any]) -> dict[str, Any]:
    """The verdict from the final (``lams``, their ``validation_acc``, ``n_val``): the best λ > 0
    (ties: the smaller) against λ = 0. ``helps``: its gain is beyond the noise margin; otherwise
    ``no λ helps`` and λ = 0 is chosen (full runs: a gain within noise is no evidence)."""
    scores = dict(zip(final["lams"], final["validation_acc"], strict=True))
    reference = scores[0.0]
    best = max((lam for lam in final["lams"] if lam > 0), key=lambda lam: (scores[lam], -lam))
    gain, margin = scores[best] - reference, noise_margin(reference, final["n_val"])
    verdict = "helps" if gain > margin else "no λ helps"
    return {
        "best": best,
        "best_acc": scores[best],
        "reference_acc": reference,
        "gain": gain,
        "margin": margin,
        "verdict": verdict,
        "lam": best if verdict == "helps" else 0.0,
    }


def auto_methods(methods: Sequence[str], config: TrainConfig) -> dict[str, str]:
    """``{method: its strength parameter}`` for each method whose strength is ``auto``."""
    autos = {}
    for m in methods:
        params = method_params(m, config)
        spec = METHOD_SPECS[m]
        for name, value in params.items():
            if value != AUTO:
                continue
            if name != spec.strength or not spec.bracket:
                what = f"its strength is {spec.strength}" if spec.strength else "it has no strength to search"
                raise ValueError(f"{m}.{name}={AUTO!r}: only a method's strength can be {AUTO!r} ({what})")
            autos[m] = name
    return autos


def check_auto(methods: Sequence[str], config: TrainConfig, grids: dict[str, Any]) -> dict[str, str]:
    """:func:`auto_methods`, or a ValueError for ``auto`` that no method would use, or that a λ
    grid (``--select-lam``) would choose too; ``grids``: the methods' λ grids."""
    autos = auto_methods(methods, config)
    both = sorted(set(autos) & set(grids))
    if both:
        raise ValueError(
            f"λ of {', '.join(both)} is both {AUTO!r} and chosen from a --select-lam grid: give one of them"
        )
    for flag, setting in (("--lam", "lam"), ("--l2-lam", "l2_lam")):
        if getattr(config, setting) == AUTO and not any(
            METHOD_SPECS[m].lam_setting in (setting, "l2_lam" if setting == "lam" else setting) for m in autos
        ):
            raise ValueError(
                f"{flag} {AUTO} has no effect: none of the methods {', '.join(methods)} takes its strength "
                f"from {flag} (--set METHOD.{setting.split('_')[-1]}=NUMBER overrides it)"
            )
    return autos


def probe_config(config: TrainConfig, autos: dict[str, str]) -> TrainConfig:
    """``config`` with a number in place of each ``auto`` strength (to check the methods build)."""
    params = dict(config.params)
    for m, name in autos.items():
        params[m] = {**params.get(m, {}), name: METHOD_SPECS[m].bracket[0]}
    return dataclasses.replace(config, params=params)


def search_auto(
    key: tuple,
    tasks: Sequence[Task],
    autos: dict[str, str],
    config: TrainConfig,
    *,
    budget: float = DEFAULT_BUDGET,
    jobs: int = 1,
    executor: Executor | None = None,
    progress: Path | None = None,
    checkpoints: bool = False,
) -> dict[str, dict[str, Any]]:
    """Choose the strength of every method in ``autos``, one method after another (each stage's
    runs ``jobs`` at a time, on ``executor``). ``key``: the run's data key (sequence, data, tasks, max
    train, data root); ``tasks``: its sequence (the sizes of its training and validation parts are
    read from it). Each record holds the screen and the final (``rungs``: the two stages, in that
    order), the verdict, the cost
    and, under ``run``, the chosen value's test run (a result of
    :func:`ewc.experiments.jobs.run_all`, the same as a test run with that value: the caller uses
    it as one). ``checkpoints``: save each finalist's learner next to the search's other files (in
    ``progress``, where a rerun finds them); the chosen one's file is named in ``checkpoint``."""
    n_tasks = key[2]
    records: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ewc-search-") as tmp:
        for m, name in autos.items():
            spec = METHOD_SPECS[m]
            if n_tasks < 2:
                records[m] = _one_task(spec.bracket, budget)
            else:
                where = _Where(Path(progress) if progress is not None else Path(tmp), progress, checkpoints)
                records[m] = _search(key, tasks, m, name, config, budget, jobs, executor, where)
            records[m]["parameter"] = name
            records[m]["chosen"] = {name: records[m]["lam"]}
    return records


@dataclass(frozen=True)
class _Where:
    """Where a search's files go (the shared first tasks, the finalists' weights and learners) and
    the runs' progress folder; ``checkpoints``: whether the finalists save their learners."""

    shared: Path
    progress: Path | None
    checkpoints: bool


def _search(
    key: tuple,
    tasks: Sequence[Task],
    m: str,
    name: str,
    config: TrainConfig,
    budget: float,
    jobs: int,
    executor: Executor | None,
    where: _Where,
) -> dict[str, Any]:
    """The screen and the final of one method (see the module doc)."""
    sequence, data, n_tasks, max_train, data_root = key
    bracket = sorted(float(v) for v in METHOD_SPECS[m].bracket if v > 0)
    n_val = [len(t.y_val) for t in tasks]

    # 1. the screen: every value on the first tasks, a fraction of each task's steps
    fraction = screen_fraction(len(bracket), budget)
    epochs, share = screen_training(fraction, config.epochs)
    k = min(SCREEN_TASKS, n_tasks)
    cap = max_train if share >= 1 else math.ceil(share * max(len(t.y_train) for t in tasks[:k]))
    # scored by ACC alone: no learning curves, no rows of the matrix before the last
    quiet = dataclasses.replace(config, eval_every=10**9, curve_samples=1, final_only=True, epochs=epochs)
    params = {**METHOD_SPECS[m].defaults, **method_params(m, quiet)}
    for sample in SAMPLE_PARAMS:  # the per-task work besides the steps (a Fisher's samples) scaled alike
        if isinstance(params.get(sample), int):
            quiet = _with(quiet, m, sample, max(1, math.ceil(fraction * params[sample])))
    screen_key = (sequence, data, n_tasks, cap, data_root, k)
    screen, _ = _runs(screen_key, m, name, quiet, bracket, True, jobs, executor, where, validation=False)
    samples = {p: v for p, v in method_params(m, quiet).items() if p in SAMPLE_PARAMS}
    screened = {
        "stage": "screen",
        "tasks": k,
        "fraction": fraction,
        **_curve(bracket, screen, "average_accuracy"),
        "n_val": sum(n_val[:k]),
        "epochs": epochs,
        "max_train_per_task": cap,
        **samples,
    }

    # 2. the final: λ = 0 and the finalists in full, scored on validation; their weights after each
    # task are kept and only the chosen run is tested (its test run, as if it had tested itself)
    finalists = [0.0, *shortlist(bracket, screened["validation_acc"])]
    final, specs = _runs(key, m, name, config, finalists, False, jobs, executor, where, validation=True)
    decided = {
        "stage": "final",
        "tasks": n_tasks,
        "fraction": 1.0,
        **_curve(finalists, final, "validation_acc"),
        "n_val": sum(n_val),
        "epochs": config.epochs,
        "max_train_per_task": max_train,
    }
    verdict = decide(decided)
    chosen = finalists.index(verdict["lam"])
    scenario = Scenario.for_tasks(config.scenario, [t.classes for t in tasks])
    run = dict(final[chosen])
    if "tests_deferred" in run:  # (a worker that does not share this machine's files tested itself)
        t0, folder = time.perf_counter(), run["tests_deferred"]
        run = evaluate_snapshots(run, folder, tasks, scenario, threads=config.threads, device=config.device)
        run["seconds"] += time.perf_counter() - t0  # the testing a run that tested itself did
        if where.progress is not None:  # the kept result, tested: a rerun after a kill reads it
            write_json(run, job_files(specs[chosen])[0])
    for r in final:
        if "tests_deferred" in r:
            shutil.rmtree(r["tests_deferred"], ignore_errors=True)
    final[chosen] = run
    decided["seconds"][chosen] = run["seconds"]
    spent = [_cost(screen), _cost(final)]
    cost = {
        "budget": budget,
        "search_steps": sum(c["steps"] for c in spent),
        "search_seconds": sum(c["seconds"] for c in spent),
    }
    # the test run's record, as a run from scratch gives it (the shared first task and the
    # validation score belong to the search)
    run = {k: v for k, v in run.items() if k not in ("validation_acc", "prefix")}
    checkpoint = specs[chosen][4].as_posix() if specs[chosen][4] is not None else None
    edge = {bracket[0]: "lower", bracket[-1]: "upper"}.get(verdict["lam"]) if verdict["lam"] else None
    record = {"auto": True, "bracket": bracket, "rungs": [screened, decided], **verdict, "edge": edge}
    return {**record, "cost": cost, "run": run, **({"checkpoint": checkpoint} if checkpoint else {})}


def _cost(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Optimizer steps and seconds of one stage's runs, a shared first task counted once: a run
    that started from the shared state did not train it (its record counts it), and when every
    run of the stage did so (a rerun after a kill), the state's own cost is added once."""
    shared = [r.get("prefix") or {} for r in runs]
    steps = sum(_steps(r) - s.get("steps", 0) for r, s in zip(runs, shared, strict=True))
    seconds = sum(r["seconds"] - s.get("seconds", 0.0) for r, s in zip(runs, shared, strict=True))
    if runs and all(shared):
        steps, seconds = steps + shared[0]["steps"], seconds + shared[0]["seconds"]
    return {"steps": steps, "seconds": seconds}


def _runs(
    key: tuple,
    m: str,
    name: str,
    config: TrainConfig,
    lams: list[float],
    on_val: bool,
    jobs: int,
    executor: Executor | None,
    where: _Where,
    *,
    validation: bool,
) -> tuple[list[dict[str, Any]], list[tuple]]:
    """One stage's runs, one per value, and their job specs: the first alone (it writes the state
    after the first task that the others start from), then the others ``jobs`` at a time."""
    prefix = where.shared / f"prefix-{job_tag(key, m, _with(config, m, name, AUTO), on_val)}.pt"
    where.shared.mkdir(parents=True, exist_ok=True)
    specs = []
    for lam in lams:
        run = _with(config, m, name, lam)
        tag = job_tag(key, m, run, on_val)
        options: dict[str, Any] = {"prefix": str(prefix), "validation": validation}
        if validation and not config.final_only:  # a finalist: tested later if chosen
            options["defer_tests"] = str(where.shared / f"tests-{tag}")
        if not validation:  # a screen's run: short, redone rather than resumed after a kill
            options["resume"] = False
        save = where.shared / f"learner-{tag}.pt" if validation and where.checkpoints else None
        specs.append((key, m, run, on_val, save, where.progress, options))
    results = [*run_all(specs[:1], 1, executor=executor), *run_all(specs[1:], jobs, executor=executor)]
    prefix.unlink(missing_ok=True)  # every run of the stage is done (its result kept)
    return results, specs


def _curve(lams: list[float], results: list[dict[str, Any]], score: str) -> dict[str, Any]:
    return {
        "lams": lams,
        "validation_acc": [r[score] for r in results],
        "steps": [_steps(r) for r in results],
        "seconds": [r["seconds"] for r in results],
    }


def _steps(result: dict[str, Any]) -> int:
    return result["curves"]["steps"][-1]


def _one_task(bracket: Sequence[float], budget: float) -> dict[str, Any]:
    """One task: no penalty ever acts, so no λ can help (nothing is run)."""
    cost = {"budget": budget, "search_steps": 0, "search_seconds": 0.0}
    return {
        "auto": True,
        "bracket": list(bracket),
        "rungs": [],
        "verdict": "no λ helps",
        "lam": 0.0,
        "cost": cost,
    }


def _with(config: TrainConfig, method: str, name: str, value: float | str) -> TrainConfig:
    params = {**config.params, method: {**config.params.get(method, {}), name: value}}
    return dataclasses.replace(config, params=params)


def finish_cost(records: dict[str, dict[str, Any]], final: dict[str, dict[str, Any]]) -> None:
    """Add each searched method's test run (its optimizer steps and seconds: one run) to its cost,
    and the ratios (all the search's runs, the chosen one included) / one run. A one-task
    search ran nothing: its test run is the only run."""
    for m, record in records.items():
        if not record.get("auto") or m not in final:
            continue
        steps, seconds = final[m]["curves"]["steps"][-1], final[m]["seconds"]
        cost = record["cost"]
        cost.update(final_steps=steps, final_seconds=seconds)
        spent = (cost["search_steps"], cost["search_seconds"]) if record["rungs"] else (steps, seconds)
        cost["ratio_steps"] = spent[0] / max(1, steps)
        cost["ratio_seconds"] = spent[1] / max(1e-9, seconds)
