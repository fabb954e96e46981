"""Kill every long-running command at random moments, resume it, and compare with an uninterrupted run.

For each command (``ewc run``, ``ewc compare``, ``ewc stream``, ``ewc rl``; small settings), it
times one uninterrupted run, then ``--kills`` times: starts the same command into a fresh folder,
SIGKILLs it after a uniformly drawn fraction of that time (mid-task, mid-consolidation or mid-write,
wherever that lands), checks that no process it started survives (by PID), runs the same command
again (possibly killed again, up to ``--max-kills`` times) until it finishes, and compares
results.json with the uninterrupted one, timings and dates aside. Prints a Markdown table.

Run (from the repository root; minutes)::

    .venv/bin/python scripts/fault_matrix.py --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "run": [
        "run",
        "permuted",
        "--tasks",
        "4",
        "--methods",
        "sgd,ewc,si,replay",
        "--epochs",
        "1",
        "--max-train-per-task",
        "600",
        "--quiet",
        "--jobs",
        "2",
    ],
    "compare": [
        "compare",
        "split",
        "--tasks",
        "3",
        "--methods",
        "sgd,ewc,lwf",
        "--epochs",
        "1",
        "--max-train-per-task",
        "400",
        "--scenarios",
        "task,class",
        "--no-search",
        "--quiet",
    ],
    "stream": [
        "stream",
        "--tasks",
        "3",
        "--schedule",
        "0 1 0 2",
        "--min-len",
        "60",
        "--max-len",
        "80",
        "--max-train-per-task",
        "3000",
        "--hidden",
        "32",
    ],
    "rl": [
        "rl",
        "--games",
        "breakout,space_invaders",
        "--visits",
        "3",
        "--steps-per-visit",
        "1500",
        "--methods",
        "dqn,ewc",
        "--seeds",
        "0",
        "--eval-every",
        "1500",
        "--eval-episodes",
        "2",
        "--checkpoint-every",
        "500",
        "--learning-starts",
        "200",
        "--no-perturb",
        "--jobs",
        "2",
    ],
}
VOLATILE = {"seconds", "train_seconds", "created", "wall_seconds", "env_steps_per_s", "updates_per_s"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from ewc.cli import main; sys.exit(main())", *args]


def strip(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def results(out: Path) -> object:
    return strip(json.loads((out / "results.json").read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5, help="killed runs per command")
    ap.add_argument("--max-kills", type=int, default=2, help="kills per run before it may finish")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="ewc-faults-"))
    try:
        for name in args.commands.split(","):
            base = COMMANDS[name]
            if name == "rl":  # fixed reference scores: the matrix is about resuming, not normalising
                ref = tmp / "reference.json"
                ref.write_text(json.dumps({"breakout": 5.0, "space_invaders": 20.0}))
                base = [*base, "--reference", str(ref)]
            whole = tmp / f"{name}-whole"
            t0 = time.perf_counter()
            proc = subprocess.run(cli(*base, "--out", str(whole)), env=env, capture_output=True, text=True)
            duration = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                rows.append((name, "uninterrupted run failed", "", "", ""))
                continue
            want = results(whole)
            same = orphans = kills_done = 0
            for k in range(args.kills):
                out = tmp / f"{name}-{k}"
                kills = rng.randint(1, args.max_kills)
                for _ in range(kills):
                    p = subprocess.Popen(
                        cli(*base, "--out", str(out)),
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(rng.uniform(0.05, 0.95) * duration)
                    family = descendants(p.pid)
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
                        kills_done += 1
                    p.wait()
                    deadline = time.time() + 5
                    while time.time() < deadline and any(alive(q) for q in family):
                        time.sleep(0.05)
                    orphans += sum(alive(q) for q in family)
                fin = subprocess.run(cli(*base, "--out", str(out)), env=env, capture_output=True, text=True)
                if fin.returncode == 0 and results(out) == want:
                    same += 1
                elif fin.returncode != 0:
                    print(f"{name} #{k}: resume failed: {fin.stderr.strip()[-500:]}")
            rows.append((name, f"{duration:.0f}", str(kills_done), f"{same}/{args.kills}", str(orphans)))
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| command | uninterrupted s | SIGKILLs | resumed = uninterrupted | orphans after 5 s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
