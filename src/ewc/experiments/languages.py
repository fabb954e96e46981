"""Languages one after another: a character-level GPT-2-style model on Debian's word lists.

One task per language (``/usr/share/dict``: ``apt-get install wamerican wngerman wfrench wspanish
witalian wportuguese wdutch wswedish``; reading, normalisation and splits in
:mod:`ewc.data.words`). A small causal transformer (:mod:`ewc.experiments.languages_model`: Hugging
Face's GPT-2 built from a ``GPT2Config``, or one of the same width, depth and heads in plain
PyTorch) learns to spell the words of each language in turn; each language's held-out words
measure bits per character. The methods (fine-tuning, EWC, online EWC, L2, replay, joint
training; :mod:`ewc.experiments.languages_train`) start from the same weights and see the same
words in the same order.

1. λ of EWC, online EWC and L2 is chosen by a pilot on the validation words (never the test words):
   one run per λ of the grid with ``seed`` (the pilot's seed, 0 by default); the λ with the lowest
   bits per character averaged over all languages after the last one wins (ties: the smaller λ). A
   grid of one value is used as is.
2. Every method runs with every seed; the test words give the matrix R[i][j], bits per character on
   language j after training language i (plus the untrained model's row), and from it the metrics
   (:func:`bpc_metrics`) and the gap each method closes between fine-tuning and joint training.

``--path transformers`` / ``--path lightning`` run the same steps through ``EWCTrainer`` /
``EWCCallback`` (:mod:`ewc.experiments.languages_paths`), to be compared with the library path.
With ``--out`` every job saves its state after each language under ``OUT/progress``: the same
command again resumes after the last finished language of every job.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewc.checks import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    THREADS,
    Interval,
    Numbers,
    Subset,
)
from ewc.config import validate
from ewc.data.words import DICT_DIR, LANGUAGES, language_file
from ewc.experiments.common import finish, param
from ewc.experiments.languages_model import MODELS, resolve_model
from ewc.experiments.languages_report import LABELS, figures, findings, tables
from ewc.experiments.languages_train import LAMBDA_METHODS, METHODS, PATH_METHODS, PATHS, run_job
from ewc.fisher import FISHER_MODES
from ewc.pool import run_jobs

NAME = "languages"
TITLE = "Languages one after another: a character-level GPT-2 on Debian's word lists"
CLAIM = (
    "EWC protects the weights that matter for earlier tasks (Kirkpatrick et al. 2017): learning a new "
    "task by plain fine-tuning overwrites what the earlier tasks needed, while EWC keeps most of the "
    "earlier performance and still learns the new task."
)

DEFAULT_LANGUAGES = ("english", "german", "french", "swedish")

#: the smallest settings that still exercise every part of the experiment (contract tests)
SMALLEST = {
    "languages": ("english", "swedish"),
    "train_words": 300,
    "val_words": 50,
    "test_words": 50,
    "n_embd": 16,
    "n_layer": 1,
    "n_head": 2,
    "steps": 8,
    "batch_size": 16,
    "lam_grid": (1.0, 100.0),
    "online_lam_grid": (10.0,),
    "l2_lam_grid": (0.1,),
    "fisher_samples": 40,
    "fisher_batch": 20,
    "memory": 40,
    "replay_batch": 8,
    "seeds": (0,),
    "jobs": 1,
}


@dataclass
class Config:
    """The languages and their words, the model, the training, the methods and their λ grids."""

    languages: tuple[str, ...] = param(
        DEFAULT_LANGUAGES,
        f"languages in training order, from: {', '.join(LANGUAGES)}",
        check=Subset(tuple(LANGUAGES)),
    )
    dict_dir: str = param(DICT_DIR, "folder with Debian's word lists (american-english, ngerman, ...)")
    train_words: int = param(
        20_000, "training words per language (0: all that are left)", check=NON_NEGATIVE_INT
    )
    val_words: int = param(1_000, "validation words per language (the λ pilot)", check=POSITIVE_INT)
    test_words: int = param(
        2_000, "test words per language (the reported bits per character)", check=POSITIVE_INT
    )
    max_length: int = param(24, "longest word kept, in characters", check=Interval(int, 1, 1000))
    split_seed: int = param(0, "seed of the train/validation/test split of every language", check=SEED)
    model: str = param(
        "auto", "gpt2 (transformers' GPT2LMHeadModel), own (plain PyTorch), auto", choices=MODELS
    )
    n_embd: int = param(64, "model width", check=POSITIVE_INT)
    n_layer: int = param(2, "transformer blocks", check=POSITIVE_INT)
    n_head: int = param(4, "attention heads (must divide n_embd)", check=POSITIVE_INT)
    steps: int = param(400, "optimizer steps per language", check=POSITIVE_INT)
    batch_size: int = param(64, "words per step", check=POSITIVE_INT)
    lr: float = param(3e-3, "Adam's learning rate (constant; a fresh Adam per language)", check=POSITIVE)
    grad_clip: float = param(1.0, "largest gradient norm per step (0: no clipping)", check=NON_NEGATIVE)
    methods: tuple[str, ...] = param(METHODS, f"methods, from: {', '.join(METHODS)}", check=Subset(METHODS))
    lam_grid: tuple[float, ...] = param(
        (1.0, 3.0, 10.0, 30.0),
        "EWC's λ: chosen on validation words (one value: used as is)",
        check=Numbers(POSITIVE),
    )
    online_lam_grid: tuple[float, ...] = param(
        (1.0, 3.0, 10.0, 30.0), "online EWC's λ, chosen the same way", check=Numbers(POSITIVE)
    )
    l2_lam_grid: tuple[float, ...] = param(
        (0.03, 0.1, 0.3), "L2's λ, chosen the same way", check=Numbers(POSITIVE)
    )
    gamma: float = param(
        1.0, "online EWC's decay of the old Fisher", check=Interval(float, 0, 1, closed="right")
    )
    fisher: str = param(
        "sample", "Fisher: labels sampled from the model, true labels, or exact", choices=FISHER_MODES[:3]
    )
    fisher_samples: int = param(1_000, "training words per language for the Fisher", check=POSITIVE_INT)
    fisher_batch: int = param(250, "words per Fisher batch", check=POSITIVE_INT)
    memory: int = param(2_000, "replay: words kept, balanced over the languages seen", check=POSITIVE_INT)
    replay_batch: int = param(32, "replay: stored words replayed per step", check=POSITIVE_INT)
    seed: int = param(0, "seed of the λ pilot's runs on the validation words", check=SEED)
    seeds: tuple[int, ...] = param(
        (0, 1, 2),
        "seeds of the reported runs (initial weights, word order, Fisher labels, memory)",
        check=Numbers(SEED, distinct=True),
    )
    path: str = param(
        "library", "run through the library loop, EWCTrainer or the Lightning EWCCallback", choices=PATHS
    )
    threads: int = param(1, "torch threads per job", check=THREADS)
    jobs: int = param(2, "jobs in parallel worker processes", check=POSITIVE_INT)

    def __post_init__(self) -> None:
        self.languages = tuple(self.languages)
        self.methods = tuple(self.methods)
        self.seeds = tuple(self.seeds)
        for name in ("lam_grid", "online_lam_grid", "l2_lam_grid"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        validate(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.path == "transformers" and self.model == "own":
            raise ValueError("--path transformers trains transformers' GPT-2: --model gpt2 or auto, not own")
        if self.path != "library" and not set(self.methods) <= set(PATH_METHODS):
            other = sorted(set(self.methods) - set(PATH_METHODS))
            raise ValueError(
                f"--path {self.path} runs {', '.join(PATH_METHODS)} only, not {', '.join(other)}"
            )


def settings(config: Config) -> dict[str, Any]:
    """A job's settings: every field that changes what a job computes (not the grids, seeds, jobs)."""
    skip = {"methods", "lam_grid", "online_lam_grid", "l2_lam_grid", "seed", "seeds", "jobs"}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    values["languages"] = list(config.languages)
    return values


def grids(config: Config) -> dict[str, tuple[float, ...]]:
    """λ grid of each method of the run that has a λ."""
    every = {"ewc": config.lam_grid, "online-ewc": config.online_lam_grid, "l2": config.l2_lam_grid}
    return {m: every[m] for m in LAMBDA_METHODS if m in config.methods}


def bpc_metrics(matrix: Sequence[Sequence[float]], initial: Sequence[float]) -> dict[str, float]:
    """The run's numbers from its bits-per-character matrix R (lower is better):

    * ``final``: mean over languages of R[T−1][j], after the last language;
    * ``learned``: mean of R[j][j], each language just after training on it (plasticity);
    * ``forgetting``: mean over j < T−1 of R[T−1][j] − R[j][j] (bits per character lost since);
    * ``first_rise``: R[T−1][0] − R[0][0], the first language's part of it;
    * ``transfer``: mean over j ≥ 1 of initial[j] − R[j−1][j] (bits gained on language j before
      training on it, from the earlier languages).
    """
    T = len(matrix)
    last = matrix[-1]
    earlier = range(T - 1)
    return {
        "final": statistics.fmean(last),
        "learned": statistics.fmean(matrix[j][j] for j in range(T)),
        "forgetting": statistics.fmean(last[j] - matrix[j][j] for j in earlier) if T > 1 else 0.0,
        "first_rise": last[0] - matrix[0][0],
        "transfer": statistics.fmean(initial[j] - matrix[j - 1][j] for j in range(1, T)) if T > 1 else 0.0,
    }


def gap_closed(value: float, finetune: float, joint: float) -> float:
    """How much of the gap between fine-tuning and joint training a method closes: 0 at fine-tuning's
    value, 1 at joint's (NaN when there is no gap)."""
    gap = finetune - joint
    return (finetune - value) / gap if gap > 0 else float("nan")


def choose(grid: Sequence[float], scores: Sequence[float]) -> float:
    """The λ with the lowest validation bits per character (ties: the smaller λ)."""
    return min(zip(scores, grid, strict=True), key=lambda p: (p[0], p[1]))[1]


def check_extras(config: Config) -> None:
    """A one-line ValueError naming what to install when the run's model or path needs a missing
    extra (``--model auto`` needs none: it falls back to ``own``)."""
    kind = resolve_model(config.model)
    if config.path == "transformers" and kind != "gpt2":
        raise ValueError("--path transformers needs transformers: pip install 'ewc[transformers]'")
    needs = {"lightning": ("lightning", "lightning")} if config.path == "lightning" else {}
    if kind == "gpt2":
        needs["transformers"] = ("transformers", "transformers")
    for what, (module, extra) in needs.items():
        if importlib.util.find_spec(module) is None:
            flag = (
                "--model gpt2"
                if what == "transformers" and config.path != "transformers"
                else f"--path {config.path}"
            )
            raise ValueError(f"{flag} needs {module}: pip install 'ewc[{extra}]'")


def run(config: Config, out: str | None = None) -> dict[str, Any]:
    """The pilot on validation words, then every method × seed on the test words; the report."""
    start = time.perf_counter()
    for name in config.languages:  # a missing word list or extra fails here, before any job starts
        language_file(name, config.dict_dir)
    check_extras(config)
    progress = str(Path(out) / "progress") if out is not None else None
    if progress is not None:
        Path(progress).mkdir(parents=True, exist_ok=True)
    s = settings(config)

    def spec(method: str, seed: int, lam: float | None, split: str) -> dict[str, Any]:
        return {
            "settings": s,
            "method": method,
            "seed": seed,
            "lam": lam,
            "split": split,
            "progress": progress,
        }

    # 1. the pilot: λ on the validation words, the pilot's seed
    searched = {m: g for m, g in grids(config).items() if len(g) > 1}
    pilot = [spec(m, config.seed, lam, "val") for m, g in searched.items() for lam in g]
    scores = iter(run_jobs(run_job, pilot, config.jobs))
    selection = {}
    for m, g in searched.items():
        runs = [next(scores) for _ in g]
        bpc = [bpc_metrics(r["matrix"], r["initial"])["final"] for r in runs]
        selection[m] = {"grid": list(g), "validation_bpc": bpc, "chosen": choose(g, bpc), "seed": config.seed}
        selection[m]["cpu_seconds"] = sum(r["cpu_seconds"] for r in runs)
    lams = {m: selection[m]["chosen"] if m in selection else g[0] for m, g in grids(config).items()}

    # 2. every method and seed on the test words
    specs = [spec(m, seed, lams.get(m), "test") for m in config.methods for seed in config.seeds]
    records = iter(run_jobs(run_job, specs, config.jobs))
    methods: dict[str, Any] = {}
    for m in config.methods:
        runs = [next(records) for _ in config.seeds]
        for r in runs:
            r["metrics"] = bpc_metrics(r["matrix"], r["initial"])
        methods[m] = {"label": LABELS[m], "lam": lams.get(m), "runs": runs, **_summary(runs)}
    _add_gaps(methods)
    first = methods[config.methods[0]]["runs"][0]
    results = {
        "results": {
            "languages": list(config.languages),
            "model": first["model"],
            "parameters": first["parameters"],
            "path": config.path,
            "selection": selection,
            "methods": methods,
            "cpu_seconds": sum(r["cpu_seconds"] for m in methods.values() for r in m["runs"])
            + sum(v["cpu_seconds"] for v in selection.values()),
        }
    }
    return finish(
        out,
        NAME,
        config,
        results,
        title=TITLE,
        claim=CLAIM,
        figures=figures(results["results"]) if out is not None else {},
        findings=findings(results["results"]),
        tables=tables(results["results"]),
        seconds=time.perf_counter() - start,
    )


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean matrix and initial row over seeds, and each metric's mean and standard deviation."""
    T = len(runs[0]["matrix"])
    mean = [[statistics.fmean(r["matrix"][i][j] for r in runs) for j in range(T)] for i in range(T)]
    metrics = {k: [r["metrics"][k] for r in runs] for k in runs[0]["metrics"]}
    return {
        "matrix": mean,
        "initial": [statistics.fmean(r["initial"][j] for r in runs) for j in range(T)],
        "mean": {k: statistics.fmean(v) for k, v in metrics.items()},
        "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in metrics.items()},
    }


def _add_gaps(methods: dict[str, Any]) -> None:
    """Per seed, the gap each method closes between fine-tuning and joint training (final bits per
    character over all languages, and on the first language), when both references ran."""
    if "finetune" not in methods or "joint" not in methods:
        return
    ft, joint = methods["finetune"]["runs"], methods["joint"]["runs"]
    for entry in methods.values():
        gaps: dict[str, list[float]] = {"final": [], "first": []}
        for r, f, j in zip(entry["runs"], ft, joint, strict=True):
            gaps["final"].append(
                gap_closed(r["metrics"]["final"], f["metrics"]["final"], j["metrics"]["final"])
            )
            gaps["first"].append(gap_closed(r["matrix"][-1][0], f["matrix"][-1][0], j["matrix"][-1][0]))
        entry["gap_closed"] = gaps
