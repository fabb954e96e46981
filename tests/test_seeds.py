"""``--seeds``: per-seed runs aggregated into mean ± 95 % CI (ewc.report.seeds), the paired tests
in report.md and ``ewc report A B``, a tiny end-to-end ``ewc run --seeds`` (each seed's run is the
single run with that ``--seed``), ``ewc compare --seeds``, and the resume of a killed multi-seed run."""

from __future__ import annotations

import copy
import csv
import json
import math
import signal
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cli import TINY
from test_report import check_png, make_results, save_run
from test_robust_runs import run_cli, start_cli, wait_for, without_timings

from ewc.cli import main
from ewc.report import load_results, validate_results, write_report
from ewc.report.seeds import aggregate_curves, aggregate_seeds, paired_tests

ROOT = Path(__file__).resolve().parents[1]
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451}  # t_{0.975, df}, printed tables


def multi_seed_results(
    seeds: tuple[int, ...] = (0, 1, 2), methods: tuple[str, ...] = ("sgd", "ewc", "joint")
):
    """A ``--seeds`` record built from independent single runs (make_results with other seeds)."""
    per_seed = []
    for s in seeds:
        r = make_results(T=3, methods=methods, seed=s)
        per_seed.append({"seed": s, "tasks": r["tasks"], "methods": r["methods"]})
    first = make_results(T=3, methods=methods, seed=seeds[0])
    first["config"]["seeds"] = list(seeds)
    return {
        "methods": aggregate_seeds(copy.deepcopy(per_seed)),
        "config": first["config"],
        "tasks": first["tasks"],
        "per_seed": per_seed,
    }


def half_width(values: list[float]) -> float:
    return T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


# ------------------------------------------------------------------------------------ aggregation


def test_aggregation_by_hand() -> None:
    runs = [
        {"average_accuracy": 0.90, "bwt": -0.10, "fwt": None, "seconds": 10.0,
         "accuracy_matrix": [[0.9, 0.1], [0.8, 1.0]], "final_accuracies": [0.8, 1.0]},
        {"average_accuracy": 0.92, "bwt": -0.06, "fwt": None, "seconds": 12.0,
         "accuracy_matrix": [[0.95, 0.1], [0.84, 1.0]], "final_accuracies": [0.84, 1.0]},
        {"average_accuracy": 0.94, "bwt": -0.02, "fwt": None, "seconds": 14.0,
         "accuracy_matrix": [[1.0, 0.1], [0.88, 1.0]], "final_accuracies": [0.88, 1.0]},
    ]  # fmt: skip
    from ewc.report.seeds import aggregate_method

    m = aggregate_method(runs, [3, 5, 7])
    assert m["seeds"] == [3, 5, 7] and m["n"] == 3
    acc = m["stats"]["average_accuracy"]
    # mean 0.92, sd 0.02: 4.3026527 · 0.02 / √3 = 0.0496827
    assert acc["mean"] == pytest.approx(0.92) and m["average_accuracy"] == pytest.approx(0.92)
    assert acc["ci95"] == pytest.approx(0.0496827, abs=1e-7) and acc["values"] == [0.90, 0.92, 0.94]
    assert m["stats"]["bwt"]["ci95"] == pytest.approx(4.3026527 * 0.04 / math.sqrt(3), abs=1e-7)
    assert m["stats"]["seconds"]["mean"] == pytest.approx(12.0)
    assert m["fwt"] is None and m["stats"]["fwt"]["n"] == 0  # missing everywhere: no mean
    assert np.allclose(m["accuracy_matrix"], [[0.95, 0.1], [0.84, 1.0]])
    half = m["stats"]["accuracy_matrix"]["ci95"]
    assert half[1][0] == pytest.approx(4.3026527 * 0.04 / math.sqrt(3), abs=1e-7)
    assert half[0][1] == pytest.approx(0.0)  # no spread
    assert m["final_accuracies"] == pytest.approx([0.84, 1.0])


def test_curves_are_averaged_on_the_first_seeds_steps() -> None:
    a = {"steps": [0, 2, 4], "accuracy": [[0.1, 0.1], [0.5, 0.1], [0.9, 0.2]], "task_starts": [0, 2]}
    b = {"steps": [0, 2, 4], "accuracy": [[0.1, 0.1], [0.7, 0.1], [0.7, 0.4]], "task_starts": [0, 2]}
    c = aggregate_curves([a, b])
    assert np.allclose(c["accuracy"], [[0.1, 0.1], [0.6, 0.1], [0.8, 0.3]])
    assert c["accuracy_ci95"][1][0] == pytest.approx(12.7062047 * statistics.stdev([0.5, 0.7]) / math.sqrt(2))
    # a seed whose second task starts later (steps 0, 4, 8): mapped onto the first seed's boundaries
    longer = {"steps": [0, 4, 8], "accuracy": [[0.1, 0.1], [0.7, 0.1], [0.7, 0.4]], "task_starts": [0, 4]}
    assert np.allclose(aggregate_curves([a, longer])["accuracy"], c["accuracy"])
    assert aggregate_curves([a, None]) is None


def test_multi_seed_report(tmp_path: Path) -> None:
    res = multi_seed_results()
    # every seed: EWC keeps more than SGD, so EWC's per-seed ACC is higher in each of the 3 seeds
    validate_results(res, "res")
    paths = write_report(res, tmp_path)
    assert set(paths) == {"metrics", "curves", "matrix", "summary", "report", "seeds"}
    md = paths["report"].read_text()
    accs = [p["methods"]["ewc"]["average_accuracy"] for p in res["per_seed"]]
    assert f"{statistics.mean(accs):.3f} ± {half_width(accs):.3f}" in md
    assert "## Paired tests over seeds" in md and "3 seeds" in md
    tests = {(t["a"], t["b"]): t for t in paired_tests(res)}
    sgd = [p["methods"]["sgd"]["average_accuracy"] for p in res["per_seed"]]
    diffs = [x - y for x, y in zip(sgd, accs, strict=True)]
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    assert tests["sgd", "ewc"]["t"] == pytest.approx(t)
    reading = tests["sgd", "ewc"]["verdict"]
    assert ("EWC beats SGD" in reading) == (tests["sgd", "ewc"]["p"] < 0.05)
    assert reading in md
    rows = list(csv.DictReader(paths["seeds"].open()))
    assert [(r["method"], int(r["seed"])) for r in rows][:3] == [("sgd", 0), ("ewc", 0), ("joint", 0)]
    assert float(rows[1]["average_accuracy"]) == accs[0]
    metrics = list(csv.DictReader(paths["metrics"].open()))
    assert (
        float(metrics[1]["average_accuracy_ci95"]) == pytest.approx(half_width(accs))
        and metrics[1]["n"] == "3"
    )
    for key in ("curves", "matrix", "summary"):
        check_png(paths[key])


def test_one_seed_says_no_test_is_possible(tmp_path: Path) -> None:
    md = write_report(multi_seed_results(seeds=(4,)), tmp_path)["report"].read_text()
    assert "no test possible (one seed" in md and "mean over 1 seed" in md


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r["per_seed"].pop(), "'seeds' [0, 1]"),
        (lambda r: r["per_seed"][1]["methods"].pop("ewc"), "per_seed[1]['methods']"),
        (lambda r: r["per_seed"][0]["methods"]["sgd"]["accuracy_matrix"].pop(), "per_seed[0]"),
        (lambda r: r["methods"]["ewc"]["stats"]["bwt"].pop("ci95"), "['stats']['bwt']"),
        (lambda r: r["methods"]["ewc"]["stats"]["bwt"]["values"].pop(), "one value per seed"),
        (lambda r: r.update(per_seed=[]), "'per_seed' must be a non-empty list"),
    ],
)
def test_malformed_multi_seed_files_are_refused(tmp_path: Path, mutate: Any, needle: str) -> None:
    res = multi_seed_results()
    mutate(res)
    with pytest.raises(ValueError) as err:
        load_results(save_run(res, tmp_path / "bad"))
    assert needle in str(err.value)


def test_saved_single_seed_runs_still_load_and_report(tmp_path: Path) -> None:
    """Runs saved before --seeds (docs/runs) read as they always did: no seed section."""
    saved = [p.parent for p in (ROOT / "docs" / "runs").rglob("results.json")]
    records = {d: json.loads((d / "results.json").read_text()) for d in saved}
    runs = [load_results(d) for d, r in records.items() if isinstance(r.get("methods"), dict)]  # ewc run
    assert sum("per_seed" not in r for r in runs) >= 5  # and the --seeds runs saved there load too
    md = write_report(load_results(ROOT / "docs" / "runs" / "accept-mnist10k"), tmp_path)[
        "report"
    ].read_text()
    assert "Paired tests" not in md and " ± " not in md.split("## Configuration")[0]
    assert not (tmp_path / "seeds.csv").exists()


# ------------------------------------------------------------------------------------ end to end

TINY_SEEDS = ["run", "permuted", "--methods", "sgd,ewc", "--jobs", "1", *TINY]


def test_run_with_seeds_is_each_single_seed_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*TINY_SEEDS, "--seeds", "0,1", "--save-state", "--out", str(tmp_path / "both")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "both" / "results.json").read_text())
    assert res["config"]["seeds"] == [0, 1] and [p["seed"] for p in res["per_seed"]] == [0, 1]
    assert main([*TINY_SEEDS, "--seed", "1", "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "results.json").read_text())
    for m in ("sgd", "ewc"):
        seed1 = {k: v for k, v in res["per_seed"][1]["methods"][m].items() if k != "checkpoint"}
        assert without_timings(seed1) == without_timings(single["methods"][m])
        assert "checkpoint" not in res["methods"][m]
        accs = [p["methods"][m]["average_accuracy"] for p in res["per_seed"]]
        assert accs[0] != accs[1]  # another permutation and initial weights
        assert res["methods"][m]["average_accuracy"] == pytest.approx(statistics.mean(accs))
        assert res["methods"][m]["stats"]["average_accuracy"]["ci95"] == pytest.approx(half_width(accs))
    assert res["per_seed"][1]["tasks"] == single["tasks"]
    for p in res["per_seed"]:  # one checkpoint per method and seed
        for m, r in p["methods"].items():
            assert r["checkpoint"] == f"checkpoints/{m}-seed{p['seed']}.pt"
            assert (tmp_path / "both" / r["checkpoint"]).is_file()
    assert "± " in printed and "paired t-test on ACC, sgd vs ewc" in printed
    assert (tmp_path / "both" / "seeds.csv").exists()
    # the reports of the two runs compared: one method's ACC paired over the common seed 1 only
    assert (
        main(["report", str(tmp_path / "both"), str(tmp_path / "one"), "--out", str(tmp_path / "cmp")]) == 0
    )
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Paired tests between runs" in md and "no test possible (one seed" in md


def test_report_compares_two_seed_runs_pairwise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "lam100", tmp_path / "lam0"
    assert main([*TINY_SEEDS, "--seeds", "0,1,2", "--out", str(a)]) == 0
    assert main([*TINY_SEEDS, "--seeds", "0,1,2", "--lam", "0", "--out", str(b)]) == 0
    capsys.readouterr()
    assert main(["report", str(a), str(b)]) == 0
    md = capsys.readouterr().out
    ra, rb = load_results(a), load_results(b)
    # SGD does not use λ: the same numbers in both runs, so no difference at all (p = 1)
    assert (
        ra["methods"]["sgd"]["stats"]["average_accuracy"]["values"]
        == (rb["methods"]["sgd"]["stats"]["average_accuracy"]["values"])
    )
    assert "no significant difference (p = 1" in md
    ea = ra["methods"]["ewc"]["stats"]["average_accuracy"]["values"]
    eb = rb["methods"]["ewc"]["stats"]["average_accuracy"]["values"]
    diffs = [x - y for x, y in zip(ea, eb, strict=True)]
    assert f"{statistics.mean(diffs):+.3f} ± {half_width(diffs):.3f}" in md
    assert md.count("| 3 |") >= 2  # three common seeds in each test


def test_seed_and_seeds_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([*TINY_SEEDS, "--seeds", "1,2", "--seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--seed 3 and --seeds 1,2 disagree" in capsys.readouterr().err
    assert main([*TINY_SEEDS, "--seeds", "1,1", "--out", str(tmp_path / "y")]) == 2
    assert "seeds" in capsys.readouterr().err


def test_compare_takes_seeds(tmp_path: Path) -> None:
    args = ["compare", "permuted", "--methods", "sgd,ewc", "--scenarios", "domain", "--no-search", *TINY]
    assert main([*args, "--seeds", "0,1", "--out", str(tmp_path / "cmp")]) == 0
    record = json.loads((tmp_path / "cmp" / "results.json").read_text())
    run = json.loads((tmp_path / "cmp" / "domain" / "results.json").read_text())
    assert record["seeds"] == [0, 1]
    for row in record["rows"]:
        stats = run["methods"][row["method"]]["stats"]["average_accuracy"]
        assert row["average_accuracy"] == stats["mean"] and row["ci95"]["average_accuracy"] == stats["ci95"]
    assert " ± " in (tmp_path / "cmp" / "comparison.md").read_text()


# ------------------------------------------------------------------------------------ resume

KILLABLE = ["run", "permuted", "--tasks", "3", "--methods", "sgd,ewc", "--epochs", "1", "--seeds", "0,1"]
KILLABLE += ["--max-train-per-task", "300", "--eval-every", "5", "--quiet"]


def test_a_killed_multi_seed_run_resumes_its_unfinished_jobs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start_cli(*KILLABLE, "--out", str(out))
    wait_for(lambda: any((out / "progress").glob("*.json")) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()  # killed before the end
    done = {p.name: p.stat().st_mtime_ns for p in (out / "progress").glob("*.json")}
    assert done
    again = run_cli(*KILLABLE, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "progress").glob("*.json") if p.name in done} == done
    assert len(list((out / "progress").glob("*.json"))) == 4  # 2 methods × 2 seeds
    whole = tmp_path / "whole"
    assert run_cli(*KILLABLE, "--out", str(whole)).returncode == 0
    got, want = (without_timings(json.loads((d / "results.json").read_text())) for d in (out, whole))
    assert got == want  # timings aside (the aggregated ones too: stats["seconds"])
