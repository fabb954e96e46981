"""``--lam auto`` against an oracle: for each case (sequence × dataset × method), the best strength of
a wide grid chosen on the TEST parts (what no honest search may do) and ``auto``'s choice on the
validation parts, with the cost of the search (its chosen run included) over one run at a fixed
strength, in optimizer steps and in CPU seconds of this process (the median of three runs of
each). Prints the Markdown table of docs/results.md ("A λ that transfers") and saves each auto
run's results.json under ``--save``.

    PYTHONPATH=src python scripts/lam_auto_table.py --tasks 5 --epochs 2 --max-train 4000 \\
        --cases permuted:mnist-10k:ewc,split:mnist-10k:ewc --save docs/runs/lam-auto

``--search-only`` (for more seeds): the oracle's grid and the search alone, no timed runs (the cost
columns are left empty). The search's chosen run is the oracle's run at its strength (same seed,
same sequence): the row records whether its test ACC is the grid's to the sample
(``same_as_grid``). ``--oracle FILE ...`` takes the grid from rows saved earlier (same case,
method and seed) instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ewc.experiments.jobs import build_tasks, clear_caches, run_all
from ewc.experiments.lam_search import search_auto
from ewc.experiments.sequence import run_sequence, with_params
from ewc.methods import AUTO, METHOD_SPECS
from ewc.train import TrainConfig

#: CPU measurements of each command per case (their median is compared)
REPEAT = 3


def case(
    sequence: str, data: str, method: str, args: argparse.Namespace, save: Path | None
) -> dict[str, Any]:
    """The oracle grid on test data and one ``auto`` run of ``method``."""
    spec = METHOD_SPECS[method]
    strength = spec.strength
    config = TrainConfig(epochs=args.epochs, progress=False, seed=args.seed)
    key = (sequence, data, args.tasks, args.max_train, None)
    grid = [0.0, *spec.bracket]
    oracle: dict[float, float] = recorded(args, f"{sequence} {data}", method)
    for lam in [lam for lam in grid if lam not in oracle]:  # the oracle's grid, one run each
        res = run_all([(key, method, with_params(config, method, {strength: lam}), False)], 1)[0]
        oracle[lam] = res["average_accuracy"]
    best = max(grid, key=lambda lam: (oracle[lam], -lam))
    if args.search_only:
        return searched(key, method, args, config, oracle, best)
    out = Path(tempfile.mkdtemp())

    def cpu_seconds(lam: float | str, where: Path) -> tuple[float, dict[str, Any]]:
        """CPU seconds of this process for one ``ewc run`` of the method (data loading included)."""
        clear_caches()
        t0 = time.process_time()
        one = with_params(config, method, {strength: lam})
        res = run_sequence(
            sequence, data, args.tasks, [method], one, where, max_train_per_task=args.max_train, report=False
        )
        return time.process_time() - t0, res

    # each the median of REPEAT measurements, alternating (a single one varies by ±20 %)
    fixed, auto = [], []
    for k in range(REPEAT):
        fixed.append(cpu_seconds(best, out / f"fixed{k}")[0])  # one run at a fixed strength
        cpu, results = cpu_seconds(AUTO, out / f"auto{k}")
        auto.append(cpu)
    one_run_cpu, auto_cpu = statistics.median(fixed), statistics.median(auto)
    record = results["config"]["selection"][method]
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for m in results["methods"].values():  # the record stays small: no curves
            m.pop("curves", None)
        name = f"{sequence}-{data}-{method}.json"
        (save / name).write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    acc = results["methods"][method]["average_accuracy"]
    return row(sequence, data, method, record, acc, oracle, best) | {
        "cost_steps": record["cost"]["ratio_steps"],
        "cost_cpu": auto_cpu / one_run_cpu,
        "steps": record["cost"]["final_steps"],
    }


def recorded(args: argparse.Namespace, name: str, method: str) -> dict[float, float]:
    """The oracle's grid of this case and seed from ``--oracle`` rows (empty when none has it; a
    row without a seed is seed 0's, as the first table's rows are)."""
    for path in args.oracle or []:
        for r in json.loads(Path(path).read_text()):
            if (r["case"], r["method"], r.get("seed", 0)) == (name, method, args.seed):
                return {float(k): v for k, v in r["oracle"].items()}
    return {}


def searched(
    key: tuple,
    method: str,
    args: argparse.Namespace,
    config: TrainConfig,
    oracle: dict[float, float],
    best: float,
) -> dict[str, Any]:
    """The row of ``--search-only``: the search's choice and its chosen run's ACC (the oracle's run
    at that strength: ``same_as_grid`` records that they agree)."""
    spec = METHOD_SPECS[method]
    sequence, data = key[:2]
    tasks, _ = build_tasks(sequence, data, args.tasks, args.seed, args.max_train, None)
    auto = with_params(config, method, {spec.strength: AUTO})
    record = search_auto(key, tasks, {method: spec.strength}, auto)[method]
    acc = record["run"]["average_accuracy"] if "run" in record else oracle[record["lam"]]
    same = acc == oracle[record["lam"]]
    return row(sequence, data, method, record, acc, oracle, best) | {
        "seed": args.seed,
        "cost_steps": None,
        "cost_cpu": None,
        "search_steps": record["cost"]["search_steps"],
        "same_as_grid": same,
        "rungs": record["rungs"],
    }


def row(
    sequence: str,
    data: str,
    method: str,
    record: dict[str, Any],
    acc: float,
    oracle: dict[float, float],
    best: float,
) -> dict[str, Any]:
    """The fields every row has: the search's choice and ACC ``acc`` against the oracle's grid."""
    return {
        "case": f"{sequence} {data}",
        "method": method,
        "auto_lam": record["lam"],
        "verdict": record["verdict"],
        "edge": record.get("edge"),
        "auto_acc": acc,
        "oracle_lam": best,
        "oracle_acc": oracle[best],
        "zero_acc": oracle[0.0],
        "ratio": acc / oracle[best] if oracle[best] else float("nan"),
        "oracle": {f"{k:g}": v for k, v in oracle.items()},
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | method | auto λ | auto ACC | oracle λ | oracle ACC | auto / oracle | λ = 0 ACC "
        "| cost (steps) | cost (CPU s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # ("helps (within noise)": the earlier search's verdict, in the rows --render shows again)
        lam = f"{r['auto_lam']:g}" + {"helps": "", "helps (within noise)": " (within noise)"}.get(
            r["verdict"], " (no λ helps)"
        )
        lam += f" ({r['edge']} edge)" if r["edge"] else ""
        seed = f" (seed {r['seed']})" if "seed" in r else ""
        lines.append(
            f"| {r['case']}{seed} | {r['method']} | {lam} | {r['auto_acc']:.3f} | {r['oracle_lam']:g} | "
            f"{r['oracle_acc']:.3f} | {100 * r['ratio']:.1f} % | {r['zero_acc']:.3f} | "
            + " | ".join("—" if r[c] is None else f"{r[c]:.2f}×" for c in ("cost_steps", "cost_cpu"))
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", help="SEQUENCE:DATA:METHOD,... (e.g. permuted:mnist-10k:ewc)")
    p.add_argument("--render", type=Path, nargs="*", help="print the table of rows saved with --json instead")
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, default=None, help="folder for each auto run's results.json")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--search-only", action="store_true", help="oracle grid and search only")
    p.add_argument("--oracle", type=Path, nargs="*", help="rows files to take the oracle grid from")
    args = p.parse_args()
    if args.render:
        print(table([row for path in args.render for row in json.loads(path.read_text())]))
        return
    rows = []
    for item in args.cases.split(","):
        sequence, data, method = item.split(":")
        rows.append(case(sequence, data, method, args, args.save))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
