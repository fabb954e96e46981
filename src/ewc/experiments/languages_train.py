"""One training job of ``ewc experiment languages``: a method and a seed over the languages in turn.

A job (:func:`run_job`, a pool job: a plain dict spec in, a plain dict out) builds the character LM
from its seed, measures bits per character on every language before any training (the initial
row), then for each language i: trains ``steps`` Adam steps (a fresh optimiser per language, the
gradient norm clipped at ``grad_clip``), consolidates, and measures every language's bits per
character on the evaluation words (the validation words for the λ pilot, the test words otherwise):
row i of the matrix.

The methods (one loop, ``path="library"``):

* ``finetune``: the language's words alone, nothing kept;
* ``ewc`` / ``online-ewc``: + ``ewc.EWC`` (``separate`` / ``online``, γ = ``gamma``), the Fisher of the
  word likelihood (a word is a sample, Σ over its predicted tokens) on the first ``fisher_samples``
  training words of the language, keyed by the language's name;
* ``l2``: + ``ewc.L2`` anchored at the end of each language;
* ``replay``: + the loss on ``replay_batch`` words drawn from an ``ewc.memory.Memory`` of at most
  ``memory`` words, balanced over the languages seen (each keeps a uniform subset of its words);
* ``joint``: stage i trains on the union of the training words of languages 0..i (the same number
  of steps, continuing from stage i − 1's weights): the upper reference.

Every method sees the same initial weights and, for a language, the same order of its words (a
generator seeded by the seed and the language's position); ``joint`` draws from its union.

With ``path="transformers"`` or ``"lightning"`` (:mod:`ewc.experiments.languages_paths`) the same
steps run through ``EWCTrainer`` or ``EWCCallback`` (methods ``finetune``, ``ewc``, ``online-ewc``).

With a progress folder, the job's state is saved there after every language (model, penalty,
memory, rows so far; atomically) and, once it ends, its record as JSON in place of the state, under
a name derived from all of its settings: the same job again resumes after its last finished
language, or returns its record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ewc.data.words import PAD, WordTask, encode_batch, load_languages
from ewc.experiments.languages_model import bits_per_char, build_lm, lm_loss, resolve_model
from ewc.memory import Memory
from ewc.penalty import EWC, L2
from ewc.runtime import torch_threads
from ewc.state import atomic_save, atomic_write_bytes, json_digest, safe_load

__all__ = [
    "METHODS",
    "PATHS",
    "PATH_METHODS",
    "data_digest",
    "data_order",
    "fisher_batches",
    "load_tasks",
    "make_optimizer",
    "make_regularizer",
    "run_job",
]

METHODS = ("finetune", "ewc", "online-ewc", "l2", "replay", "joint")
PATHS = ("library", "transformers", "lightning")
PATH_METHODS = ("finetune", "ewc", "online-ewc")  # what the integration paths run
LAMBDA_METHODS = ("ewc", "online-ewc", "l2")  # the methods with a λ
FORMAT = "ewc.languages/1"

# the data settings (what load_tasks reads) and the rest of a job's settings
DATA_KEYS = ("languages", "dict_dir", "train_words", "val_words", "test_words", "max_length", "split_seed")

_TASKS: dict[str, tuple[int, list[WordTask], str]] = {}  # one process's loaded languages, by settings


def load_tasks(settings: dict[str, Any]) -> tuple[int, list[WordTask]]:
    """(vocabulary size, one WordTask per language) for a job's data settings (loaded once per process)."""
    vocab_size, tasks, _ = _loaded(settings)
    return vocab_size, tasks


def data_digest(settings: dict[str, Any]) -> str:
    """A digest of the words a job reads (every split of every language, encoded): a word list
    changed on disk between two sessions makes other jobs, not a mix of old and new."""
    return _loaded(settings)[2]


def _loaded(settings: dict[str, Any]) -> tuple[int, list[WordTask], str]:
    key = json_digest({k: settings[k] for k in DATA_KEYS})
    if key not in _TASKS:
        vocab, tasks = load_languages(
            settings["languages"],
            settings["dict_dir"],
            train=settings["train_words"],
            val=settings["val_words"],
            test=settings["test_words"],
            max_length=settings["max_length"],
            seed=settings["split_seed"],
        )
        _TASKS.clear()
        words = [[t.name, t.train, t.val, t.test] for t in tasks]
        _TASKS[key] = (len(vocab), tasks, json_digest([len(vocab), words]))
    return _TASKS[key]


def task_generator(seed: int, task: int, stream: int) -> torch.Generator:
    """A generator for one use (``stream``: 0 data order, 1 Fisher labels) of one language of a seed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * task + 104_729 * stream)


def data_order(n: int, steps: int, batch: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` batches of ``batch`` indices into ``n`` words: seeded permutations, one after another."""
    flat: list[int] = []
    while len(flat) < steps * batch:
        flat += torch.randperm(n, generator=generator).tolist()
    return [flat[s * batch : (s + 1) * batch] for s in range(steps)]


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimiser of every path: Adam over all parameters (fresh for each language)."""
    return torch.optim.Adam(model.parameters(), lr=lr)


def make_regularizer(method: str, model: nn.Module, lam: float | None, s: dict[str, Any]) -> EWC | L2 | None:
    """The penalty of ``method`` (None for those without one)."""
    if method in ("ewc", "online-ewc"):
        mode = "online" if method == "online-ewc" else "separate"
        return EWC(
            model, lam=lam, mode=mode, gamma=s["gamma"], fisher=s["fisher"], batch_size=s["fisher_batch"]
        )
    if method == "l2":
        return L2(model, lam=lam)
    if method == "finetune" and s["path"] != "library":
        return EWC(model, lam=0.0, fisher=s["fisher"], batch_size=s["fisher_batch"])  # never consolidated
    return None


def fisher_batches(words: Sequence[Sequence[int]], s: dict[str, Any]) -> list[dict[str, Tensor]]:
    """The Fisher's data: the first ``fisher_samples`` words, batches of ``fisher_batch``."""
    words = list(words[: s["fisher_samples"]])
    size = s["fisher_batch"]
    return [encode_batch(words[i : i + size]) for i in range(0, len(words), size)]


def memory_rows(words: Sequence[Sequence[int]], length: int) -> Tensor:
    """Encoded words as rows of ``length`` token ids, padded with PAD (the memory's fixed shape)."""
    rows = torch.full((len(words), length), PAD, dtype=torch.long)
    for i, w in enumerate(words):
        rows[i, : len(w)] = torch.as_tensor(w)
    return rows


def library_task(
    model: nn.Module,
    words: Sequence[Sequence[int]],
    order: list[list[int]],
    reg: EWC | L2 | None,
    memory: Memory | None,
    s: dict[str, Any],
) -> None:
    """Train on ``words`` in ``order``: loss (+ replayed words' loss) (+ penalty), clip, Adam step."""
    optimizer = make_optimizer(model, s["lr"])
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for idx in order:
        loss = lm_loss(model, encode_batch([words[k] for k in idx]))
        if memory is not None and len(memory):
            rows = memory.sample(s["replay_batch"])[0]
            loss = loss + lm_loss(model, encode_batch([r[r != PAD].tolist() for r in rows]))
        if reg is not None and reg.num_tasks:
            loss = loss + reg.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        optimizer.step()


def evaluate(model: nn.Module, tasks: Sequence[WordTask], split: str) -> list[float]:
    """Bits per character on every language's ``split`` words."""
    return [bits_per_char(model, t.split(split)) for t in tasks]


def job_tag(spec: dict[str, Any]) -> str:
    """The name of a job's progress files: a digest of everything it computes with (the model that
    ``auto`` resolves to here and the words read included)."""
    s = spec["settings"]
    computed = [resolve_model(s["model"]), data_digest(s)]
    return json_digest([FORMAT, spec["method"], spec["seed"], spec["lam"], spec["split"], s, computed])


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method and seed over the languages (see the module docstring); its record."""
    s = spec["settings"]
    progress = Path(spec["progress"]) if spec.get("progress") else None
    tag = job_tag(spec)
    if progress is not None and (progress / f"{tag}.json").exists():
        done = progress / f"{tag}.json"
        try:
            return json.loads(done.read_text())
        except ValueError:
            raise ValueError(
                f"corrupt progress file {str(done)!r}: delete it to run that job again"
            ) from None
    with torch_threads(s["threads"]):
        return _train(spec, progress, tag)


def _train(spec: dict[str, Any], progress: Path | None, tag: str) -> dict[str, Any]:
    s, method, seed = spec["settings"], spec["method"], spec["seed"]
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    vocab_size, tasks = load_tasks(s)
    kind = resolve_model(s["model"])
    model = build_lm(
        kind,
        vocab_size,
        n_positions=s["max_length"] + 2,
        n_embd=s["n_embd"],
        n_layer=s["n_layer"],
        n_head=s["n_head"],
        seed=seed,
    )
    reg = make_regularizer(method, model, spec["lam"], s)
    memory = Memory(s["memory"], "balanced", "task", seed) if method == "replay" else None
    partial = progress / f"{tag}.pt" if progress is not None else None
    done, rows, spent = 0, [], {"seconds": 0.0, "cpu_seconds": 0.0}
    if partial is not None and partial.exists():
        state = safe_load(partial)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{str(partial)!r} is not a saved {FORMAT} job: delete it to run that job again")
        model.load_state_dict(state["model"])
        if reg is not None:
            reg.load_state_dict(state["reg"])
        if memory is not None:
            memory.load_state_dict(state["memory"])
        done, rows, initial, spent = state["done"], state["rows"], state["initial"], state["spent"]
    else:
        initial = evaluate(model, tasks, spec["split"])
    for i in range(done, len(tasks)):
        words = [w for t in tasks[: i + 1] for w in t.train] if method == "joint" else tasks[i].train
        order = data_order(len(words), s["steps"], s["batch_size"], task_generator(seed, i, 0))
        fisher = fisher_batches(tasks[i].train, s)
        if s["path"] == "library":
            library_task(model, words, order, reg, memory, s)
            if isinstance(reg, EWC):
                reg.consolidate(
                    fisher, key=tasks[i].name, generator=task_generator(seed, i, 1), shift_labels=True
                )
            elif isinstance(reg, L2):
                reg.consolidate(key=tasks[i].name)
            if memory is not None:
                train = tasks[i].train
                memory.add(memory_rows(train, s["max_length"] + 2), torch.full((len(train),), i), i)
        else:
            from ewc.experiments.languages_paths import PATH_TASKS

            assert isinstance(reg, EWC)
            ordered = [words[k] for idx in order for k in idx]
            key = tasks[i].name if method != "finetune" else None
            PATH_TASKS[s["path"]](model, reg, ordered, tasks[i].train[: s["fisher_samples"]], s, key, seed, i)
        rows.append(evaluate(model, tasks, spec["split"]))
        if partial is not None:
            now = _spent(spent, start_wall, start_cpu)
            state = {"format": FORMAT, "done": i + 1, "rows": rows, "initial": initial, "spent": now}
            state["model"] = model.state_dict()
            state["reg"] = reg.state_dict() if reg is not None else {}
            state["memory"] = memory.state_dict() if memory is not None else {}
            atomic_save(state, partial)
    record = {
        "method": method,
        "seed": seed,
        "lam": spec["lam"],
        "split": spec["split"],
        "path": s["path"],
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "initial": initial,
        "matrix": rows,
        **_spent(spent, start_wall, start_cpu),
    }
    if progress is not None and partial is not None:
        atomic_write_bytes(progress / f"{tag}.json", json.dumps(record).encode())
        partial.unlink(missing_ok=True)  # the record replaces the saved state
    return record


def _spent(before: dict[str, float], wall: float, cpu: float) -> dict[str, float]:
    """Wall and process CPU seconds of the job so far (earlier sessions of a resumed job included)."""
    return {
        "seconds": before["seconds"] + time.perf_counter() - wall,
        "cpu_seconds": before["cpu_seconds"] + time.process_time() - cpu,
    }
