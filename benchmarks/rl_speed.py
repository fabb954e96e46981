"""Throughput of the continual-RL agent (``ewc.rl``) next to the raw pieces it is made of.

Measured side by side in one run, on one torch thread:

1. raw MinAtar: random actions through ``minatar.Environment`` (``act`` + ``state``), steps/s
   per game, and the same through ``ewc.rl.env.Game`` (padded float observations);
2. a bare DQN update loop: ``QNetwork`` Double-DQN Huber loss on a random batch of 32 binary
   observations, backward, gradient clipping, fused Adam step (no replay, no agent), updates/s;
3. the agent's training loop, ``Agent.step()`` with ``train_every=1`` (an update every env step),
   without and with an active EWC term (one game consolidated before), env steps/s;
4. ratios: the agent's time per step over (raw step + bare update), the framework overhead;
5. where a step's time goes: ε-greedy action (one forward pass), a replay ``add`` (bit-packing),
   a replay ``sample`` of 32, the agent's step without updates (env + action + store), and the
   update (the step with one update minus the step without);
6. evaluation: env steps/s of ``Agent.evaluate`` (30 episodes played in lockstep, one batched
   forward pass per step) next to the same episodes played one after another with a batch-1
   forward pass per step (how evaluation ran before issue #19).

All times are CPU time of this process (``time.process_time``), so that another job on a shared
machine slows the numbers less than wall time would.

Run (from the repository root)::

    .venv/bin/python benchmarks/rl_speed.py
    .venv/bin/python benchmarks/rl_speed.py --agent-steps 3000 --games breakout,space_invaders,seaquest
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from ewc.rl.agent import Agent, DQNConfig, td_targets
from ewc.rl.env import GAMES, NUM_ACTIONS, OBS_SIZE, Game, _minatar, max_channels
from ewc.rl.qnet import QNetwork


def raw_minatar(game: str, steps: int, seed: int = 0) -> float:
    """Random-action steps/s of MinAtar itself (act + state, reset at episode ends)."""
    env = _minatar().Environment(game, sticky_action_prob=0.1)
    env.seed(seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(NUM_ACTIONS, size=steps)
    tic = time.process_time()
    for a in actions:
        _, done = env.act(int(a))
        env.state()
        if done:
            env.reset()
    return steps / (time.process_time() - tic)


def wrapped(game: str, steps: int, seed: int = 0) -> float:
    """Random-action steps/s through ewc.rl.env.Game (padded float tensors)."""
    env = Game(game, seed=seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(NUM_ACTIONS, size=steps)
    tic = time.process_time()
    for a in actions:
        _, _, done = env.step(int(a))
        if done:
            env.reset()
    return steps / (time.process_time() - tic)


def bare_updates(updates: int, conv: int, hidden: int, batch: int = 32, seed: int = 0) -> float:
    """Double-DQN updates/s of a QNetwork on random binary batches: the update alone."""
    torch.manual_seed(seed)
    c = max_channels()
    net = QNetwork(c, NUM_ACTIONS, 1, conv, hidden)
    target = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=3.125e-4, fused=True)
    gen = torch.Generator().manual_seed(seed)
    n = 64  # a pool of random batches, cycled (sampling cost is not part of the update)
    obs = (torch.rand(n, batch, c, OBS_SIZE, OBS_SIZE, generator=gen) < 0.1).float()
    nxt = (torch.rand(n, batch, c, OBS_SIZE, OBS_SIZE, generator=gen) < 0.1).float()
    act = torch.randint(NUM_ACTIONS, (n, batch), generator=gen)
    rew = torch.randint(2, (n, batch), generator=gen).float()
    done = (torch.rand(n, batch, generator=gen) < 0.05).float()
    params = list(net.parameters())

    def step(i: int) -> None:
        k = i % n
        y = td_targets(net, target, nxt[k], rew[k], done[k], 0, 0.99, True)
        q = net(obs[k], 0).gather(1, act[k].unsqueeze(1)).squeeze(1)
        loss = F.huber_loss(q, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 10.0)
        opt.step()

    for i in range(20):  # warm-up
        step(i)
    tic = time.process_time()
    for i in range(updates):
        step(i)
    return updates / (time.process_time() - tic)


def agent_steps(game: str, steps: int, warmup: int, conv: int, hidden: int, ewc: bool) -> tuple[float, int]:
    """Agent.step() env steps/s (one update per step) on ``game`` after a warm-up visit of
    breakout (consolidated when ``ewc``) and ``warmup`` steps of ``game``; returns the EWC term count."""
    config = DQNConfig(
        replay_capacity=max(10_000, 2 * (warmup + steps)),
        learning_starts=32,
        train_every=1,
        eps_decay_steps=max(1, warmup),
        ewc_min_steps=warmup if ewc else 10**18,
        fisher_samples=256,
        conv_channels=conv,
        hidden=hidden,
        seed=0,
    )
    agent = Agent(config)
    first = "breakout" if game != "breakout" else "space_invaders"
    agent.begin_visit(first)
    for _ in range(warmup):
        agent.step()
    agent.end_visit()
    agent.begin_visit(game)
    for _ in range(warmup):
        agent.step()
    tic = time.process_time()
    for _ in range(steps):
        agent.step()
    rate = steps / (time.process_time() - tic)
    return rate, agent.method.reg.num_tasks


def step_parts(game: str, steps: int, conv: int, hidden: int) -> dict[str, float]:
    """Milliseconds (CPU) per call of each part of ``Agent.step`` on ``game`` (see module doc)."""
    config = DQNConfig(
        replay_capacity=10_000, learning_starts=10**9, eps_decay_steps=1, conv_channels=conv, hidden=hidden
    )
    agent = Agent(config)
    agent.begin_visit(game)
    for _ in range(300):
        agent.step()
    ms: dict[str, float] = {}
    tic = time.process_time()
    for _ in range(steps):
        agent.step()
    ms["step without update"] = (time.process_time() - tic) / steps * 1e3
    obs = torch.zeros(agent.obs_shape)
    obs[0, 0, 0] = 1.0
    tic = time.process_time()
    for _ in range(steps):
        agent.act(obs, 0.0)
    ms["ε-greedy action"] = (time.process_time() - tic) / steps * 1e3
    ctx = agent.context
    frames = [(torch.rand(agent.obs_shape) < 0.1).float() for _ in range(steps + 1)]
    tic = time.process_time()
    for i in range(steps):
        agent.replay.add(ctx, frames[i], 0, 0.0, frames[i + 1], False)
    ms["replay add"] = (time.process_time() - tic) / steps * 1e3
    buf = agent.replay.buffer(ctx)
    tic = time.process_time()
    for _ in range(steps):
        buf.sample(32, agent.gen)
    ms["replay sample (32)"] = (time.process_time() - tic) / steps * 1e3
    return ms


def eval_rates(game: str, episodes: int, conv: int, hidden: int) -> tuple[float, float]:
    """Env steps/s of Agent.evaluate (lockstep) and of the same episodes one at a time (batch 1)."""
    from ewc.rl.config import derive_seed

    agent = Agent(DQNConfig(conv_channels=conv, hidden=hidden, seed=0))
    idx = GAMES.index(game)
    tic = time.process_time()
    r = agent.evaluate(game, episodes, 0.05, seed=1)
    batched = sum(r["contexts"].values()) / (time.process_time() - tic)
    env = Game(game, seed=1)
    gen = torch.Generator().manual_seed(1)
    n = 0
    tic = time.process_time()
    for ep in range(episodes):
        obs = env.reset(seed=derive_seed(1, 3, ep))
        for _ in range(27_000):
            obs, _, done = env.step(agent.act(obs, 0.05, idx, gen))
            n += 1
            if done:
                break
    return batched, n / (time.process_time() - tic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--games", default="breakout,space_invaders", help="comma-separated MinAtar games")
    p.add_argument(
        "--raw-steps", type=int, default=20_000, help="random env steps per game (raw and wrapped)"
    )
    p.add_argument("--updates", type=int, default=1_000, help="timed bare DQN updates")
    p.add_argument("--agent-steps", type=int, default=1_500, help="timed Agent.step() calls per setting")
    p.add_argument("--warmup", type=int, default=300, help="agent steps per game before timing")
    p.add_argument("--conv-channels", type=int, default=16, help="Q-network filters (MinAtar: 16)")
    p.add_argument("--hidden", type=int, default=128, help="Q-network hidden units (MinAtar: 128)")
    p.add_argument("--eval-episodes", type=int, default=30, help="episodes per evaluation (ewc rl: 30)")
    p.add_argument("--skip-parts", action="store_true", help="skip the step breakdown and evaluation")
    args = p.parse_args(argv)
    games = [g.strip() for g in args.games.split(",") if g.strip()]
    bad = [g for g in games if g not in GAMES]
    if bad:
        p.error(f"unknown game(s) {', '.join(bad)}; expected some of {', '.join(GAMES)}")
    torch.set_num_threads(1)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, 1 thread; net conv {args.conv_channels}, hidden {args.hidden}\n")

    upd = bare_updates(args.updates, args.conv_channels, args.hidden)
    print(
        f"bare DQN update loop (batch 32, Double DQN, Adam fused): {upd:8.0f} updates/s "
        f"({1e3 / upd:.2f} ms)\n"
    )
    head = (
        f"{'game':<15} {'raw MinAtar':>12} {'Game wrapper':>13} {'agent':>9} {'agent+EWC':>10} {'ideal':>8}"
    )
    head += f" {'overhead':>9} {'+EWC':>6}"
    print(head)
    print(f"{'':<15} {'steps/s':>12} {'steps/s':>13} {'steps/s':>9} {'steps/s':>10} {'steps/s':>8}")
    for g in games:
        raw = raw_minatar(g, args.raw_steps)
        wrap = wrapped(g, args.raw_steps)
        plain, k0 = agent_steps(g, args.agent_steps, args.warmup, args.conv_channels, args.hidden, ewc=False)
        withewc, k1 = agent_steps(g, args.agent_steps, args.warmup, args.conv_channels, args.hidden, ewc=True)
        assert k0 == 0 and k1 >= 1, (k0, k1)
        ideal = 1.0 / (1.0 / raw + 1.0 / upd)  # raw env step + bare update, nothing else
        print(
            f"{g:<15} {raw:12.0f} {wrap:13.0f} {plain:9.0f} {withewc:10.0f} {ideal:8.0f} "
            f"{ideal / plain:8.2f}x {plain / withewc:5.2f}x"
        )
    print(
        "\nideal = 1 / (1/raw + 1/bare update); overhead = ideal / agent (the agent's time per step over raw "
        "step + bare update: replay, ε-greedy forward, wrapper); +EWC = agent / agent+EWC"
    )
    if not args.skip_parts:
        print("\nwhere a step's time goes (ms CPU per call; update (bare): the bare DQN update above)")
        for g in games:
            parts = step_parts(g, args.agent_steps, args.conv_channels, args.hidden)
            parts["update (bare)"] = 1e3 / upd
            print(f"{g:<15} " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
        print(f"\nevaluation ({args.eval_episodes} episodes, ε = 0.05, untrained agent), env steps/s")
        print(f"{'game':<15} {'lockstep':>9} {'one by one':>11} {'speed-up':>9}")
        for g in games:
            batched, single = eval_rates(g, args.eval_episodes, args.conv_channels, args.hidden)
            print(f"{g:<15} {batched:9.0f} {single:11.0f} {batched / single:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
