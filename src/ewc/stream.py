"""Continual learning on a stream without task labels: :class:`StreamLearner`.

``StreamLearner(model, method=..., detector=..., memory=...)`` learns from a stream of labelled
batches whose task boundaries nobody announces. Every ``partial_fit(x, y)``:

1. asks the :class:`ewc.taskid.TaskDetector` for the batch's task id (from the batch's inputs
   and labels; nobody gives task labels), unless the caller gives ``task_id`` (the control);
2. on a change of id, ends the task just left — ``method.after_task(old_id, task)`` with a
   :class:`ewc.data.Task` built from the last ``memory`` samples of that segment (EWC computes its
   Fisher, MAS its importances, SI closes its path integral, replay stores the samples) — and
   starts the new one (``method.before_task``);
3. takes one optimiser step on ``(x, y)`` through the method hooks, in the trainer's order
   (``loss`` → ``backward`` → ``after_backward`` → ``step`` → ``after_step``).

**A returning task's own constraint.** When a task returns the learner calls
``method.forget_task(index)``. With EWC or L2 in ``separate`` mode (alone or inside a
:class:`ewc.methods.Compose`), each inferred task owns at most one quadratic, keyed by its id:
``forget_task`` drops it, so it does not pull the task back towards its old solution while it
learns more of itself; when the task ends again it is consolidated afresh at its new parameters.
The other tasks' terms stay. Merged penalties (online EWC, SI, MAS) cannot subtract one task's
share (their ``forget_task`` does nothing): there a returning task keeps its old share in the
quadratic while it trains, and re-consolidation on leave merges it again (online-EWC semantics:
the anchor moves to the latest parameters). Replay stores each segment's samples when it ends.

**Tentative ids.** A new id from the detector is tentative; if the detector retracts it (the next
batch went elsewhere), the learner drops that id's samples and does not consolidate it. The task
left when the tentative id appeared has already been consolidated (harmless in separate mode, where
a returning task's term is replaced; an extra merge for online penalties).

The scenario is shared (all outputs, labels as they are): a stream has no task id at test time.
``state_dict()`` holds model, optimiser, method, detector, the segment buffer and counters, all as
tensors and plain values (``torch.load(weights_only=True)`` loads it), so a stream can stop and
resume exactly; ``load_state_dict`` checks a state fully before it changes anything. The task of
a batch at prediction time, from its inputs alone, is ``learner.detector.predict(x)``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc.data import Task
from ewc.methods import Batch, Compose, L2Method, Method, make_method
from ewc.runtime import OPTIMIZERS, make_optimizer
from ewc.scenario import Scenario
from ewc.state import check_finite_state, check_model_state
from ewc.taskid import TaskDetector

__all__ = ["FORMAT", "StreamLearner"]

FORMAT = "ewc.stream/1"


class StreamLearner:
    """Learn a stream of labelled batches with unsupervised task switches (see the module doc).

    - ``model``: maps a batch ``x`` to logits ``[n, classes]``.
    - ``method``: a registered name (``make_method(method, **method_params)``) or a ``Method``.
    - ``detector``: a :class:`TaskDetector` (default: ``TaskDetector()``).
    - ``memory``: samples of the current task kept for its consolidation (the last ``memory``).
    - ``optimizer`` (``"sgd"`` or ``"adam"``), ``lr``: the learner's own optimiser.
    - ``num_classes``: recorded in the shared scenario (optional); labels must be below it (and
      below the model's output width, read from one row at the first batch, in any case).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method = "ewc",
        detector: TaskDetector | None = None,
        memory: int = 1000,
        *,
        optimizer: str = "sgd",
        lr: float = 0.05,
        num_classes: int | None = None,
        method_params: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be a positive int (samples kept per task), got {memory!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and 0 < lr < float("inf")):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if isinstance(method, str):
            method = make_method(method, **(method_params or {}))
        elif method_params:
            raise ValueError("method_params only apply when method is given by name")
        if not isinstance(method, Method):
            raise ValueError(f"method must be a name or a Method, got {type(method).__name__}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.model = model
        self.method = method
        self.detector = detector if detector is not None else TaskDetector()
        self.memory = memory
        self.lr = float(lr)
        self.optimizer_name = optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameters that require grad")
        self.optimizer: torch.optim.Optimizer = make_optimizer(optimizer, params, self.lr)
        self.method.setup(model, Scenario.shared(num_classes))
        self.num_classes = num_classes
        self._outputs: int | None = None  # the model's output width, read at the first batch
        self.current = -1
        self.consolidations: list[int] = []  # task ids passed to after_task, in order
        self.n_batches = 0
        self._feature_shape: tuple[int, ...] | None = None
        self._given: bool | None = None  # task ids given by the caller (True) or inferred (False)
        self._buf_x: Tensor | None = None
        self._buf_y: Tensor | None = None

    # ------------------------------------------------------------------------------------------
    # input checks
    # ------------------------------------------------------------------------------------------

    def _check_x(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"x must be a batch [n, features...], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: x has no rows")
        if self._feature_shape is not None and tuple(x.shape[1:]) != self._feature_shape:
            raise ValueError(
                f"feature shape changed mid-stream: the stream has samples of shape {self._feature_shape}, "
                f"this batch has {tuple(x.shape[1:])}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x has NaN or inf values")
        return x

    def _check_y(self, x: Tensor, y: Any) -> Tensor:
        """Labels: int64, one per row of ``x``, in ``[0, classes)`` (the model's outputs, or
        ``num_classes``), checked before anything changes."""
        if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y must be a 1-D tensor, one label per row of x ({x.shape[0]}), got {shape}")
        if y.dtype != torch.long:
            raise ValueError(f"y must be int64 class labels, got {y.dtype}")
        if self._outputs is None:  # once: the model's output width, from one row in eval mode
            was = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    out = self.model(x[:1])
            finally:
                self.model.train(was)
            if not isinstance(out, Tensor) or out.ndim != 2:
                what = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"the model must return logits [n, classes], got {what}")
            width = int(out.shape[1])
            if self.num_classes is not None and self.num_classes > width:
                raise ValueError(
                    f"num_classes must be at most the model's outputs ({width}), got {self.num_classes}"
                )
            self._outputs = width
        classes = self.num_classes or self._outputs
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise ValueError(f"y must be class labels in [0, {classes}), got {low if low < 0 else high}")
        return y

    # ------------------------------------------------------------------------------------------
    # stream
    # ------------------------------------------------------------------------------------------

    def _task(self, index: int, x: Tensor, y: Tensor) -> Task:
        """A Task-like record of the samples seen of one inferred task (train part only)."""
        ex, ey = x[:0], y[:0]
        classes = tuple(sorted({int(c) for c in y.tolist()}))
        return Task(f"stream-{index}", index, x, y, ex, ey, ex, ey, classes)

    def _remember(self, x: Tensor, y: Tensor) -> None:
        x, y = x.detach(), y.detach()
        if self._buf_x is None or self._buf_y is None:
            bx, by = x, y
        else:
            bx, by = torch.cat([self._buf_x, x]), torch.cat([self._buf_y, y])
        self._buf_x, self._buf_y = bx[-self.memory :].clone(), by[-self.memory :].clone()

    def _end_task(self) -> None:
        """Consolidate the current task on its buffered samples, then clear the buffer."""
        if self.current < 0 or self._buf_x is None or self._buf_y is None:
            self._clear()
            return
        self.method.after_task(self.current, self._task(self.current, self._buf_x, self._buf_y))
        self.consolidations.append(self.current)
        self._clear()

    def _clear(self) -> None:
        self._buf_x = self._buf_y = None

    def _start_task(self, index: int, x: Tensor, y: Tensor) -> None:
        """Activate ``index``: ``method.forget_task`` (a returning task drops its own terms), then
        ``method.before_task``."""
        self.method.forget_task(index)
        self.method.before_task(index, self._task(index, x, y))
        self.current = index

    def partial_fit(self, x: Tensor, y: Tensor, task_id: int | None = None) -> int:
        """One step on a labelled batch; returns the batch's task id.

        The id is the detector's unless ``task_id`` is given: then the given id is used and the
        detector is not consulted (the control "EWC with the true task boundaries"). A learner
        uses one or the other for its whole life; mixing them is an error. Bad input (``y`` not
        int64 labels in ``[0, classes)``, the classes being the model's outputs or ``num_classes``)
        is a ValueError before anything changes.
        """
        x = self._check_x(x)
        y = self._check_y(x, y)
        given = task_id is not None
        if self._given is not None and given != self._given:
            raise ValueError(
                "task_id must be given for every batch or for none: this learner has so far been "
                + ("given task ids" if self._given else "inferring task ids with its detector")
            )
        retracted = False  # the detector took back the tentative task we were in
        if given:
            if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
                raise ValueError(f"task_id must be a non-negative int, got {task_id!r}")
            index = task_id
        else:
            before = self.detector.retracted
            index = self.detector.update(x, y)  # inputs and labels; no task label
            retracted = self.detector.retracted != before
        self._given = given
        self._feature_shape = tuple(x.shape[1:])
        if retracted:
            self._clear()  # the tentative task we were in did not exist: no consolidation
            self._start_task(index, x, y)
        elif index != self.current:
            self._end_task()
            self._start_task(index, x, y)
        self._step(x, y, index)
        self._remember(x, y)
        self.n_batches += 1
        return index

    def _step(self, x: Tensor, y: Tensor, index: int) -> None:
        self.model.train()
        out = self.model(x)
        task_loss = F.cross_entropy(out, y)
        loss = self.method.loss(task_loss, Batch(x, y, out, index))
        self.optimizer.zero_grad()
        loss.backward()
        self.method.after_backward()
        self.optimizer.step()
        self.method.after_step()

    def finish(self) -> None:
        """End the current task now (consolidate it), e.g. before deploying after a stream stops."""
        self._end_task()

    # ------------------------------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Class predictions ``[n]`` (eval mode; the model's mode is restored)."""
        x = self._check_x(x)
        was = self.model.training
        self.model.eval()
        try:
            return self.model(x).argmax(1)
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model, optimiser, method, detector, segment buffer and counters (tensors and plain values)."""
        return {
            "format": FORMAT,
            "config": {"memory": self.memory, "lr": self.lr, "optimizer": self.optimizer_name},
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "method_name": self.method.name,
            "method": self.method.state_dict(),
            "detector": self.detector.state_dict(),
            "buffer": None if self._buf_x is None else (self._buf_x.clone(), self._buf_y.clone()),  # type: ignore[union-attr]
            "current": self.current,
            "consolidations": list(self.consolidations),
            "n_batches": self.n_batches,
            "given_ids": self._given,
            "feature_shape": None if self._feature_shape is None else list(self._feature_shape),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a learner built with the same model and method kinds.

        Everything is checked before anything changes: format, config, method name, counters,
        the model's weights (keys, shapes, finite), and a trial load of the model, optimiser,
        method and detector states into copies of them (briefly twice the model's and the
        method's memory). A state that does not fit, or holds NaN / inf weights, statistics or
        samples, raises ValueError naming the key and leaves the learner exactly as it was.
        """
        buffer, current, consolidations, n_batches, given, feature_shape = self._check_state(state)
        self.model.load_state_dict(state["model"])  # before the method: SI reads the parameters
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        if "owners" in state:  # saved before penalty terms had keys: key each term by its owner
            _key_terms_by_owner(self.method, state["owners"])
        self.detector.load_state_dict(state["detector"])
        self._buf_x, self._buf_y = buffer
        self.current, self.consolidations, self.n_batches = current, consolidations, n_batches
        self._given, self._feature_shape = given, feature_shape

    def _check_state(self, state: Any) -> tuple:
        """A ValueError unless ``state`` loads into this learner; else its parsed counters
        ``((buf_x, buf_y), current, consolidations, n_batches, given, feature_shape)``."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a StreamLearner state (expected format {FORMAT!r})")
        missing = sorted(set(_STATE_KEYS) - set(state))
        if missing:
            raise ValueError(f"StreamLearner state is missing {missing}")
        if state["config"] != {"memory": self.memory, "lr": self.lr, "optimizer": self.optimizer_name}:
            raise ValueError(f"state was saved with config {state['config']}, this learner differs")
        name = state.get("method_name")  # absent in states saved before it was recorded
        if name is not None and name != self.method.name:
            raise ValueError(f"state was saved by method {name!r}, this learner uses {self.method.name!r}")
        check_model_state(self.model, state["model"], "StreamLearner state 'model'")
        check_finite_state(state["optimizer"], "StreamLearner state 'optimizer'")
        # copies to load into, the optimiser and the method bound to the model's copy
        model, optimizer, method, detector = copy.deepcopy(
            (self.model, self.optimizer, self.method, self.detector)
        )
        try:
            counters = _parse_counters(state)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            method.load_state_dict(state["method"])
            if "owners" in state:
                _key_terms_by_owner(method, state["owners"])
            detector.load_state_dict(state["detector"])
        except Exception as exc:  # anything the trial load raises means the state does not fit
            if isinstance(exc, ValueError):
                raise
            raise ValueError(f"StreamLearner state does not fit this learner: {exc!r}") from exc
        return counters

    def __repr__(self) -> str:
        return (
            f"StreamLearner(method={self.method.name!r}, current={self.current}, "
            f"tasks={self.detector.num_tasks}, batches={self.n_batches})"
        )


_STATE_KEYS = (
    "config",
    "model",
    "optimizer",
    "method",
    "detector",
    "buffer",
    "current",
    "consolidations",
    "n_batches",
    "feature_shape",
)


def _parse_counters(state: dict[str, Any]) -> tuple:
    """The segment buffer and counters of a saved state, converted (errors: ValueError/TypeError)."""
    buf = state["buffer"]
    if buf is None:
        buffer: tuple[Tensor | None, Tensor | None] = (None, None)
    elif (
        isinstance(buf, tuple | list)
        and len(buf) == 2
        and all(isinstance(t, Tensor) for t in buf)
        and len(buf[0]) == len(buf[1])
    ):
        buffer = (buf[0].clone(), buf[1].clone())
        check_finite_state(buf[0], "StreamLearner state 'buffer'")
    else:
        raise ValueError("state 'buffer' must be None or a pair of tensors with as many rows")
    given = state.get("given_ids")
    fs = state["feature_shape"]
    return (
        buffer,
        int(state["current"]),
        [int(t) for t in state["consolidations"]],
        int(state["n_batches"]),
        None if given is None else bool(given),
        None if fs is None else tuple(int(d) for d in fs),
    )


def _key_terms_by_owner(method: Method, owners: dict[str, list[int]]) -> None:
    """Old states kept {part index: [task id owning each term]} beside penalties whose terms
    were keyed 0, 1, ...: rekey each term by its owning task (pop all, restore in order, which
    leaves the penalty bit-identical)."""
    parts = method.methods if isinstance(method, Compose) else (method,)
    for i, owned in owners.items():
        part = parts[int(i)]
        if not isinstance(part, L2Method) or len(part.reg.keys) != len(owned):
            raise ValueError("state's separate-penalty parts do not match this learner's method")
        terms = [part.reg.pop(k) for k in part.reg.keys]
        for task, term in zip(owned, terms, strict=True):
            part.reg.restore(int(task), term)
