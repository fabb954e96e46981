"""The training jobs of ``ewc run`` / ``ewc compare`` and of the experiments with a sequence inside:
one job is one method trained on one task sequence (on its validation or its test parts), run
in this process, in local workers or on a Ray cluster (:mod:`ewc.executors`), saved and resumed
under a name derived from all of its settings."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ewc.data import TaskSequence, load_data, make_sequence, validation_tasks
from ewc.data.custom import file_sha256, is_npz_path
from ewc.executors import Executor, make_executor
from ewc.experiments.common import write_json
from ewc.experiments.detached import run_detached
from ewc.methods import METHOD_SPECS
from ewc.models import model_name, resolve_model
from ewc.scenario import Scenario
from ewc.state import json_digest
from ewc.train import TrainConfig, method_params, run_method

__all__ = [
    "build_tasks",
    "check_model_for_workers",
    "clear_caches",
    "job_files",
    "job_tag",
    "run_all",
    "task_records",
    "validation_tasks",
]


def _job(spec: tuple) -> dict[str, Any]:
    """One training run, in this process or a worker: (data key, method, config, on_validation
    [, checkpoint path, progress folder[, options]]); the data key is (sequence, data, tasks, max train per
    task, data root[, the first tasks to train on]). With a checkpoint path the trained learner is saved there
    (ewc.checkpoint); with a progress folder the run is saved there after a task (SaveSchedule) and its
    result when it ends, both under a name derived from all of the job's settings, so that the
    same job run again (after a kill) resumes or returns the finished result. ``options``:
    ``prefix`` (a file of the state after the first task shared by the runs that differ only in
    the strength), ``validation`` (also score on the validation parts), ``defer_tests`` (a
    folder for the weights to test later), see :func:`ewc.train.run_method`, and ``resume``
    (False: no progress saved within the run, a short one that is cheaper to redo; its result
    is still kept)."""
    (sequence, data, n_tasks, max_train, data_root, *first), method, config, on_val, *rest = spec
    save, progress, options = (*rest, None, None, None)[:3]
    options = options or {}
    if progress is not None:
        finished, partial = job_files(spec)
        if finished.exists() and (save is None or Path(save).exists()):
            return json.loads(finished.read_text())
        Path(progress).mkdir(parents=True, exist_ok=True)
    tasks, _ = build_tasks(sequence, data, n_tasks, config.seed, max_train, data_root)
    scenario = Scenario.for_tasks(config.scenario, [t.classes for t in tasks]) if first else None
    run_on = validation_tasks(tasks) if on_val else tasks
    if first:  # the first tasks only (a search's screen), with the whole sequence's output layer
        run_on = run_on[: first[0]]
    res = run_method(
        run_on,
        method,
        config,
        scenario,
        progress=partial if progress and options.get("resume", True) else None,
        prefix=options.get("prefix"),
        validation=bool(options.get("validation")),
        defer_tests=options.get("defer_tests"),
    )
    model, learner = res.pop("model"), res.pop("method")
    if save is not None:
        from ewc.checkpoint import save_checkpoint

        params, arch = method_params(method, config), res["architecture"]
        save_checkpoint(
            save, model, learner, name=method, params=params, scenario=learner.scenario, architecture=arch
        )
    if progress is not None:
        write_json(res, finished)
        partial.unlink(missing_ok=True)
    return res


def job_files(spec: tuple) -> tuple[Path, Path]:
    """The (result, progress after a task) files of a job with a progress folder."""
    folder, tag = Path(spec[5]), job_tag(*spec[:4], spec[6] if len(spec) > 6 else None)
    return folder / f"{tag}.json", folder / f"{tag}.pt"


def job_tag(key: tuple, method: str, config: TrainConfig, on_val: bool, options: dict | None = None) -> str:
    """``METHOD-val|test-DIGEST``: the digest covers the data key, the method, every setting
    the job runs with (progress display excepted) and which ``options`` it has (a shared prefix,
    validation scoring: the result records them)."""
    settings = {k: v for k, v in config.to_dict().items() if k != "progress"}
    data = key[1]
    file = [file_sha256(data)] if is_npz_path(data) else []  # a file's contents, not only its name
    flags = sorted(k for k, v in (options or {}).items() if v)
    digest = json_digest([list(key), method, settings, on_val, *file, *([flags] if flags else [])])
    return f"{method}-{'val' if on_val else 'test'}-{digest[:16]}"


_TASK_CACHE: dict[tuple, tuple[TaskSequence, int]] = {}
#: the last registered dataset loaded (sequences of it with other sizes, e.g. the screen of a λ
#: search, are made without reading it again); a .npz file is read again each time
_DATA_CACHE: dict[tuple, Any] = {}


def task_records(
    sequence: str, data: str, n_tasks: int, seed: int, max_train: int | None, data_root: str | None
) -> list[dict[str, Any]]:
    """What results.json says of each task: its name, classes and the sizes of its parts."""
    tasks, _ = build_tasks(sequence, data, n_tasks, seed, max_train, data_root)
    parts = lambda t: {"n_train": len(t.y_train), "n_val": len(t.y_val), "n_test": len(t.y_test)}  # noqa: E731
    return [{"name": t.name, "classes": list(t.classes), **parts(t)} for t in tasks]


def build_tasks(
    sequence: str, data: str, n_tasks: int, seed: int, max_train: int | None, data_root: str | None
) -> tuple[TaskSequence, int]:
    """The task sequence (its tasks built when read) and the number of classes (once per process;
    :func:`clear_caches` forgets them)."""
    key = (sequence, data, n_tasks, seed, max_train, data_root)
    if key not in _TASK_CACHE:
        _TASK_CACHE.clear()
        if is_npz_path(data) or (data, data_root) not in _DATA_CACHE:
            _DATA_CACHE.clear()
            _DATA_CACHE[(data, data_root)] = load_data(data, root=data_root)
        dataset = _DATA_CACHE[(data, data_root)]
        tasks = make_sequence(dataset, sequence, n_tasks, seed=seed, max_train_per_task=max_train)
        _TASK_CACHE[key] = (tasks, dataset.num_classes)
    return _TASK_CACHE[key]


def clear_caches() -> None:
    """Forget the sequence and the dataset kept by :func:`build_tasks` (their memory goes back)."""
    _TASK_CACHE.clear()
    _DATA_CACHE.clear()


def check_model_for_workers(config: TrainConfig, jobs: int) -> None:
    """A ValueError for a model factory given as a function that ``jobs`` > 1 workers cannot import
    (they rebuild it from its ``module:name``: a lambda or a nested function has none)."""
    if jobs > 1 and callable(config.model):
        name = model_name(config.model)
        try:
            same = resolve_model(name) is config.model
        except ValueError:
            same = False
        if not same:
            raise ValueError(
                f"the model factory {name} cannot be imported by name, which --jobs {jobs} workers need: "
                "define it at the top level of a module, or run with jobs=1"
            )


def run_all(
    specs: list[tuple], jobs: int, out: str | os.PathLike | None = None, executor: Executor | None = None
) -> list[dict[str, Any]]:
    """Run independent training jobs, ``jobs`` at a time, on ``executor`` (local workers by default).

    Every run is seeded and uses its config's thread count (``--threads``, 1 by default) wherever
    it runs, so the results depend neither on ``jobs`` nor on the executor; ``jobs`` local workers
    use ``jobs × threads`` cores. With ``out``, jobs given without a progress folder save theirs in
    ``OUT/progress`` (see :func:`_job`): the experiment run again after a kill resumes them (on
    workers that do not see ``out``, :mod:`ewc.experiments.detached`).
    """
    folder = Path(out) / "progress" if out is not None else None
    specs = [(*s, None, folder) if len(s) == 4 else s for s in specs]
    executor, cpus = executor or make_executor(), max((s[2].threads or 1 for s in specs), default=1)
    # workers draw no bar (they share the terminal): a line on stderr as each job ends instead
    tell = (
        _ended(specs)
        if jobs > 1 and len(specs) > 1 and any(s[2].progress is not False for s in specs)
        else None
    )
    if executor.shares_files:
        return executor.run(_job, specs, jobs, cpus=cpus, for_workers=_no_progress, on_result=tell)
    return run_detached(
        executor, _job, specs, jobs, cpus=cpus, for_workers=_no_progress, files=job_files, on_result=tell
    )


def _ended(specs: list[tuple]) -> Callable[[int, dict[str, Any]], None]:
    """``on_result`` that prints ``[k/n] method [strength=value] [(validation)]: ACC …, … s`` on
    stderr as each job ends (the strength names a --lam auto run's or a grid's value)."""
    ended = [0]

    def tell(i: int, res: dict[str, Any]) -> None:
        ended[0] += 1
        method, config = specs[i][1], specs[i][2]
        strength = METHOD_SPECS[method].strength if method in METHOD_SPECS else None
        value = method_params(method, config).get(strength) if strength else None
        where = (f" {strength}={value:g}" if isinstance(value, int | float) else "") + (
            " (validation)" if specs[i][3] else ""
        )
        acc, seconds = res["average_accuracy"], res["seconds"]
        if acc is None:  # tests deferred: its validation ACC
            acc, where = res["validation_acc"], where + " (validation)"
        print(f"[{ended[0]}/{len(specs)}] {method}{where}: ACC {acc:.3f}, {seconds:.1f} s", file=sys.stderr)

    return tell


def _no_progress(spec: tuple) -> tuple:
    """A job spec as a worker runs it: no progress bar (workers share the caller's terminal)."""
    key, method, config, *rest = spec
    return (key, method, dataclasses.replace(config, progress=False), *rest)
