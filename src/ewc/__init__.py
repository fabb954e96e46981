"""ewc: Elastic Weight Consolidation for any PyTorch model.

Public API::

    from ewc import diagonal_fisher, EWC, L2

The names are imported on first use (PEP 562), so that ``import ewc.<module>`` of a module that
needs no torch (the command line's first checks) does not pay torch's import time.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EWC", "FISHER_MODES", "L2", "diagonal_fisher"]
__version__ = "0.1.0"

_PUBLIC = {
    "EWC": "ewc.penalty",
    "L2": "ewc.penalty",
    "FISHER_MODES": "ewc.fisher",
    "diagonal_fisher": "ewc.fisher",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ewc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
