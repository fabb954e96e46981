"""``--lam auto``: a method's strength (EWC's λ, L2's λ, SI's c, MAS's λ) chosen on the validation
parts by successive halving, at a cost of about ``budget`` runs of the whole sequence.

Rung 0 tries λ = 0 (plain fine-tuning, the reference) and the method's bracket (one value per
decade, ``MethodSpec.bracket``) on the first tasks of the sequence, each task trained on a seeded
fraction of its training part. Each later rung keeps the best third of the λ > 0 (η = 3) and λ = 0,
and gives each of them η times the resources (more tasks and more of each task's data), so every
rung costs about as much as the one before. The best λ of the last rung is chosen, unless it beats
λ = 0 by no more than the noise of the validation ACC (:func:`noise_margin`): then "no λ helps" and
the method runs with λ = 0. A run's score is ACC over the tasks it learned, measured on their
validation parts (:func:`ewc.experiments.jobs.validation_tasks`): the test parts are never read.
The search's cost (optimizer steps and seconds of all its runs) is recorded with the final run's
(docs/methods.md, "λ chosen by a search").
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
    "finish_cost",
    "noise_margin",
    "probe_config",
    "schedule",
    "search_auto",
    "successive_halving",
]

#: the search's cost in runs of the whole sequence (the final run comes on top: about 3× one run)
DEFAULT_BUDGET = 1.8
#: each rung keeps the best 1/ETA of the λ > 0 and gives each ETA times the resources
ETA = 3
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
    resource r trains k = T·√r tasks (at least 2: one task has nothing to forget) on r·T/k of each
    task's data, so tasks and steps per task grow together."""
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
        rungs.append(Rung(k, min(1.0, resource * n_tasks / k), resource))
    return rungs


def noise_margin(acc: float, n_samples: int) -> float:
    """The gain over λ = 0 that validation noise can give: two standard errors of an accuracy near
    ``acc`` measured on ``n_samples`` samples (both λ are scored on the same samples, so their
    difference varies less than two independent accuracies would), at least :data:`MIN_GAIN`."""
    p = min(max(acc, 0.0), 1.0)
    return max(MIN_GAIN, 2.0 * math.sqrt(p * (1.0 - p) / max(1, n_samples)))


def decide(lams: Sequence[float], accs: Sequence[float], n_samples: int) -> dict[str, Any]:
    """The verdict of the last rung: the best λ > 0 (ties: the smaller) against λ = 0."""
    scores = dict(zip(lams, accs, strict=True))
    reference = scores[0.0]
    best = max((lam for lam in lams if lam > 0), key=lambda lam: (scores[lam], -lam))
    gain, margin = scores[best] - reference, noise_margin(reference, n_samples)
    helps = gain > margin
    return {
        "best": best,
        "best_acc": scores[best],
        "reference_acc": reference,
        "gain": gain,
        "margin": margin,
        "verdict": "helps" if helps else "no λ helps",
        "lam": best if helps else 0.0,
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
                "n_val": results[0]["n_val"],
            }
        )
        ranked = sorted(alive, key=lambda lam: (-accs[lams.index(lam)], lam))
        alive = sorted(ranked[: math.ceil(len(alive) / ETA)])
    last = rungs[-1]
    verdict = decide(last["lams"], last["validation_acc"], last["n_val"])
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
    """Choose the strength of every method in ``autos`` (rungs of all methods run together, ``jobs``
    at a time). ``key``: the run's data key (sequence, data, tasks, max train, data root); ``tasks``:
    its sequence (the sizes of the training and validation parts are read from it)."""
    sequence, data, n_tasks, max_train, data_root = key
    n_train = [len(t.y_train) for t in tasks]
    n_val = [len(t.y_val) for t in tasks]
    # search runs draw no learning curves: their test-subset evaluations are not needed
    quiet = dataclasses.replace(config, eval_every=10**9, curve_samples=1)

    def specs(m: str, rung: Rung, lams: list[float]) -> list[tuple]:
        cap = max_train if rung.fraction >= 1 else math.ceil(rung.fraction * max(n_train[: rung.tasks]))
        rung_key = (sequence, data, n_tasks, cap, data_root, rung.tasks)
        return [(rung_key, m, _with(quiet, m, autos[m], lam), True, None, progress) for lam in lams]

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
        results = run_all(specs(m, rung, lams), jobs, executor=executor)
        n = sum(n_val[: rung.tasks])
        return [
            {
                "acc": r["average_accuracy"],
                "steps": r["curves"]["steps"][-1],
                "seconds": r["seconds"],
                "n_val": n,
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
