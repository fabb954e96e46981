"""The Fisher perturbation test: does noise the diagonal Fisher calls harmless leave the network intact?

The paper's Fig. 4C (Kirkpatrick et al. 2017; an Atari agent there, an MNIST classifier here):
train on one task, then add random perturbations ``z`` of growing norm ``‖z‖ = r`` to all the
parameters and measure how much performance drops. Three kinds of noise, each a Gaussian draw
``g ~ N(0, I)`` over the ``P`` parameters, shaped and then rescaled to exactly ``‖z‖ = r``:

- ``isotropic``: ``z ∝ g``, the same scale on every parameter (the paper's "uniform");
- ``fisher``: ``z_i ∝ g_i / √(F_i + ε)``, the shape of a Gaussian posterior with precision F
  (inverse-Fisher covariance), damped by ``ε = damping × mean(F)`` so that F = 0 stays finite;
- ``null``: ``z ∝ g`` on the parameters with the smallest Fisher values that together hold only
  ``null_mass`` of its trace (the "near-null space" of the diagonal Fisher), zero elsewhere.

``F`` is the exact diagonal Fisher (:func:`ewc.fisher.diagonal_fisher`) on ``fisher_samples``
training images. If the diagonal Fisher measured importance well, ``fisher`` and ``null`` noise
would hurt far less than ``isotropic`` noise of the same norm. Per norm and kind we average
``draws`` draws of: test accuracy, test loss, and the mean KL divergence between the network's
predictions before and after on the Fisher's own images, next to the Fisher's second-order
prediction of that KL, ``½ Σ_i F_i z_i²`` (exact as ``r → 0``). A measured KL far above the
prediction means the Fisher is overconfident that those parameters do not matter.
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
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ewc.checks import POSITIVE, POSITIVE_INT, SEED, THREADS, Interval, Sizes
from ewc.config import validate
from ewc.data import load_dataset, make_sequence
from ewc.experiments.common import figure_style, finish, md_table, new_figure, param, setup_runtime
from ewc.fisher import diagonal_fisher
from ewc.models import MLP_HIDDEN
from ewc.train import TrainConfig, run_method

TITLE = "Perturbing a trained network along the inverse Fisher, isotropically, or in its null space"
CLAIM = (
    "Fig. 4C (an Atari agent): noise shaped by the inverse of the diagonal Fisher hurt performance "
    "least, much less than isotropic (uniform) noise of the same norm, while noise confined to the "
    "Fisher's null space, which the Fisher says should not matter at all, hurt about as much as the "
    "Fisher-shaped noise; the paper reads this as the diagonal Fisher being overconfident about "
    "unimportant parameters."
)

KINDS = ("isotropic", "fisher", "null")
_LABELS = {"isotropic": "isotropic (uniform)", "fisher": "inverse Fisher", "null": "Fisher null space"}
_COLORS = {"isotropic": "#1f77b4", "fisher": "#d62728", "null": "#ff7f0e"}
FRACTION = Interval(float, 0, 1, closed="neither")


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "hidden": (32,),
    "train_samples": 1000,
    "epochs": 2,
    "lr": 3e-3,
    "fisher_samples": 200,
    "test_samples": 300,
    "norm_min": 3.0,
    "norm_max": 300.0,
    "norms": 5,
    "draws": 3,
    "threads": 1,
}


@dataclass
class Config:
    """Settings of the perturbation test (defaults: a 2×400 MLP on 7200 MNIST images)."""

    hidden: tuple[int, ...] = param(MLP_HIDDEN, "hidden layer sizes of the MLP", check=Sizes())
    train_samples: int = param(
        7200, "training images (7200: all of mnist-10k's training part)", check=POSITIVE_INT
    )
    epochs: int = param(5, "training epochs", check=POSITIVE_INT)
    batch_size: int = param(64, "mini-batch size", check=POSITIVE_INT)
    lr: float = param(1e-3, "Adam learning rate", check=POSITIVE)
    fisher_samples: int = param(1000, "training images for the Fisher (and the KL check)", check=POSITIVE_INT)
    test_samples: int = param(1000, "test images for accuracy and loss", check=POSITIVE_INT)
    norm_min: float = param(1.0, "smallest perturbation norm ‖z‖", check=POSITIVE)
    norm_max: float = param(1000.0, "largest perturbation norm ‖z‖", check=POSITIVE)
    norms: int = param(13, "norms on a log grid from norm_min to norm_max", check=Interval(int, 2))
    draws: int = param(10, "noise draws per norm and kind", check=POSITIVE_INT)
    damping: float = param(
        1e-3, "ε of the inverse-Fisher noise, as a multiple of the mean Fisher", check=POSITIVE
    )
    null_mass: float = param(
        0.01, "share of the Fisher's trace held by the 'null space' parameters", check=FRACTION
    )
    drop: float = param(
        0.1, "accuracy drop (0.1 = 10 points) whose norm the report gives per kind", check=FRACTION
    )
    seed: int = param(0, "seed for data, initial weights and noise", check=SEED)
    threads: int = param(1, "torch threads (one is fastest for networks this small)", check=THREADS)

    def __post_init__(self) -> None:
        validate(self)
        self.hidden = tuple(self.hidden)
        if self.norm_min >= self.norm_max:
            raise ValueError(f"need norm_min < norm_max, got {self.norm_min!r} and {self.norm_max!r}")


def null_space_mask(fisher: Tensor, mass: float) -> Tensor:
    """True for the parameters with the smallest Fisher that together hold at most ``mass`` of its sum.

    Exact zeros are always inside; ties are broken by position (a stable sort).
    """
    order = torch.sort(fisher, stable=True).indices
    share = torch.cumsum(fisher[order].double(), 0) / fisher.double().sum().clamp_min(1e-300)
    mask = torch.zeros_like(fisher, dtype=torch.bool)
    mask[order[share <= mass]] = True
    return mask


def noise_scales(fisher: Tensor, kind: str, *, damping: float, null_mass: float) -> Tensor:
    """Per-parameter standard deviations (before normalising to a norm) of each kind of noise."""
    if kind == "isotropic":
        return torch.ones_like(fisher)
    if kind == "fisher":
        return (fisher + damping * fisher.mean()).rsqrt()
    if kind == "null":
        return null_space_mask(fisher, null_mass).to(fisher.dtype)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {KINDS}")


def draw(scales: Tensor, norm: float, generator: torch.Generator) -> Tensor:
    """One perturbation: Gaussian noise times ``scales``, rescaled to Euclidean norm ``norm``."""
    z = torch.randn(scales.shape, generator=generator, dtype=scales.dtype) * scales
    return z * (norm / z.norm())


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def _measure(
    model: nn.Module, test: tuple[Tensor, Tensor], fisher_x: Tensor, base_logp: Tensor
) -> tuple[float, float, float]:
    """Test accuracy, test loss, and mean KL(before ‖ now) on the Fisher's images."""
    logits = _logits(model, test[0])
    acc = float((logits.argmax(-1) == test[1]).double().mean())
    loss = float(F.cross_entropy(logits, test[1]))
    logp = F.log_softmax(_logits(model, fisher_x), -1)
    kl = float((base_logp.exp() * (base_logp - logp)).sum(-1).mean())
    return acc, loss, kl


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """Train one network, perturb it with each kind of noise on a grid of norms; report."""
    start = time.perf_counter()
    generator = setup_runtime(config.seed, config.threads)
    (task,) = make_sequence(
        load_dataset("mnist-10k"),
        "permuted",
        1,
        seed=config.seed,
        max_train_per_task=config.train_samples,
        max_eval_per_task=config.test_samples,
    )
    train = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        hidden=config.hidden,
        eval_every=10**9,  # no learning curves needed
        curve_samples=1,
        seed=config.seed,
        threads=config.threads,
        progress=False,
    )
    model = run_method([task], "sgd", train)["model"].eval()
    fisher_x, fisher_y = task.x_train[: config.fisher_samples], task.y_train[: config.fisher_samples]
    fisher_by_name = diagonal_fisher(model, (fisher_x, fisher_y))
    params = list(model.parameters())
    fisher = torch.cat([fisher_by_name[n].flatten() for n, _ in model.named_parameters()])
    theta = parameters_to_vector(params).detach().clone()
    base_logp = F.log_softmax(_logits(model, fisher_x), -1)
    test = (task.x_test, task.y_test)
    base_acc, base_loss, _ = _measure(model, test, fisher_x, base_logp)

    norms = np.geomspace(config.norm_min, config.norm_max, config.norms).tolist()

    def measure(z: Tensor) -> tuple[float, ...]:
        """Accuracy, loss, KL at θ* + z, and the Fisher's forecast of that KL."""
        vector_to_parameters(theta + z, params)
        return (*_measure(model, test, fisher_x, base_logp), 0.5 * float((fisher * z * z).sum()))

    per_kind = {}
    for kind in KINDS:
        scales = noise_scales(fisher, kind, damping=config.damping, null_mass=config.null_mass)
        cells = [[measure(draw(scales, r, generator)) for _ in range(config.draws)] for r in norms]
        per_kind[kind] = {
            key: [[c[j] for c in row] for row in cells]
            for j, key in enumerate(("accuracy", "loss", "kl", "predicted_kl"))
        }
        per_kind[kind]["mean_accuracy"] = np.mean(per_kind[kind]["accuracy"], 1).tolist()
        per_kind[kind]["parameters_with_noise"] = int((scales > 0).sum())
    vector_to_parameters(theta, params)

    first = next(n for n, _ in model.named_parameters())
    results = {
        "norms": norms,
        "baseline": {"accuracy": base_acc, "loss": base_loss},
        "parameters": int(fisher.numel()),
        "parameter_norm": float(theta.norm()),
        "fisher_zeros": int((fisher == 0).sum()),
        "fisher_zeros_first_layer": int((fisher_by_name[first] == 0).sum()),
        "kinds": per_kind,
        "norm_at_drop": {
            k: norm_at_drop(norms, v["mean_accuracy"], base_acc, config.drop) for k, v in per_kind.items()
        },
    }
    return finish(
        out,
        "perturb",
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures={"perturb.png": _figure(results, config.drop)},
        findings=_findings(results, config),
        tables=[_table(results)],
        seconds=time.perf_counter() - start,
    )


def norm_at_drop(norms: list[float], accuracy: list[float], baseline: float, drop: float) -> float | None:
    """The norm where the mean accuracy first falls ``drop`` below ``baseline``.

    Interpolated linearly in accuracy against log-norm between grid points; the first norm if it
    already has fallen there, None if it never does on the grid.
    """
    target = baseline - drop
    for i, acc in enumerate(accuracy):
        if acc <= target:
            if i == 0:
                return norms[0]
            a0, a1 = accuracy[i - 1], acc
            t = (a0 - target) / (a0 - a1) if a0 != a1 else 1.0
            return float(math.exp(math.log(norms[i - 1]) + t * (math.log(norms[i]) - math.log(norms[i - 1]))))
    return None


def _findings(r: dict[str, Any], config: Config) -> list[str]:
    """Sentences from the measurements: where each kind loses ``drop``, and the Fisher's forecast."""
    pts = round(100 * config.drop)
    at = r["norm_at_drop"]
    lines = [
        f"Unperturbed: test accuracy {100 * r['baseline']['accuracy']:.1f}%, parameter norm "
        f"{r['parameter_norm']:.1f} over {r['parameters']} parameters; {r['fisher_zeros']} have a Fisher "
        f"of exactly 0 ({r['fisher_zeros_first_layer']} of them first-layer weights, mostly of pixels "
        f"blank in all {config.fisher_samples} Fisher images).",
        f"Norm at which test accuracy falls by {pts} points: "
        + "; ".join(f"{_LABELS[k]} {_norm_text(at[k], r['norms'])}" for k in KINDS)
        + ".",
    ]
    iso, fis, nul = (math.inf if at[k] is None else at[k] for k in KINDS)
    if fis > iso:
        lines.append(
            f"Inverse-Fisher noise hurt less than isotropic noise, as in the paper: it took "
            f"{_ratio_text(fis, iso)} the norm to lose {pts} points."
        )
    else:
        lines.append(
            f"Inverse-Fisher noise did not hurt less than isotropic noise ({pts} points lost at norm "
            f"{fis:.1f} against {iso:.1f}), unlike the paper."
        )
    if math.isinf(fis) and math.isinf(nul):
        lines.append(f"Neither inverse-Fisher nor null-space noise cost {pts} points on this grid.")
    elif 2 / 3 <= nul / fis <= 3 / 2:
        lines.append(
            f"Null-space noise hurt about as much as inverse-Fisher noise, as in the paper (its {pts}-point "
            f"norm is {nul / fis:.2f}× the latter's)."
        )
    else:
        lines.append(
            f"Null-space noise hurt {'less' if nul > fis else 'more'} than inverse-Fisher noise (its "
            f"{pts}-point norm is {_ratio_text(nul, fis)} the latter's); the paper found them about equal."
        )
    return lines + _forecast(r, config.drop)


def _norm_text(norm: float | None, grid: list[float]) -> str:
    return f"beyond the grid (> {grid[-1]:.0f})" if norm is None else f"{norm:.1f}"


def _ratio_text(a: float, b: float) -> str:
    return "more than the whole grid's" if math.isinf(a) else f"{a / b:.1f}×"


def _forecast(r: dict[str, Any], drop: float) -> list[str]:
    """The measured KL on the Fisher's images against the Fisher's forecast ½ Σ F z², per kind.

    Twice: at the largest norm where isotropic noise costs under 1 point (the quadratic regime),
    and at the first norm where each kind has cost ``drop``.
    """
    base = r["baseline"]["accuracy"]
    iso = r["kinds"]["isotropic"]["mean_accuracy"]
    small = max([i for i, a in enumerate(iso) if a >= base - 0.01], default=0)

    def ratio(kind: str, i: int) -> float:
        v = r["kinds"][kind]
        return float(np.mean(v["kl"][i]) / max(np.mean(v["predicted_kl"][i]), 1e-300))

    near = [ratio(k, small) for k in KINDS]
    verdict = "forecasts the damage well" if all(0.5 <= q <= 2 for q in near) else "misjudges the damage"
    lines = [
        f"Near the trained weights the Fisher {verdict}: at norm {r['norms'][small]:.3g} the measured KL "
        "on the Fisher's own images is "
        + ", ".join(f"{q:.2f}×" for q in near)
        + " its forecast ½ Σ F z² (isotropic, inverse Fisher, null space)."
    ]
    parts = []
    for k in KINDS:
        hit = [i for i, a in enumerate(r["kinds"][k]["mean_accuracy"]) if a <= base - drop]
        if hit:
            parts.append(f"{_LABELS[k]} {ratio(k, hit[0]):.3g}× (norm {r['norms'][hit[0]]:.3g})")
    if parts:
        lines.append(
            f"Where a kind of noise first costs {round(100 * drop)} points, the measured KL exceeds the "
            "forecast by " + "; ".join(parts) + ": a ratio far above 1 means the diagonal Fisher called "
            "those directions safer than they are."
        )
    return lines


def _table(r: dict[str, Any]) -> str:
    """Mean test accuracy per norm (rows) and kind (columns)."""
    header = ["‖z‖"] + [_LABELS[k] for k in KINDS]
    rows = [
        [f"{n:.3g}"] + [f"{100 * r['kinds'][k]['mean_accuracy'][i]:.1f}%" for k in KINDS]
        for i, n in enumerate(r["norms"])
    ]
    return md_table(header, rows)


def _figure(r: dict[str, Any], drop: float) -> Any:
    """Left: test accuracy against norm; right: measured KL and the Fisher's forecast (log-log)."""
    norms = np.array(r["norms"])
    with figure_style():
        fig = new_figure((10.0, 4.0))
        acc_ax, kl_ax = fig.subplots(1, 2)
        for k in KINDS:
            v = r["kinds"][k]
            acc = np.array(v["accuracy"])
            acc_ax.errorbar(
                norms,
                acc.mean(1),
                yerr=acc.std(1),
                marker="o",
                ms=4,
                capsize=2,
                color=_COLORS[k],
                label=_LABELS[k],
            )
            kl_ax.plot(norms, np.mean(v["kl"], 1), marker="o", ms=4, color=_COLORS[k], label=f"{_LABELS[k]}")
            kl_ax.plot(norms, np.mean(v["predicted_kl"], 1), ls="--", color=_COLORS[k])
        base = r["baseline"]["accuracy"]
        acc_ax.axhline(base, color="0.5", lw=0.8, ls=":")
        acc_ax.axhline(base - drop, color="0.5", lw=0.8, ls="--", label=f"baseline − {round(100 * drop)} pts")
        acc_ax.set(xscale="log", xlabel="perturbation norm ‖z‖", ylabel="test accuracy", ylim=(0, 1))
        acc_ax.set_title("Accuracy after perturbing all parameters")
        acc_ax.legend(loc="lower left")
        kl_ax.set(xscale="log", yscale="log", xlabel="perturbation norm ‖z‖", ylabel="KL(before ‖ after)")
        kl_ax.set_title("KL on the Fisher's images (dashed: ½ Σ F z²)")
        kl_ax.legend(loc="upper left")
    return fig
