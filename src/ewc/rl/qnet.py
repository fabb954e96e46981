"""The Q-network: MinAtar's standard DQN torso with per-task gains and biases on every layer.

Shared layers (Young & Tian 2019): conv 3x3, stride 1, ``conv_channels`` filters -> ReLU ->
linear ``hidden`` -> ReLU -> linear ``num_actions``. For task context ``t`` every layer's output
(pre-activation) is modulated element-wise, ``y = gain_t * layer(x) + bias_t``: per channel after
the convolution, per unit after the hidden layer and per action on the Q outputs. This is the
EWC paper's task-specific "biases and gains" (Kirkpatrick et al. 2017, RL section); they start at
gain 1 / bias 0, so a fresh context is the shared network itself.

Each task's gains and biases are separate ``nn.Parameter`` objects, named
``task_gain.{t}.{layer}`` and ``task_bias.{t}.{layer}``: a context that is not used in a batch gets
no gradient at all (``grad`` stays ``None``), so Adam leaves it exactly as it was rather than
moving it with stale momentum. Every parameter whose name does not start with ``task_`` is shared
(:meth:`QNetwork.shared_parameter_names`); EWC anchors those only. :class:`SharedView` is the
module a library :class:`ewc.methods.Method` is set up on, so that it too sees only those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.checks import check_count

__all__ = ["TASK_PREFIX", "QNetwork", "SharedView"]

TASK_PREFIX = "task_"


class QNetwork(nn.Module):
    """Q-values ``[n, num_actions]`` of observations ``[n, in_channels, 10, 10]`` in a task context."""

    def __init__(
        self,
        in_channels: int,
        num_actions: int = 6,
        num_tasks: int = 1,
        conv_channels: int = 16,
        hidden: int = 128,
        size: int = 10,
    ) -> None:
        super().__init__()
        for v, what in (
            (in_channels, "in_channels"),
            (num_actions, "num_actions"),
            (num_tasks, "num_tasks"),
            (conv_channels, "conv_channels"),
            (hidden, "hidden"),
        ):
            check_count(v, what)
        if size < 3:
            raise ValueError(f"size must be >= 3 for a 3x3 convolution, got {size!r}")
        self.num_tasks = num_tasks
        self.num_actions = num_actions
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, stride=1)
        self.fc = nn.Linear(conv_channels * (size - 2) ** 2, hidden)
        self.out = nn.Linear(hidden, num_actions)
        widths = (conv_channels, hidden, num_actions)
        self.task_gain = nn.ModuleList(
            nn.ParameterList(nn.Parameter(torch.ones(w)) for w in widths) for _ in range(num_tasks)
        )
        self.task_bias = nn.ModuleList(
            nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths) for _ in range(num_tasks)
        )

    def shared_parameter_names(self) -> list[str]:
        """Names of the parameters every task uses (all but the per-task gains and biases)."""
        return [n for n, _ in self.named_parameters() if not n.startswith(TASK_PREFIX)]

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """The gains and biases of context ``task``."""
        return [*self.task_gain[task], *self.task_bias[task]]

    @torch.no_grad()
    def reset_task(self, task: int) -> None:
        """Context ``task`` back to gain 1 / bias 0 (e.g. an id the task detector retracted)."""
        for g in self.task_gain[task]:
            g.fill_(1.0)
        for b in self.task_bias[task]:
            b.zero_()

    def _context(self, task: int | Tensor, n: int) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer gains and biases: ``[w]`` for an int context, ``[n, w]`` for per-sample ones."""
        if isinstance(task, Tensor):
            if task.dim() == 0:
                task = int(task)
            else:
                if task.shape != (n,) or task.dtype != torch.long:
                    raise ValueError(
                        f"per-sample task ids must be a LongTensor [{n}], got "
                        f"{task.dtype} {tuple(task.shape)}"
                    )
                if n and (int(task.min()) < 0 or int(task.max()) >= self.num_tasks):
                    raise ValueError(f"task ids must be in 0..{self.num_tasks - 1}")
                # only the contexts present get a graph (and a gradient)
                uniq, inv = torch.unique(task, return_inverse=True)
                ids = uniq.tolist()
                gains = [torch.stack([self.task_gain[t][k] for t in ids])[inv] for k in range(3)]
                biases = [torch.stack([self.task_bias[t][k] for t in ids])[inv] for k in range(3)]
                return gains, biases
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in 0..{self.num_tasks - 1} or a LongTensor, got {task!r}")
        return list(self.task_gain[task]), list(self.task_bias[task])

    def forward(self, x: Tensor, task: int | Tensor) -> Tensor:
        """Q-values of ``x`` under context ``task`` (an int, or a LongTensor ``[n]`` of per-sample ids)."""
        gains, biases = self._context(task, x.shape[0])
        per_sample = gains[0].dim() == 2
        g0, b0 = (
            (gains[0][:, :, None, None], biases[0][:, :, None, None])
            if per_sample
            else (gains[0][:, None, None], biases[0][:, None, None])
        )
        h = F.relu(self.conv(x) * g0 + b0)
        h = F.relu(self.fc(h.flatten(1)) * gains[1] + biases[1])
        return self.out(h) * gains[2] + biases[2]


class SharedView(nn.Module):
    """The shared layers of a :class:`QNetwork` as a module of their own, for a ``Method``.

    Its parameters are the net's shared ones under the same names (``conv.*``, ``fc.*``,
    ``out.*``), the very same tensors, so a method set up on it anchors, tracks or measures those
    only (the per-task gains and biases are not its parameters). Its ``forward(x)`` is the whole
    net in context :attr:`task`, which the agent sets before a hook that may run the model.
    """

    net: QNetwork

    def __init__(self, net: QNetwork, task: int = 0) -> None:
        super().__init__()
        self.conv, self.fc, self.out = net.conv, net.fc, net.out
        object.__setattr__(self, "net", net)  # not a submodule: its task parameters stay outside
        self.task = task

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.task)
