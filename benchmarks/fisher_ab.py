"""A/B of the Fisher between two source trees: each tree's ``diagonal_fisher`` against the floor.

Runs, in alternating fresh processes (``PYTHONPATH=TREE/src``), one thread and process CPU time,
``fisher_speed.py``'s MLP or CNN on 2 560 samples in batches of 256, and prints each tree's
Fisher time per mode as a ratio to its own floor (the median of 5). On a machine shared with
other work the ratios are inflated alike for both trees; their difference is what it measures.

    git worktree add --detach /tmp/before REV
    .venv/bin/python benchmarks/fisher_ab.py /tmp/before . --models mlp,cnn --rounds 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = """
import sys, time, torch
sys.path.insert(0, {bench!r})
import fisher_speed as fs
from ewc import diagonal_fisher
torch.set_num_threads(1)
m = fs.make_model({name!r}); data = fs.batches(*fs.make_data(2560, {name!r}), 256)
def t(f, r=5):
    ts = []
    for _ in range(r):
        a = time.process_time(); f(); ts.append(time.process_time() - a)
    return sorted(ts)[len(ts) // 2]
fs.floor(m, data); diagonal_fisher(m, data, mode="empirical")
fl = t(lambda: fs.floor(m, data))
print(f"floor {{fl:.3f}} s", *(f"{{mode}} {{t(lambda: diagonal_fisher(m, data, mode=mode)) / fl:.2f}}x"
      for mode in ("empirical", "sample", "exact")), sep=" | ")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs=2, help="two source trees (each with src/ewc)")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for name in args.models.split(","):
        for _ in range(args.rounds):
            for tree in args.trees:
                env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve() / "src")}
                code = WORKER.format(bench=str(HERE), name=name)
                out = subprocess.run(
                    [sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True
                )
                ok = out.returncode == 0
                line = out.stdout.strip().splitlines()[-1] if ok else out.stderr.strip()[-200:]
                print(f"{name} {tree}: {line}", flush=True)


if __name__ == "__main__":
    main()
