"""Tests of issue #19's pieces of the RL protocol: lockstep evaluation, packing once, schedules
with returns, task-inference confusion per visit, and the perturbation test per game."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("minatar")

from rl_helpers import tiny_dqn  # noqa: E402

from ewc.rl.agent import Agent  # noqa: E402
from ewc.rl.config import config_key, derive_seed, saved_config  # noqa: E402
from ewc.rl.env import GAMES, Game  # noqa: E402
from ewc.rl.replay import ReplayBuffer, pack_bits  # noqa: E402

torch.set_num_threads(1)

TINY = tiny_dqn()


# ------------------------------------------------------------------------------ evaluation


def _one_by_one_greedy(agent: Agent, game: str, episodes: int, seed: int) -> list[float]:
    """The greedy policy's returns, episode after episode with a batch-1 forward pass (the
    independent reference for the lockstep evaluation: at ε = 0 the RNG plays no part)."""
    env = Game(game, seed=seed, sticky_action_prob=agent.config.sticky_action_prob)
    out = []
    for k in range(episodes):
        obs = env.reset(seed=derive_seed(seed, 3, k))
        total = 0.0
        for _ in range(27_000):
            with torch.no_grad():
                a = int(agent.qnet(obs.unsqueeze(0), GAMES.index(game)).argmax(1))
            obs, r, done = env.step(a)
            total += r
            if done:
                break
        out.append(total)
    return out


@pytest.mark.parametrize("game", ["breakout", "asterix"])
def test_lockstep_evaluation_equals_episodes_played_one_by_one(game: str) -> None:
    agent = Agent(TINY)
    agent.begin_visit(game)
    for _ in range(150):  # some learning so that the greedy policy is not constant
        agent.step()
    agent.end_visit()
    r = agent.evaluate(game, episodes=4, epsilon=0.0, seed=7)
    assert r["returns"] == _one_by_one_greedy(agent, game, 4, 7)
    assert r["mean_return"] == pytest.approx(np.mean(r["returns"]))
    # every env step played is counted once, in the game's own context
    assert list(r["contexts"]) == [str(GAMES.index(game))]


def test_lockstep_evaluation_with_inferred_contexts_is_seeded_and_counts_steps() -> None:
    from dataclasses import replace

    agent = Agent(replace(TINY, true_task_labels=False))
    for g in ("breakout", "space_invaders"):
        agent.begin_visit(g)
        for _ in range(200):
            agent.step()
        agent.end_visit()
    a = agent.evaluate("space_invaders", episodes=3, epsilon=0.5, seed=1)
    b = agent.evaluate("space_invaders", episodes=3, epsilon=0.5, seed=1)
    assert a == b
    greedy = agent.evaluate("space_invaders", episodes=3, epsilon=0.0, seed=1)
    for r in (a, greedy):
        assert all(int(k) < agent.detector.num_tasks for k in r["contexts"])
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        agent.evaluate("breakout", episodes=0)


# ------------------------------------------------------------------------------ packing once


def test_replay_packs_an_episodes_shared_frame_once_and_notices_in_place_changes(monkeypatch) -> None:  # noqa: ANN001
    import ewc.rl.replay as replay

    calls = Counter()
    real = replay.pack_bits

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return real(x)

    monkeypatch.setattr(replay, "pack_bits", counting)
    gen = torch.Generator().manual_seed(0)
    frames = [(torch.rand(2, 4, 4, generator=gen) < 0.5).float() for _ in range(6)]
    buf = ReplayBuffer(10, (2, 4, 4))
    for i in range(5):
        buf.add(frames[i], 0, 0.0, frames[i + 1], False)
    assert calls["n"] == 6  # 5 next observations + the first observation
    for i in range(5):
        assert torch.equal(buf.obs[i], real(frames[i].unsqueeze(0))[0])
        assert torch.equal(buf.next_obs[i], real(frames[i + 1].unsqueeze(0))[0])
    frames[5].fill_(1.0)  # the same tensor, changed in place: packed again, not taken from the memo
    buf.add(frames[5], 0, 0.0, frames[0], True)
    assert torch.equal(buf.obs[5], real(torch.ones(1, 2, 4, 4))[0])


def test_numpy_packing_matches_bit_order_by_hand() -> None:
    x = torch.zeros(1, 10)
    x[0, 0] = x[0, 9] = 1.0  # bits 1000000001 -> bytes 0b10000000, 0b01000000
    assert pack_bits(x).tolist() == [[128, 64]]
    for bad in (0.5, -1.0, 2.0, float("nan")):
        y = x.clone()
        y[0, 3] = bad
        with pytest.raises(ValueError, match="binary"):
            pack_bits(y)


# ------------------------------------------------------------------------------- schedules


def _first_draw(games: list[str], visits: int, seed: int) -> list[str]:
    """The schedule of the code before issue #19 (a permutation, then random non-repeats)."""
    rng = np.random.default_rng(seed)
    s = [games[i] for i in rng.permutation(len(games))]
    while len(s) < visits:
        others = [g for g in games if g != s[-1]]
        s.append(others[int(rng.integers(len(others)))])
    return s


def test_full_protocol_schedules_hold_their_constraints_over_many_seeds() -> None:
    from ewc.experiments.rl_config import FULL_PROTOCOL, Config, command
    from ewc.rl.protocol import make_schedule

    full = Config(**FULL_PROTOCOL)  # a valid ewc rl configuration, with its command line
    assert set(full.methods) == {"dqn", "ewc", "ewc-true-labels", "online-ewc"} and len(full.seeds) >= 5
    assert "--min-visits 2" in command(full) and "--visits 10" in command(full)
    # the command docs/rl.md and docs/results.md print carries every flag of FULL_PROTOCOL
    root = Path(__file__).resolve().parents[1]
    for doc in ("docs/rl.md", "docs/results.md"):
        text = " ".join(root.joinpath(doc).read_text().replace("\\\n", " ").split())
        for key, value in FULL_PROTOCOL.items():
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"
            assert f"--{key.replace('_', '-')} {shown}" in text, (doc, key)
    games = list(FULL_PROTOCOL["games"])
    seen = set()
    for seed in range(300):
        s = make_schedule(games, FULL_PROTOCOL["visits"], seed, FULL_PROTOCOL["min_visits"])
        assert len(s) == 10 and sorted(s[:5]) == sorted(games)  # a permutation first
        assert all(a != b for a, b in zip(s, s[1:], strict=False))  # never twice in a row
        assert min(Counter(s)[g] for g in games) >= 2  # every game returns
        assert s == make_schedule(games, 10, seed, 2)  # seeded
        seen.add(tuple(s))
    assert len(seen) > 250  # the seed matters
    for seed in range(50):  # min_visits=1: exactly the earlier code's schedules
        assert make_schedule(games, 7, seed) == _first_draw(games, 7, seed)
    # 3 games, 6 visits, each twice: tight, still found
    for seed in range(50):
        s = make_schedule(["a", "b", "c"], 6, seed, 2)
        assert Counter(s) == {"a": 2, "b": 2, "c": 2}
        assert all(a != b for a, b in zip(s, s[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"visits": 9, "min_visits": 2}, "cannot cover 5 games 2 time"),
        ({"visits": 10, "min_visits": 0}, "min_visits must be an int >= 1"),
    ],
)
def test_impossible_schedules_are_clear_errors(kwargs: dict, message: str) -> None:
    from ewc.rl.protocol import make_schedule

    with pytest.raises(ValueError, match=message):
        make_schedule(list(GAMES), seed=0, **kwargs)


def test_config_refuses_too_few_visits_for_min_visits() -> None:
    from ewc.experiments.rl_config import Config, dqn_config

    with pytest.raises(ValueError, match="cannot give each of the 2 games --min-visits 2"):
        Config(games=("breakout", "freeway"), visits=3, min_visits=2)
    c = Config(methods=("online-ewc",), online_gamma=0.8)
    d = dqn_config(c, "online-ewc", 0)
    assert (d.ewc_mode, d.ewc_gamma, d.true_task_labels, d.ewc_lam) == ("online", 0.8, True, c.lam)
    e = dqn_config(c, "ewc-true-labels", 0)
    assert (e.ewc_mode, e.ewc_gamma) == ("separate", 1.0)  # online_gamma leaves the others alone
    # the detector's settings reach the detector's agent only: the others' configs (and the
    # references' cache keys) stay those of the default
    h = Config(detector_hazard=0.2, detector_kappa0=0.3, detector_var_floor=0.02)
    d = dqn_config(h, "ewc", 0)
    assert (d.detector_hazard, d.detector_kappa0, d.detector_var_floor) == (0.2, 0.3, 0.02)
    det = Agent(d).detector
    assert (det.hazard, det.kappa0, det.var_floor) == (0.2, 0.3, 0.02)
    for m in ("dqn", "ewc-true-labels", "online-ewc"):
        assert dqn_config(h, m, 0) == dqn_config(Config(), m, 0)
    # a checkpoint saved before detector_var_floor existed resumes with its default
    saved = {k: v for k, v in asdict(dqn_config(Config(), "dqn", 0)).items() if k != "detector_var_floor"}
    assert saved_config(saved) == asdict(dqn_config(Config(), "dqn", 0))
    assert "detector_var_floor" not in config_key(dqn_config(Config(), "dqn", 0))


def test_mean_total_of_runs_scored_before_it_existed() -> None:
    from ewc.rl.protocol import mean_total, summarise

    old = {"record": {"evaluations": [{"total": 1.0}, {"total": 0.0}, {"total": 2.0}]}}
    assert mean_total(old) == pytest.approx(1.0)  # (1 + 0 + 2) / 3, from the evaluations
    assert mean_total({**old, "mean_total": 0.25}) == 0.25  # a scored run's own value
    assert mean_total({"record": {"evaluations": [{"env_step": 5}]}}) is None  # nothing to average
    run = {
        **old,
        "final_total": 2.0,
        "final_normalised": {"a": 1.0},
        "final_scores": {"a": 3.0},
        "forgetting": {"a": 0.0},
        "env_steps_per_s": 1.0,
        "updates_per_s": 1.0,
    }
    s = summarise({"dqn": [run, {**run, "mean_total": 3.0}]}, ["a"])["dqn"]["mean_total"]
    assert (s["n"], s["mean"], s["min"], s["max"]) == (2, pytest.approx(2.0), 1.0, 3.0)


def test_stats_and_games_at_half() -> None:
    from ewc.rl.protocol import games_at, stats

    assert games_at({"a": 0.5, "b": 0.49, "c": None, "d": 1.0}) == 2
    s = stats([1.0, 2.0, 3.0, None])
    # t_{0.975, 2} = 4.302653; sd = 1
    assert s["n"] == 3 and s["mean"] == 2.0 and s["ci95"] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert stats([1.0])["ci95"] is None


# ------------------------------------------------------------------------ task inference


def test_task_inference_confusion_per_visit_by_hand() -> None:
    from ewc.rl.protocol import task_inference

    record = {
        "detector": {"num_tasks": 3, "retracted": 0, "cap_hits": 0},
        "visits": [
            {"game": "a", "contexts": {"0": 90, "1": 10}},
            {"game": "b", "contexts": {"1": 100}},
            {"game": "a", "contexts": {"0": 60, "2": 40}},  # a return, recognised
            {"game": "b", "contexts": {"2": 70, "1": 30}},  # a return, not recognised
        ],
    }
    t = task_inference(record)
    assert t["per_visit"][0] == {"visit": 0, "game": "a", "shares": {"0": 0.9, "1": 0.1}, "majority": "0"}
    assert t["per_visit"][3]["majority"] == "2"
    # over all visits: a has 150 in 0; b has 130 in 1, 70 in 2
    assert t["game_context"] == {"a": "0", "b": "1"} and t["one_to_one"]
    assert (t["returns"], t["returns_recognised"], t["num_contexts"]) == (2, 1, 3)
    assert t["accuracy"] == pytest.approx((150 + 130) / 400)
    assert task_inference({"visits": record["visits"]}) is None  # true labels: no detector


def test_report_reads_a_perturbation_entry_from_before_issue_19() -> None:
    from ewc.experiments.rl_report import perturb_games

    old = {"method": "ewc", "seed": 0, "game": "breakout", "scores": {"isotropic": [1.0], "fisher": [2.0]}}
    assert perturb_games(old) == {"breakout": old}
    new = {"method": "ewc", "seed": 0, "per_game": {"a": {}, "b": {}}}
    assert list(perturb_games(new)) == ["a", "b"]


# ------------------------------------------------------------------------------ the claims


def _run(seed: int, ends: list[dict[str, float]], games_good: int, total: float) -> dict:
    evals = [
        {"env_step": 10 * (v + 1), "normalised": n, "total": sum(n.values())} for v, n in enumerate(ends)
    ]
    evals.insert(0, {"env_step": 5, "normalised": {"a": 0.0, "b": 0.0}, "total": 0.0})  # not a visit end
    record = {"evaluations": evals}
    return {"seed": seed, "record": record, "final_games_good": games_good, "final_total": total}


def test_claims_by_hand() -> None:
    from ewc.experiments.rl_claims import claims, erasure

    schedule = ["a", "b", "a"]
    forget = [{"a": 0.9, "b": 0.0}, {"a": 0.1, "b": 0.8}, {"a": 1.0, "b": 0.6}]
    dqn0 = _run(0, forget, 1, 1.6)
    e = erasure(dqn0, schedule, 10)
    # visit 1 (b) took a from 0.9 to 0.1; visit 2 (a) took b from 0.8 to 0.6
    assert [(p["game"], p["before"], p["after"]) for p in e["pairs"]] == [("a", 0.9, 0.1), ("b", 0.8, 0.6)]
    assert (e["held_good"], e["lost_half"]) == (2, 1)
    assert e["mean_before"] == pytest.approx(0.85) and e["mean_after"] == pytest.approx(0.35)
    results = {
        "schedule": schedule,
        "steps_per_visit": 10,
        "normalised_games": ["a", "b"],
        "runs": {
            "dqn": [dqn0, _run(1, forget, 0, 1.0)],
            "ewc": [_run(0, forget, 2, 1.7), _run(1, forget, 2, 1.5)],
            "ewc-true-labels": [_run(0, forget, 2, 1.8), _run(1, forget, 1, 1.2)],
        },
    }
    # the total averaged over the run: DQN's from its evaluations (0 + 0.9 + 0.9 + 1.6) / 4 = 0.85
    for r, area in zip(results["runs"]["ewc"], (1.0, 1.2), strict=True):
        r["mean_total"] = area
    c = claims(results)
    assert c["mean_total"]["ewc"]["mean_diff"] == pytest.approx(0.25)  # (0.15 + 0.35) / 2
    assert c["inferred_vs_true_mean_total"]["mean_diff"] == pytest.approx(0.25)  # true: 0.85 as DQN
    assert "total averaged over the run, ewc − DQN = +0.25" in c["lines"][1]
    assert c["games_good"]["ewc"]["mean_diff"] == pytest.approx(1.5)  # (2-1 + 2-0) / 2
    assert c["games_good"]["ewc"]["n"] == 2
    assert c["inferred_vs_true"]["mean_diff"] == pytest.approx(0.1)  # (-0.1 + 0.3) / 2
    assert len(c["lines"]) == 4 and c["lines"][0].startswith("Claim 1")
    assert "below half in 2" in c["lines"][0]  # 1 per seed, two seeds
    # a run scored before issue #19 has no final_games_good: counted from its final scores
    for r in results["runs"]["ewc"]:
        r["final_normalised"] = {"a": 0.5, "b": 0.7} if r.pop("final_games_good") == 2 else {}
    assert claims(results)["games_good"]["ewc"]["mean_diff"] == pytest.approx(1.5)


def test_plasticity_by_hand() -> None:
    from ewc.experiments.rl_claims import claims, plasticity

    norm = {
        "a": {"random": 1.0, "reference": 3.0},  # span 2
        "b": {"random": 0.0, "reference": 10.0},  # span 10
        "c": {"random": 1.0, "reference": 1.0},  # cannot be normalised: left out
    }

    def run(seed: int, returns: list[float]) -> dict:
        visits = [{"game": g, "mean_return": x} for g, x in zip("abc", returns, strict=True)]
        record = {"evaluations": [], "visits": visits}
        return {"seed": seed, "record": record, "final_total": 0.0, "final_games_good": 0}

    # (3 - 1) / 2 = 1 (capped at 1), (5 - 0) / 10 = 0.5: mean 0.75; c is left out
    assert plasticity(run(0, [3.0, 5.0, 7.0]), norm) == pytest.approx(0.75)
    assert plasticity(run(0, [2.0, 1.0, 0.0]), norm) == pytest.approx((0.5 + 0.1) / 2)
    assert plasticity(run(0, [0.0, 0.0, 9.0]) | {"record": {"visits": []}}, norm) is None
    results = {
        "schedule": ["a", "b", "c"],
        "steps_per_visit": 10,
        "normalised_games": ["a", "b"],
        "normalisation": norm,
        "runs": {
            "dqn": [run(0, [3.0, 5.0, 0.0]), run(1, [2.0, 5.0, 0.0])],  # 0.75, 0.5
            "ewc": [run(0, [2.0, 1.0, 0.0]), run(1, [1.0, 1.0, 0.0])],  # 0.3, 0.05
        },
    }
    c = claims(results)
    assert c["plasticity"]["ewc"]["mean_diff"] == pytest.approx(-0.45)  # (-0.45 - 0.45) / 2
    assert any(line.startswith("What holding costs, ewc:") and "-0.45" in line for line in c["lines"])
