"""EWC and L2 penalties: anchored quadratics that keep a model close to its earlier solutions.

After task ``k`` the regulariser stores an anchor θ*_k (a detached copy of the parameters) and a
diagonal precision F_k (the Fisher for :class:`EWC`, ones for :class:`L2`); later tasks train on

    loss = task_loss + λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²

The ½ is the paper's (Kirkpatrick et al. 2017, Eq. 3): with it λ·F is the precision of the
Gaussian (Laplace) approximation of the old tasks' posterior and the gradient is λ·F·(θ − θ*).
Code that drops the ½ needs a λ half as large for the same penalty.

Modes:

* ``separate`` (the paper): one quadratic per consolidated task. The state grows with the number
  of tasks, but :meth:`penalty` does not: the terms are merged into one diagonal quadratic per
  parameter in float64 when they change (:mod:`ewc.quadratic`, the numeric kernel; only the
  rounding of the merged anchor to the parameter dtype differs from the term-by-term sum).
* ``online`` (Schwarz et al. 2018; Huszár 2018): one merged quadratic, F ← γ·F + F_new and
  θ* ← the latest parameters. With γ = 1 its curvature equals ``separate``'s, but it is centred
  on the latest parameters rather than on the Fisher-weighted mean of all anchors.

Terms and keys: every consolidation adds a term named by a key (default: the running task count);
``keys``, ``anchors``, ``precisions`` read them, and in ``separate`` mode ``drop`` removes a term and
``pop`` / ``restore`` set one aside and put it back unchanged (``online``'s merged term cannot split).

Parameters are matched by name (``model.named_parameters()``). A parameter added after the last
consolidation (a new head) is not penalised; a consolidated parameter that disappeared or changed
shape is an error. Moving the model to another device or dtype after consolidation is followed.
``parameters=`` picks which are consolidated, ``store_dtype=`` / ``store_device=`` how θ* and F are
stored; the penalty is still computed on the parameters' device, in float32 or wider (penalty_config).
Memory: the stored tasks, plus one scratch tensor the size of the anchored parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from ewc import penalty_config as options
from ewc.checks import NON_NEGATIVE, POSITIVE, Interval, Options, check, check_count, check_float
from ewc.fisher import FISHER_MODES, LIKELIHOODS, diagonal_fisher
from ewc.penalty_config import OPTION_KEYS, Selection, TermKey, check_config, check_keys
from ewc.quadratic import Quadratic, Term, check_term, merge_online, new_term
from ewc.state import PathLike, atomic_save, safe_load

__all__ = ["EWC", "FORMAT", "L2", "MODES", "Term", "TermKey"]

FORMAT = "ewc.penalty/1"
MODES = ("separate", "online")


# What λ, γ and σ may be (read with float(), so a numpy scalar or a 0-dim tensor works too).
LAM = NON_NEGATIVE
GAMMA = Interval(float, 0, 1, closed="right")
SIGMA = POSITIVE


# ---------------------------------------------------------------------------- base class


class _AnchoredPenalty:
    """Shared machinery of :class:`EWC` and :class:`L2`: anchors, merging, penalty and state."""

    _KIND: ClassVar[str]
    _CONFIG_KEYS: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        mode: str,
        gamma: float,
        parameters: Selection = None,
        store_dtype: torch.dtype | str | None = None,
        store_device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._model = model
        self._lam = check_float(lam, LAM, "lam")
        self._mode = str(check(mode, Options(MODES), "mode"))
        self._gamma = check_float(gamma, GAMMA, "gamma")
        self._names = options.resolve_selection(model, parameters)
        # the terms (separate: one per task; online: at most one, merged) and their quadratic
        self._quad = Quadratic(model, *options.check_storage(store_dtype, store_device))
        self._keys: list[TermKey] = []  # the key of each term
        self._num_tasks = 0

    # -- configuration ---------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def lam(self) -> float:
        """Penalty strength λ (>= 0); may be changed between steps."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_float(value, LAM, "lam")

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def gamma(self) -> float:
        """Decay of the old Fisher in ``online`` mode (F ← γ·F + F_new); unused by ``separate``."""
        return self._gamma

    @property
    def parameters(self) -> tuple[str, ...] | None:
        """Names of the consolidated parameters; None: all that require grad at consolidation."""
        return self._names

    @property
    def store_dtype(self) -> torch.dtype | None:
        """The dtype θ* and F are stored in (None: each parameter's)."""
        return self._quad.dtype

    @property
    def store_device(self) -> torch.device | None:
        """The device θ* and F are stored on (None: each parameter's)."""
        return self._quad.device

    @property
    def num_tasks(self) -> int:
        """Number of consolidated tasks (in ``online`` mode: merged into the one quadratic)."""
        return self._num_tasks

    @property
    def keys(self) -> tuple[TermKey, ...]:
        """The terms' keys, oldest first (``online``: the merged term's, i.e. its latest one)."""
        return tuple(self._keys)

    def _config(self) -> dict[str, Any]:
        saved = options.saved(self._names, self._quad.dtype, self._quad.device)
        return {"lam": self._lam, "mode": self._mode, "gamma": self._gamma, **saved}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lam={self._lam}, mode={self._mode!r}, "
            f"gamma={self._gamma}, num_tasks={self._num_tasks})"
        )

    # -- consolidation ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every consolidated task; the penalty is zero again."""
        self._quad.set([])
        self._keys, self._num_tasks = [], 0

    def _new_key(self, key: Any) -> TermKey:
        """``key`` checked (an int or a str, not taken in ``separate`` mode), or the default:
        the larger of the running task count and one more than the largest int key."""
        if key is None:
            ints = [k for k in self._keys if isinstance(k, int)]
            return max([self._num_tasks, *(k + 1 for k in ints)])
        if isinstance(key, bool) or not isinstance(key, int | str):
            raise ValueError(f"a term key must be an int or a str, got {key!r}")
        if self._mode == "separate" and key in self._keys:
            raise ValueError(f"there is already a term with key {key!r} (keys: {self._keys})")
        return key

    def _add_task(self, fisher: Mapping[str, Tensor], key: TermKey | None = None) -> None:
        """Consolidate at the current parameters with precision ``fisher`` (checked, copied to storage)."""
        key = self._new_key(key)
        named = dict(self._model.named_parameters(remove_duplicate=False))
        store = {"dtype": self._quad.dtype, "device": self._quad.device}
        anchor, precision = new_term(named, fisher, **store)
        if self._mode == "separate":
            self._quad.set([*self._quad.terms, {"anchor": anchor, "fisher": precision}])
        else:
            old = self._quad.terms[0] if self._quad.terms else None
            self._quad.set([merge_online(old, anchor, precision, named, self._gamma, **store)])
        self._keys = [*self._keys, key] if self._mode == "separate" else [key]
        self._num_tasks += 1

    # -- editing and reading terms ---------------------------------------------------------

    def _index(self, key: Any, what: str) -> int:
        """Position of the term ``key``; ValueError for an unknown key or (if ``what`` names an
        edit) in ``online`` mode, whose merged term cannot be split."""
        if what and self._mode != "separate":
            raise ValueError(
                f"{what} needs mode='separate': online mode keeps one merged term that cannot be "
                "split into tasks (reset() clears it)"
            )
        try:
            return self._keys.index(key)
        except ValueError:
            raise ValueError(f"no term with key {key!r} (keys: {self._keys})") from None

    def drop(self, key: TermKey) -> None:
        """Remove the term ``key`` (``separate`` mode): the penalty is then that of the other terms,
        as if ``key`` had never been consolidated. ValueError for an unknown key or online mode."""
        self.pop(key)

    def pop(self, key: TermKey) -> Term:
        """Remove the term ``key`` and return it, ``{"anchor": {name: θ*}, "fisher": {name: F}}``,
        for :meth:`restore` (``separate`` mode). The tensors are the stored ones, not copies."""
        k = self._index(key, "pop/drop")
        terms = self._quad.terms
        term = terms[k]
        self._quad.set(terms[:k] + terms[k + 1 :])
        self._keys = self._keys[:k] + self._keys[k + 1 :]
        self._num_tasks -= 1
        return {"anchor": dict(term["anchor"]), "fisher": dict(term["fisher"])}

    def restore(self, key: TermKey, term: Mapping[str, Any]) -> None:
        """Add a term from :meth:`pop` (or any ``{"anchor", "fisher"}`` of name→tensor dicts)
        back as the newest one, under ``key`` (required; ``separate`` mode; a key in use is an
        error). The tensors are checked and copied into the storage. Restoring the term just
        popped from the end gives back a bit-identical penalty; one popped from the middle comes
        back last, which changes the merged quadratic only by float64 summation order.
        """
        if key is None:
            raise ValueError("restore needs the term's key (an int or a str), got None")
        if self._mode != "separate":
            self._index(key, "restore")
        key = self._new_key(key)
        checked = check_term(term, "the restored term")
        copied = {part: {n: t.detach().clone() for n, t in checked[part].items()} for part in checked}
        self._quad.set([*self._quad.terms, copied])
        self._keys = [*self._keys, key]
        self._num_tasks += 1

    def anchors(self, key: TermKey | None = None) -> dict[str, Tensor]:
        """{name: θ*} of the term ``key``; with no key, of the one quadratic the penalty evaluates
        (online: the merged term; separate: the Fisher-weighted mean anchor θ̄ of all terms).

        The stored tensors (in the store dtype, on the store device), not copies: read them, do not
        modify them. Empty before the first consolidation (with no key).
        """
        return self._read("anchor", key)

    def precisions(self, key: TermKey | None = None) -> dict[str, Tensor]:
        """{name: F} of the term ``key`` (the Fisher, Ω for SI/MAS, ones for L2); with no key, the
        precision the penalty applies (online: the merged F; separate: Σ_k F_k). Stored tensors,
        not copies, as for :meth:`anchors`."""
        return self._read("fisher", key)

    def _read(self, part: str, key: TermKey | None) -> dict[str, Tensor]:
        merged = self._quad.current()  # follows a model moved to another device or dtype
        if key is None:
            return {t.name: getattr(t, part) for t in merged}
        return dict(self._quad.terms[self._index(key, "")][part])

    def memory_bytes(self) -> int:
        """Bytes of the stored terms' anchors and precisions (what :meth:`state_dict` holds), in
        the store dtype: ``store_dtype=torch.bfloat16`` halves it against float32."""
        return sum(
            t.numel() * t.element_size()
            for task in self._quad.terms
            for d in task.values()
            for t in d.values()
        )

    def penalty(self) -> Tensor:
        """λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)², a 0-dim tensor differentiable w.r.t. the model.

        Zero (a tensor on the model's device) before the first consolidation. With grad enabled
        the value is computed when first read (``.item()``, any operation but ``+``), exactly, at
        the parameters of this call, and ``backward()`` adds λ·F·(θ − θ*) into ``.grad`` in one
        pass at its end; no cost grows with the number of tasks (:mod:`ewc.quadratic_eval`).
        """
        return self._quad.value(self._lam)

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the regulariser, as plain dicts, lists and tensors.

        ``{"format", "class", "config", "num_tasks", "tasks": [{"anchor": {name: T},
        "fisher": {name: T}}, ...], "keys": [key of each task]}``; ``online`` keeps a single
        merged entry. The tensors are the stored ones (not copies): do not modify them in place.
        """
        return {
            "format": FORMAT,
            "class": self._KIND,
            "config": self._config(),
            "num_tasks": self._num_tasks,
            "tasks": [{"anchor": dict(t["anchor"]), "fisher": dict(t["fisher"])} for t in self._quad.terms],
            "keys": list(self._keys),
        }

    @classmethod
    def _check_header(cls, state: Any) -> dict[str, Any]:
        """Validate format, class and config of a state dict; return the config."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        expected = {"format", "class", "config", "num_tasks", "tasks"}
        if set(state) - {"keys"} != expected:  # states saved before term keys have no "keys"
            raise ValueError(f"state keys {sorted(map(str, state))} != {sorted(expected | {'keys'})}")
        if state["format"] != FORMAT:
            raise ValueError(f"unsupported state format {state['format']!r}; expected {FORMAT!r}")
        if state["class"] != cls._KIND:
            raise ValueError(f"state was saved by {state['class']!r}, cannot load it into {cls._KIND!r}")
        return check_config(state["config"], cls._CONFIG_KEYS, cls._KIND)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: config (λ, γ, ...) and tasks, checked against the model.

        Raises ValueError on a different format or class, wrong config keys, another ``mode``,
        or tensors whose names or shapes do not match the model's parameters. The selection
        (``parameters``) is the state's; the storage stays this regulariser's: tensors are copied
        into its store dtype and device (a bfloat16 state into float32 storage is widened
        exactly, a float32 one into bfloat16 storage is rounded to nearest). Nothing changes if
        an error is raised.
        """
        config = self._check_header(state)
        if config["mode"] != self._mode:
            raise ValueError(f"state is for mode {config['mode']!r}, this {self._KIND} uses {self._mode!r}")
        mine = {"store_dtype": self._quad.dtype, "store_device": self._quad.device}
        probe = type(self)(self._model, **{**config, **mine})  # validates every config value
        num_tasks, tasks = state["num_tasks"], state["tasks"]
        if not isinstance(tasks, list) or any(not isinstance(t, Mapping) for t in tasks):
            raise ValueError("state 'tasks' must be a list of dicts")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 0:
            raise ValueError(f"state 'num_tasks' must be an integer >= 0, got {num_tasks!r}")
        if self._mode == "separate" and num_tasks != len(tasks):
            raise ValueError(f"state has {len(tasks)} tasks but num_tasks={num_tasks}")
        if self._mode == "online" and (len(tasks) > 1 or (num_tasks > 0) != (len(tasks) == 1)):
            raise ValueError(
                f"online state must hold one merged task when num_tasks > 0 and none "
                f"otherwise; got {len(tasks)} entries for num_tasks={num_tasks}"
            )
        checked = [check_term(t, f"task {k}") for k, t in enumerate(tasks)]
        keys = check_keys(state.get("keys"), len(tasks), num_tasks)
        self._quad.set(checked, copy=True)  # checked against the model: the last step that can fail
        self._config_from(probe)
        self._keys, self._num_tasks = keys, num_tasks

    def _config_from(self, other: Self) -> None:
        """Adopt the settings of ``other`` (an instance built from a loaded config)."""
        self._lam, self._gamma, self._names = other._lam, other._gamma, other._names

    def save(self, path: PathLike) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (see :func:`ewc.state.atomic_save`)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: PathLike, model: nn.Module) -> Self:
        """Rebuild a regulariser for ``model`` from :meth:`save` output, without running code
        (with the saved selection and storage)."""
        state = safe_load(path, map_location="cpu")
        config = cls._check_header(state)
        obj = cls(model, **config)
        obj.load_state_dict(state)
        return obj


# ------------------------------------------------------------------------------ public API


class EWC(_AnchoredPenalty):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017) for any ``nn.Module``.

    ``reg.consolidate(data)`` after each task; ``loss = task_loss + reg.penalty()`` during the
    next ones. ``fisher`` picks how the diagonal Fisher is computed (see
    :func:`ewc.fisher.diagonal_fisher`); ``max_samples``, ``batch_size``, ``likelihood``,
    ``sigma`` and ``output`` (which output is the logits; not saved with the state) are passed on
    to it. ``parameters`` (names, a predicate ``(name, param) -> bool`` or
    None: all that require grad), ``store_dtype`` and ``store_device``: see
    :mod:`ewc.penalty_config`; the Fisher is computed for the selected parameters only.
    """

    _KIND = "EWC"
    _CONFIG_KEYS = (
        *("lam", "mode", "gamma", "fisher", "max_samples", "batch_size", "likelihood", "sigma"),
        *OPTION_KEYS,
    )

    def __init__(
        self,
        model: nn.Module,
        lam: float = 100.0,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher: str = "exact",
        *,
        max_samples: int | None = None,
        batch_size: int = 256,
        likelihood: str = "categorical",
        sigma: float = 1.0,
        parameters: Selection = None,
        store_dtype: torch.dtype | str | None = None,
        store_device: torch.device | str | None = None,
        output: Any = None,
    ) -> None:
        super().__init__(model, lam, mode, gamma, parameters, store_dtype, store_device)
        self._output = output
        self._fisher = str(check(fisher, Options(FISHER_MODES), "fisher"))
        likelihood = check(likelihood, Options(LIKELIHOODS), "likelihood")
        sigma_value = check_float(sigma, SIGMA, "sigma")
        self._max_samples = check_count(max_samples, "max_samples", allow_none=True)
        self._batch_size = check_count(batch_size, "batch_size")
        self._likelihood = str(likelihood)
        self._sigma = sigma_value

    @property
    def fisher_mode(self) -> str:
        return self._fisher

    def _config(self) -> dict[str, Any]:
        return {
            **super()._config(),
            "fisher": self._fisher,
            "max_samples": self._max_samples,
            "batch_size": self._batch_size,
            "likelihood": self._likelihood,
            "sigma": self._sigma,
        }

    def _config_from(self, other: EWC) -> None:  # type: ignore[override]
        super()._config_from(other)
        self._fisher, self._max_samples = other._fisher, other._max_samples
        self._batch_size, self._likelihood, self._sigma = (other._batch_size, other._likelihood, other._sigma)

    def consolidate(
        self,
        data: Any = None,
        *,
        fisher_diag: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        key: TermKey | None = None,
        **fisher_options: Any,
    ) -> dict[str, Tensor]:
        """End of a task: anchor the current parameters with their diagonal Fisher on ``data``.

        ``data`` is anything :func:`ewc.fisher.diagonal_fisher` accepts; ``generator`` and
        ``fisher_options`` (``sequence=``, ``shift_labels=``, ``ignore_index=``, ``output=``) are
        passed on to it. Alternatively pass a precomputed ``fisher_diag``
        ``{name: F}`` (names of the model's parameters, F >= 0; any precision computed
        elsewhere, e.g. a normalised policy Fisher or SI/MAS importances); parameters it leaves
        out, or that ``parameters`` does not select, are not anchored. ``key`` names the new term
        (default: the running task count; in ``separate`` mode a key in use is a ValueError).
        Returns this task's Fisher (``online`` merges it into the stored one).
        """
        self._new_key(key)  # a bad or duplicate key fails before the Fisher is computed
        if fisher_diag is None:
            if data is None:
                raise ValueError(
                    "EWC.consolidate needs data to compute the Fisher on (or a precomputed fisher_diag)"
                )
            with options.grad_only_for(self._model, self._names):  # no Fisher work for the others
                fisher_diag = diagonal_fisher(
                    self._model,
                    data,
                    mode=self._fisher,
                    max_samples=self._max_samples,
                    likelihood=self._likelihood,
                    sigma=self._sigma,
                    batch_size=self._batch_size,
                    generator=generator,
                    **({} if self._output is None else {"output": self._output}) | fisher_options,
                )
        elif data is not None:
            raise ValueError("pass either data or fisher_diag to consolidate, not both")
        fisher_diag = options.pick(self._model, fisher_diag, self._names)
        self._add_task(fisher_diag, key)
        return {name: f.detach() for name, f in fisher_diag.items()}


class L2(_AnchoredPenalty):
    """The paper's isotropic baseline: EWC's anchoring with F ≡ 1, λ/2 · Σ_k ‖θ − θ*_k‖²."""

    _KIND = "L2"
    _CONFIG_KEYS = ("lam", "mode", "gamma", *OPTION_KEYS)

    def __init__(
        self,
        model: nn.Module,
        lam: float = 100.0,
        mode: str = "separate",
        gamma: float = 1.0,
        *,
        parameters: Selection = None,
        store_dtype: torch.dtype | str | None = None,
        store_device: torch.device | str | None = None,
    ) -> None:
        super().__init__(model, lam, mode, gamma, parameters, store_dtype, store_device)

    def consolidate(self, data: Any = None, *, key: TermKey | None = None) -> dict[str, Tensor]:
        """Anchor the selected parameters (default: every one that requires grad) at their
        current values; ``data`` is ignored. ``key`` names the new term, as for
        :meth:`EWC.consolidate`."""
        ones = {
            n: torch.ones_like(p, memory_format=torch.contiguous_format).detach()
            for n, p in options.selected(self._model, self._names).items()
        }
        if not ones:
            raise ValueError("the model has no parameters that require grad")
        self._add_task(ones, key)
        return ones
