"""``ewc experiment languages``'s findings, tables and figures, drawn from its results only."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ewc.experiments.common import figure_style, md_table, new_figure
from ewc.report import method_color

__all__ = ["LABELS", "figures", "findings", "tables"]

LABELS = {
    "finetune": "Fine-tuning",
    "ewc": "EWC",
    "online-ewc": "Online EWC",
    "l2": "L2",
    "replay": "Replay",
    "joint": "Joint (languages so far)",
}
# the registry's colours: fine-tuning is plain SGD's
COLOUR_OF = {"finetune": "sgd"}


def colour(method: str, methods: Sequence[str]) -> str:
    """The method's colour in every report (fine-tuning drawn as the registry's SGD)."""
    return method_color(COLOUR_OF.get(method, method), [COLOUR_OF.get(m, m) for m in methods])


def _pm(values: Sequence[float], digits: int = 2) -> str:
    """Mean ± standard deviation (the mean alone for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _per_seed(values: Sequence[float]) -> str:
    return ", ".join("n/a" if math.isnan(v) else f"{100 * v:.0f}%" for v in values)


def findings(res: dict[str, Any]) -> list[str]:
    """Sentences read off the measured numbers."""
    methods, langs = res["methods"], res["languages"]
    first, last = langs[0], langs[-1]
    seeds = len(next(iter(methods.values()))["runs"])
    out = [
        f"A {res['model']} character model ({res['parameters']:,} parameters) learned "
        f"{', '.join(langs)} in this order ({res['path']} path, {seeds} seed{'s' * (seeds > 1)}); "
        "bits per character on each language's test words."
    ]
    if "finetune" in methods:
        ft = methods["finetune"]
        rises = [r["metrics"]["first_rise"] for r in ft["runs"]]
        verdict = "forgets visibly" if min(rises) >= 0.5 else "forgets less than 0.5 bits per character"
        out.append(
            f"Fine-tuning {verdict}: on {first} bits per character rise by {_pm(rises)} from right after "
            f"learning it ({_pm([r['matrix'][0][0] for r in ft['runs']])}) to after {last} "
            f"(per seed: {', '.join(f'{v:+.2f}' for v in rises)})."
        )
    for m, entry in methods.items():
        if m in ("finetune", "joint") or "gap_closed" not in entry:
            continue
        lam = f" (λ = {entry['lam']:g})" if entry.get("lam") is not None else ""
        out.append(
            f"{LABELS[m]}{lam} closes {_per_seed(entry['gap_closed']['final'])} of the gap between "
            f"fine-tuning and joint training in final bits per character over all languages (per seed), "
            f"{_per_seed(entry['gap_closed']['first'])} on {first}; it forgets "
            f"{_pm([r['metrics']['forgetting'] for r in entry['runs']])} bits per character on average and "
            f"reaches {_pm([r['metrics']['learned'] for r in entry['runs']])} on each language just learned."
        )
    if "finetune" in methods and "ewc" in methods:
        d = methods["ewc"]["mean"]["learned"] - methods["finetune"]["mean"]["learned"]
        out.append(
            f"The cost of EWC's protection: each new language ends {d:+.2f} bits per character from where "
            "fine-tuning gets it (mean of the matrix diagonals)."
        )
    for m, s in res["selection"].items():
        grid = ", ".join(f"{v:g}" for v in s["grid"])
        edge = " (at the edge of the grid)" if s["chosen"] in (min(s["grid"]), max(s["grid"])) else ""
        out.append(
            f"Pilot for {LABELS[m]} on the validation words: λ ∈ {{{grid}}}, chosen {s['chosen']:g}{edge} "
            f"(final validation bits per character {min(s['validation_bpc']):.3f})."
        )
    out.append(f"CPU time of all jobs: {res['cpu_seconds'] / 60:.1f} min.")
    return out


def tables(res: dict[str, Any]) -> list[str]:
    """The metrics per method, the gap closed per seed, each method's mean matrix, the pilot."""
    methods, langs = res["methods"], res["languages"]
    keys = ("final", "learned", "forgetting", "first_rise", "transfer")
    head = ["Method", "λ", "final bpc", "learned bpc", "forgetting", f"rise on {langs[0]}", "transfer"]
    rows = []
    for m, e in methods.items():
        lam = "" if e.get("lam") is None else f"{e['lam']:g}"
        rows.append([LABELS[m], lam, *(_pm([r["metrics"][k] for r in e["runs"]], 3) for k in keys)])
    out = [
        "## Bits per character (test words; mean ± sd over seeds)",
        "final: mean over languages after the last one; learned: each language right after training "
        "on it; forgetting: mean rise since then over the earlier languages; transfer: bits gained on a "
        "language before training on it.",
        md_table(head, rows, ["---", "---:", *["---:"] * len(keys)]),
    ]
    gaps = [(m, e) for m, e in methods.items() if "gap_closed" in e and m not in ("finetune", "joint")]
    if gaps:
        seeds = [r["seed"] for r in gaps[0][1]["runs"]]
        out += [
            "## Gap closed between fine-tuning (0%) and joint training (100%), per seed",
            md_table(
                ["Method", "on", *(f"seed {s}" for s in seeds)],
                [
                    [LABELS[m], what, *(_per_seed([v]) for v in e["gap_closed"][key])]
                    for m, e in gaps
                    for key, what in (("final", "all languages"), ("first", langs[0]))
                ],
            ),
        ]
    for m, e in methods.items():
        out += [
            f"## {LABELS[m]}: bits per character (row: after training on; column: language)",
            md_table(
                ["after", *langs],
                [["(untrained)", *(f"{v:.3f}" for v in e["initial"])]]
                + [[langs[i], *(f"{v:.3f}" for v in row)] for i, row in enumerate(e["matrix"])],
                ["---", *["---:"] * len(langs)],
            ),
        ]
    if res["selection"]:
        out += [
            f"## Pilot: λ on the validation words (seed {next(iter(res['selection'].values()))['seed']}; "
            "final bits per character over all languages)",
            md_table(
                ["Method", "λ", "validation bpc", "chosen"],
                [
                    [LABELS[m], f"{v:g}", f"{b:.3f}", "✓" if v == s["chosen"] else ""]
                    for m, s in res["selection"].items()
                    for v, b in zip(s["grid"], s["validation_bpc"], strict=True)
                ],
                ["---", "---:", "---:", ":---:"],
            ),
        ]
    return out


def figures(res: dict[str, Any]) -> dict[str, Any]:
    """``matrix.png`` (each method's mean matrix) and ``curves.png`` (the first language, and the
    average over the languages seen, after each language)."""
    return {"matrix.png": _matrices(res), "curves.png": _curves(res)}


def _matrices(res: dict[str, Any]) -> Any:
    methods, langs = res["methods"], res["languages"]
    values = [v for e in methods.values() for row in e["matrix"] for v in row]
    lo, hi = min(values), max(values)
    cols = min(3, len(methods))
    nrows = math.ceil(len(methods) / cols)
    size = 1.0 + 0.55 * len(langs)
    with figure_style():
        fig = new_figure((cols * size + 1.0, nrows * size))
        axes = fig.subplots(nrows, cols, squeeze=False)
        image = None
        for ax, (m, e) in zip(axes.flat, methods.items(), strict=False):
            image = ax.imshow(e["matrix"], vmin=lo, vmax=hi, cmap="viridis_r")
            for i, row in enumerate(e["matrix"]):
                for j, v in enumerate(row):
                    ink = "black" if v < lo + 0.4 * (hi - lo) else "white"  # on yellow / on blue
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=ink)
            ax.set_xticks(range(len(langs)), [lang[:3] for lang in langs])
            ax.set_yticks(range(len(langs)), [lang[:3] for lang in langs])
            ax.set_title(LABELS[m])
            ax.set_xlabel("language")
            ax.set_ylabel("after training on")
        for ax in list(axes.flat)[len(methods) :]:
            ax.axis("off")
        fig.colorbar(image, ax=axes, label="bits per character (lower is better)", shrink=0.8)
    return fig


def _curves(res: dict[str, Any]) -> Any:
    methods, langs = res["methods"], res["languages"]
    x = list(range(1, len(langs) + 1))
    with figure_style():
        fig = new_figure((9.0, 3.6))
        left, right = fig.subplots(1, 2)
        for m, e in methods.items():
            style = {"color": colour(m, list(methods)), "marker": "o", "ms": 3.5, "label": LABELS[m]}
            left.plot(x, [row[0] for row in e["matrix"]], **style)
            right.plot(x, [statistics.fmean(row[: i + 1]) for i, row in enumerate(e["matrix"])], **style)
        left.set(xlabel="languages trained", ylabel=f"bits per character on {langs[0]}")
        right.set(xlabel="languages trained", ylabel="mean over the languages seen")
        for ax in (left, right):
            ax.set_xticks(x, [lang[:3] for lang in langs])
            ax.grid(alpha=0.3)
        left.legend(loc="upper left", fontsize=8)
        left.set_title(f"Retention of {langs[0]} (mean over seeds)")
        right.set_title("Languages seen so far")
    return fig
