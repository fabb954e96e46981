"""Can the agent's task detector tell the five MinAtar games apart? (issue #19, item 3)

A cheap proxy for the full protocol's ``ewc`` arm: frames of each game under the uniform random
policy (sticky actions 0.1, one ``Game`` per game, episodes seeded 1, 2, ...), cut into blocks of
``--block`` frames, turned into ``block_features`` (× ``--scale``) and fed to a ``TaskDetector``
in the order of the full protocol's schedule (``make_schedule(GAMES, 10, seed, min_visits=2)``,
``--steps`` frames per visit; a game's second visit reads frames 8 000 on). Per setting and
schedule seed: the contexts found, and whether each game's majority context is its own (one to
one). A setting passes a seed when it finds exactly five contexts, one per game.

    python scripts/rl_detector_games.py --seeds 12 --block 64 --scale 1 --kappa0 0.1 --alpha0 3 \
        --var-floor 0.001

Comma lists in ``--block``, ``--scale``, ``--kappa0``, ``--alpha0``, ``--var-floor`` and
``--hazard`` run every combination; ``--explain SEED`` prints the first block of each visit.
Random play is not a learning agent's play (a learning policy makes a game's frames drift more),
so passing here is necessary, not sufficient. ``--replay DIR`` reads instead the frames a
learning single-task DQN saw: the replay buffers of the reference checkpoints
``DIR/reference-{game}.pt`` that ``ewc rl`` writes (their order of insertion, ε decaying over
the visit); then ``--steps`` frames per visit, a game's first visit from its first frame (ε = 1
at first) and its second ending at its last (the trained policy): the most drift the file holds.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings

import numpy as np
import torch

from ewc.rl.env import Game
from ewc.rl.protocol import make_schedule
from ewc.taskid import TaskDetector

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
SECOND_VISIT = 8_000  # frame offset of a game's second visit


def frames_counts(game: str, n: int, seed: int = 0) -> torch.Tensor:
    """Per-frame active-cell counts per channel ``[n, C]`` of ``game`` under random play."""
    rng = np.random.default_rng(seed)
    env = Game(game, seed=seed)
    episode = 1
    obs = env.reset(seed=episode)
    out = []
    for _ in range(n):
        out.append(obs.sum(dim=(1, 2)))
        obs, _, done = env.step(int(rng.integers(6)))
        if done:
            episode += 1
            obs = env.reset(seed=episode)
    return torch.stack(out)


def replay_counts(directory: str, game: str) -> torch.Tensor:
    """Per-frame channel counts ``[n, C]`` of the observations in a reference checkpoint's replay,
    in the order they were stored (the buffer must not have wrapped around)."""
    from ewc.rl.replay import unpack_bits
    from ewc.state import safe_load

    state = safe_load(f"{directory}/reference-{game}.pt")["agent"]["replay"]
    (buf,) = state["buffers"].values()
    if int(buf["added"]) != int(buf["size"]):
        raise SystemExit(f"reference-{game}.pt: its replay wrapped around; the frames are out of order")
    shape = [int(d) for d in buf["obs_shape"]]
    packed = buf["obs"]
    return torch.cat(
        [unpack_bits(packed[i : i + 5_000], shape).sum(dim=(2, 3)) for i in range(0, packed.shape[0], 5_000)]
    )


def one_schedule(
    counts: dict[str, torch.Tensor],
    block: int,
    scale: float,
    detector: dict[str, float],
    seed: int,
    steps: int,
    explain: bool = False,
    offsets: tuple[int, int] = (0, SECOND_VISIT),
) -> tuple[int, bool]:
    """(contexts found, one context per game) for the schedule of ``seed``, with the detector's
    ``kappa0``, ``alpha0``, ``var_floor`` and ``hazard`` from ``detector``; ``explain``: print each
    visit's first block's log-likelihoods (per known context, and as a new task)."""
    det = TaskDetector(max_tasks=10, seed=seed, proj_dim=None, **detector)
    visits = {g: 0 for g in GAMES}
    ids: dict[str, list[int]] = {g: [] for g in GAMES}
    for game in make_schedule(GAMES, 10, seed, min_visits=2):
        start = offsets[visits[game]]
        visits[game] += 1
        for b in range(steps // block):
            frames = counts[game][start + b * block : start + (b + 1) * block]
            ids[game].append(det.update((frames.sqrt().mean(0) * scale)[None]))
            if explain and b == 0:
                h = det.history[-1]
                known = ", ".join(f"{ll:.1f}" for ll in h["loglik"]) or "none"
                print(
                    f"  {game:<15} first block: {h['event']} -> {h['task']}; log-lik per context [{known}], "
                    f"new task {h['loglik_new']:.1f}"
                )
    major = {g: max(set(v), key=v.count) for g, v in ids.items()}
    return det.num_tasks, det.num_tasks == len(GAMES) and len(set(major.values())) == len(GAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=12, help="schedule seeds 0..N-1")
    p.add_argument("--steps", type=int, default=6_000, help="frames per visit")
    p.add_argument("--block", default="64", help="frames per detector block (comma list)")
    p.add_argument("--scale", default="1", help="factor on the block features (comma list)")
    p.add_argument("--kappa0", default="0.1", help="detector kappa0 (comma list)")
    p.add_argument("--alpha0", default="3", help="detector alpha0 (comma list)")
    p.add_argument("--var-floor", default="0.001", help="detector var_floor (comma list)")
    p.add_argument("--hazard", default="0.02", help="detector hazard (comma list)")
    p.add_argument("--replay", default=None, help="read learning frames from DIR/reference-{game}.pt")
    p.add_argument(
        "--explain", type=int, default=None, help="print the first block of each visit of this seed"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the cap warning cannot fire below 10 contexts
    if args.replay is None:
        counts = {g: frames_counts(g, SECOND_VISIT + args.steps) for g in GAMES}
        offsets = (0, SECOND_VISIT)
    else:
        counts = {g: replay_counts(args.replay, g) for g in GAMES}
        n = min(c.shape[0] for c in counts.values())
        if 2 * args.steps > n:
            p.error(f"--steps {args.steps}: two visits need {2 * args.steps} frames, the replays hold {n}")
        offsets = (0, n - args.steps)
    knobs = (args.block, args.scale, args.kappa0, args.alpha0, args.var_floor, args.hazard)
    grid = [[float(x) for x in str(v).split(",")] for v in knobs]
    for block, scale, kappa0, alpha0, floor, hazard in itertools.product(*grid):
        detector = {"kappa0": kappa0, "alpha0": alpha0, "var_floor": floor, "hazard": hazard}
        if args.explain is not None:
            print(f"schedule seed {args.explain}: {make_schedule(GAMES, 10, args.explain, min_visits=2)}")
            one_schedule(counts, int(block), scale, detector, args.explain, args.steps, True, offsets)
        res = [
            one_schedule(counts, int(block), scale, detector, s, args.steps, offsets=offsets)
            for s in range(args.seeds)
        ]
        print(
            f"block {int(block)} scale {scale:g} kappa0 {kappa0:g} alpha0 {alpha0:g} var_floor {floor:g} "
            f"hazard {hazard:g}: five contexts, one per game, in {sum(ok for _, ok in res)}/{args.seeds} "
            f"schedules; contexts {[n for n, _ in res]}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
