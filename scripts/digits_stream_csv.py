"""Write the shipped MNIST subset as a CSV stream, to try ``ewc stream --csv`` on real data.

    python scripts/digits_stream_csv.py /tmp/digits_stream.csv
    ewc stream --csv /tmp/digits_stream.csv --label-column digit --timestamp-column time \
               --task-column pair --out runs/digits-csv

Rows: 784 pixel columns ``p0..p783`` in [0, 1], the ``digit`` label, a ``time`` index and the
``pair`` of digits the row's segment comes from (split tasks {0,1}, {2,3}, ... in the order
0-1, 2-3, 4-5, 0-1, 6-7, 8-9; 1 200 rows per segment), about 15 MB.
"""

from __future__ import annotations

import sys

import numpy as np

from ewc.data import load_dataset, make_sequence

ORDER = (0, 1, 2, 0, 3, 4)
ROWS = 1200


def main(path: str) -> None:
    tasks = make_sequence(load_dataset("mnist-10k"), "split", 5, seed=0)
    lines = ["time," + ",".join(f"p{i}" for i in range(784)) + ",digit,pair"]
    used: dict[int, int] = {}
    for k in ORDER:
        x = tasks[k].x_train.reshape(len(tasks[k].x_train), -1).numpy()
        y = tasks[k].y_train.numpy()
        start = used.get(k, 0)
        used[k] = start + ROWS
        pair = "-".join(map(str, tasks[k].classes))
        for i in np.arange(start, start + ROWS) % len(x):
            pixels = ",".join(f"{v:.3f}".rstrip("0").rstrip(".") for v in x[i])
            lines.append(f"{len(lines) - 1},{pixels},{y[i]},{pair}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/digits_stream_csv.py OUT.csv")
    main(sys.argv[1])
