"""A one-line progress bar for a training run (stderr, when it is a terminal)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise. It is redrawn at
    most every ``interval`` seconds (and at the end); ``info`` may be a function, called only then
    (reading the loss there computes a penalty's value only for the steps shown)."""

    def __init__(self, total: int, label: str, enabled: bool | None = None, interval: float = 0.1):
        self.total, self.label, self.n = total, label, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self.interval, self.drawn = interval, -math.inf

    def update(self, k: int = 1, info: str | Callable[[], str] = "") -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.drawn < self.interval and self.n < self.total:
            return
        self.drawn = now
        if callable(info):
            info = info()
        frac = self.n / max(1, self.total)
        bar = "#" * int(30 * frac)
        rate = self.n / max(1e-9, time.perf_counter() - self.start)
        sys.stderr.write(f"\r{self.label:<12} [{bar:<30}] {100 * frac:5.1f}% {rate:7.1f} it/s {info}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
