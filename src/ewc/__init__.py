"""ewc: Elastic Weight Consolidation for any PyTorch model.

Public API::

    from ewc import diagonal_fisher, EWC, L2
"""

from ewc.fisher import FISHER_MODES, diagonal_fisher
from ewc.penalty import EWC, L2

__all__ = ["EWC", "FISHER_MODES", "L2", "diagonal_fisher"]
__version__ = "0.1.0"
