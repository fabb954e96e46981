"""`ewc rl`: normalisation, schedule, a tiny end-to-end run through the CLI (cache, resume,
--reference), and clear input errors. Everything runs in-process (--jobs 1) on one thread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("minatar")

from ewc.cli import main  # noqa: E402
from ewc.experiments.rl import (  # noqa: E402
    Config,
    budgets,
    forgetting,
    make_schedule,
    normalise,
    total_score,
)
from ewc.rl.env import GAMES, random_policy_score  # noqa: E402

torch.set_num_threads(1)

TINY = [
    "rl",
    "--games",
    "breakout,space_invaders",
    "--visits",
    "2",
    "--steps-per-visit",
    "300",
    "--eval-every",
    "150",
    "--eval-episodes",
    "2",
    "--hidden",
    "32",
    "--conv-channels",
    "8",
    "--learning-starts",
    "64",
    "--fisher-samples",
    "64",
    "--replay-capacity",
    "1000",
    "--seeds",
    "0",
    "--jobs",
    "1",
    "--perturb-norms",
    "1,10",
    "--perturb-draws",
    "1",
    "--perturb-episodes",
    "1",
]


# ---------------------------------------------------------------------------- by hand


def test_normalise_caps_at_one_keeps_negatives_and_refuses_a_flat_game() -> None:
    assert normalise(2.0, 1.0, 3.0) == pytest.approx(0.5)
    assert normalise(9.0, 1.0, 3.0) == 1.0  # better than the reference: capped
    assert normalise(0.0, 1.0, 3.0) == pytest.approx(-0.5)  # worse than random: kept, not floored
    assert normalise(5.0, 1.0, 1.0) is None  # reference == random
    assert normalise(5.0, 1.0, 1.0 + 1e-7) is None  # within 1e-6
    assert normalise(5.0, 2.0, 1.0) is None  # reference below random
    norm = {
        "a": {"random": 1.0, "reference": 3.0},
        "b": {"random": 0.0, "reference": 10.0},
        "c": {"random": 4.0, "reference": 4.0},  # cannot be normalised: left out of the total
    }
    assert total_score({"a": 9.0, "b": -5.0, "c": 100.0}, norm) == pytest.approx(1.0 - 0.5)


def test_forgetting_is_best_up_to_the_last_visit_minus_final() -> None:
    evals = [
        {"env_step": 100, "normalised": {"a": 0.2, "b": None}},
        {"env_step": 200, "normalised": {"a": 0.9, "b": None}},
        {"env_step": 300, "normalised": {"a": 0.4, "b": None}},
        {"env_step": 400, "normalised": {"a": 0.95, "b": None}},  # after a's last visit: not "best"
        {"env_step": 500, "normalised": {"a": 0.3, "b": None}},
    ]
    best, final, drop = forgetting(evals, "a", last_visit_end=300)
    assert (best, final) == (0.9, 0.3) and drop == pytest.approx(0.6)
    assert forgetting(evals, "b", 300) is None


def test_schedule_is_a_seeded_permutation_then_no_immediate_repeats() -> None:
    games = ["breakout", "space_invaders", "freeway"]
    firsts = set()
    for seed in range(20):
        s = make_schedule(games, 10, seed)
        assert len(s) == 10 and sorted(s[:3]) == sorted(games)
        assert all(a != b for a, b in zip(s, s[1:], strict=False))
        assert s == make_schedule(games, 10, seed)  # seeded
        firsts.add(tuple(s[:3]))
    assert len(firsts) > 1  # the seed changes the order
    assert make_schedule(["asterix"], 1, 0) == ["asterix"]
    with pytest.raises(ValueError, match="cannot cover"):
        make_schedule(games, 2, 0)
    with pytest.raises(ValueError, match="fewer than the 3 games"):
        Config(games=tuple(games), visits=2)
    assert budgets(["a", "b", "a"], 100) == {"a": 200, "b": 100}


# ------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rl")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        rc1 = main([*TINY, "--out", str(out)])
        first = json.loads((out / "results.json").read_text())
        rc2 = main([*TINY, "--out", str(out)])  # the same command again: cache + resume
        second = json.loads((out / "results.json").read_text())
    return {"root": root, "out": out, "rc": (rc1, rc2), "first": first, "second": second}


def test_tiny_rl_writes_results_figures_and_report(tiny_run: dict) -> None:
    assert tiny_run["rc"] == (0, 0)
    out, r = tiny_run["out"], tiny_run["first"]
    for png in ("total_score.png", "per_game.png", "perturb.png"):
        assert (out / png).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "ewc rl" in report and "![total_score](total_score.png)" in report
    assert "| total averaged over the run (mean ± 95 % CI) |" in report
    assert r["command"].startswith("ewc rl ")
    for key in (
        "schedule",
        "games",
        "budgets",
        "normalisation",
        "excluded_games",
        "runs",
        "summary",
        "perturb",
        "findings",
    ):
        assert key in r
    assert sorted(r["schedule"]) == ["breakout", "space_invaders"]
    assert r["budgets"] == {"breakout": 300, "space_invaders": 300}
    assert set(r["runs"]) == {"dqn", "ewc", "ewc-true-labels"}
    for method, runs in r["runs"].items():
        (run,) = runs
        assert run["seed"] == 0
        rec = run["record"]
        assert rec["env_steps"] == 600 and "episode_returns" not in rec
        assert rec["evaluations"][-1]["env_step"] == 600
        assert all("total" in e and "normalised" in e for e in rec["evaluations"])
        assert run["final_total"] == rec["evaluations"][-1]["total"]
        totals = [e["total"] for e in rec["evaluations"]]
        assert run["mean_total"] == pytest.approx(sum(totals) / len(totals))
        assert run["env_steps_per_s"] > 0
        s = r["summary"][method]["final_total"]
        assert s["n"] == 1 and s["mean"] == run["final_total"]
        assert r["summary"][method]["mean_total"]["mean"] == pytest.approx(run["mean_total"])
        area = r["summary"][method]["mean_total"]["mean"]
        assert f"{method}: total normalised score averaged over the run's evaluations {area:.2f}" in report
    for g, n in r["normalisation"].items():
        assert n["reference_source"] == "computed"
        assert n["normalisable"] == (n["reference"] - n["random"] > 1e-6)
        assert (g in r["excluded_games"]) == (not n["normalisable"])
    assert r["runs"]["dqn"][0]["record"]["config"]["ewc_lam"] == 0.0
    assert r["runs"]["ewc"][0]["record"]["config"]["true_task_labels"] is False
    p = r["perturb"]
    assert p["method"] == "ewc-true-labels" and p["seed"] == 0 and p["skipped"] == {}
    assert set(p["per_game"]) == {"breakout", "space_invaders"}  # every game, in its own context
    for game, t in p["per_game"].items():
        assert t["game"] == game and t["context"] == GAMES.index(game)
        assert t["norms"] == [1.0, 10.0] and set(t["scores"]) == {"isotropic", "fisher", "null"}
        assert len(t["scores"]["fisher"]) == 2
        # the shaped noise is, by construction, seen less by the Fisher than isotropic noise, and
        # noise in the null space (F < 1e-3) least of all
        q = t["fisher_quadratic"]
        assert q["fisher"][0] < q["isotropic"][0]
        if t["scores"]["null"] is not None:
            assert t["null_parameters"] > 0 and q["null"][0] <= 1e-3 * 1.0**2
    # confusion per visit of the inferred-label run
    inf = r["runs"]["ewc"][0]["task_inference"]
    assert [v["game"] for v in inf["per_visit"]] == r["schedule"]
    assert all(abs(sum(v["shares"].values()) - 1) < 1e-9 for v in inf["per_visit"])
    assert r["runs"]["dqn"][0]["task_inference"] is None  # true labels: nothing inferred
    assert "the detector's contexts per visit" in report


def test_second_run_uses_cached_references_and_resumes(tiny_run: dict) -> None:
    first, second = tiny_run["first"], tiny_run["second"]
    assert {n["reference_source"] for n in second["normalisation"].values()} == {"cache"}
    for g in first["games"]:
        assert second["normalisation"][g]["reference"] == first["normalisation"][g]["reference"]
    assert len(list((tiny_run["root"] / "cache" / "ewc" / "rl-reference").glob("*.json"))) == 2
    for m in first["runs"]:  # resumed from the finished checkpoints: the same records
        assert second["runs"][m][0]["record"]["evaluations"] == first["runs"][m][0]["record"]["evaluations"]


def test_reference_file_is_used_as_given(tiny_run: dict, tmp_path: Path) -> None:
    flat = random_policy_score("space_invaders", 100, 0)  # reference == random: cannot normalise
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"breakout": 7.5, "space_invaders": flat}))
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run["out"] / "checkpoints" / "dqn-s0.pt", out / "checkpoints")  # resumes
    rc = main([*TINY, "--methods", "dqn", "--reference", str(ref), "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert r["normalisation"]["breakout"]["reference"] == 7.5
    assert {n["reference_source"] for n in r["normalisation"].values()} == {"file"}
    assert r["excluded_games"] == ["space_invaders"] and r["normalised_games"] == ["breakout"]
    assert any("space_invaders cannot be normalised" in f for f in r["findings"])
    assert r["perturb"] is None and not (out / "perturb.png").exists()  # no EWC agent to perturb
    assert "needs ewc-true-labels, ewc or online-ewc" in r["perturb_skipped"]
    assert not list((out / "checkpoints").glob("reference-*"))  # no reference was trained


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--games", "breakout,pong"],
            "games must be distinct names from breakout, space_invaders, freeway, asterix, seaquest, "
            "at least one, got ('breakout', 'pong')",
        ),
        (
            ["--methods", "dqn,sgd"],
            "methods must be distinct names from dqn, ewc, ewc-true-labels, online-ewc, at least one, "
            "got ('dqn', 'sgd')",
        ),
        (["--visits", "1"], "--visits 1 is fewer than the 2 games"),
        (["--jobs", "0"], "jobs must be a positive integer, got 0"),
        (["--games", "breakout,breakout"], "at least one, got ('breakout', 'breakout')"),
        (["--eval-epsilon", "1.5"], "eval_epsilon must be a finite number in [0, 1], got 1.5"),
        (["--perturb-norms", "1,0"], "perturb_norms must be a non-empty list, each a finite number > 0"),
        (["--replay-capacity", "8"], "invalid DQN setting: replay_capacity (8) must be >= batch_size"),
        (["--reference", "/nonexistent/ref.json"], "no such file"),
    ],
)
def test_bad_input_is_exit_2_with_a_clear_message(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main([*TINY, *flags, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ewc: error:") and message in err
    assert not (tmp_path / "x" / "results.json").exists()


def test_reference_file_without_a_game_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"breakout": 3.0}))
    assert main([*TINY, "--reference", str(ref), "--out", str(tmp_path / "x")]) == 2
    assert "has no score for space_invaders" in capsys.readouterr().err
