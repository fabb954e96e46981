"""The look shared by every report figure: matplotlib style, figure creation and saving, and each
method's label and colour (so a method is drawn the same way in every figure of every report).

matplotlib is imported lazily (``import ewc`` stays fast) and only the object-oriented ``Figure``
API is used, so no pyplot state is touched; the Agg backend is selected when pyplot has not been
imported yet.  Figures are written to a temporary file then renamed, so an interrupted report
never leaves a half-written PNG behind.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ewc.methods import METHOD_SPECS
from ewc.state import atomic_write_bytes

DPI = 130

# Every registered method's label and colour are declared in its spec (ewc.methods: SGD blue,
# L2 green, EWC red, as in the paper's Fig. 2); unknown names get distinct extra colours.


def _known_colors() -> dict[str, str]:
    return {name: spec.color for name, spec in METHOD_SPECS.items()}


def _known_labels() -> dict[str, str]:
    return {name: spec.label for name, spec in METHOD_SPECS.items()}


_EXTRA_COLORS = ["#9467bd", "#e377c2", "#17becf", "#bcbd22", "#8c564b", "#7f7f7f", "#aec7e8", "#98df8a"]

_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def canonical_name(name: str) -> str:
    """Normalise a method name for colour/label lookup (``Online_EWC`` -> ``online-ewc``)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    return {"onlineewc": "online-ewc", "multitask": "joint", "multi-task": "joint"}.get(key, key)


def method_label(name: str) -> str:
    """Human-readable label of a method (``online-ewc`` -> ``Online EWC``)."""
    return _known_labels().get(canonical_name(name), name)


def method_color(name: str, others: Sequence[str] = ()) -> str:
    """Colour of a method: fixed for known methods, else a distinct one by position in ``others``.

    Pass the full list of methods being drawn as ``others`` so unknown methods get distinct
    colours that stay the same in every figure of a report.
    """
    key = canonical_name(name)
    known = _known_colors()
    if key in known:
        return known[key]
    used = {known[canonical_name(m)] for m in others if canonical_name(m) in known}
    free = [c for c in _EXTRA_COLORS if c not in used] or _EXTRA_COLORS
    unknown = sorted({canonical_name(m) for m in others if canonical_name(m) not in known} | {key})
    return free[unknown.index(key) % len(free)]


def load_matplotlib() -> Any:
    """Import matplotlib lazily; select Agg unless the user already set up pyplot."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib


def figure_style() -> Any:
    """A context manager with the report's matplotlib style (font sizes, no top/right spines)."""
    return load_matplotlib().rc_context(_RC)


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure (no pyplot state, constrained layout) for the report figures."""
    load_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG, atomically (creating the folder if needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
