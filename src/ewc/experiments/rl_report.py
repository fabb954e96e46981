"""The report of ``ewc rl``: figures, findings and tables from its results (:mod:`ewc.experiments.rl`).

Reads only the results dictionary that :func:`ewc.experiments.rl.run` builds, so a finished run's
``results.json`` can be rendered again without training anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ewc.experiments.common import figure_style, md_table, new_figure
from ewc.rl.perturb import PERTURB_KINDS
from ewc.rl.protocol import AGENTS
from ewc.stats import mean_ci_array

__all__ = ["figure_per_game", "figure_perturb", "figure_total", "findings", "perturb_games", "tables"]

_KIND_LABELS = {"isotropic": "isotropic", "fisher": "inverse Fisher, 1/√(F+ε)", "null": "Fisher null space"}
_KIND_COLORS = {"isotropic": "#1f77b4", "fisher": "#d62728", "null": "#2ca02c"}
_GAME_SHADES = ("#e8e8e8", "#fbe6c9", "#d9ecf7", "#e3f2dc", "#f2def0")


# ---------------------------------------------------------------------------------- figures


def _shade_visits(ax: Any, schedule: Sequence[str], spv: int, legend: bool) -> None:
    games = list(dict.fromkeys(schedule))
    shown: set[str] = set()
    for v, g in enumerate(schedule):
        label = f"training {g}" if legend and g not in shown else None
        shown.add(g)
        ax.axvspan(
            v * spv,
            (v + 1) * spv,
            color=_GAME_SHADES[games.index(g) % len(_GAME_SHADES)],
            lw=0,
            zorder=0,
            label=label,
        )


def _curve(
    runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
) -> tuple[np.ndarray, ...]:
    """(env steps, mean, mean − CI, mean + CI) over the runs (95 % t interval of the mean; the
    band is the mean itself for one run), at the env steps every run evaluated."""
    per_run = []
    for r in runs:
        by_step = {e["env_step"]: value(e) for e in r["record"]["evaluations"]}  # later duplicate wins
        per_run.append(by_step)
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    ys = np.array([[np.nan if d[s] is None else d[s] for s in steps] for d in per_run], dtype=float)
    if not steps:
        return np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0)
    mean, half = mean_ci_array(ys)
    half = np.nan_to_num(half)
    return np.array(steps), mean, mean - half, mean + half


def figure_total(results: dict[str, Any]) -> Any:
    schedule, spv = results["schedule"], results["steps_per_visit"]
    n = len(results["normalised_games"])
    with figure_style():
        fig = new_figure((9, 4.5))
        ax = fig.subplots()
        _shade_visits(ax, schedule, spv, legend=True)
        for method, runs in results["runs"].items():
            x, mean, lo, hi = _curve(runs, lambda e: e["total"])
            color = AGENTS[method].color
            ax.plot(x, mean, color=color, lw=1.8, marker="o", ms=3, label=AGENTS[method].label)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        ax.axhline(n, color="black", lw=0.8, ls="--")
        ax.set_xlim(0, len(schedule) * spv)
        ax.set_xlabel("env steps")
        ax.set_ylabel(f"total normalised score (max {n})")
        seeds = len(next(iter(results["runs"].values()))) if results["runs"] else 0
        ax.set_title(f"Total normalised score over {n} game(s): mean ± 95 % CI over {seeds} seed(s)")
        fig.legend(loc="outside lower center", fontsize=8, ncol=5)
    return fig


def figure_per_game(results: dict[str, Any]) -> Any:
    schedule, spv = results["schedule"], results["steps_per_visit"]
    games = results["games"]
    with figure_style():
        fig = new_figure((5 * len(games), 4))
        axes = np.atleast_1d(fig.subplots(1, len(games), squeeze=False)[0])
        for ax, game in zip(axes, games, strict=True):
            _shade_visits(ax, schedule, spv, legend=False)
            for method, runs in results["runs"].items():
                x, mean, lo, hi = _curve(runs, lambda e, g=game: e["scores"][g])
                color = AGENTS[method].color
                ax.plot(x, mean, color=color, lw=1.6, marker="o", ms=3, label=AGENTS[method].label)
                if len(runs) > 1:
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            norm = results["normalisation"][game]
            ax.axhline(norm["random"], color="grey", ls="--", lw=1, label="random")
            ax.axhline(norm["reference"], color="black", ls="--", lw=1, label="single-task reference")
            ax.set_xlim(0, len(schedule) * spv)
            ax.set_title(game)
            ax.set_xlabel("env steps")
            ax.set_ylabel("mean return (mean ± 95 % CI over seeds)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=5)
    return fig


def perturb_games(p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{game: test}`` of a results' ``perturb`` entry (one written before issue #19 held one game)."""
    return p["per_game"] if "per_game" in p else {p["game"]: p}


def figure_perturb(p: dict[str, Any], normalisation: dict[str, dict[str, Any]]) -> Any:
    tests = perturb_games(p)
    with figure_style():
        fig = new_figure((4.2 * len(tests), 4))
        axes = np.atleast_1d(fig.subplots(1, len(tests), squeeze=False)[0])
        for ax, (game, t) in zip(axes, tests.items(), strict=True):
            for kind in PERTURB_KINDS:
                if t["scores"].get(kind) is None:
                    continue
                color, label = _KIND_COLORS[kind], _KIND_LABELS[kind]
                ax.plot(t["norms"], t["scores"][kind], marker="o", color=color, label=label)
            ax.axhline(t["unperturbed"], color="black", lw=1, ls=":", label="unperturbed")
            ax.axhline(normalisation[game]["random"], color="grey", lw=1, ls="--", label="random policy")
            ax.set_xscale("log")
            ax.set_xlabel("‖z‖ (L2 norm, shared parameters)")
            ax.set_title(f"{game} (context {t['context']})")
        axes[0].set_ylabel(f"mean return ({p_episodes(tests)} episodes × draws)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", fontsize=8, ncol=5)
        fig.suptitle(f"Perturbing the final {p['method']} agent (seed {p['seed']}) in each game's context")
    return fig


def p_episodes(tests: dict[str, dict[str, Any]]) -> int:
    """The evaluation episodes per point of the perturbation tests (the same for every game)."""
    return int(next(iter(tests.values()))["episodes"])


# ------------------------------------------------------------------------ findings, tables


def _pm(s: dict[str, Any], digits: int = 3) -> str:
    """``mean ± std`` of a :func:`ewc.rl.protocol.stats` entry."""
    if s["mean"] is None:
        return "n/a"
    std = "n/a" if s["std"] is None else f"{s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {std}"


def _ci(s: dict[str, Any], digits: int = 2) -> str:
    """``mean ± 95 % CI half-width`` of a stats entry (an entry from before issue #19: no CI)."""
    if s["mean"] is None:
        return "n/a"
    half = s.get("ci95")
    return f"{s['mean']:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def findings(results: dict[str, Any]) -> list[str]:
    out = [
        f"Schedule ({len(results['schedule'])} visits of {results['steps_per_visit']} env steps): "
        + " → ".join(results["schedule"])
        + "."
    ]
    excluded = results["excluded_games"]
    for g in excluded:
        n = results["normalisation"][g]
        out.append(
            f"{g} cannot be normalised: its reference score {n['reference']:.3f} is not above the random "
            f"score {n['random']:.3f}; it is left out of the total."
        )
    n_games = len(results["normalised_games"])
    summary = results["summary"]
    for method, s in summary.items():
        t = s["final_total"]
        if t["mean"] is None:
            continue
        out.append(
            f"{method}: final total normalised score {_pm(t)} (mean ± std over {t['n']} seed(s); min "
            f"{t['min']:.3f}, max {t['max']:.3f}; maximum possible {n_games})."
        )
        area = s.get("mean_total")
        if area and area["mean"] is not None:
            out.append(
                f"{method}: total normalised score averaged over the run's evaluations {_ci(area)} "
                f"(mean ± 95 % CI over {area['n']} seed(s); min {area['min']:.3f}, max {area['max']:.3f})."
            )
    if "dqn" in summary and summary["dqn"]["final_total"]["mean"] is not None:
        base = summary["dqn"]["final_total"]
        for method in [m for m in summary if m != "dqn"]:
            if method not in summary or summary[method]["final_total"]["mean"] is None:
                continue
            t = summary[method]["final_total"]
            diff = f"{method} − dqn, final total: {t['mean'] - base['mean']:+.3f} (difference of means"
            if t["n"] < 2 or base["n"] < 2:
                out.append(f"{diff}; a single seed on one side, so no spread to compare it with).")
            else:
                overlap = t["min"] <= base["max"] and base["min"] <= t["max"]
                base_by_seed = {r["seed"]: r["final_total"] for r in results["runs"]["dqn"]}
                pairs = [
                    (r["final_total"], base_by_seed[r["seed"]])
                    for r in results["runs"][method]
                    if r["seed"] in base_by_seed
                ]
                above = sum(a > b for a, b in pairs)
                out.append(
                    f"{diff} over {t['n']} and {base['n']} seeds); the seeds' min–max ranges "
                    + ("overlap" if overlap else "do not overlap")
                    + f"; {method} ends above the same-seed dqn run in {above} of {len(pairs)} seeds."
                )
    for method, s in summary.items():
        good = s.get("final_games_good")
        if good and good["mean"] is not None:
            per_seed = ", ".join(str(r.get("final_games_good", "?")) for r in results["runs"].get(method, []))
            out.append(
                f"{method}: games at ≥ 0.5 normalised score at the end: {_ci(good, 1)} (mean ± 95 % CI; "
                f"per seed {per_seed}; of {n_games})."
            )
    for method, s in summary.items():
        parts = []
        for g in results["normalised_games"]:
            pg = s["per_game"][g]
            parts.append(f"{g} {_pm(pg['final'])} (forgetting {_pm(pg['forgetting'])})")
        if parts:
            out.append(f"{method}, final normalised score per game: " + "; ".join(parts) + ".")
    for method, runs in results["runs"].items():
        inf = [(r["seed"], r.get("task_inference")) for r in runs]
        if not inf or any(t is None for _, t in inf):
            continue
        parts = [
            f"seed {seed}: {t['num_contexts']} contexts"
            + (", one per game" if t["one_to_one"] and t["num_contexts"] == len(results["games"]) else "")
            + f", {t['returns_recognised']} of {t['returns']} returns recognised, "
            f"{100 * t['accuracy']:.1f} % of transitions in their game's context"
            for seed, t in inf
        ]
        out.append(f"{method}'s task detector ({len(results['games'])} games): " + "; ".join(parts) + ".")
    out += (results.get("claims") or {}).get("lines", [])
    if results.get("perturb_skipped"):
        out.append(f"Perturbation test skipped: {results['perturb_skipped']}.")
    p = results.get("perturb")
    if p:
        for game, t in perturb_games(p).items():
            kinds = [k for k in PERTURB_KINDS if t["scores"].get(k) is not None]
            pairs = ", ".join(
                f"{r:g}: " + " / ".join(f"{t['scores'][k][i]:.2f}" for k in kinds)
                for i, r in enumerate(t["norms"])
            )
            out.append(
                f"Perturbation test ({p['method']}, seed {p['seed']}, {game}, context {t['context']}, "
                f"unperturbed {t['unperturbed']:.2f}): mean return at ‖z‖ = {pairs} "
                f"({' / '.join(_KIND_LABELS[k] for k in kinds)} noise)."
            )
        for game, why in p.get("skipped", {}).items():
            out.append(f"Perturbation test on {game} skipped: {why}.")
    return out


def tables(results: dict[str, Any]) -> list[str]:
    games = results["games"]
    norm = results["normalisation"]
    t1 = md_table(
        ["game", "visits", "budget (env steps)", "random", "reference", "reference from"],
        [
            [
                g,
                str(results["schedule"].count(g)),
                str(results["budgets"][g]),
                f"{norm[g]['random']:.3f}",
                f"{norm[g]['reference']:.3f}",
                norm[g]["reference_source"],
            ]
            for g in games
        ],
        align=["---", "---:", "---:", "---:", "---:", "---"],
    )
    rows = []
    for method, s in results["summary"].items():
        t = s["final_total"]
        good = s.get("final_games_good") or {"mean": None}
        area = s.get("mean_total") or {"mean": None}
        rows.append(
            [
                method,
                _pm(t),
                _ci(t),
                _ci(area),
                _ci(good, 1),
                "n/a" if t["min"] is None else f"{t['min']:.3f} / {t['max']:.3f}",
                *[_pm(s["per_game"][g]["final"]) for g in results["normalised_games"]],
                f"{s['env_steps_per_s']['mean']:.0f}",
                f"{s['updates_per_s']['mean']:.0f}",
            ]
        )
    t2 = md_table(
        [
            "method",
            "final total (mean ± std)",
            "mean ± 95 % CI",
            "total averaged over the run (mean ± 95 % CI)",
            "games ≥ 0.5",
            "min / max",
            *[f"{g} final" for g in results["normalised_games"]],
            "env steps/s",
            "updates/s",
        ],
        rows,
    )
    out = [t1, t2]
    for method, runs in results["runs"].items():
        inf = [(r["seed"], r.get("task_inference")) for r in runs]
        if not inf or any(t is None for _, t in inf):
            continue
        rows = []
        for v, game in enumerate(results["schedule"]):
            cells = []
            for _, t in inf:
                shares = t["per_visit"][v]["shares"] if v < len(t["per_visit"]) else {}
                cells.append(", ".join(f"{k}: {100 * x:.0f} %" for k, x in shares.items()) or "n/a")
            rows.append([str(v), game, *cells])
        out.append(
            f"{method}: the detector's contexts per visit (share of the visit's transitions; the game's "
            "context is the one holding most of its transitions)\n\n"
            + md_table(["visit", "game", *[f"seed {seed}" for seed, _ in inf]], rows)
        )
    p = results.get("perturb")
    if p:
        for game, t in perturb_games(p).items():
            kinds = [k for k in PERTURB_KINDS if t["scores"].get(k) is not None]
            out.append(
                f"Perturbation test, {game} (context {t['context']}, unperturbed {t['unperturbed']:.2f}, "
                f"{t.get('null_parameters', 'n/a')} of {t['shared_parameters']} shared parameters in "
                "the Fisher's null space)\n\n"
                + md_table(
                    ["‖z‖", *[_KIND_LABELS[k] for k in kinds], *[f"Σ F z² {k}" for k in kinds]],
                    [
                        [
                            f"{r:g}",
                            *[f"{t['scores'][k][i]:.2f}" for k in kinds],
                            *[f"{t['fisher_quadratic'][k][i]:.3g}" for k in kinds],
                        ]
                        for i, r in enumerate(t["norms"])
                    ],
                )
            )
    return out
