"""The task-sequence loop: train tasks one after another, evaluate every task as we go.

For each method the loop starts from the same initial weights (seeded) and visits the same data
in the same order, so methods differ only in the method. After each task it measures test
accuracy on *every* task (a row of the accuracy matrix R[i][j]); during training it measures a
fixed test subset of every task every ``eval_every`` mini-batches (the curves of the paper's
Fig. 2A, and the learning-curve area).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ewc.checks import check_counts
from ewc.data import Task
from ewc.methods import METHOD_SPECS, Batch, Method, make_method
from ewc.metrics import summarize
from ewc.scenario import SCENARIOS, Scenario

OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """Everything that defines a run besides the data and the methods."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    hidden: tuple[int, ...] = (400, 400)
    dropout: float = 0.0
    batchnorm: bool = False
    scenario: str | None = None  # task / domain / class; None: domain if tasks share classes, else class
    lam: float = 100.0
    l2_lam: float | None = None
    gamma: float = 1.0
    fisher: str = "exact"
    fisher_samples: int | None = 1000
    eval_every: int = 50
    curve_samples: int = 500
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method → its parameters
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    progress: bool | None = None  # None: a bar on a terminal, quiet otherwise

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        check_counts(self, ("epochs", "batch_size", "eval_every", "curve_samples"))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.scenario is not None and self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; expected one of {', '.join(SCENARIOS)}")
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {self.hidden!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def method_params(name: str, config: TrainConfig) -> dict[str, Any]:
    """The parameters a registered method is built with: EWC's λ, γ and Fisher settings and
    L2's λ from the config's fields, then anything in ``config.params[name]`` on top."""
    if name not in METHOD_SPECS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHOD_SPECS)}")
    params: dict[str, Any] = {}
    if name in ("ewc", "online-ewc", "ewc+replay"):
        params = {
            "lam": config.lam,
            "gamma": config.gamma,
            "fisher": config.fisher,
            "fisher_samples": config.fisher_samples,
        }
    elif name == "l2":
        params = {"lam": config.lam if config.l2_lam is None else config.l2_lam}
    return {**params, **config.params.get(name, {})}


def make_mlp(
    input_dim: int,
    hidden: tuple[int, ...],
    num_classes: int,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """The paper's fully connected classifier: Flatten, (Linear, ReLU[, Dropout]) × depth, Linear.

    With ``batchnorm`` each hidden block is Linear → BatchNorm1d → ReLU [→ Dropout] (for the
    BatchNorm experiment; the paper's networks have no normalisation).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_dim
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def setup_runtime(config: TrainConfig) -> torch.device:
    """The one place that decides threads, seeds and device for a run."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    torch.manual_seed(config.seed)
    return device


@torch.no_grad()
def accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 1000,
    scenario: Scenario | None = None,
    task: int = 0,
    seen: int | None = None,
) -> float:
    """Top-1 accuracy in eval mode (the model's training flag is restored).

    With a ``scenario``, the prediction is the argmax over the active head of ``task`` (with
    the classes of tasks up to ``seen`` in class-incremental learning).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(device))
        target = y[i : i + batch_size].to(device)
        if scenario is not None:
            out, target = scenario.view(out, target, task, seen)
        correct += int((out.argmax(-1) == target).sum())
    model.train(was)
    return correct / max(1, len(x))


def accuracies(
    model: nn.Module, parts: list[tuple[Tensor, Tensor]], scenario: Scenario, current: int
) -> list[float]:
    """Accuracy on every task's (x, y) while training task ``current`` (class-IL: the classes of
    tasks up to max(current, j) are active when evaluating task j)."""
    accs = []
    for j, (x, y) in enumerate(parts):
        accs.append(accuracy(model, x, y, scenario=scenario, task=j, seen=max(current, j)))
    return accs


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.total, self.label, self.n = total, label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()

    def update(self, k: int = 1, info: str = "") -> None:
        self.n += k
        if not self.enabled:
            return
        frac = self.n / max(1, self.total)
        bar = "#" * int(30 * frac)
        rate = self.n / max(1e-9, time.perf_counter() - self.start)
        sys.stderr.write(f"\r{self.label:<12} [{bar:<30}] {100 * frac:5.1f}% {rate:7.1f} it/s {info}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class _Curves:
    steps: list[int] = field(default_factory=list)
    accuracy: list[list[float]] = field(default_factory=list)
    task_starts: list[int] = field(default_factory=list)
    per_task: list[list[float]] = field(default_factory=list)


def run_method(
    tasks: list[Task],
    method: str | Method,
    config: TrainConfig,
    scenario: str | Scenario | None = None,
) -> dict[str, Any]:
    """Train ``method`` on ``tasks`` in order; return its accuracy matrix, curves and metrics.

    ``scenario`` (``task`` / ``domain`` / ``class``, default ``config.scenario``, else the
    natural one: domain-incremental when all tasks share their classes, class-incremental
    otherwise) decides the output layer's width and which outputs each task is trained and
    evaluated on. R[i][j] is evaluated after task i on task j's head (class-IL: the classes of
    tasks 0..max(i, j)).
    """
    if not tasks:
        raise ValueError("no tasks to train on")
    if not isinstance(scenario, Scenario):
        scenario = Scenario.for_tasks(scenario or config.scenario, [t.classes for t in tasks])
    device = setup_runtime(config)
    if isinstance(method, str):
        method = make_method(method, **method_params(method, config))
    input_dim = math.prod(tasks[0].x_train.shape[1:])
    dropout = config.dropout if method.dropout is None else method.dropout
    torch.manual_seed(config.seed)  # the same initial weights for every method
    model = make_mlp(input_dim, config.hidden, scenario.num_outputs, dropout, config.batchnorm).to(device)
    method.setup(model, scenario)

    tests = [(t.x_test.to(device), t.y_test.to(device)) for t in tasks]
    subsets = [(x[: config.curve_samples], y[: config.curve_samples]) for x, y in tests]
    baseline = [accuracy(model, x, y, scenario=scenario, task=j) for j, (x, y) in enumerate(tests)]
    curves = _Curves()
    matrix: list[list[float]] = []
    step = 0
    eval_seconds = 0.0

    def evaluate(k: int) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        accs = accuracies(model, subsets, scenario, k)
        curves.steps.append(step)
        curves.accuracy.append(accs)
        curves.per_task[k].append(accs[k])
        eval_seconds += time.perf_counter() - t0

    sizes = [method.epoch_size(i, tasks) for i in range(len(tasks))]
    total = sum(config.epochs * math.ceil(n / config.batch_size) for n in sizes)
    bar = Progress(total, method.name, config.progress)
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        method.before_task(i, task)
        data = method.train_data(i, tasks)  # (x, y), or (x, y, per-sample task ids)
        x, y = data[0], data[1]
        ids = data[2] if len(data) > 2 else None
        opt = _optimizer(config, model)  # fresh optimiser state per task
        gen = torch.Generator().manual_seed(config.seed * 10_007 + i)  # same order for every method
        curves.task_starts.append(step)
        curves.per_task.append([])
        evaluate(i)
        model.train()
        task_step = 0  # evaluation points are spaced from each task's start
        size = min(method.epoch_size(i, tasks), len(x))
        for _ in range(config.epochs):
            order = torch.randperm(len(x), generator=gen)[:size]
            for b in range(0, size, config.batch_size):
                idx = order[b : b + config.batch_size]
                if config.batchnorm and len(idx) < 2:
                    continue  # BatchNorm has no batch statistics for a single sample
                xb, yb = x[idx].to(device), y[idx].to(device)
                out = model(xb)
                which = i if ids is None else ids[idx].to(device)
                task_loss = scenario.cross_entropy(out, yb, which, seen=i)
                loss = method.loss(task_loss, Batch(xb, yb, out, i))
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"{method.name}: training diverged on task {i + 1} at step {step} "
                        f"(loss {loss.item()}); "
                        f"lower the learning rate (lr={config.lr}) or the penalty strength (lam={config.lam})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                method.after_backward()
                opt.step()
                method.after_step()
                step += 1
                task_step += 1
                if task_step % config.eval_every == 0:
                    evaluate(i)
                    model.train()
                if bar.enabled:
                    bar.update(1, f"task {i + 1}/{len(tasks)} loss {loss.item():.3f}")
        if curves.steps[-1] != step:
            evaluate(i)
        model.eval()
        method.after_task(i, task)
        t0 = time.perf_counter()
        matrix.append(accuracies(model, tests, scenario, i))
        eval_seconds += time.perf_counter() - t0
    bar.close()
    seconds = time.perf_counter() - start

    out: dict[str, Any] = {"accuracy_matrix": matrix}
    out.update(summarize(matrix, baseline, curves.per_task))
    out.update(
        {
            "seconds": seconds,
            "train_seconds": seconds - eval_seconds,
            "baseline_accuracy": baseline,
            "scenario": scenario.kind,
            "architecture": {
                "input_dim": input_dim,
                "hidden": list(config.hidden),
                "num_classes": scenario.num_outputs,
                "dropout": dropout,
                "batchnorm": config.batchnorm,
            },
            "memory_bytes": method.memory_bytes(),
            "curves": asdict(curves),
        }
    )
    out["model"] = model
    out["method"] = method
    return out


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    return torch.optim.Adam(params, lr=config.lr)
