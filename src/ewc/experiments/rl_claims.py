"""The paper's RL claims, tested one by one on the results of ``ewc rl`` (issue #19).

Reads only the results dictionary of :func:`ewc.experiments.rl.run` (its ``runs`` with their
normalised evaluations), so a finished run's ``results.json`` can be tested again. Each claim
gets the measurement that decides it and a verdict in words; none is asserted without its
numbers. Paired comparisons pair runs of the same seed (same initial weights and schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ewc.rl.protocol import GOOD, games_at, mean_total, normalise, stats
from ewc.stats import paired_t_test

__all__ = ["claims", "erasure", "plasticity"]


def _at_visit_ends(run: dict[str, Any], visits: int, spv: int) -> list[dict[str, float | None]]:
    """The normalised scores of the evaluation at the end of each visit."""
    by_step = {e["env_step"]: e["normalised"] for e in run["record"]["evaluations"]}
    return [by_step.get((v + 1) * spv, {}) for v in range(visits)]


def erasure(run: dict[str, Any], schedule: Sequence[str], spv: int) -> dict[str, Any]:
    """How much each visit took from the game trained just before it: for every visit ``v >= 1``,
    the previous game's normalised score at the end of visit ``v - 1`` and at the end of visit
    ``v``; ``lost_half``: how many of the visits that found it at >= 0.5 left it below half."""
    ends = _at_visit_ends(run, len(schedule), spv)
    pairs = []
    for v in range(1, len(schedule)):
        prev = schedule[v - 1]
        before, after = ends[v - 1].get(prev), ends[v].get(prev)
        if before is not None and after is not None:
            pairs.append({"visit": v, "game": prev, "before": before, "after": after})
    good = [p for p in pairs if p["before"] >= GOOD]
    return {
        "pairs": pairs,
        "mean_before": stats([p["before"] for p in pairs])["mean"],
        "mean_after": stats([p["after"] for p in pairs])["mean"],
        "held_good": len(good),
        "lost_half": sum(p["after"] < p["before"] / 2 for p in good),
    }


def plasticity(run: dict[str, Any], normalisation: dict[str, dict[str, Any]]) -> float | None:
    """How well a run learned the game in hand: the mean, over its visits, of the visit's mean
    training return (ε-greedy, while learning) normalised like the scores; games that cannot be
    normalised are left out. What consolidation costs shows here: a penalty that holds old games
    can keep the new one from being learned."""
    values = []
    for visit in run["record"]["visits"]:
        n = normalisation[visit["game"]]
        v = normalise(visit["mean_return"], n["random"], n["reference"])
        if v is not None:
            values.append(v)
    return sum(values) / len(values) if values else None


def _value(run: dict[str, Any], key: str) -> float:
    """``run[key]``; a run scored before issue #19 has no ``final_games_good``: counted here."""
    if key == "final_games_good" and key not in run:
        return games_at(run["final_normalised"])
    return run[key]


def _paired(
    results: dict[str, Any], a: str, b: str, key: str, value: Callable[[dict[str, Any]], Any] | None = None
) -> dict[str, Any] | None:
    """Paired t-test of ``key`` (or of ``value(run)``) between methods ``a`` and ``b`` over their
    common seeds."""
    runs = results["runs"]
    if a not in runs or b not in runs:
        return None
    rb = {r["seed"]: r for r in runs[b]}
    common = [r for r in runs[a] if r["seed"] in rb]
    if not common:
        return None
    get = value or (lambda r: _value(r, key))
    test = paired_t_test([get(r) for r in common], [get(rb[r["seed"]]) for r in common])
    return {**test, "a": a, "b": b, "key": key}


def _fmt(test: dict[str, Any], digits: int = 2) -> str:
    d, half, p = test["mean_diff"], test["ci95"], test["p"]
    ci = "" if half is None else f" ± {half:.{digits}f}"
    pv = "" if p is None else f", paired t-test p = {p:.3g}"
    return f"{d:+.{digits}f}{ci} (95 % CI, {test['n']} seeds{pv})"


def claims(results: dict[str, Any]) -> dict[str, Any]:
    """The three claims of the paper's RL experiment with their measurements, and what holding costs
    each method in the game in hand (:func:`plasticity`); ``"lines"``: words."""
    schedule, spv = results["schedule"], results["steps_per_visit"]
    runs = results["runs"]
    n_games = len(results["normalised_games"])
    out: dict[str, Any] = {"lines": []}
    lines = out["lines"]
    if "dqn" in runs:
        er = [erasure(r, schedule, spv) for r in runs["dqn"]]
        total = stats([r["final_total"] for r in runs["dqn"]])
        held = sum(e["held_good"] for e in er)
        lost = sum(e["lost_half"] for e in er)
        before = stats([e["mean_before"] for e in er])["mean"]
        after = stats([e["mean_after"] for e in er])["mean"]
        out["dqn_erasure"] = {"per_seed": er, "held_good": held, "lost_half": lost}
        if total["mean"] is not None and before is not None and after is not None:
            lines.append(
                f"Claim 1, DQN's total stays low because each new game erases the last: DQN's final total "
                f"is {total['mean']:.2f} of {n_games}; over the visits, the game trained just before fell "
                f"from {before:.2f} to {after:.2f} normalised during the next visit (mean over visits and "
                f"seeds); of the {held} times it had reached ≥ {GOOD}, the next visit left it below half "
                f"in {lost}."
            )
    for m in [m for m in runs if m != "dqn"]:
        test = _paired(results, m, "dqn", "final_games_good")
        if test is None or test["mean_diff"] is None:
            continue
        mine = [_value(r, "final_games_good") for r in runs[m]]
        base = [_value(r, "final_games_good") for r in runs["dqn"]]
        out.setdefault("games_good", {})[m] = test
        line = (
            f"Claim 2, {m} holds more games at once than DQN: games at ≥ {GOOD} at the end "
            f"{stats(mine)['mean']:.1f} (seeds {mine}) vs DQN {stats(base)['mean']:.1f} (seeds {base}); "
            f"difference {_fmt(test, 1)}"
        )
        area = _paired(results, m, "dqn", "mean_total", mean_total)
        if area is not None and area["mean_diff"] is not None:
            out.setdefault("mean_total", {})[m] = area
            line += f"; total averaged over the run, {m} − DQN = {_fmt(area)}"
        lines.append(line + ".")
    if "normalisation" in results:
        for m in [m for m in runs if m != "dqn"]:
            test = _paired(results, m, "dqn", "plasticity", lambda r: plasticity(r, results["normalisation"]))
            if test is not None and test["mean_diff"] is not None:
                out.setdefault("plasticity", {})[m] = test
                lines.append(
                    f"What holding costs, {m}: the game in hand's normalised training return, mean "
                    f"over the visits, {m} − DQN = {_fmt(test)}."
                )
    test = _paired(results, "ewc", "ewc-true-labels", "final_total")
    if test is not None and test["mean_diff"] is not None:
        out["inferred_vs_true"] = test
        line = (
            f"Claim 3, inferred task labels do about as well as the true ones: final total, ewc − "
            f"ewc-true-labels = {_fmt(test)}"
        )
        area = _paired(results, "ewc", "ewc-true-labels", "mean_total", mean_total)
        if area is not None and area["mean_diff"] is not None:
            out["inferred_vs_true_mean_total"] = area
            line += f"; total averaged over the run = {_fmt(area)}"
        lines.append(line + ".")
    return out
