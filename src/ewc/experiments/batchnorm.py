"""BatchNorm and the Fisher: how normalisation changes what EWC anchors and how much it retains.

The same permuted task sequence is learned by the same MLP without and with BatchNorm (Linear →
BatchNorm1d → ReLU). For each we record the diagonal Fisher of the first task (what EWC anchors
first; computed in eval mode, so BatchNorm uses its running statistics): per-layer histograms
of log10 F, the share of the total Fisher held by the top 1% of parameters, and the Fisher of the
BatchNorm affine parameters. Then EWC's retention (ACC, forgetting) with and without BatchNorm,
at one fixed λ and at λ re-chosen on the validation parts, next to plain SGD.

BatchNorm's running statistics are buffers, not parameters: EWC cannot anchor them and they
follow the latest task. As a diagnostic we re-estimate them on each old task's own training
data at the end and measure that task again, which separates this drift from the rest.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ewc.checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Interval,
    Numbers,
    Registered,
    Sizes,
)
from ewc.config import validate
from ewc.data import DATASETS, Task
from ewc.experiments.common import figure_style, finish, md_table, new_figure, param, setup_runtime
from ewc.experiments.many_tasks import data_key, pct, run_summary, train_config
from ewc.experiments.sequence import build_tasks, choose_lam, run_all
from ewc.models import MLP_HIDDEN
from ewc.report import method_color
from ewc.runtime import OPTIMIZERS
from ewc.train import accuracy, run_method

NAME = "batchnorm"
TITLE = "BatchNorm and the Fisher: EWC's anchor and retention with and without BatchNorm"
CLAIM = (
    "Not tested in the paper, whose networks have no normalisation layers. EWC anchors every parameter "
    "in proportion to its diagonal Fisher and assumes the network's function is fixed by its parameters; "
    "BatchNorm makes the weights before it scale-invariant and keeps running statistics outside the "
    "parameters, so both the Fisher's distribution and EWC's retention may change."
)
CONDITIONS = {"plain": False, "batchnorm": True}
LABELS = {"plain": "no BatchNorm", "batchnorm": "BatchNorm"}
LOG10_RANGE = (-12.0, 1.0)  # histogram range of log10 F; values outside are counted in the end bins
TOP = 0.01  # the "top 1%" of parameters


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "tasks": 2,
    "max_train_per_task": 300,
    "epochs": 2,
    "hidden": (32,),
    "lr": 3e-3,
    "lam": 100.0,
    "lam_grid": (100.0, 1000.0),
    "fisher_samples": 200,
    "jobs": 1,
}


@dataclass
class Config:
    """The task sequence, the network, the training, the fixed λ and the validation grid."""

    data: str = param("mnist-10k", "dataset the permuted tasks are made from", check=Registered(DATASETS))
    tasks: int = param(5, "number of permuted tasks", check=Interval(int, 2))  # retention: 2 at least
    max_train_per_task: int = param(
        2000, "training images per task (0: all of the dataset's)", check=NON_NEGATIVE_INT
    )
    epochs: int = param(3, "epochs per task", check=POSITIVE_INT)
    batch_size: int = param(64, "mini-batch size", check=POSITIVE_INT)
    lr: float = param(1e-3, "learning rate", check=POSITIVE)
    optimizer: str = param("adam", "optimiser (fresh state per task)", choices=OPTIMIZERS)
    hidden: tuple[int, ...] = param(MLP_HIDDEN, "hidden layer sizes", check=Sizes())
    lam: float = param(
        0.0,
        "the fixed EWC λ for both networks; 0: the λ chosen on validation for the network without BatchNorm",
        check=NON_NEGATIVE,
    )
    lam_grid: tuple[float, ...] = param(
        (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0),
        "EWC λ values searched on validation data, per network",
        check=Numbers(POSITIVE),
    )
    fisher_samples: int = param(1000, "samples per task for EWC's Fisher", check=POSITIVE_INT)
    bins: int = param(
        52, f"histogram bins of log10 F over [{LOG10_RANGE[0]:g}, {LOG10_RANGE[1]:g}]", check=POSITIVE_INT
    )
    seed: int = param(0, "seed for data, permutations and initial weights", check=SEED)
    threads: int = param(1, "torch threads per process", check=POSITIVE_INT)
    jobs: int = param(2, "training runs in parallel worker processes", check=POSITIVE_INT)

    def __post_init__(self) -> None:
        validate(self)
        self.hidden = tuple(self.hidden)
        self.lam_grid = tuple(float(lam) for lam in self.lam_grid)


# ------------------------------------------------------------------------------ the Fisher


def top_mass(values: Tensor, fraction: float = TOP) -> float:
    """Share of the total of ``values`` (>= 0) held by the largest ``fraction`` of them."""
    flat = values.detach().flatten().double()
    total = float(flat.sum())
    if total <= 0:
        return math.nan
    k = max(1, math.ceil(fraction * flat.numel()))
    return float(flat.topk(k).values.sum()) / total


def _layer_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Parameter name → (layer label, kind): ``linear 1`` … ``output``, ``BN 1`` …; weight or bias."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    labels = {n: f"linear {i + 1}" for i, n in enumerate(linears[:-1])} | {linears[-1]: "output"}
    labels |= {n: f"BN {i + 1}" for i, n in enumerate(norms)}
    return {f"{m}.{kind}": (label, kind) for m, label in labels.items() for kind in ("weight", "bias")}


def fisher_summary(fisher: dict[str, Tensor], model: nn.Module, bins: int) -> dict[str, Any]:
    """Per-parameter statistics and log10 histograms of a diagonal Fisher, and its concentration."""
    names = _layer_names(model)
    everything = torch.cat([f.flatten().double() for f in fisher.values()])
    total = float(everything.sum())
    linear = [n for n in fisher if names[n][1] == "weight" and not names[n][0].startswith("BN")]
    weights = torch.cat([fisher[n].flatten().double() for n in linear])
    edges = np.linspace(*LOG10_RANGE, bins + 1)
    params = []
    for n, f in fisher.items():
        v = f.detach().flatten().double()
        logs = torch.log10(v.clamp_min(1e-300)).clamp(*LOG10_RANGE).numpy()
        params.append(
            {
                "name": n,
                "layer": names[n][0],
                "kind": names[n][1],
                "count": v.numel(),
                "mean": float(v.mean()),
                "median": float(v.median()),
                "max": float(v.max()),
                "mass": float(v.sum()) / total if total > 0 else math.nan,
                "top1_mass": top_mass(v),
                "zeros": int((v == 0).sum()),
                "hist": np.histogram(logs, bins=edges)[0].tolist(),
            }
        )
    return {
        "total": total,
        "count": everything.numel(),
        "top1_mass": top_mass(everything),
        "top1_mass_linear_weights": top_mass(weights),
        "edges": edges.tolist(),
        "params": params,
    }


# -------------------------------------------------------------------------- the diagnostic


@torch.no_grad()
def own_statistics_accuracy(model: nn.Module, tasks: list[Task], batch_size: int = 500) -> list[float]:
    """Test accuracy of each task after re-estimating BatchNorm's running statistics on its training data.

    The parameters are untouched (a copy of the model is used): the difference to the ordinary
    accuracy is what the running statistics, which EWC cannot anchor, cost that task.
    """
    accs = []
    for task in tasks:
        m = copy.deepcopy(model).eval()
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.reset_running_stats()
                bn.momentum = None  # a plain average over all batches
                bn.train()
        for i in range(0, len(task.x_train), batch_size):
            m(task.x_train[i : i + batch_size])
        accs.append(accuracy(m, task.x_test, task.y_test))
    return accs


# ------------------------------------------------------------------------------------ run


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """Search λ per network, run SGD and EWC (fixed and chosen λ) with and without BatchNorm; report."""
    start = time.perf_counter()
    setup_runtime(config.seed, config.threads)
    key = data_key(config)
    grid = list(config.lam_grid)

    # 1. λ on the validation parts for each network, and the SGD references (test), in workers
    specs = [
        (key, "ewc", train_config(config, batchnorm=bn, lam=lam), True)
        for bn in CONDITIONS.values()
        for lam in grid
    ]
    specs += [(key, "sgd", train_config(config, batchnorm=bn), False) for bn in CONDITIONS.values()]
    done = iter(run_all(specs, config.jobs, out))
    selection = {
        c: choose_lam(grid, {lam: next(done)["average_accuracy"] for lam in grid}) for c in CONDITIONS
    }
    runs: dict[str, dict[str, Any]] = {c: {"sgd": run_summary(next(done))} for c in CONDITIONS}

    # 2. EWC at the chosen λ (test), in workers, unless it is the fixed λ run below
    fixed = config.lam or selection["plain"]["chosen"]
    todo = [c for c in CONDITIONS if selection[c]["chosen"] != fixed]
    specs = [
        (key, "ewc", train_config(config, batchnorm=CONDITIONS[c], lam=selection[c]["chosen"]), False)
        for c in todo
    ]
    for c, res in zip(todo, run_all(specs, config.jobs, out), strict=True):
        runs[c]["ewc_chosen"] = {"lam": selection[c]["chosen"], **run_summary(res)}

    # 3. EWC at the fixed λ here, keeping the model: its first Fisher and the BatchNorm diagnostic
    tasks, _ = build_tasks(*key[:3], config.seed, *key[3:])
    fisher: dict[str, Any] = {}
    for c, bn in CONDITIONS.items():
        res = run_method(tasks, "ewc", train_config(config, batchnorm=bn, lam=fixed))
        runs[c]["ewc_fixed"] = {"lam": fixed, **run_summary(res)}
        runs[c].setdefault("ewc_chosen", dict(runs[c]["ewc_fixed"]))
        reg = res["method"].reg
        fisher[c] = fisher_summary(reg.precisions(reg.keys[0]), res["model"], config.bins)
        if bn:
            runs[c]["ewc_fixed"]["own_statistics_final"] = own_statistics_accuracy(res["model"], tasks)

    results = {"results": {"runs": runs, "selection": selection, "fisher": fisher}}
    return finish(
        out,
        NAME,
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures={"fisher_hist.png": _fisher_figure(fisher), "retention.png": _retention_figure(runs)}
        if out
        else {},
        findings=_findings(runs, selection, fisher, fixed, transferred=not config.lam),
        tables=_tables(runs, selection, fisher),
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------- report


def _mean_of(summary: dict[str, Any], prefix: str, kind: str | None = None) -> float:
    """Mean Fisher over the parameters of the layers whose label starts with ``prefix``."""
    ps = [p for p in summary["params"] if p["layer"].startswith(prefix) and kind in (None, p["kind"])]
    n = sum(p["count"] for p in ps)
    return sum(p["mean"] * p["count"] for p in ps) / n if n else math.nan


def _heaviest_layer(summary: dict[str, Any]) -> tuple[str, float]:
    """The layer with the largest share of the total Fisher, and that share."""
    shares: dict[str, float] = {}
    for p in summary["params"]:
        shares[p["layer"]] = shares.get(p["layer"], 0.0) + p["mass"]
    layer = max(shares, key=shares.__getitem__)
    return layer, shares[layer]


def _findings(
    runs: dict[str, Any], selection: dict[str, Any], fisher: dict[str, Any], lam: float, transferred: bool
) -> list[str]:
    """Sentences read off the measured numbers."""
    p, b = fisher["plain"], fisher["batchnorm"]
    out = [
        f"Task 1's Fisher: the top 1% of parameters hold {pct(p['top1_mass'])} of the total without "
        f"BatchNorm and {pct(b['top1_mass'])} with it ({pct(p['top1_mass_linear_weights'])} vs "
        f"{pct(b['top1_mass_linear_weights'])} over the linear weights only); the total Fisher is "
        f"{p['total']:.3g} vs {b['total']:.3g} (×{b['total'] / p['total']:.2g}).",
    ]
    w1p, w1b = _mean_of(p, "linear 1", "weight"), _mean_of(b, "linear 1", "weight")
    wb = _mean_of(b, "linear", "weight")
    gamma, beta = _mean_of(b, "BN", "weight"), _mean_of(b, "BN", "bias")
    bn_share = sum(q["mass"] for q in b["params"] if q["layer"].startswith("BN"))
    out.append(
        f"The first layer's weights have mean Fisher {w1p:.3g} without and {w1b:.3g} with BatchNorm "
        f"(×{w1b / w1p:.2g}); the BatchNorm scales γ have mean Fisher {gamma:.3g} and the shifts β "
        f"{beta:.3g}, ×{gamma / wb:.3g} and ×{beta / wb:.3g} the mean of the hidden linear weights, "
        f"but they hold only {pct(bn_share)} of the total."
    )
    (heavy_p, share_p), (heavy_b, share_b) = _heaviest_layer(p), _heaviest_layer(b)
    out.append(
        f"The layer holding most of the Fisher is the {heavy_p} layer ({pct(share_p)} of the total) without "
        f"BatchNorm and the {heavy_b} layer ({pct(share_b)}) with it."
    )
    origin = "the λ chosen without BatchNorm, used for both" if transferred else "given, used for both"
    rp, rb = runs["plain"]["ewc_fixed"], runs["batchnorm"]["ewc_fixed"]
    out.append(
        f"EWC at the fixed λ = {lam:g} ({origin}): ACC {pct(rp['average_accuracy'])} without and "
        f"{pct(rb['average_accuracy'])} with BatchNorm; forgetting {100 * rp['forgetting']:.1f} pp vs "
        f"{100 * rb['forgetting']:.1f} pp."
    )
    lp, lb = selection["plain"]["chosen"], selection["batchnorm"]["chosen"]
    grid = ", ".join(f"{v:g}" for v in selection["plain"]["grid"])
    rc = runs["batchnorm"]["ewc_chosen"]
    if lb == lam:
        tail = f"re-choosing λ for BatchNorm keeps λ = {lam:g}: the fixed-λ numbers above are its numbers."
    else:
        tail = (
            f"at its own λ = {lb:g} EWC with BatchNorm reaches ACC {pct(rc['average_accuracy'])} "
            f"(forgetting {100 * rc['forgetting']:.1f} pp), "
            f"{100 * (rc['average_accuracy'] - rb['average_accuracy']):+.1f} pp ACC against the fixed λ."
        )
    out.append(
        f"Validation (λ ∈ {{{grid}}}) chooses λ = {lp:g} without and λ = {lb:g} with BatchNorm; {tail}"
    )
    sp, sb = runs["plain"]["sgd"], runs["batchnorm"]["sgd"]
    out.append(
        f"Plain SGD for reference: ACC {pct(sp['average_accuracy'])} without and "
        f"{pct(sb['average_accuracy'])} with BatchNorm; forgetting "
        f"{100 * sp['forgetting']:.1f} pp vs {100 * sb['forgetting']:.1f} pp."
    )
    compared = ("ewc_fixed",) if lb == lam and lp == lam else ("ewc_fixed", "ewc_chosen")
    more = {w: runs["batchnorm"][w]["forgetting"] - runs["plain"][w]["forgetting"] for w in compared}
    out.append(
        "With BatchNorm EWC forgets "
        + " and ".join(
            f"{abs(100 * d):.1f} pp {'more' if d > 0 else 'less'} at the {w.removeprefix('ewc_')} λ"
            for w, d in more.items()
        )
        + (
            "."
            if all(d > 0 for d in more.values())
            else f"; BatchNorm does not raise EWC's forgetting at {'every' if len(more) > 1 else 'this'} λ."
        )
    )
    fixed = runs["batchnorm"]["ewc_fixed"]
    own = fixed["own_statistics_final"]
    final = fixed["accuracy_matrix"][-1]
    old = len(final) - 1
    gain = sum(own[:old]) / old - sum(final[:old]) / old
    plain_old = sum(runs["plain"]["ewc_fixed"]["accuracy_matrix"][-1][:old]) / old
    out.append(
        f"With BatchNorm at λ = {lam:g}, re-estimating the running statistics on each earlier task's own "
        f"training data changes their mean final accuracy from {pct(sum(final[:old]) / old)} to "
        f"{pct(sum(own[:old]) / old)} ({100 * gain:+.1f} pp; without BatchNorm: {pct(plain_old)}): "
        + (
            "part of the forgetting is the drift of the running statistics, which no penalty on the "
            "parameters can prevent."
            if gain > 0.005
            else "the drift of the running statistics explains little of the forgetting here."
        )
    )
    return out


def _tables(runs: dict[str, Any], selection: dict[str, Any], fisher: dict[str, Any]) -> list[str]:
    """Retention per network and method; the λ search; the Fisher per parameter tensor."""
    rows = []
    for c in CONDITIONS:
        for what, label in (("sgd", "SGD"), ("ewc_fixed", "EWC, fixed λ"), ("ewc_chosen", "EWC, chosen λ")):
            r = runs[c][what]
            lam = f"{r['lam']:g}" if "lam" in r else "–"
            rows.append(
                [
                    LABELS[c],
                    label,
                    lam,
                    f"{r['average_accuracy']:.3f}",
                    f"{r['forgetting']:.3f}",
                    f"{r['bwt']:.3f}",
                ]
            )
    retention = md_table(
        ["Network", "Method", "λ", "ACC", "Forgetting", "BWT"], rows, ["---", "---"] + ["---:"] * 4
    )
    rows = [
        [
            LABELS[c],
            p["name"],
            p["layer"],
            str(p["count"]),
            f"{p['mean']:.3g}",
            f"{p['median']:.3g}",
            f"{p['mass']:.3f}",
            f"{p['top1_mass']:.3f}",
        ]
        for c in CONDITIONS
        for p in fisher[c]["params"]
    ]
    header = [
        "Network",
        "Parameter",
        "Layer",
        "Count",
        "Mean F",
        "Median F",
        "Share of total",
        "Top-1% share",
    ]
    search = md_table(
        ["λ", *(f"validation ACC, {LABELS[c]}" for c in CONDITIONS)],
        [
            [f"{lam:g}", *(f"{selection[c]['validation_acc'][i]:.3f}" for c in CONDITIONS)]
            for i, lam in enumerate(selection["plain"]["grid"])
        ],
    )
    return [
        "## Retention (test parts)",
        retention,
        "## λ search (validation parts; final average accuracy over all tasks)",
        search,
        "## The first task's Fisher per parameter tensor",
        md_table(header, rows, ["---"] * 3 + ["---:"] * 5),
    ]


def _colours() -> dict[str, str]:
    names = ["ewc", "ewc + batchnorm"]
    return {"plain": method_color("ewc", names), "batchnorm": method_color("ewc + batchnorm", names)}


def _fisher_figure(fisher: dict[str, Any]) -> Any:
    """One panel per linear layer (weights, both networks) and one for the BatchNorm affine parameters."""
    colour = _colours()
    layers = list(dict.fromkeys(p["layer"] for p in fisher["plain"]["params"]))
    panels = [(f"{layer} weights", [(c, layer, "weight") for c in CONDITIONS]) for layer in layers]
    panels.append(("BatchNorm γ and β", [("batchnorm", "BN", "weight"), ("batchnorm", "BN", "bias")]))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with figure_style():
        fig = new_figure((3.2 * ncols, 2.8 * nrows))
        axes = np.atleast_1d(fig.subplots(nrows, ncols)).flatten()
        for ax, (title, curves) in zip(axes, panels, strict=False):
            for c, prefix, kind in curves:
                ps = [p for p in fisher[c]["params"] if p["layer"].startswith(prefix) and p["kind"] == kind]
                counts = np.sum([p["hist"] for p in ps], axis=0)
                edges = np.asarray(fisher[c]["edges"])
                label = LABELS[c] if prefix != "BN" else ("γ (scale)" if kind == "weight" else "β (shift)")
                ls = "--" if kind == "bias" else "-"
                ax.stairs(counts / max(1, counts.sum()), edges, color=colour[c], ls=ls, label=label, lw=1.4)
            ax.set(title=title, xlabel=f"log10 F (left bin: F ≤ 1e{LOG10_RANGE[0]:g}, incl. 0)")
            ax.set_ylabel("fraction of parameters")
            ax.legend(fontsize=7)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
    return fig


def _retention_figure(runs: dict[str, Any]) -> Any:
    """ACC and forgetting per method and network; final accuracy per task for EWC at the fixed λ."""
    colour = _colours()
    methods = [("sgd", "SGD"), ("ewc_fixed", "EWC\nfixed λ"), ("ewc_chosen", "EWC\nchosen λ")]
    with figure_style():
        fig = new_figure((11.0, 3.4))
        acc_ax, fgt_ax, task_ax = fig.subplots(1, 3)
        x = np.arange(len(methods))
        for k, c in enumerate(CONDITIONS):
            for ax, metric in ((acc_ax, "average_accuracy"), (fgt_ax, "forgetting")):
                values = [runs[c][m][metric] for m, _ in methods]
                bars = ax.bar(x + (k - 0.5) * 0.38, values, 0.38, color=colour[c], label=LABELS[c])
                lams = ["", *(f"λ={runs[c][m]['lam']:g}" for m, _ in methods[1:])]
                ax.bar_label(
                    bars, [f"{v:.3f}\n{lam}" for v, lam in zip(values, lams, strict=True)], fontsize=6
                )
            fixed = runs[c]["ewc_fixed"]
            T = len(fixed["accuracy_matrix"])
            task_ax.plot(
                range(1, T + 1), fixed["accuracy_matrix"][-1], "o-", color=colour[c], label=LABELS[c]
            )
            if "own_statistics_final" in fixed:
                task_ax.plot(
                    range(1, T + 1),
                    fixed["own_statistics_final"],
                    "s--",
                    color=colour[c],
                    label=f"{LABELS[c]}, own statistics",
                )
        for ax, title in ((acc_ax, "ACC (final, all tasks)"), (fgt_ax, "Forgetting")):
            ax.set_xticks(x, [label for _, label in methods])
            ax.set_title(title)
        acc_ax.legend(fontsize=7, loc="upper center", ncols=2)
        for ax in (acc_ax, fgt_ax):
            ax.margins(y=0.3)
        task_ax.set(
            title=f"EWC, fixed λ = {runs['plain']['ewc_fixed']['lam']:g}: final accuracy",
            xlabel="task",
            ylabel="test accuracy",
        )
        task_ax.set_xticks(range(1, T + 1))
        task_ax.legend(fontsize=7)
    return fig
