"""The stream system's acceptance measurements (issue #6), in one reproducible run.

    python scripts/stream_acceptance.py --out docs/runs/stream-acceptance [--jobs 2]

1. Task identification on permuted and split mnist-10k streams (5 tasks, schedule with 4 returns,
   segments of 20-60 batches of 32, stream seeds 0-9), the detector fed inputs and labels as
   ``StreamLearner`` feeds it: assignment accuracy, delays, false alarms (pooled and worst stream).
2. Learning: ``ewc stream`` defaults (EWC with inferred ids, EWC given the true ids, plain SGD) on
   permuted and split streams, seeds 0-4: final mean test accuracy of each.
3. A long stationary segment (2 000 batches of one task) and two noise streams (a new noise
   distribution every batch; a new one every 2 batches, which must hit the cap with a warning).

Writes ``results.json`` into ``--out`` and prints the tables (markdown).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ewc.data import load_dataset, make_sequence
from ewc.experiments.stream import Config, run
from ewc.state import atomic_write_bytes
from ewc.taskid import TaskCapWarning, TaskDetector
from ewc.taskid_eval import assignment_metrics, make_stream

SCHEDULE = [0, 1, 2, 0, 3, 1, 4, 2, 0]
KINDS = ("permuted", "split")


def identification() -> dict:
    ds = load_dataset("mnist-10k")
    out = {}
    for kind in KINDS:
        tasks = make_sequence(ds, kind, 5, seed=0)
        ms = []
        for seed in range(10):
            batches, true = make_stream(tasks, SCHEDULE, 32, seed=seed, min_len=20, max_len=60)
            det = TaskDetector()
            ms.append(assignment_metrics(true, [det.update(x, y) for x, y in batches], 32))
        samples = sum(m["n_batches"] for m in ms) * 32
        out[kind] = {
            "streams": len(ms),
            "samples": samples,
            "accuracy_mean": float(np.mean([m["accuracy"] for m in ms])),
            "accuracy_min": min(m["accuracy"] for m in ms),
            "mean_delay_max": max(m["mean_delay"] for m in ms),
            "max_delay": max(m["max_delay"] for m in ms),
            "false_alarms_per_10k_pooled": sum(m["false_alarms"] for m in ms) * 1e4 / samples,
            "false_alarms_per_10k_worst": max(m["false_alarms_per_10k"] for m in ms),
            "tasks_found": sorted({m["tasks_found"] for m in ms}),
            "split_tasks": sum(m["split_tasks"] for m in ms),
        }
    return out


def learning_one(args: tuple[str, int]) -> dict:
    kind, seed = args
    record = run(Config(sequence=kind, seed=seed, threads=1))
    by = {r["label"]: float(np.mean(r["test_accuracy"])) for r in record["learners"]}
    return {"kind": kind, "seed": seed, "assignment": record["assignment"]["accuracy"], "final": by}


def stationary_and_noise() -> dict:
    ds = load_dataset("mnist-10k")
    out: dict = {}
    for kind in KINDS:
        tasks = make_sequence(ds, kind, 5, seed=0)
        batches, _ = make_stream(tasks[1:2], [0], 32, seed=0, min_len=2000, max_len=2000)
        det = TaskDetector()
        ids = [det.update(x, y) for x, y in batches]
        out[f"stationary_{kind}"] = {
            "batches": len(ids),
            "ids": sorted(set(ids)),
            "id_changes": sum(a != b for a, b in zip(ids, ids[1:], strict=False)),
            "retracted": det.retracted,
        }
    g = torch.Generator().manual_seed(0)
    for every in (1, 2):
        det = TaskDetector()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(2000):
                if i % every == 0:
                    scale, shift = 3 * torch.rand(1, generator=g), 3 * torch.randn(1, 784, generator=g)
                det.update(torch.rand(32, 784, generator=g) * scale + shift)
        out[f"noise_new_every_{every}"] = {
            "batches": 2000,
            "ids": det.num_tasks,
            "max_tasks": det.max_tasks,
            "cap_hits": det.cap_hits,
            "cap_warnings": sum(issubclass(w.category, TaskCapWarning) for w in caught),
            "retracted": det.retracted,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    record: dict = {"identification": identification()}
    jobs = [(k, s) for k in KINDS for s in range(5)]
    with ProcessPoolExecutor(args.jobs) as pool:
        record["learning"] = list(pool.map(learning_one, jobs))
    record["stationary_and_noise"] = stationary_and_noise()
    record["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", json.dumps(record, indent=1).encode())

    print(
        "| stream | accuracy mean (min) | mean delay (worst stream) | max delay | false alarms / 10k "
        "(pooled; worst stream) | tasks found | split tasks |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, m in record["identification"].items():
        print(
            f"| {kind} | {m['accuracy_mean']:.4f} ({m['accuracy_min']:.4f}) | {m['mean_delay_max']:.2f} | "
            f"{m['max_delay']} | {m['false_alarms_per_10k_pooled']:.2f}; "
            f"{m['false_alarms_per_10k_worst']:.2f} | {m['tasks_found']} | {m['split_tasks']} |"
        )
    print()
    print("| stream | EWC, inferred ids | EWC, true ids | SGD | inferred / true | EWC − SGD (points) |")
    print("|---|---|---|---|---|---|")
    for kind in KINDS:
        rows = [r for r in record["learning"] if r["kind"] == kind]
        inf = np.array([r["final"]["ewc (inferred ids)"] for r in rows])
        tru = np.array([r["final"]["ewc (true ids)"] for r in rows])
        sgd = np.array([r["final"]["sgd"] for r in rows])
        diff = 100 * (inf - sgd)
        per_seed = ", ".join(f"{d:+.1f}" for d in diff)
        print(
            f"| {kind} | {inf.mean():.4f} ± {inf.std():.4f} | {tru.mean():.4f} ± {tru.std():.4f} | "
            f"{sgd.mean():.4f} ± {sgd.std():.4f} | {inf.mean() / tru.mean():.1%} "
            f"(min {np.min(inf / tru):.1%}) | {diff.mean():+.1f} (per seed {per_seed}) |"
        )
    print()
    for name, m in record["stationary_and_noise"].items():
        print(f"- {name}: {m}")
    print(f"\n{record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
