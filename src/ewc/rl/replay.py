"""Experience replay: a fixed-capacity circular buffer per task context.

MinAtar observations are binary, so they are stored bit-packed (8 pixels per ``uint8``): a
``[10, 10, 10]`` observation costs 125 bytes instead of 4000 as float32, and a 100k-transition
buffer with observations and next observations about 25 MB. Sampling is uniform over the filled
part, drawn from a caller's ``torch.Generator`` (seeded runs are reproducible). State is a dict of
plain tensors and ints (loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ewc.checks import check_count
from ewc.state import check_finite_state

__all__ = ["ReplayBuffer", "TaskReplay", "pack_bits", "unpack_bits"]


def pack_bits(x: Tensor) -> Tensor:
    """Binary tensor ``[n, *shape]`` -> ``uint8 [n, ceil(numel / 8)]``, most significant bit first
    (raises on non-binary values). numpy's packbits: ~3x faster than the same in torch ops."""
    flat = x.detach().reshape(x.shape[0], -1).cpu().numpy()
    with np.errstate(invalid="ignore"):  # NaN / negative values: caught just below
        bits = flat.astype(np.uint8)
    if not np.array_equal(bits, flat) or bits.max(initial=0) > 1:
        raise ValueError("observations must be binary (0/1) to be stored bit-packed")
    return torch.from_numpy(np.packbits(bits, axis=1))


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [n, bytes]`` -> ``float32 [n, *shape]``."""
    numel = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), axis=1, count=numel)
    return torch.from_numpy(bits.astype(np.float32)).reshape(-1, *shape)


class ReplayBuffer:
    """Circular buffer of ``(obs, action, reward, next_obs, done)`` for binary observations."""

    def __init__(self, capacity: int, obs_shape: Sequence[int]) -> None:
        self.capacity = check_count(capacity, "capacity")
        self.obs_shape = tuple(int(d) for d in obs_shape)
        nbytes = math.ceil(math.prod(self.obs_shape) / 8)
        self.obs = torch.zeros(capacity, nbytes, dtype=torch.uint8)
        self.next_obs = torch.zeros(capacity, nbytes, dtype=torch.uint8)
        self.actions = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity, dtype=torch.float32)
        self.dones = torch.zeros(capacity, dtype=torch.bool)
        self.pos = 0  # next slot to write
        self.size = 0  # filled slots
        self.added = 0  # transitions ever added
        # (the last next_obs added, its version counter, its packed bits): an episode's next
        # observation is the following transition's observation, packed once
        self._last: tuple[Tensor, int, Tensor] | None = None

    def __len__(self) -> int:
        return self.size

    def add(self, obs: Tensor, action: int, reward: float, next_obs: Tensor, done: bool) -> None:
        """Store one transition, overwriting the oldest when full."""
        if tuple(obs.shape) != self.obs_shape or tuple(next_obs.shape) != self.obs_shape:
            raise ValueError(f"observations must have shape {self.obs_shape}, got {tuple(obs.shape)}")
        i = self.pos
        last = self._last
        same = last is not None and last[0] is obs and last[1] == obs._version  # not changed in place
        self.obs[i] = last[2] if same and last is not None else pack_bits(obs.unsqueeze(0))[0]
        packed = pack_bits(next_obs.unsqueeze(0))[0]
        self.next_obs[i] = packed
        self._last = (next_obs, next_obs._version, packed)
        self.actions[i] = int(action)
        self.rewards[i] = float(reward)
        self.dones[i] = bool(done)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.added += 1

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """``batch_size`` transitions drawn uniformly with replacement: obs, actions, rewards,
        next obs (float32 ``[b, *obs_shape]``) and dones (float32 0/1)."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (batch_size,), generator=generator)
        return (
            unpack_bits(self.obs[idx], self.obs_shape),
            self.actions[idx],
            self.rewards[idx],
            unpack_bits(self.next_obs[idx], self.obs_shape),
            self.dones[idx].to(torch.float32),
        )

    def observations(self, n: int, generator: torch.Generator) -> Tensor:
        """Up to ``n`` distinct stored observations (float32), drawn without replacement."""
        idx = torch.randperm(self.size, generator=generator)[:n]
        return unpack_bits(self.obs[idx], self.obs_shape)

    def state_dict(self) -> dict[str, Any]:
        """The filled part and the counters, as plain tensors and ints."""
        n = self.size
        return {
            "capacity": self.capacity,
            "obs_shape": list(self.obs_shape),
            "obs": self.obs[:n].clone(),
            "next_obs": self.next_obs[:n].clone(),
            "actions": self.actions[:n].clone(),
            "rewards": self.rewards[:n].clone(),
            "dones": self.dones[:n].clone(),
            "pos": self.pos,
            "size": self.size,
            "added": self.added,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` of a buffer with the same capacity and observation shape."""
        if int(state["capacity"]) != self.capacity or tuple(state["obs_shape"]) != self.obs_shape:
            raise ValueError(
                f"replay state has capacity {state['capacity']} and obs shape {tuple(state['obs_shape'])}, "
                f"this buffer {self.capacity} and {self.obs_shape}"
            )
        n = int(state["size"])
        keys = ("obs", "next_obs", "actions", "rewards", "dones")
        if not 0 <= n <= self.capacity:
            raise ValueError(f"replay state is inconsistent: size {n}, capacity {self.capacity}")
        for key in keys:  # all checked before any is written
            mine, t = getattr(self, key), state[key]
            if not isinstance(t, Tensor) or t.dtype != mine.dtype or t.shape != (n, *mine.shape[1:]):
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"replay state {key!r} must be {mine.dtype} {(n, *mine.shape[1:])}, got {what}"
                )
        check_finite_state(state["rewards"], "replay state 'rewards'")
        for key in keys:
            getattr(self, key)[:n] = state[key]
        self.pos, self.size, self.added = int(state["pos"]), n, int(state["added"])


class TaskReplay:
    """One :class:`ReplayBuffer` per task context, created on first use; contexts never mix."""

    def __init__(self, capacity: int, obs_shape: Sequence[int]) -> None:
        ReplayBuffer(1, obs_shape)  # validates obs_shape early
        self.capacity = check_count(capacity, "capacity")
        self.obs_shape = tuple(int(d) for d in obs_shape)
        self.buffers: dict[int, ReplayBuffer] = {}

    def buffer(self, task: int) -> ReplayBuffer:
        """The buffer of context ``task`` (created empty on first use)."""
        if task not in self.buffers:
            self.buffers[task] = ReplayBuffer(self.capacity, self.obs_shape)
        return self.buffers[task]

    def size(self, task: int) -> int:
        """Transitions stored for ``task`` (0 for an unknown context)."""
        return self.buffers[task].size if task in self.buffers else 0

    def add(self, task: int, obs: Tensor, action: int, reward: float, next_obs: Tensor, done: bool) -> None:
        self.buffer(task).add(obs, action, reward, next_obs, done)

    def clear(self, task: int) -> None:
        """Forget every transition of ``task``."""
        self.buffers.pop(task, None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "obs_shape": list(self.obs_shape),
            "buffers": {str(t): b.state_dict() for t, b in sorted(self.buffers.items())},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity or tuple(state["obs_shape"]) != self.obs_shape:
            raise ValueError("task replay state has another capacity or observation shape")
        buffers = {}
        for key, sub in state["buffers"].items():
            b = ReplayBuffer(self.capacity, self.obs_shape)
            b.load_state_dict(sub)
            buffers[int(key)] = b
        self.buffers = buffers
