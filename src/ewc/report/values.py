"""Numbers out of ``results.json`` and into text: missing values (None, non-numbers) become NaN so
they flow through arithmetic, and NaN is written as a dash or ``n/a`` rather than ``nan``.

Shared by the tables, the figures and the run comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The per-method scalar metrics of a run, in the order of metrics.csv and the summary figure.
METRIC_KEYS = ("average_accuracy", "bwt", "fwt", "forgetting", "lca", "seconds")


def num(x: Any) -> float:
    """``x`` as a float, NaN for None / non-numbers (so missing values flow through arithmetic)."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def arr(x: Any) -> np.ndarray:
    """Nested list with possible None entries -> float array with NaN."""
    if x is None:
        return np.full(0, np.nan)
    if isinstance(x, list | tuple) and x and isinstance(x[0], list | tuple):
        width = max(len(r) for r in x)
        return np.array([[num(v) for v in r] + [math.nan] * (width - len(r)) for r in x], dtype=float)
    if isinstance(x, list | tuple):
        return np.array([num(v) for v in x], dtype=float)
    return np.asarray(x, dtype=float)


def nan_low(x: float) -> float:
    """Sort key that ranks NaN below every number."""
    return x if math.isfinite(x) else -math.inf


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, a dash when missing."""
    v = num(x)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def stat(m: Mapping[str, Any], key: str) -> tuple[float, float]:
    """(value, 95 % half-width) of a method's metric: the mean ± CI of a ``--seeds`` run (its
    ``stats``), else the single run's value and NaN."""
    s = m.get("stats")
    entry = s.get(key) if isinstance(s, Mapping) else None
    if isinstance(entry, Mapping):
        return num(entry.get("mean")), num(entry.get("ci95"))
    return num(m.get(key)), math.nan


def fmt_ci(value: Any, half: Any = None, digits: int = 3) -> str:
    """``value ± half`` (``fmt`` alone when there is no interval: one seed, or a single run)."""
    h = num(half)
    shown = math.isfinite(h) and math.isfinite(num(value))
    return fmt(value, digits) + (f" ± {h:.{digits}f}" if shown else "")


def fmt_stat(m: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """A method's metric as ``mean ± CI`` (``--seeds`` runs) or its value (single runs)."""
    return fmt_ci(*stat(m, key), digits)


def pct(x: Any, digits: int = 1) -> str:
    """An accuracy in percent, ``n/a`` when missing."""
    v = num(x)
    return "n/a" if not math.isfinite(v) else f"{100 * v:.{digits}f}%"


def pp(x: Any, digits: int = 1) -> str:
    """A difference of accuracies in percentage points."""
    v = num(x)
    return "n/a" if not math.isfinite(v) else f"{100 * v:.{digits}f} pp"


def run_title(results: Mapping[str, Any], what: str) -> str:
    """``what`` followed by the run's dataset (a file: its name), sequence, task count and model
    (unless the default mlp), for headings and figures."""
    cfg = results.get("config", {})
    bits = [str(cfg[k]) for k in ("dataset", "sequence") if cfg.get(k) is not None]
    if bits and str(cfg.get("dataset", "")).lower().endswith(".npz"):
        bits[0] = Path(bits[0]).name
    T = len(results["tasks"])
    bits.append(f"{T} task{'s' if T != 1 else ''}")
    if cfg.get("model") not in (None, "mlp"):
        bits.append(f"model {cfg['model']}")
    if isinstance(results.get("per_seed"), list):
        n = len(results["per_seed"])
        bits.append(f"{n} seed{'s' if n != 1 else ''}")
    return f"{what} ({', '.join(bits)})"
