"""What a report shows of a strength chosen by ``auto`` (``--lam auto``): the chosen value, the
verdict ("no λ helps"), the search's cost and its curve (validation ACC per λ: the screen's line
and the final's points),
drawn from the ``config.selection`` records of ``results.json``
(:mod:`ewc.experiments.lam_search` writes them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ewc.report.style import figure_style, method_label, new_figure, save_figure

__all__ = ["auto_records", "plot_search", "search_section", "summary_line"]


def auto_records(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{method: its search record}`` for every method whose strength was chosen by ``auto``."""
    selection = results.get("config", {}).get("selection") or {}
    return {m: s for m, s in selection.items() if isinstance(s, Mapping) and s.get("auto")}


def summary_line(method: str, record: Mapping[str, Any]) -> str:
    """One line (stdout, report): the chosen strength, the verdict and the cost."""
    name, lam = record.get("parameter", "lam"), record["lam"]
    cost = record.get("cost", {})
    ratio = (
        f"; the search (its chosen run included): {cost['ratio_steps']:.2f}× the optimizer steps of one run"
        if "ratio_steps" in cost
        else ""
    )
    if not record["rungs"]:
        return f"{method}: no λ helps (one task: the penalty never acts); {name} = 0"
    if record["verdict"] != "no λ helps":
        edge = (
            f" (at the bracket's {record['edge']} edge: the best may lie beyond it)" if record["edge"] else ""
        )
        noise = (  # "helps (within noise)": a verdict of the earlier search, in older results.json
            f", a difference within the noise margin {record['margin']:.3f}"
            if record["verdict"] != "helps"
            else ""
        )
        return (
            f"{method}: {name} = {lam:g} chosen by auto{edge}: validation ACC {record['best_acc']:.3f} vs "
            f"{record['reference_acc']:.3f} at {name} = 0{noise}{ratio}"
        )
    return (
        f"{method}: no λ helps: the best, {name} = {record['best']:g}, has validation ACC "
        f"{record['best_acc']:.3f} vs {record['reference_acc']:.3f} at {name} = 0 (noise margin "
        f"{record['margin']:.3f}); run with {name} = 0{ratio}"
    )


def _rung_table(record: Mapping[str, Any]) -> list[str]:
    name = record.get("parameter", "lam")
    lines = [
        f"| stage | tasks | steps per task | {name} → validation ACC |",
        "|---|---:|---:|---|",
    ]
    for r, rung in enumerate(record["rungs"]):
        cells = ", ".join(
            f"{lam:g}: {acc:.3f}" for lam, acc in zip(rung["lams"], rung["validation_acc"], strict=True)
        )
        lines.append(
            f"| {rung.get('stage', r)} | {rung['tasks']} | {100 * rung['fraction']:.0f} % | {cells} |"
        )
    return lines


def search_section(results: Mapping[str, Any], figure: str | None = "search.png") -> list[str]:
    """The report.md section of the ``auto`` searches (nothing when there were none)."""
    records = auto_records(results)
    if not records:
        return []
    lines = [
        "## Strength chosen by a search (auto)",
        "",
        "Chosen on the validation parts: a screen trains one value per decade of the method's bracket on "
        "the first two tasks for part of each task's steps; 0 and the screen's two best then train the whole "
        "sequence in full, and the best of them is chosen if it beats 0 beyond noise, else 0 "
        "(docs/methods.md). The chosen value's full run is the test run reported here.",
        "",
    ]
    for m, record in records.items():
        cost = record.get("cost", {})
        lines += [f"- {summary_line(m, record)}"]
        if "final_steps" in cost:
            lines += [
                f"  (search: {cost['search_steps']} optimizer steps, {cost['search_seconds']:.1f} s, its "
                f"chosen run included; one run: {cost['final_steps']} steps, {cost['final_seconds']:.1f} s; "
                f"{cost['ratio_seconds']:.2f}× in seconds)"
            ]
    for m, record in records.items():
        if record["rungs"]:
            lines += ["", f"{method_label(m)}:", "", *_rung_table(record)]
    if figure:
        lines += ["", f"![validation ACC per strength: the screen and the final]({figure})"]
    return [*lines, ""]


def plot_search(results: Mapping[str, Any], path: Path) -> Path | None:
    """Validation ACC against the strength (log scale; 0 drawn at the left as a square, dashed), one
    panel per searched method: the screen's line and the final's points; None when no strength was
    searched."""
    records = {m: r for m, r in auto_records(results).items() if r["rungs"]}
    if not records:
        return None
    with figure_style():
        fig = new_figure((3.6 * len(records) + 0.4, 3.0))
        axes = fig.subplots(1, len(records), squeeze=False)[0]
        for ax, (m, record) in zip(axes, records.items(), strict=True):
            low = min(record["bracket"]) / 10
            for r, rung in enumerate(record["rungs"]):
                pts = sorted(zip(rung["lams"], rung["validation_acc"], strict=True))
                xs = [lam for lam, _ in pts if lam > 0]
                ys = [acc for lam, acc in pts if lam > 0]
                stage = rung.get("stage", f"rung {r}")
                style = (
                    {"ls": "none", "marker": "D", "ms": 5} if stage == "final" else {"marker": "o", "ms": 3}
                )
                line = ax.plot(xs, ys, label=f"{stage}: {rung['tasks']} tasks", **style)[0]
                ref = dict(pts).get(0.0)
                if ref is not None:
                    ax.plot([low], [ref], marker="s", color=line.get_color())
                    ax.axhline(ref, color=line.get_color(), ls="--", lw=0.6)
            if record["lam"]:
                ax.axvline(record["lam"], color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(f"{record.get('parameter', 'lam')} (square at left: 0)")
            ax.set_ylabel("validation ACC")
            ax.set_title(f"{method_label(m)}: {record['verdict']}")
            ax.legend(fontsize=7)
        return save_figure(fig, path)
