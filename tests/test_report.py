"""Tests for ewc.report: files written from a hand-built results dict, CSV/Markdown content, loading
errors and run comparison.  Everything is synthetic, so the module runs in a few seconds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ewc.report import compare_runs, load_results, method_color, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# How much of an old task each method keeps per later task (1 = no forgetting).
_RETAIN = {"sgd": 0.80, "l2": 0.90, "ewc": 0.97, "online-ewc": 0.96, "joint": 1.0, "si": 0.93}


def make_results(
    T: int = 3,
    methods: tuple[str, ...] = ("sgd", "l2", "ewc", "online-ewc", "joint"),
    steps_per_task: int = 100,
    eval_every: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Plausible results.json content: accuracies rise while a task trains and decay afterwards.

    ``joint`` trains on all tasks seen so far, so its stages get longer (different task_starts).
    ``ewc`` gets ``fwt``/``lca`` = None to exercise missing values.
    """
    rng = np.random.default_rng(seed)
    chance, peak = 0.1, 0.97
    out: dict[str, Any] = {
        "config": {
            "dataset": "mnist-10k",
            "sequence": "permuted",
            "tasks": T,
            "methods": list(methods),
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.1,
            "lam": 100.0,
            "seed": seed,
            "fisher": {"mode": "exact", "samples": 600},
        },
        "tasks": [
            {
                "name": f"permuted-{i}",
                "classes": list(range(10)),
                "n_train": 7200,
                "n_val": 800,
                "n_test": 2000,
            }
            for i in range(T)
        ],
        "methods": {},
    }
    for mi, name in enumerate(methods):
        keep = _RETAIN.get(name, 0.9)
        stage_len = [steps_per_task * ((i + 1) if name == "joint" else 1) for i in range(T)]
        starts = np.concatenate([[0], np.cumsum(stage_len)[:-1]]).astype(int)
        total = int(sum(stage_len))
        steps = list(range(0, total + 1, eval_every))
        acc_pts = []
        for s in steps:
            row = []
            for k in range(T):
                if s <= starts[k]:
                    a = chance + 0.02 * rng.standard_normal()
                else:
                    into = min(s - starts[k], stage_len[k])
                    top = peak if name == "joint" else peak - 0.01 * mi
                    a = chance + (top - chance) * (1 - math.exp(-into / (0.15 * steps_per_task)))
                    done_after = s - (starts[k] + stage_len[k])
                    if done_after > 0:
                        a *= keep ** (done_after / steps_per_task)
                row.append(float(np.clip(a + 0.005 * rng.standard_normal(), 0, 1)))
            acc_pts.append(row)
        acc_pts_arr = np.array(acc_pts)
        ends = [int(np.searchsorted(steps, starts[i] + stage_len[i])) for i in range(T)]
        R = acc_pts_arr[ends]  # accuracy on every task at the end of each stage
        final = R[-1]
        bwt = float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else 0.0
        forg = float(np.mean([R[:-1, j].max() - R[-1, j] for j in range(T - 1)])) if T > 1 else 0.0
        per_task = [
            [
                acc_pts_arr[p, k]
                for p in range(len(steps))
                if starts[k] <= steps[p] <= starts[k] + stage_len[k]
            ]
            for k in range(T)
        ]
        out["methods"][name] = {
            "accuracy_matrix": R.tolist(),
            "average_accuracy": float(final.mean()),
            "bwt": bwt,
            "fwt": None if name == "ewc" else float(0.01 * rng.standard_normal()),
            "forgetting": forg,
            "lca": None if name == "ewc" else 0.6 + 0.01 * mi,
            "seconds": 10.0 + 4.0 * mi,
            "train_seconds": 8.0 + 4.0 * mi,
            "baseline_accuracy": [chance] * T,
            "final_accuracies": final.tolist(),
            "curves": {
                "steps": steps,
                "accuracy": acc_pts_arr.tolist(),
                "task_starts": starts.tolist(),
                "per_task": per_task,
            },
        }
    return out


def save_run(results: dict[str, Any], run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def check_png(path: Path, min_w: int = 300, min_h: int = 200) -> tuple[int, int]:
    """Valid, non-trivial PNG that matplotlib can read back; returns (height, width)."""
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (path, img.shape)
    assert w <= 2600 and h <= 2600, (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} looks blank"
    return h, w


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# write_report
# ----------------------------------------------------------------------------------------------


def test_write_report_files(tmp_path: Path) -> None:
    res = make_results(T=3)
    paths = write_report(res, tmp_path / "rep")
    assert set(paths) == {"metrics", "curves", "matrix", "summary", "report"}
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "rep"
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(
        ["metrics.csv", "curves.png", "matrix.png", "summary.png", "report.md"]
    )
    h, w = check_png(paths["curves"])
    assert h > w * 0.5  # one stacked panel per task
    check_png(paths["matrix"])
    h, w = check_png(paths["summary"])
    assert w > h  # panels side by side


def test_curves_height_scales_with_tasks_and_is_capped(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    from ewc.report.figures import plot_curves  # only the curves figure: the full report is tested above

    heights = {}
    for T in (1, 3, 25):
        res = make_results(T=T, methods=("sgd", "ewc"), steps_per_task=10, eval_every=5)
        heights[T] = mpimg.imread(plot_curves(res, tmp_path / f"curves{T}.png")).shape[0]
    assert heights[1] < heights[3] < heights[25] <= 17 * 130 + 1


def test_metrics_csv(tmp_path: Path) -> None:
    res = make_results(T=3)
    rows = read_csv(write_report(res, tmp_path)["metrics"])
    assert [r["method"] for r in rows] == list(res["methods"])
    expected_cols = ["method", "average_accuracy", "bwt", "fwt", "forgetting", "lca", "seconds"]
    assert list(rows[0]) == expected_cols + ["final_acc_0", "final_acc_1", "final_acc_2"]
    for r in rows:
        m = res["methods"][r["method"]]
        for k in ("average_accuracy", "bwt", "forgetting", "seconds"):
            assert float(r[k]) == m[k]
        for j in range(3):
            assert float(r[f"final_acc_{j}"]) == m["final_accuracies"][j]
    ewc_row = next(r for r in rows if r["method"] == "ewc")
    assert ewc_row["fwt"] == "" and ewc_row["lca"] == ""  # None -> empty cell


def test_report_md_content(tmp_path: Path) -> None:
    res = make_results(T=3)
    md = write_report(res, tmp_path)["report"].read_text()
    for img in ("curves.png", "matrix.png", "summary.png"):
        assert f"]({img})" in md
    for m in res["methods"].values():
        assert f"{m['average_accuracy']:.3f}" in md
        assert f"{m['bwt']:.3f}" in md
        assert f"{m['forgetting']:.3f}" in md
    assert "| Method | ACC" in md
    assert "`lam`" in md and "100.0" in md and "`fisher.mode`" in md  # config table, nested keys flattened
    # Reading of the numbers: best method, SGD forgetting, gap fraction for EWC.
    acc = {n: m["average_accuracy"] for n, m in res["methods"].items()}
    frac = (acc["ewc"] - acc["sgd"]) / (acc["joint"] - acc["sgd"])
    assert f"EWC closes {100 * frac:.0f}% of the SGD → joint gap" in md
    assert "Plain SGD forgets" in md
    best = max((n for n in acc if n != "joint"), key=acc.get)
    assert "has the best average accuracy" in md and best in md.lower()


@pytest.mark.parametrize(
    "methods", [("sgd",), ("ewc", "joint"), ("sgd", "ewc", "si"), ("sgd", "l2", "ewc", "online-ewc", "joint")]
)
def test_single_task_and_method_subsets(tmp_path: Path, methods: tuple[str, ...]) -> None:
    res = make_results(T=1, methods=methods)
    paths = write_report(res, tmp_path)
    for key in ("curves", "matrix", "summary"):
        check_png(paths[key], min_w=250, min_h=150)
    rows = read_csv(paths["metrics"])
    assert len(rows) == len(methods) and "final_acc_0" in rows[0] and "final_acc_1" not in rows[0]
    assert "nothing to forget" in paths["report"].read_text()


def test_nan_none_and_missing_curves(tmp_path: Path) -> None:
    res = make_results(T=3, methods=("sgd", "ewc", "joint"))
    res["methods"]["sgd"]["accuracy_matrix"][0][2] = None  # unmeasured entry above the diagonal
    res["methods"]["sgd"]["accuracy_matrix"][0][1] = float("nan")
    res["methods"]["ewc"]["bwt"] = float("nan")
    del res["methods"]["joint"]["curves"]  # drawn from the accuracy matrix instead
    res["methods"]["joint"]["seconds"] = None
    paths = write_report(res, tmp_path)
    for key in ("curves", "matrix", "summary"):
        check_png(paths[key])
    ewc = next(r for r in read_csv(paths["metrics"]) if r["method"] == "ewc")
    assert ewc["bwt"] == ""
    assert "nan" not in paths["report"].read_text().lower().replace("permuted", "")


def test_curves_from_per_task_only(tmp_path: Path) -> None:
    res = make_results(T=2, methods=("sgd", "ewc"))
    for m in res["methods"].values():
        del m["curves"]["steps"], m["curves"]["accuracy"]
    check_png(write_report(res, tmp_path)["curves"])


def test_unknown_methods_get_distinct_colours() -> None:
    names = ["sgd", "l2", "ewc", "online-ewc", "joint", "foo", "bar", "baz"]
    colours = [method_color(n, names) for n in names]
    assert len(set(colours)) == len(colours)
    assert (
        method_color("sgd") == "#1f77b4"
        and method_color("ewc") == "#d62728"
        and method_color("L2") == "#2ca02c"
    )


def test_written_files_are_replaced_atomically(tmp_path: Path) -> None:
    res = make_results(T=2, methods=("sgd",))
    first = write_report(res, tmp_path)["metrics"].read_text()
    res["methods"]["sgd"]["average_accuracy"] = 0.123456
    second = write_report(res, tmp_path)["metrics"].read_text()
    assert first != second and "0.123456" in second
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in tmp_path.iterdir())  # not mkstemp's 0600


# ----------------------------------------------------------------------------------------------
# load_results
# ----------------------------------------------------------------------------------------------


def test_load_results_roundtrip(tmp_path: Path) -> None:
    res = make_results(T=2, methods=("sgd", "ewc"))
    run = save_run(res, tmp_path / "run")
    assert load_results(run) == res
    assert load_results(run / "results.json") == res
    assert load_results(str(run)) == res


def test_load_results_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_results(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.pop("methods"), "'methods'"),
        (lambda r: r.pop("config"), "'config'"),
        (lambda r: r.pop("tasks"), "'tasks'"),
        (lambda r: r["methods"]["ewc"].pop("accuracy_matrix"), "'accuracy_matrix'"),
        (lambda r: r["methods"]["ewc"]["accuracy_matrix"].pop(), "accuracy_matrix"),
        (lambda r: r["methods"]["sgd"]["curves"].pop("steps"), "'steps'"),
        (lambda r: r["methods"]["sgd"]["curves"]["accuracy"].pop(), "'steps' has"),
        (lambda r: r.update(methods={}), "'methods' is empty"),
    ],
)
def test_load_results_malformed(tmp_path: Path, mutate: Any, needle: str) -> None:
    res = make_results(T=2, methods=("sgd", "ewc"))
    mutate(res)
    run = save_run(res, tmp_path / "bad")
    with pytest.raises(ValueError) as ei:
        load_results(run)
    msg = str(ei.value)
    assert str(run / "results.json") in msg and needle in msg


def test_load_results_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)


# ----------------------------------------------------------------------------------------------
# compare_runs
# ----------------------------------------------------------------------------------------------


def test_compare_runs(tmp_path: Path) -> None:
    a = make_results(T=3, methods=("sgd", "ewc", "joint"), seed=0)
    b = make_results(T=3, methods=("sgd", "ewc"), seed=1)
    b["config"]["lam"] = 1000.0
    b["config"]["extra"] = "x"
    ra, rb = save_run(a, tmp_path / "lam100"), save_run(b, tmp_path / "lam1000")
    md = compare_runs([ra, rb], out_dir=tmp_path / "cmp")
    assert "`lam100`" in md and "`lam1000`" in md
    for r in (a, b):
        for m in r["methods"].values():
            assert f"{m['average_accuracy']:.3f}" in md and f"{m['bwt']:.3f}" in md
    diff = md.split("## Config differences")[1]
    assert "`lam`" in diff and "1000.0" in diff and "`seed`" in diff and "`extra`" in diff
    assert "| `dataset`" not in diff  # identical keys are not listed as differences
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith(md)
    check_png(tmp_path / "cmp" / "comparison.png")


def test_compare_runs_without_out_dir_and_same_names(tmp_path: Path) -> None:
    r1 = save_run(make_results(T=1, methods=("sgd",)), tmp_path / "a" / "run")
    r2 = save_run(make_results(T=1, methods=("sgd",), seed=3), tmp_path / "b" / "run")
    md = compare_runs([r1, r2])
    assert "`a/run`" in md and "`b/run`" in md
    assert not (tmp_path / "comparison.md").exists()
    with pytest.raises(FileNotFoundError):
        compare_runs([tmp_path / "missing"])
