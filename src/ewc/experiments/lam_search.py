"""``--lam auto``: a method's strength (EWC's λ, L2's λ, SI's c, MAS's λ) chosen on the validation
parts by successive halving, at a cost of about ``budget`` runs of the whole sequence.

Rung 0 tries λ = 0 (plain fine-tuning, the reference) and the method's bracket (one value per
decade, ``MethodSpec.bracket``) on the first tasks of the sequence, each task trained for a
fraction of its steps (fewer epochs, then a seeded share of its training part) and of the
samples of its other per-task work (EWC's Fisher, MAS's importances). Each later rung keeps
the best third of the λ > 0 (η = 3; ties: the larger) and λ = 0, and gives each of them η times
the resources, so every rung costs about as much as the one before; the last rung trains all
tasks. Its best λ is chosen unless λ = 0 beats it there beyond noise, no λ > 0 beat λ = 0 in
any rung, or no strength changed the validation ACC beyond noise (:func:`decide`): then "no λ
helps" and the method runs with λ = 0. A run's score is ACC over the tasks it learned, measured
on their validation parts (:func:`ewc.experiments.jobs.validation_tasks`): the test parts are
never read. The search's cost (optimizer steps and seconds of all its runs) is recorded with the
final run's (docs/methods.md, "λ chosen by a search").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewc.data import Task
from ewc.executors import Executor
from ewc.experiments.jobs import run_all
from ewc.methods import AUTO, METHOD_SPECS
from ewc.train import TrainConfig, method_params

__all__ = [
    "DEFAULT_BUDGET",
    "ETA",
    "MIN_GAIN",
    "Rung",
    "auto_methods",
    "check_auto",
    "decide",
    "ever_beaten",
    "finish_cost",
    "flat",
    "noise_margin",
    "probe_config",
    "rung_training",
    "schedule",
    "search_auto",
    "successive_halving",
]

#: the search's cost in runs of the whole sequence (the final run comes on top: about 3× one run)
DEFAULT_BUDGET = 1.8
#: each rung keeps the best 1/ETA of the λ > 0 and gives each ETA times the resources
ETA = 3
#: a method's parameters that count the samples of its per-task work besides the steps (EWC's
#: Fisher, MAS's importances): a rung that trains a fraction of the steps uses that fraction of them
SAMPLE_PARAMS = ("fisher_samples", "max_samples")
#: the least gain in validation ACC over λ = 0 that counts as help, whatever the validation size:
#: about the seed-to-seed spread of ACC of one method (docs/results.md, 5 seeds)
MIN_GAIN = 0.01


@dataclass(frozen=True)
class Rung:
    """One rung: each candidate trains the first ``tasks`` tasks on ``fraction`` of each task's
    training samples; ``resource`` is its cost in runs of the whole sequence."""

    tasks: int
    fraction: float
    resource: float


def schedule(n_tasks: int, n_values: int, budget: float = DEFAULT_BUDGET) -> list[Rung]:
    """The rungs for ``n_values`` λ > 0 (each rung also runs λ = 0): candidates n, ⌈n/η⌉, ... down
    to ⌈n/η^r⌉ ≤ η, resources r₀·η^r with Σ (candidates + 1)·resource = ``budget``. A rung of
    resource r trains k = T·√r tasks (at least 2: one task has nothing to forget) for r·T/k of each
    task's steps, so tasks and steps per task grow together; the last rung, which decides, trains
    all T tasks (for r of each task's steps)."""
    if n_values < 1 or n_tasks < 1 or budget <= 0:
        raise ValueError(f"need λ values, tasks and a positive budget, got {n_values}, {n_tasks}, {budget}")
    sizes = [n_values]
    while sizes[-1] > ETA:
        sizes.append(math.ceil(sizes[-1] / ETA))
    r0 = budget / sum((n + 1) * ETA**r for r, n in enumerate(sizes))
    rungs = []
    for r in range(len(sizes)):
        resource = min(1.0, r0 * ETA**r)
        k = min(n_tasks, max(min(2, n_tasks), round(n_tasks * math.sqrt(resource))))
        if r == len(sizes) - 1:
            k = n_tasks  # the deciding rung faces the whole sequence's plasticity / stability trade-off
        rungs.append(Rung(k, min(1.0, resource * n_tasks / k), resource))
    return rungs


def rung_training(fraction: float, epochs: int) -> tuple[int, float]:
    """(epochs, share of each task's training data) of a rung that trains ``fraction`` of a run's
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


def flat(rungs: Sequence[dict[str, Any]]) -> bool:
    """True when no strength moved the validation ACC by more than noise in any rung (the
    method makes no difference at any strength)."""
    return all(
        max(r["validation_acc"]) - min(r["validation_acc"])
        <= noise_margin(sum(r["validation_acc"]) / len(r["validation_acc"]), r["n_val"])
        for r in rungs
    )


def ever_beaten(rungs: Sequence[dict[str, Any]]) -> bool:
    """True when some λ > 0 scored above λ = 0 by more than one standard error (half the noise
    margin) in some rung: weaker evidence than a gain beyond the margin, enough to keep the best λ
    when the last rung cannot tell."""
    for r in rungs:
        reference = r["validation_acc"][r["lams"].index(0.0)]
        best = max(a for lam, a in zip(r["lams"], r["validation_acc"], strict=True) if lam > 0)
        if best - reference > noise_margin(reference, r["n_val"]) / 2:
            return True
    return False


def decide(rungs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The verdict: the last rung's best λ > 0 (ties: the smaller) against λ = 0 there.

    ``helps``: its gain is beyond the noise margin. ``no λ helps`` (λ = 0 is chosen): λ = 0 beats it
    by more than the margin, or no λ > 0 beat λ = 0 in any rung (:func:`ever_beaten`), or no strength changed
    the ACC beyond noise in any rung (:func:`flat`). ``helps (within noise)`` otherwise: the best λ
    is still chosen, since the rungs train a fraction of a run's steps (where a strength's benefit
    shows less than in the full run) and fine-tuning's own ACC varies by a few points between
    runs, so a difference within noise at the last rung is not evidence against the method."""
    last = rungs[-1]
    scores = dict(zip(last["lams"], last["validation_acc"], strict=True))
    reference = scores[0.0]
    best = max((lam for lam in last["lams"] if lam > 0), key=lambda lam: (scores[lam], -lam))
    gain, margin = scores[best] - reference, noise_margin(reference, last["n_val"])
    if gain > margin:
        verdict = "helps"
    elif gain < -margin or flat(rungs) or not ever_beaten(rungs):
        verdict = "no λ helps"
    else:
        verdict = "helps (within noise)"
    return {
        "best": best,
        "best_acc": scores[best],
        "reference_acc": reference,
        "gain": gain,
        "margin": margin,
        "verdict": verdict,
        "lam": 0.0 if verdict == "no λ helps" else best,
    }


#: evaluate(rung, λ values) → one result per value: {"acc", "steps", "seconds", "n_val"}
Evaluate = Callable[[Rung, list[float]], list[dict[str, Any]]]


def successive_halving(
    bracket: Sequence[float], n_tasks: int, evaluate: Evaluate, budget: float = DEFAULT_BUDGET
) -> dict[str, Any]:
    """Successive halving over ``[0] + bracket`` (one method; see the module doc): the rungs' curves
    (λ → validation ACC), the verdict (:func:`decide`), the chosen λ and the search's cost."""
    bracket = sorted(float(v) for v in bracket if v > 0)
    alive, rungs = bracket, []
    for rung in schedule(n_tasks, len(bracket), budget):
        lams = [0.0, *alive]
        results = evaluate(rung, lams)
        accs = [r["acc"] for r in results]
        rungs.append(
            {
                **dataclasses.asdict(rung),
                "lams": lams,
                "validation_acc": accs,
                "steps": [r["steps"] for r in results],
                "seconds": [r["seconds"] for r in results],
                **{k: v for k, v in results[0].items() if k not in ("acc", "steps", "seconds")},
            }
        )
        # ties go to the larger λ: a smaller one that scores the same is the likelier to act like
        # λ = 0, which every rung runs anyway
        ranked = sorted(alive, key=lambda lam: (-accs[lams.index(lam)], -lam))
        alive = sorted(ranked[: math.ceil(len(alive) / ETA)])
    verdict = decide(rungs)
    edge = {bracket[0]: "lower", bracket[-1]: "upper"}.get(verdict["lam"]) if verdict["lam"] else None
    cost = {
        "budget": budget,
        "search_steps": sum(sum(r["steps"]) for r in rungs),
        "search_seconds": sum(sum(r["seconds"]) for r in rungs),
    }
    return {"auto": True, "bracket": bracket, "rungs": rungs, **verdict, "edge": edge, "cost": cost}


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
) -> dict[str, dict[str, Any]]:
    """Choose the strength of every method in ``autos``, one method after another (a rung's runs
    ``jobs`` at a time, on ``executor``). ``key``: the run's data key (sequence, data, tasks, max
    train, data root); ``tasks``: its sequence (the sizes of its training and validation parts are
    read from it)."""
    sequence, data, n_tasks, max_train, data_root = key
    n_train = [len(t.y_train) for t in tasks]
    n_val = [len(t.y_val) for t in tasks]
    # search runs are scored by ACC alone: no learning curves, no rows of the matrix before the last
    quiet = dataclasses.replace(config, eval_every=10**9, curve_samples=1, final_only=True)

    def specs(m: str, rung: Rung, lams: list[float]) -> list[tuple]:
        epochs, share = rung_training(rung.fraction, config.epochs)
        cap = max_train if share >= 1 else math.ceil(share * max(n_train[: rung.tasks]))
        rung_key = (sequence, data, n_tasks, cap, data_root, rung.tasks)
        run = dataclasses.replace(quiet, epochs=epochs)
        # the per-task work besides the steps (a Fisher's / MAS's samples) scaled alike
        params = {**METHOD_SPECS[m].defaults, **method_params(m, run)}
        for name in SAMPLE_PARAMS:
            if isinstance(params.get(name), int):
                run = _with(run, m, name, max(1, math.ceil(rung.fraction * params[name])))
        return [(rung_key, m, _with(run, m, autos[m], lam), True, None, progress) for lam in lams]

    records: dict[str, dict[str, Any]] = {}
    for m, name in autos.items():
        spec = METHOD_SPECS[m]
        if n_tasks < 2:
            records[m] = _one_task(spec.bracket, budget)
        else:
            evaluate = _runner(specs, m, n_val, jobs, executor)
            records[m] = successive_halving(spec.bracket, n_tasks, evaluate, budget)
        records[m]["parameter"] = name
        records[m]["chosen"] = {name: records[m]["lam"]}
    return records


def _runner(specs: Callable, m: str, n_val: list[int], jobs: int, executor: Executor | None) -> Evaluate:
    """The evaluate function of one method: a rung's runs on the validation parts."""

    def evaluate(rung: Rung, lams: list[float]) -> list[dict[str, Any]]:
        runs = specs(m, rung, lams)
        results = run_all(runs, jobs, executor=executor)
        n, epochs, cap = sum(n_val[: rung.tasks]), runs[0][2].epochs, runs[0][0][3]
        samples = {k: v for k, v in method_params(m, runs[0][2]).items() if k in SAMPLE_PARAMS}
        return [
            {
                "acc": r["average_accuracy"],
                "steps": r["curves"]["steps"][-1],
                "seconds": r["seconds"],
                "n_val": n,
                "epochs": epochs,
                "max_train_per_task": cap,
                **samples,
            }
            for r in results
        ]

    return evaluate


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


def _with(config: TrainConfig, method: str, name: str, value: float) -> TrainConfig:
    params = {**config.params, method: {**config.params.get(method, {}), name: value}}
    return dataclasses.replace(config, params=params)


def finish_cost(records: dict[str, dict[str, Any]], final: dict[str, dict[str, Any]]) -> None:
    """Add each searched method's final run (its optimizer steps and seconds) to its cost, and the
    ratios (search + final run) / final run."""
    for m, record in records.items():
        if not record.get("auto") or m not in final:
            continue
        steps, seconds = final[m]["curves"]["steps"][-1], final[m]["seconds"]
        cost = record["cost"]
        cost.update(final_steps=steps, final_seconds=seconds)
        cost["ratio_steps"] = (cost["search_steps"] + steps) / max(1, steps)
        cost["ratio_seconds"] = (cost["search_seconds"] + seconds) / max(1e-9, seconds)
