"""Small jobs for the executor tests, in a module of their own: the local pool's spawned workers
import it (so it imports nothing heavy), and Ray's workers receive it by value."""

from __future__ import annotations

import time


def square_after(spec: tuple[int, float]) -> int:
    """The spec's value squared, after a delay (give later specs shorter ones: they end first)."""
    x, delay = spec
    time.sleep(delay)
    return x * x
