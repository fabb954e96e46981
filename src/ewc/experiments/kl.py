"""How well EWC's quadratic penalty approximates the KL divergence between predictive distributions.

EWC replaces "how much did the old task's predictions change" by a quadratic in the parameters.
The exact quantity is the data-averaged KL divergence

    KL(Δ) = E_x KL(p_θ*(·|x) ‖ p_θ*+Δ(·|x)),

whose Taylor expansion at Δ = 0 starts at second order with the Fisher information:
KL(Δ) = ½ ΔᵀFΔ + O(‖Δ‖³), F = E_x Jᵀ(diag p − ppᵀ)J (J: the Jacobian of the logits). EWC keeps only
the diagonal, ½ Σ_i F_ii Δ_i².

We train two classifiers on mnist-10k: an MLP on the 28×28 images (``--hidden``, ~80k parameters)
and a small one on downsampled images (``--pool``, ``--small-hidden``, ~1k parameters) whose full
Fisher can be formed exactly. From θ* we move along unit directions d by steps ε on a log grid
and compare KL(εd) with

* ``full``: ½ε² dᵀFd, computed exactly for any model with one forward-mode pass (dᵀFd is the
  variance of the logit change Jd under p), and for the small model also from the formed F;
* ``diag``: ½ε² Σ_i F_ii d_i², with F_ii from :func:`ewc.fisher.diagonal_fisher` (mode exact).

Directions: isotropic random ones, the normalised gradient of the training loss, and for the small
model the top eigenvector of F (where off-diagonal curvature matters most). F and the KL are
averaged over the same ``--fisher-samples`` training images, so the second-order agreement is a
theorem, not an approximation. Everything after training runs in float64.

Per direction we report the small-step ratio quadratic/KL and how far the quadratic holds: the
largest step up to which every grid step keeps the ratio within [1/band, band] (``--band``), with
the KL (nats) and the accuracy there.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp

from ewc.checks import POSITIVE, POSITIVE_INT, SEED, THREADS, Interval
from ewc.config import validate
from ewc.data import load_dataset
from ewc.experiments.common import (
    figure_style,
    finish,
    fit_loglog,
    md_table,
    new_figure,
    param,
    setup_runtime,
)
from ewc.fisher import diagonal_fisher
from ewc.models import make_mlp

TITLE = "The quadratic penalty as an approximation of the KL divergence of the predictions"
CLAIM = (
    "EWC approximates the old task's posterior by a Gaussian whose precision is the Fisher "
    "information; the Fisher is the curvature of the KL divergence between the model's predictive "
    "distributions at θ*, so ½ΔᵀFΔ measures how much a move Δ changes the predictions, for small "
    "moves. EWC keeps only the diagonal of F."
)
POOLS = (1, 2, 4, 7, 14)


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "hidden": 16,
    "small_hidden": 8,
    "pool": 7,
    "train_samples": 400,
    "epochs": 1,
    "fisher_samples": 100,
    "random_directions": 2,
    "step_min": 1e-4,
    "step_max": 1.0,
    "steps": 5,
}


@dataclass
class Config:
    """The two classifiers, their training, the data average and the grid of steps."""

    hidden: int = param(100, "hidden units of the MLP on 28×28 images (diagonal Fisher)", check=POSITIVE_INT)
    small_hidden: int = param(16, "hidden units of the small model (full Fisher formed)", check=POSITIVE_INT)
    pool: int = param(4, "the small model sees images average-pooled by this factor", choices=POOLS)
    train_samples: int = param(8000, "training images (mnist-10k has 8000)", check=Interval(int, 1, 8000))
    epochs: int = param(5, "training epochs (Adam)", check=POSITIVE_INT)
    lr: float = param(3e-3, "Adam learning rate", check=POSITIVE)
    batch_size: int = param(64, "mini-batch size", check=POSITIVE_INT)
    fisher_samples: int = param(
        1000, "training images over which F and the KL are averaged", check=POSITIVE_INT
    )
    random_directions: int = param(3, "isotropic random directions per model", check=POSITIVE_INT)
    step_min: float = param(1e-3, "smallest step ε (parameter-space norm)", check=POSITIVE)
    step_max: float = param(100.0, "largest step ε", check=POSITIVE)
    steps: int = param(31, "log-spaced steps between step_min and step_max", check=Interval(int, 2))
    band: float = param(
        2.0,
        "the quadratic holds while quadratic/KL is within [1/band, band]",
        check=Interval(float, 1, closed="neither"),
    )
    tolerance: float = param(
        0.1,
        "the quadratic is accurate while |quadratic/KL − 1| ≤ tolerance",
        check=Interval(float, 0, 1, closed="neither"),
    )
    seed: int = param(0, "seed of data order, initial weights and directions", check=SEED)
    threads: int = param(2, "torch threads", check=THREADS)

    def __post_init__(self) -> None:
        validate(self)
        if self.fisher_samples > self.train_samples:
            raise ValueError(
                f"need fisher_samples ≤ train_samples, got {self.fisher_samples}, {self.train_samples}"
            )
        if self.step_max <= self.step_min:
            raise ValueError(f"need step_min < step_max, got {self.step_min!r} and {self.step_max!r}")


# ------------------------------------------------------------------------- flat-parameter tools


def flat_params(model: nn.Module) -> Tensor:
    """All parameters of ``model`` as one detached vector (``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def logits_at(model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
    """The model's logits on ``x`` with its parameters replaced by the flat vector ``theta``."""
    params, i = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[i : i + p.numel()].view_as(p)
        i += p.numel()
    return functional_call(model, params, (x,))


def kl_divergence(model: nn.Module, logp0: Tensor, theta: Tensor, x: Tensor) -> float:
    """E_x KL(p_θ* ‖ p_θ), with θ*'s log-probabilities ``logp0`` on ``x`` given."""
    logp = F.log_softmax(logits_at(model, theta, x), dim=-1)
    return float((logp0.exp() * (logp0 - logp)).sum(-1).mean())


def fisher_quadratic(model: nn.Module, theta: Tensor, d: Tensor, x: Tensor) -> float:
    """dᵀFd exactly, without forming F: the variance under p of the logit change u = Jd (one jvp)."""
    z, u = jvp(lambda th: logits_at(model, th, x), (theta,), (d,))
    p = F.softmax(z, dim=-1)
    return float(((p * u * u).sum(-1) - (p * u).sum(-1).square()).mean())


def full_fisher(model: nn.Module, theta: Tensor, x: Tensor, chunk: int = 64) -> Tensor:
    """F = E_x Jᵀ(diag p − ppᵀ)J, formed exactly ([P, P]; only for small models)."""
    n_params = theta.numel()
    fisher = theta.new_zeros(n_params, n_params)
    for i in range(0, len(x), chunk):
        xc = x[i : i + chunk]
        jac = jacrev(lambda th, xc=xc: logits_at(model, th, xc))(theta)  # [b, C, P]
        p = F.softmax(logits_at(model, theta, xc), dim=-1)
        weighted = (p.sqrt().unsqueeze(-1) * jac).reshape(-1, n_params)  # Σ_c p_c J_cᵀJ_c
        mean_row = torch.einsum("bc,bcp->bp", p, jac)  # (pᵀJ)ᵀ(pᵀJ)
        fisher += weighted.T @ weighted - mean_row.T @ mean_row
    return fisher / len(x)


# ----------------------------------------------------------------------------------- the models


def load_data(config: Config, gen: torch.Generator) -> dict[str, Tensor]:
    """mnist-10k training images in [0, 1] (a seeded subset, in a seeded order) and labels."""
    data = load_dataset("mnist-10k")
    order = torch.randperm(len(data.y_train), generator=gen)[: config.train_samples]
    x = torch.from_numpy(data.x_train.astype(np.float32) / 255.0)[order]
    y = torch.tensor(data.y_train)[order]
    return {"x": x, "y": y}


def train(model: nn.Module, x: Tensor, y: Tensor, config: Config, gen: torch.Generator) -> float:
    """Adam on the cross-entropy for ``epochs``; returns the training accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(config.batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def probe(
    name: str, model: nn.Module, x: Tensor, y: Tensor, config: Config, gen: torch.Generator, full: bool
) -> dict[str, Any]:
    """Train ``model``, then compare KL and the quadratics along each direction (float64)."""
    n_params = sum(p.numel() for p in model.parameters())
    train_acc = train(model, x, y, config, gen)
    model = model.double().eval()
    x, xf, yf = x.double(), x[: config.fisher_samples].double(), y[: config.fisher_samples]
    theta = flat_params(model)
    with torch.no_grad():
        logp0 = F.log_softmax(logits_at(model, theta, xf), dim=-1)
    diag = torch.cat([f.reshape(-1) for f in diagonal_fisher(model, (xf, yf), mode="exact").values()])

    # directions: random unit vectors, the training-loss gradient, the top Fisher eigenvector
    directions: dict[str, Tensor] = {}
    for k in range(config.random_directions):
        directions[f"random {k + 1}"] = torch.randn(n_params, generator=gen, dtype=torch.float64)
    theta_g = theta.clone().requires_grad_(True)
    directions["gradient"] = torch.autograd.grad(F.cross_entropy(logits_at(model, theta_g, x), y), theta_g)[0]
    result: dict[str, Any] = {"model": name, "parameters": n_params, "train_accuracy": train_acc}
    fisher = None
    if full:
        fisher = full_fisher(model, theta, xf)
        eigvals, eigvecs = torch.linalg.eigh(fisher)
        directions["top eigenvector"] = eigvecs[:, -1]
        result["top_eigenvalues"] = eigvals.flip(0)[:5].tolist()
        result["diag_vs_full_max_rel_diff"] = float(
            (fisher.diagonal() - diag).abs().max() / fisher.diagonal().abs().max()
        )
    result["fisher_trace"] = float(diag.sum())

    eps = np.logspace(math.log10(config.step_min), math.log10(config.step_max), config.steps)
    result["directions"] = {}
    jvp_check = 0.0
    for dname, d in directions.items():
        d = d / d.norm()
        entry = compare_along(model, theta, d, xf, yf, logp0, diag, eps, config)
        if fisher is not None:
            formed = float(d @ fisher @ d)
            jvp_check = max(jvp_check, abs(entry["curvature_full"] - formed) / abs(formed))
        result["directions"][dname] = entry
    if fisher is not None:
        result["jvp_vs_formed_max_rel_diff"] = jvp_check
    return result


def compare_along(
    model: nn.Module,
    theta: Tensor,
    d: Tensor,
    x: Tensor,
    y: Tensor,
    logp0: Tensor,
    diag: Tensor,
    eps: np.ndarray,
    config: Config,
) -> dict[str, Any]:
    """KL(εd), ½ε²dᵀFd and ½ε²dᵀdiag(F)d for every step ε, their ratios and where they hold."""
    dfd = fisher_quadratic(model, theta, d, x)
    ddiag = float((diag * d * d).sum())
    kl, acc = [], []
    with torch.no_grad():
        for e in eps:
            kl.append(kl_divergence(model, logp0, theta + e * d, x))
            acc.append(float((logits_at(model, theta + e * d, x).argmax(-1) == y).double().mean()))
    kl_a, acc_a = np.asarray(kl), np.asarray(acc)
    quad_full, quad_diag = 0.5 * eps**2 * dfd, 0.5 * eps**2 * ddiag
    entry = {
        "kl": _round(kl),
        "accuracy": acc,
        "quad_full": _round(quad_full),
        "quad_diag": _round(quad_diag),
        "curvature_full": dfd,
        "curvature_diag": ddiag,
    }
    for kind, quad in (("full", quad_full), ("diag", quad_diag)):
        ratio = quad / np.maximum(kl_a, 1e-300)
        entry[f"ratio_{kind}"] = _round(ratio)
        entry[f"small_step_ratio_{kind}"] = float(ratio[0])
        entry[f"holds_{kind}"] = limit(ratio, eps, kl_a, acc_a, (1 / config.band, config.band))
        entry[f"accurate_{kind}"] = limit(
            ratio, eps, kl_a, acc_a, (1 - config.tolerance, 1 + config.tolerance)
        )
    # how the KL grows over the last three steps (the quadratic: exponent 2)
    entry["kl_growth_at_end"] = fit_loglog(eps[-3:], kl_a[-3:])
    return entry


def _round(values: Any, digits: int = 6) -> list[float]:
    """Curves as JSON floats with ``digits`` significant digits (keeps results.json small)."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=float)]


def limit(
    ratio: np.ndarray, eps: np.ndarray, kl: np.ndarray, acc: np.ndarray, bounds: tuple[float, float]
) -> dict[str, Any]:
    """The largest step up to which every step keeps ``ratio`` within ``bounds``, and KL/accuracy there.

    ``step`` is None when not even the smallest step is inside; ``to_end`` when all of them are.
    """
    inside = (ratio >= bounds[0]) & (ratio <= bounds[1])
    n_ok = len(inside) if inside.all() else int(np.argmin(inside))
    if n_ok == 0:
        return {"step": None, "kl": None, "accuracy": None, "to_end": False}
    i = n_ok - 1
    return {
        "step": float(eps[i]),
        "kl": float(kl[i]),
        "accuracy": float(acc[i]),
        "to_end": bool(inside.all()),
    }


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """Train both models, probe KL vs quadratics along each direction, write results and figures."""
    start = time.perf_counter()
    gen = setup_runtime(config.seed, config.threads)
    data = load_data(config, gen)
    x, y = data["x"], data["y"]
    side = 28 // config.pool
    x_small = F.avg_pool2d(x.unsqueeze(1), config.pool).reshape(len(x), side * side)
    models = {
        "mlp": probe("mlp", make_mlp(28 * 28, (config.hidden,), 10), x, y, config, gen, full=False),
        "small": probe(
            "small", make_mlp(side * side, (config.small_hidden,), 10), x_small, y, config, gen, full=True
        ),
    }
    eps = np.logspace(math.log10(config.step_min), math.log10(config.step_max), config.steps)
    results = {"results": {"steps": eps.tolist(), "band": [1 / config.band, config.band], "models": models}}
    seconds = time.perf_counter() - start
    return finish(
        out,
        "kl",
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures=figures(config, results["results"]) if out is not None else {},
        findings=make_findings(config, results["results"]),
        tables=[table(config, results["results"])],
        seconds=seconds,
    )


def _reach(limits: list[dict[str, Any]]) -> str:
    """How far a quadratic holds over one or several directions: 'ε ≤ 4.6–6.8 (KL 0.004–0.014 nats)'."""
    ok = [lim for lim in limits if lim["step"] is not None]
    if not ok:
        return "never"

    def span(key: str, fmt: str) -> str:
        lo, hi = min(lim[key] for lim in ok), max(lim[key] for lim in ok)
        return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}–{hi:{fmt}}"

    text = f"ε ≤ {span('step', '.3g')} (KL {span('kl', '.2g')} nats, accuracy {span('accuracy', '.0%')})"
    if len(ok) < len(limits):
        text += f", never for {len(limits) - len(ok)} of {len(limits)}"
    if all(lim["to_end"] for lim in ok):
        text += ", the whole grid"
    return text


def _by_kind(dirs: dict[str, Any], key: str) -> str:
    """``_reach`` for the random directions together and for each other direction."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for name, e in dirs.items():
        groups.setdefault("random" if name.startswith("random") else name, []).append(e[key])
    return "; ".join(f"{name}: {_reach(limits)}" for name, limits in groups.items())


def table(config: Config, r: dict[str, Any]) -> str:
    """One row per model and direction: small-step ratios and how far each quadratic holds."""
    rows = []
    for m in r["models"].values():
        for dname, e in m["directions"].items():
            cells = [f"{m['model']} ({m['parameters']} params)", dname]
            cells += [f"{e['small_step_ratio_full']:.4f}", f"{e['small_step_ratio_diag']:.3f}"]
            for key in ("accurate_full", "holds_full", "holds_diag"):
                lim = e[key]
                cells.append("never" if lim["step"] is None else f"{lim['step']:.3g} ({lim['kl']:.2g})")
            rows.append(cells)
    lo, hi = r["band"]
    header = [
        "model",
        "direction",
        "full/KL (ε→0)",
        "diag/KL (ε→0)",
        f"full within {config.tolerance:.0%}",
        f"full in [{lo:g}, {hi:g}]",
        f"diag in [{lo:g}, {hi:g}]",
    ]
    return (
        "Ratios quadratic/KL at the smallest step, and the largest step ε up to which every step keeps "
        "the ratio within the tolerance or the band (the KL there, in nats, in brackets).\n\n"
        + md_table(header, rows, align=["---", "---"] + ["---:"] * 5)
    )


def make_findings(config: Config, r: dict[str, Any]) -> list[str]:
    """Sentences computed from the measured ratios."""
    lo, hi = r["band"]
    lines = []
    for m in r["models"].values():
        name, dirs = m["model"], m["directions"]
        full0 = [e["small_step_ratio_full"] for e in dirs.values()]
        lines.append(
            f"{name} ({m['parameters']} parameters, train accuracy {m['train_accuracy']:.1%}): at the "
            f"smallest step (ε = {config.step_min:g}) ½ΔᵀFΔ/KL is {min(full0):.4f}–{max(full0):.4f} over "
            f"{len(dirs)} directions: the full-Fisher quadratic is the KL's second-order term."
        )
        rnd = [e["small_step_ratio_diag"] for k, e in dirs.items() if k.startswith("random")]
        parts = [f"{min(rnd):.2f}–{max(rnd):.2f} along random directions"] if rnd else []
        parts += [
            f"{dirs[k]['small_step_ratio_diag']:.3g} along the {k}"
            for k in ("gradient", "top eigenvector")
            if k in dirs
        ]
        bad = [k for k, e in dirs.items() if not lo <= e["small_step_ratio_diag"] <= hi]
        verdict = (
            f"outside [{lo:g}, {hi:g}] even for small steps along: {', '.join(bad)}."
            if bad
            else f"within [{lo:g}, {hi:g}] for small steps along every direction."
        )
        lines.append(f"{name}: the diagonal quadratic over the KL is " + ", ".join(parts) + "; " + verdict)
        lines.append(
            f"{name}: the full quadratic is within {config.tolerance:.0%} of the KL for "
            + _by_kind(dirs, "accurate_full")
            + f". Within [{lo:g}, {hi:g}]: "
            + _by_kind(dirs, "holds_full")
            + "."
        )
        growth = [e["kl_growth_at_end"] for e in dirs.values()]
        lines.append(
            f"{name}: at the largest steps the KL grows like ε^s with "
            f"s = {min(growth):.2f}–{max(growth):.2f} (the quadratic: s = 2)."
        )
        if "diag_vs_full_max_rel_diff" in m:
            lines.append(
                f"{name}: checks: diag of the formed F vs ewc.fisher.diagonal_fisher, max rel. difference "
                f"{m['diag_vs_full_max_rel_diff']:.1e}; dᵀFd by forward mode vs formed F "
                f"{m['jvp_vs_formed_max_rel_diff']:.1e}; top eigenvalues of F "
                + ", ".join(f"{v:.3g}" for v in m["top_eigenvalues"][:3])
                + f" (trace {m['fisher_trace']:.3g})."
            )
    return lines


def figures(config: Config, r: dict[str, Any]) -> dict[str, Any]:
    """kl.png: KL and both quadratics vs step (log–log) per model and direction; ratio.png: their ratios."""
    eps = np.asarray(r["steps"])
    lo, hi = r["band"]
    models = list(r["models"].values())
    shown = [[k for k in m["directions"] if k in ("random 1", "gradient", "top eigenvector")] for m in models]
    cols = max(len(s) for s in shown)
    with figure_style():
        fig = new_figure((3.3 * cols, 2.9 * len(models)))
        axes = np.atleast_2d(fig.subplots(len(models), cols, squeeze=False))
        for row, (m, names) in enumerate(zip(models, shown, strict=True)):
            for col in range(cols):
                ax = axes[row, col]
                if col >= len(names):
                    ax.axis("off")
                    continue
                e = m["directions"][names[col]]
                ax.plot(eps, e["kl"], "-", color="black", lw=1.8, label="KL(p* ‖ p)")
                ax.plot(eps, e["quad_full"], "--", color="#d62728", lw=1.2, label="½ΔᵀFΔ (full F)")
                ax.plot(eps, e["quad_diag"], ":", color="#1f77b4", lw=1.6, label="½Δᵀdiag(F)Δ")
                lim = e["holds_full"]
                if lim["step"] is not None and not lim["to_end"]:
                    ax.axvline(lim["step"], color="#d62728", lw=0.7, alpha=0.6)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{m['model']} ({m['parameters']} params): {names[col]}", fontsize=9)
                ax.set_xlabel("step ε = ‖Δ‖")
                if col == 0:
                    ax.set_ylabel("nats")
        axes[0, 0].legend(fontsize=8)

        fig2 = new_figure((4.8 * len(models), 3.6))
        axes2 = fig2.subplots(1, len(models), squeeze=False)[0]
        palette = ["#7f7f7f", "#aaaaaa", "#c7c7c7", "#bcbd22", "#17becf"]
        for ax, m in zip(axes2, models, strict=True):
            ax.axhspan(lo, hi, color="0.92", zorder=0)
            for i, (dname, e) in enumerate(m["directions"].items()):
                c = {"gradient": "#2ca02c", "top eigenvector": "#9467bd"}.get(
                    dname, palette[i % len(palette)]
                )
                ax.plot(eps, e["ratio_full"], "--", color=c, lw=1.2)
                ax.plot(eps, e["ratio_diag"], "-", color=c, lw=1.2, label=dname)
            ax.axhline(1, color="black", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("step ε = ‖Δ‖")
            ax.set_ylabel("quadratic / KL")
            ax.set_title(f"{m['model']}: solid diag(F), dashed full F", fontsize=9)
            ax.legend(fontsize=7)
        fig2.suptitle(f"Quadratic over KL (shaded: [{lo:g}, {hi:g}])", fontsize=11)
    return {"kl.png": fig, "ratio.png": fig2}
