"""Fisher overlap by depth: do two tasks learned with EWC rely on the same weights, layer by layer?

The paper's Fig. 3 (Kirkpatrick et al. 2017, "Fisher overlap"): a deep MLP (6 hidden layers of
100 units) learns two tasks with EWC; for every layer the two tasks' diagonal Fishers are
compared. Each task permutes the pixels of a centred ``k × k`` square of the MNIST images
(:func:`ewc.data.permute_patch`, an independent permutation per task): a small square (8 × 8)
gives two similar tasks, a large one (26 × 26, nearly the whole image) two dissimilar ones.

Procedure, per patch size and per repeat (fresh permutations and initial weights):

1. train on task 1, consolidate (EWC, exact Fisher), train on task 2 with the EWC penalty
   (:func:`ewc.train.run_method`);
2. at the final parameters, compute each task's diagonal Fisher on its own training images;
3. per layer (the weights and bias of one ``Linear``), normalise each Fisher to unit trace and
   take the overlap ``1 − d²`` with ``d² = ½ Σ_i (√f̂1_i − √f̂2_i)²``, the Fréchet distance
   between the two diagonal Fishers (:func:`fisher_overlap`): 1 for proportional Fishers, 0 for
   disjoint supports.

We read the paper as computing both Fishers after training on both tasks (its Methods text could
not be retrieved here to confirm it); the Fishers used by EWC's penalty are not reused because
task 1's would be taken before task 2 changed the weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ewc.checks import NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, THREADS, Interval, Numbers
from ewc.config import validate
from ewc.data import Dataset, Task, load_dataset, make_sequence, permute_patch
from ewc.experiments.common import figure_style, finish, md_table, new_figure, param, setup_runtime
from ewc.fisher import diagonal_fisher
from ewc.train import TrainConfig, run_method

TITLE = "Fisher overlap by layer depth for similar and dissimilar tasks (paper Fig. 3)"
CLAIM = (
    "An MLP with 6 hidden layers of 100 units learns two permuted-MNIST tasks with EWC. Tasks that "
    "permute only a small 8×8 patch (similar) have a high Fisher overlap in every layer; tasks that "
    "permute a 26×26 patch (dissimilar) overlap little in the layers near the input and more in the "
    "layers near the output: the network shares its upper layers between dissimilar tasks."
)


#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "patch_sizes": (4, 20),
    "depth": 2,
    "width": 16,
    "repeats": 1,
    "train_samples": 300,
    "epochs": 1,
    "fisher_samples": 100,
    "test_samples": 100,
    "threads": 1,
}


@dataclass
class Config:
    """Settings of the overlap experiment (defaults: the paper's 6×100 network, 7200 MNIST images)."""

    patch_sizes: tuple[int, ...] = param(
        (8, 16, 26),
        "side of the centred square each task permutes",
        check=Numbers(Interval(int, 1, 28), distinct=True),  # MNIST is 28x28
    )
    depth: int = param(6, "hidden layers (paper: 6)", check=POSITIVE_INT)
    width: int = param(100, "units per hidden layer (paper: 100)", check=POSITIVE_INT)
    repeats: int = param(
        3, "task pairs per patch size (new permutations and initial weights each)", check=POSITIVE_INT
    )
    train_samples: int = param(
        7200, "training images per task (7200: all of mnist-10k's training part)", check=POSITIVE_INT
    )
    epochs: int = param(5, "epochs per task", check=POSITIVE_INT)
    batch_size: int = param(64, "mini-batch size", check=POSITIVE_INT)
    lr: float = param(1e-3, "Adam learning rate", check=POSITIVE)
    lam: float = param(100.0, "EWC strength λ while learning task 2", check=NON_NEGATIVE)
    fisher_samples: int = param(1000, "training images per task for each Fisher", check=POSITIVE_INT)
    test_samples: int = param(1000, "test images per task for the accuracies", check=POSITIVE_INT)
    seed: int = param(0, "seed for data, permutations and initial weights", check=SEED)
    threads: int = param(1, "torch threads (one is fastest for networks this small)", check=THREADS)

    def __post_init__(self) -> None:
        validate(self)
        self.patch_sizes = tuple(self.patch_sizes)


def fisher_overlap(f1: Tensor, f2: Tensor) -> float:
    """The paper's overlap ``1 − d²`` of two diagonal Fishers (any shape, the same for both).

    Each is normalised to unit trace; ``d² = ½ Σ (√f̂1 − √f̂2)²`` is the Fréchet distance of the
    diagonal case, in [0, 1]. So the overlap is ``Σ √(f̂1 f̂2)``: 1 when the Fishers are
    proportional, 0 when no parameter matters to both. NaN if either Fisher is all zero.
    """
    a, b = f1.detach().double().flatten(), f2.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"Fishers of different sizes: {tuple(f1.shape)} and {tuple(f2.shape)}")
    for f in (a, b):
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("a Fisher must be finite and non-negative")
    ta, tb = float(a.sum()), float(b.sum())
    if ta == 0.0 or tb == 0.0:
        return math.nan
    d2 = 0.5 * float(((a / ta).sqrt() - (b / tb).sqrt()).square().sum())
    return 1.0 - d2


def layer_fishers(model: nn.Module, fisher: dict[str, Tensor]) -> dict[str, Tensor]:
    """One flat Fisher per ``Linear`` layer (its weight and bias), in forward order."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            keys = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            layers[name] = torch.cat([fisher[k].flatten() for k in keys])
    return layers


def _layer_labels(model: nn.Module) -> list[str]:
    """``"1 (784→100)"`` ... ``"out (100→10)"``: depth and shape of every Linear layer."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    labels = [f"{i + 1}" for i in range(len(linears) - 1)] + ["out"]
    return [f"{lab} ({m.in_features}→{m.out_features})" for lab, m in zip(labels, linears, strict=True)]


def _patch_task(base: Task, size: int, rng: np.random.Generator, index: int) -> Task:
    """``base`` (an unpermuted task) with one random permutation of its centred ``size²`` patch."""
    perm_seed = int(rng.integers(2**31))
    moved = {k: permute_patch(getattr(base, k), size, perm_seed) for k in ("x_train", "x_val", "x_test")}
    transform = {"kind": "patch", "size": size, "permutation_seed": perm_seed}
    return dataclasses.replace(base, name=f"patch{size}-{index}", index=index, transform=transform, **moved)


def _pair(base: Task, size: int, repeat: int, config: Config) -> dict[str, Any]:
    """Train one task pair with EWC; the per-layer overlaps and both tasks' final accuracies."""
    rng = np.random.default_rng([config.seed, size, repeat])
    tasks = [_patch_task(base, size, rng, k) for k in range(2)]
    train = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        hidden=(config.width,) * config.depth,
        lam=config.lam,
        fisher_samples=config.fisher_samples,
        eval_every=10**9,  # no learning curves: only the accuracies after each task
        curve_samples=1,
        seed=config.seed + repeat,  # the same initial weights for every patch size
        threads=config.threads,
        progress=False,
    )
    result = run_method(tasks, "ewc", train)
    model = result["model"]
    n = config.fisher_samples
    f1, f2 = (layer_fishers(model, diagonal_fisher(model, (t.x_train[:n], t.y_train[:n]))) for t in tasks)
    return {
        "overlap": [fisher_overlap(f1[name], f2[name]) for name in f1],
        "accuracy": result["accuracy_matrix"][-1],
        "labels": _layer_labels(model),
    }


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """Measure the per-layer Fisher overlap for every patch size; write the report to ``out``."""
    start = time.perf_counter()
    setup_runtime(config.seed, config.threads)
    dataset: Dataset = load_dataset("mnist-10k")
    (base,) = make_sequence(
        dataset,
        "permuted",
        1,
        seed=config.seed,
        max_train_per_task=config.train_samples,
        max_eval_per_task=config.test_samples,
    )
    overlap: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, list[list[float]]] = {}
    labels: list[str] = []
    for size in config.patch_sizes:
        pairs = [_pair(base, size, r, config) for r in range(config.repeats)]
        runs = np.array([p["overlap"] for p in pairs], dtype=float)
        overlap[str(size)] = {
            "mean": runs.mean(0).tolist(),
            "std": runs.std(0).tolist(),
            "runs": runs.tolist(),
        }
        accuracy[str(size)] = [p["accuracy"] for p in pairs]
        labels = pairs[0]["labels"]
    results = {
        "layers": labels,
        "patch_sizes": list(config.patch_sizes),
        "overlap": overlap,
        "accuracy_after_both": accuracy,
    }
    return finish(
        out,
        "overlap",
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures={"overlap.png": _figure(results)},
        findings=_findings(results),
        tables=[_table(results)],
        seconds=time.perf_counter() - start,
    )


def _findings(r: dict[str, Any]) -> list[str]:
    """Sentences from the measured overlaps: each patch size, then similar against dissimilar."""
    sizes = r["patch_sizes"]
    means = {s: np.array(r["overlap"][str(s)]["mean"]) for s in sizes}
    lines = []
    for s in sizes:
        m = means[s]
        acc = np.array(r["accuracy_after_both"][str(s)]).mean(0)
        lines.append(
            f"{s}×{s} patch: overlap {m[0]:.2f} in the first layer, {m[-1]:.2f} in the output layer "
            f"(lowest {m.min():.2f}, mean {m.mean():.2f} over {len(m)} layers); accuracy after both "
            f"tasks {100 * acc[0]:.1f}% on task 1 and {100 * acc[1]:.1f}% on task 2."
        )
    if len(sizes) < 2:
        return lines
    small, large = min(sizes), max(sizes)
    sim, dis = means[small], means[large]
    higher = int((sim > dis).sum())
    lines.append(
        f"Similar tasks ({small}×{small}) overlap more than dissimilar ones ({large}×{large}) in "
        f"{higher} of {len(sim)} layers; the gap is {sim[0] - dis[0]:.2f} in the first layer and "
        f"{sim[-1] - dis[-1]:.2f} in the output layer."
    )
    rises = dis[-1] > dis[0]
    trend = "rises" if rises else "does not rise"
    paper = "as in the paper" if rises and dis[0] < sim[0] else "unlike the paper"
    lines.append(
        f"For the dissimilar tasks the overlap {trend} from the input ({dis[0]:.2f}) to the output "
        f"({dis[-1]:.2f}), {paper}; its deepest hidden layer has {dis[-2]:.2f}."
    )
    return lines


def _table(r: dict[str, Any]) -> str:
    """Mean ± std overlap per layer (rows) and patch size (columns)."""
    sizes = r["patch_sizes"]
    header = ["layer"] + [f"{s}×{s}" for s in sizes]
    rows = [
        [label]
        + [f"{r['overlap'][str(s)]['mean'][i]:.3f} ± {r['overlap'][str(s)]['std'][i]:.3f}" for s in sizes]
        for i, label in enumerate(r["layers"])
    ]
    return md_table(header, rows)


def _figure(r: dict[str, Any]) -> Any:
    """Overlap against layer depth, one line per patch size (light: similar, dark: dissimilar)."""
    sizes = sorted(r["patch_sizes"])
    with figure_style():
        fig = new_figure((6.0, 4.0))
        ax = fig.add_subplot()
        x = np.arange(1, len(r["layers"]) + 1)
        shades = np.linspace(0.65, 0.0, len(sizes)) if len(sizes) > 1 else [0.3]
        for s, shade in zip(sizes, shades, strict=True):
            o = r["overlap"][str(s)]
            ax.errorbar(
                x, o["mean"], yerr=o["std"], marker="o", capsize=3, color=str(shade), label=f"{s}×{s} patch"
            )
        ax.set_xticks(x, [lab.split(" ")[0] for lab in r["layers"]])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer depth (input → output)")
        ax.set_ylabel("Fisher overlap")
        ax.set_title("Overlap of the two tasks' Fishers after learning both with EWC")
        ax.legend(title="pixels permuted", loc="lower right")
    return fig
