"""SGD with dropout: the paper's second baseline (Kirkpatrick et al. 2017, Fig. 2C).

Plain fine-tuning, θ ← θ − η ∇L_t(θ), on a network with dropout (Srivastava et al. 2014) after
every hidden layer; Goodfellow et al. (2014) found dropout reduces forgetting. The method only
names the rate; the trainer builds the MLP with it. No memory, no penalty.
"""

from __future__ import annotations

import math

from ewc.methods.base import Method
from ewc.methods.registry import MethodSpec, register


class DropoutMethod(Method):
    """Fine-tuning on a network built with dropout rate ``rate`` (units dropped with probability rate)."""

    name = "dropout"

    def __init__(self, rate: float = 0.5):
        if not (isinstance(rate, int | float) and math.isfinite(rate) and 0.0 <= rate < 1.0):
            raise ValueError(f"dropout: rate must be in [0, 1), got {rate!r}")
        self.dropout = float(rate)


register(
    MethodSpec(
        "dropout",
        DropoutMethod,
        {"rate": 0.5},
        {"rate": (0.2, 0.5)},
        "fine-tuning with dropout",
        label="SGD + dropout",
        color="#17becf",
        order=6,
    )
)
