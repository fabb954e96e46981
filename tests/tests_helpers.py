"""A user's own model factories, importable as ``tests_helpers:NAME`` once tests/ is on sys.path
(``--model tests_helpers:make_net``): the contract of ``ewc.models`` from the outside."""

from __future__ import annotations

import math

from torch import Tensor, nn


def make_net(input_shape: tuple[int, ...], num_outputs: int, *, width: int = 24) -> nn.Module:
    """Flatten, one hidden layer of ``width`` tanh units, the output layer (any input shape)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh(), nn.Linear(width, num_outputs)
    )


class TokenNet(nn.Module):
    """Token ids ``[N, T]`` (int64) → embeddings → mean over positions → logits."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, vocab: int = 50, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x).mean(dim=1))


def wrong_width(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """A factory that breaks the contract: one output too many."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs + 1))


def not_a_module(input_shape: tuple[int, ...], num_outputs: int) -> int:
    """A factory that breaks the contract: no nn.Module."""
    return 3
