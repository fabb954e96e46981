"""Online, unsupervised task identification for data streams (``TaskDetector``).

In the spirit of the Forget-Me-Not process that the EWC paper's RL agent used to infer the task
context: every known task keeps one simple generative model of the inputs; each incoming batch is
scored under every known model and under a fresh "new task" model, and a Bayesian switch prior
(hazard rate) turns the scores into a posterior over "same task / switch to known task k / new
task". The batch gets the MAP task id.

The design choices and the reasons for them (projection, Normal-Gamma model, "new task"
evidence, switch prior, tentative ids, labels, cap) are in ``docs/taskid.md``.

Bad input: the feature dimension is fixed by the first non-empty batch and a change raises
``ValueError``; rows with NaN/inf are dropped and counted (``n_dropped``) under the default
``nan_policy="drop"``, or raise with ``nan_policy="raise"``; an empty batch (or one whose rows were
all dropped) changes nothing and returns the current id (``-1`` before any task exists).

Streams to test it on and the scores of its ids are in :mod:`ewc.taskid_eval`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ewc.checks import NON_NEGATIVE, POSITIVE, POSITIVE_INT, Interval, check
from ewc.taskid_state import COUNTERS, check_config, restore

__all__ = ["TaskCapWarning", "TaskDetector"]


class TaskCapWarning(RuntimeWarning):
    """``max_tasks`` ids exist and a batch that looks like a new task was given a known id instead."""


def _standardiser(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature centre and scale of the first batch (scale 1 where it is ~constant or n = 1)."""
    center = z.mean(0)
    sd = z.std(0) if z.shape[0] > 1 else torch.ones_like(center)
    return center, torch.where(sd > 1e-8, sd, torch.ones_like(sd))


# What the probabilities and the prior's numbers may be. They are read with float() first, as
# they always were, so a numeric string or a 0-dim tensor is a number here.
PROBABILITY = Interval(float, 0, 1, closed="neither")


class TaskDetector:
    """Assign each batch of a stream a task id, online and without labels.

    ``update(x)`` returns the id of batch ``x`` (``[n, ...]``, flattened to ``[n, D]``). The
    per-batch log-likelihoods under every known task and under the "new task" model, the posterior
    and the decision are appended to ``history`` (see ``loglik_table`` for plotting).

    Parameters (defaults tuned on the permuted and split MNIST streams, batch size 32):

    - ``hazard``: prior probability that the task changes between two batches (0.02).
    - ``p_new``: of a change, the prior probability that it is a task never seen before (0.5).
    - ``proj_dim``: dimension of the fixed random projection (128); ``None`` scores raw inputs.
    - ``kappa0``: prior precision of a task's feature means, in units of the within-task variance
      (3.0: task means spread by about 0.6 within-task standard deviations, as measured).
    - ``alpha0``: prior shape of a task's feature variances (3.0, about 6 pseudo-samples at 1).
    - ``var_floor``: minimum observation variance in standardised units (1e-3).
    - ``temperature``: log-likelihoods are divided by it before the prior is added (1.0).
    - ``max_tasks``: cap on the number of ids (50), with a ``TaskCapWarning`` when hit.
    - ``label_prior``: Dirichlet concentration per class of the label model used when ``update``
      gets labels (1.0: uniform over the classes seen so far).
    - ``max_classes``: labels must be below it (100 000): the label counts grow to the largest
      label seen, so a stray label of 10⁹ would take gigabytes.
    - ``nan_policy``: ``"drop"`` (drop and count non-finite rows) or ``"raise"``.
    - ``features``: ``"linear"`` (projection) or ``"cos"`` (random Fourier features of the
      standardised projection, scaled by ``bandwidth``; measured no better on MNIST streams).
    - ``seed``: seed of the projection.
    """

    def __init__(
        self,
        *,
        hazard: float = 0.02,
        p_new: float = 0.5,
        proj_dim: int | None = 128,
        kappa0: float = 3.0,
        alpha0: float = 3.0,
        var_floor: float = 1e-3,
        temperature: float = 1.0,
        max_tasks: int = 50,
        label_prior: float = 1.0,
        max_classes: int = 100_000,
        nan_policy: str = "drop",
        features: str = "linear",
        bandwidth: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.hazard = check(float(hazard), PROBABILITY, "hazard")
        self.p_new = check(float(p_new), PROBABILITY, "p_new")
        if proj_dim is not None and (not isinstance(proj_dim, int) or proj_dim < 1):
            raise ValueError(f"proj_dim must be a positive int or None, got {proj_dim!r}")
        self.proj_dim = proj_dim
        self.kappa0 = check(float(kappa0), POSITIVE, "kappa0")
        self.alpha0 = check(float(alpha0), POSITIVE, "alpha0")
        self.var_floor = check(float(var_floor), NON_NEGATIVE, "var_floor")
        self.temperature = check(float(temperature), POSITIVE, "temperature")
        if not isinstance(max_tasks, int) or max_tasks < 1:
            raise ValueError(f"max_tasks must be a positive int, got {max_tasks!r}")
        self.max_tasks = max_tasks
        self.label_prior = check(float(label_prior), POSITIVE, "label_prior")
        self.max_classes = int(check(max_classes, POSITIVE_INT, "max_classes"))
        if nan_policy not in ("drop", "raise"):
            raise ValueError(f"nan_policy must be 'drop' or 'raise', got {nan_policy!r}")
        self.nan_policy = nan_policy
        if features not in ("cos", "linear"):
            raise ValueError(f"features must be 'cos' or 'linear', got {features!r}")
        if features == "cos" and proj_dim is None:
            raise ValueError("features='cos' needs a projection (proj_dim), not None")
        self.features = features
        self.bandwidth = check(float(bandwidth), POSITIVE, "bandwidth")
        self.seed = int(seed)
        self.reset()

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every task and the projection (the next batch starts a fresh stream)."""
        self.in_dim: int | None = None
        self._proj: torch.Tensor | None = None  # [D, d] float64, or None for raw inputs
        self._phase: torch.Tensor | None = None  # [d] random phases of the cos features
        self._lin_center: torch.Tensor | None = None  # [d] standardisation of the projection
        self._lin_scale: torch.Tensor | None = None
        self._center: torch.Tensor | None = None  # [d] standardisation of the features
        self._scale: torch.Tensor | None = None
        self._count = torch.zeros(0, dtype=torch.float64)  # [K]
        self._sum = torch.zeros(0, 0, dtype=torch.float64)  # [K, d]
        self._sumsq = torch.zeros(0, 0, dtype=torch.float64)  # [K, d]
        self._labels = torch.zeros(0, 0, dtype=torch.float64)  # [K, C] label counts (C grows)
        self.current: int = -1
        self.tentative: bool = False
        self.n_batches: int = 0
        self.n_samples: int = 0
        self.n_dropped: int = 0
        self.cap_hits: int = 0
        self.retracted: int = 0
        self.history: list[dict[str, Any]] = []

    @property
    def num_tasks(self) -> int:
        """Number of task ids in use (a tentative task included)."""
        return int(self._count.numel())

    _CONFIG = (
        "hazard",
        "p_new",
        "proj_dim",
        "kappa0",
        "alpha0",
        "var_floor",
        "temperature",
        "max_tasks",
        "label_prior",
        "max_classes",
        "nan_policy",
        "features",
        "bandwidth",
        "seed",
    )
    _COUNTERS = COUNTERS

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only, loadable with ``torch.load(weights_only=True)``."""
        return {
            "config": {k: getattr(self, k) for k in self._CONFIG},
            "counters": {k: getattr(self, k) for k in self._COUNTERS},
            "proj": self._proj,
            "phase": self._phase,
            "lin_center": self._lin_center,
            "lin_scale": self._lin_scale,
            "center": self._center,
            "scale": self._scale,
            "count": self._count.clone(),
            "sum": self._sum.clone(),
            "sumsq": self._sumsq.clone(),
            "labels": self._labels.clone(),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a detector saved by ``state_dict`` (configuration included), to resume a stream.

        Everything is checked first (:mod:`ewc.taskid_state`: the configuration, the counters,
        every tensor's shape and finiteness): a state that does not fit raises ValueError naming
        the part, and the detector is exactly as it was."""
        config = check_config(state)
        try:
            new = TaskDetector(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"TaskDetector state 'config': {err}") from None
        restore(new, state)
        self.__dict__.update(new.__dict__)

    # ------------------------------------------------------------------------------------------
    # model
    # ------------------------------------------------------------------------------------------

    def _features(
        self, x: torch.Tensor, record: bool = True, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate, flatten, drop non-finite rows, project and standardise: ``[n, d]`` float64,
        and the labels of the rows kept (``None`` when ``y`` is ``None``).

        With ``record=False`` (scoring only) nothing is counted or initialised."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.ndim == 0:
            raise ValueError("a batch must have at least one dimension (rows), got a scalar")
        x = x.detach().to("cpu", torch.float64)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        y = self._check_labels(y, x.shape[0])
        if x.shape[0] == 0:
            return x.new_zeros(0, self.in_dim or 0), y
        x = x.reshape(x.shape[0], -1)
        if self.in_dim is not None and x.shape[1] != self.in_dim:
            raise ValueError(
                f"feature dimension changed mid-stream: the stream has {self.in_dim} features per "
                f"sample, this batch has {x.shape[1]} (call reset() to start a new stream)"
            )
        ok = torch.isfinite(x).all(dim=1)
        if not bool(ok.all()):
            bad = int((~ok).sum())
            if self.nan_policy == "raise":
                raise ValueError(f"batch has {bad} row(s) with NaN or inf values (nan_policy='raise')")
            if record:
                self.n_dropped += bad
            x = x[ok]
            y = None if y is None else y[ok]
            if x.shape[0] == 0:
                return x, y
        if self.in_dim is None:
            if not record:
                raise ValueError("the detector has seen no data yet: nothing to score against")
            self.in_dim = int(x.shape[1])
            if self.proj_dim is not None:
                g = torch.Generator().manual_seed(self.seed)
                self._proj = torch.randn(self.in_dim, self.proj_dim, generator=g, dtype=torch.float64)
                self._proj /= math.sqrt(self.in_dim)
                self._phase = 2 * math.pi * torch.rand(self.proj_dim, generator=g, dtype=torch.float64)
        z = x @ self._proj if self._proj is not None else x
        if self._lin_center is None:
            self._lin_center, self._lin_scale = _standardiser(z)
        if self.features == "cos":
            assert self._lin_scale is not None and self._phase is not None
            z = torch.cos(self.bandwidth * (z - self._lin_center) / self._lin_scale + self._phase)
        if self._center is None:
            self._center, self._scale = _standardiser(z)
        assert self._scale is not None
        return (z - self._center) / self._scale, y

    def _check_labels(self, y: Any, n: int) -> torch.Tensor | None:
        """Labels as an int64 CPU tensor ``[n]`` of class indices in ``[0, max_classes)``, or ``None``."""
        if y is None:
            return None
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(np.asarray(y))
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"labels must be 1-D with one label per row ({n}), got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got {y.dtype}")
        y = y.detach().to("cpu", torch.int64)
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"labels must be class indices >= 0, got {int(y.min())}")
        if y.numel() and int(y.max()) >= self.max_classes:
            raise ValueError(
                f"labels must be class indices < max_classes ({self.max_classes}), got {int(y.max())}"
            )
        return y

    @staticmethod
    def _with_classes_of(counts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Label counts ``[K, C]`` widened with zero columns to cover the classes in ``y``."""
        c = max(counts.shape[1], int(y.max()) + 1 if y.numel() else 0)
        return torch.nn.functional.pad(counts, (0, c - counts.shape[1]))

    def _label_scores(self, y: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Dirichlet-multinomial ``log p(y | labels of task k)`` ``[K]`` and under a new task."""
        counts = self._with_classes_of(counts, y)
        c = counts.shape[1]
        m = torch.bincount(y, minlength=c).to(torch.float64)
        a = self.label_prior
        table = torch.cat([counts, torch.zeros(1, c, dtype=torch.float64)])  # last row: new task
        n = table.sum(1)
        ll = (
            torch.lgamma(c * a + n)
            - torch.lgamma(c * a + n + m.sum())
            + (torch.lgamma(a + table + m) - torch.lgamma(a + table)).sum(1)
        )
        return ll[:-1], float(ll[-1])

    def _log_evidence(self, n: torch.Tensor, s: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        """log marginal likelihood of data with statistics (n [K], s, ss [K, d]), summed over features."""
        k0, a0, b0 = self.kappa0, self.alpha0, self.alpha0  # mu0 = 0, prior variance 1
        n2 = n.unsqueeze(-1)
        mean = s / n2.clamp_min(1.0)
        scatter = (ss - s * mean).clamp_min(0.0)
        kn = k0 + n2
        an = a0 + n2 / 2
        bn = b0 + 0.5 * (scatter + n2 * self.var_floor) + k0 * n2 * mean**2 / (2 * kn)
        per = (
            torch.lgamma(an)
            - math.lgamma(a0)
            + a0 * math.log(b0)
            - an * torch.log(bn)
            + 0.5 * (math.log(k0) - torch.log(kn))
            - n2 / 2 * math.log(2 * math.pi)
        )
        return per.sum(-1)

    def score(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """``log p(x[, y] | task k)`` for every known task ``[K]`` and under a new task, for a raw
        batch ``x`` (labels ``y`` optional); the detector is not changed (no prior, no update)."""
        z, y = self._features(x, record=False, y=y)
        if z.shape[0] == 0:
            raise ValueError("no finite rows in the batch to score")
        return self.scores(z, y)

    def predict(self, x: torch.Tensor) -> int:
        """The known task whose input model fits batch ``x`` best, ``-1`` before any task exists.

        The argmax of :meth:`score` over known tasks: no switch prior, no "new task" option, and
        the detector is not changed (for prediction time, when no labels come with the inputs).
        """
        if self.num_tasks == 0:
            return -1
        ll, _ = self.score(x)
        return int(torch.argmax(ll))

    def scores(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """``log p(batch | task k)`` for every known task ``[K]`` and ``log p(batch | new task)``
        for standardised features ``z`` (plus the label term when labels ``y`` are given)."""
        n, s, ss = float(z.shape[0]), z.sum(0), (z * z).sum(0)
        new = float(self._log_evidence(torch.tensor([n]), s[None], ss[None])[0])
        if self.num_tasks == 0:
            ll = torch.zeros(0, dtype=torch.float64)
        else:
            before = self._log_evidence(self._count, self._sum, self._sumsq)
            ll = self._log_evidence(self._count + n, self._sum + s, self._sumsq + ss) - before
        if y is not None:
            ll_y, new_y = self._label_scores(y, self._labels)
            ll, new = ll + ll_y, new + new_y
        return ll, new

    def _log_prior(self) -> tuple[torch.Tensor, float]:
        """Switch prior from the current task: log P(task k) for known tasks and log P(new)."""
        k = self.num_tasks
        lp = torch.full((k,), -math.inf, dtype=torch.float64)
        if self.current < 0:
            return lp, 0.0
        lp[self.current] = math.log1p(-self.hazard)
        others = k - 1
        if others > 0:
            lp_other = math.log(self.hazard * (1 - self.p_new) / others)
            lp[torch.arange(k) != self.current] = lp_other
            return lp, math.log(self.hazard * self.p_new)
        return lp, math.log(self.hazard)

    # ------------------------------------------------------------------------------------------
    # online update
    # ------------------------------------------------------------------------------------------

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> int:
        """Assign batch ``x`` a task id, then fold it into that task's model; returns the id.

        ``y`` (optional labels, int class indices, one per row): when given, the batch is scored by
        its inputs *and* labels and the labels are added to the chosen task's label counts.
        """
        z, y = self._features(x, y=y)
        self.n_batches += 1
        rec: dict[str, Any] = {"batch": self.n_batches - 1, "n": int(z.shape[0])}
        if z.shape[0] == 0:
            rec.update(event="empty", task=self.current, loglik=[], loglik_new=None, posterior_new=None)
            self.history.append(rec)
            return self.current
        ll, ll_new = self.scores(z, y)
        lp, lp_new = self._log_prior()
        logits = torch.cat([ll / self.temperature + lp, torch.tensor([ll_new / self.temperature + lp_new])])
        post = torch.softmax(logits, 0)
        choice = int(torch.argmax(logits))
        k = self.num_tasks
        event = "stay"
        if choice == k and k >= self.max_tasks:
            choice = int(torch.argmax(ll / self.temperature + lp)) if k > 1 else 0
            self.cap_hits += 1
            event = "cap"
            if self.cap_hits == 1:
                warnings.warn(
                    f"TaskDetector: max_tasks={self.max_tasks} task ids exist and batch {rec['batch']} "
                    f"looks like a new task; it was given the best known id {choice} instead. "
                    "Raise max_tasks if the stream really has more tasks (further hits are counted "
                    "in cap_hits, not warned).",
                    TaskCapWarning,
                    stacklevel=2,
                )
        # A tentative task that the next batch does not return to is retracted.
        if self.tentative and choice != self.current:
            last = k - 1
            self._count, self._sum, self._sumsq = self._count[:-1], self._sum[:-1], self._sumsq[:-1]
            self._labels = self._labels[:-1]
            self.retracted += 1
            self.tentative = False
            rec["retracted"] = last
            k -= 1
            if choice == last + 1:  # "new" is re-indexed onto the freed id
                choice = k
        elif self.tentative:
            self.tentative = False
        if choice == k:
            d = z.shape[1]
            self._count = torch.cat([self._count, torch.zeros(1, dtype=torch.float64)])
            self._sum = torch.cat([self._sum.reshape(-1, d), torch.zeros(1, d, dtype=torch.float64)])
            self._sumsq = torch.cat([self._sumsq.reshape(-1, d), torch.zeros(1, d, dtype=torch.float64)])
            self._labels = torch.nn.functional.pad(self._labels, (0, 0, 0, 1))
            self.tentative = k > 0  # the very first task needs no confirmation
            event = "new"
        elif event != "cap" and choice != self.current:
            event = "switch"
        self._count[choice] += z.shape[0]
        self._sum[choice] += z.sum(0)
        self._sumsq[choice] += (z * z).sum(0)
        if y is not None and y.numel():
            self._labels = self._with_classes_of(self._labels, y)
            self._labels[choice] += torch.bincount(y, minlength=self._labels.shape[1]).to(torch.float64)
        self.current = choice
        self.n_samples += int(z.shape[0])
        rec.update(
            event=event,
            task=choice,
            loglik=ll.tolist(),
            loglik_new=ll_new,
            posterior_new=float(post[-1]),
        )
        self.history.append(rec)
        return choice

    def loglik_table(self) -> torch.Tensor:
        """History as ``[batches, max ids + 1]``: log-likelihood per known task, last column "new".

        Entries for tasks that did not exist yet (and empty batches) are NaN. For plotting.
        """
        width = max((len(h["loglik"]) for h in self.history), default=0) + 1
        out = torch.full((len(self.history), width), math.nan, dtype=torch.float64)
        for i, h in enumerate(self.history):
            if h["loglik"]:
                out[i, : len(h["loglik"])] = torch.tensor(h["loglik"], dtype=torch.float64)
            if h["loglik_new"] is not None:
                out[i, -1] = h["loglik_new"]
        return out

    def __repr__(self) -> str:
        return (
            f"TaskDetector(tasks={self.num_tasks}, current={self.current}, batches={self.n_batches}, "
            f"hazard={self.hazard}, proj_dim={self.proj_dim}, max_tasks={self.max_tasks})"
        )
