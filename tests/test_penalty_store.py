"""Parameter subsets (``parameters=``) and compact storage (``store_dtype=``, ``store_device=``).

References are float64 hand computations of λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² and its gradient
from tensors chosen here (never through ``ewc``), restricted to the selected parameters.

bfloat16 storage: the tolerance is derived, not tuned. bfloat16 keeps 8 significant bits, so
rounding to nearest changes a value by a relative u = 2⁻⁸ at most. A stored θ*' = θ*(1+α) and
F' = F(1+φ) with |α| ≤ u and |φ| ≤ e_F (u for one rounding; (1+u)^T − 1 after T online merges,
each rounding a sum of non-negative numbers once) give, per element, with d = θ − θ*,

    |λF'(θ − θ*') − λFd|      ≤ λF (e_F |d| + (1 + e_F) u |θ*|)
    |F'(θ − θ*')² − F d²|     ≤ F (e_F d² + (1 + e_F)(2u |d||θ*| + u² θ*²))

(the value bound times λ/2, summed). In ``separate`` mode the merge of several terms is rounded
once more (F̄' and θ̄' to bfloat16), which adds λ u (1+3u) F̄' (|θ − θ̄'| + |θ̄'|) to the gradient
and λ/2 · u (1+3u) F̄' (θ − θ̄')² to the value. The float32 arithmetic adds a slack of 2⁻²⁰ of the
magnitudes involved. The tests also check that the bound is not vacuous (the error reaches a
tenth of it somewhere), i.e. that bfloat16 was really used.
"""

from __future__ import annotations

import pytest
import torch
from penalty_helpers import Params, random_tasks, set_params, snapshot, tiny_model
from torch import nn

import ewc.penalty as penalty_module
from ewc import EWC, L2, diagonal_fisher
from ewc.state import safe_load

torch.set_num_threads(1)

U = 2.0**-8  # unit roundoff of bfloat16
SLACK = 2.0**-20  # float32 arithmetic, relative to the magnitudes involved


def consolidate_all(reg: EWC | L2, tasks: list[tuple[Params, Params]]) -> None:
    """Consolidate each (anchor, F) at its anchor, then put the parameters back."""
    now = snapshot(reg.model)
    for anchor, fisher in tasks:
        set_params(reg.model, anchor)
        if isinstance(reg, EWC):
            reg.consolidate(fisher_diag=fisher)
        else:
            reg.consolidate()
    set_params(reg.model, now)


def hand(model: nn.Module, lam: float, tasks: list[tuple[Params, Params]], names) -> tuple[float, Params]:
    """float64 value and gradient of λ/2 Σ_k Σ_{i in names} F_k (θ − θ*_k)²; zero gradient elsewhere."""
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    grad = {n: torch.zeros_like(t) for n, t in theta.items()}
    value = 0.0
    for anchor, fisher in tasks:
        for n in names:
            d = theta[n] - anchor[n].double()
            value += lam / 2 * float((fisher[n].double() * d**2).sum())
            grad[n] += lam * fisher[n].double() * d
    return value, grad


def value_and_grad(reg: EWC | L2) -> tuple[float, Params]:
    model = reg.model
    model.zero_grad(set_to_none=True)
    value = reg.penalty()
    value.backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return float(value.detach()), grads


def assert_matches(reg: EWC | L2, value: float, grad: Params) -> None:
    got_value, got_grad = value_and_grad(reg)
    assert got_value == pytest.approx(value, rel=1e-5)
    for n in grad:
        torch.testing.assert_close(got_grad[n].double(), grad[n], rtol=1e-5, atol=1e-6, msg=n)


def state_bytes(reg: EWC | L2) -> int:
    return sum(t.nbytes for task in reg.state_dict()["tasks"] for d in task.values() for t in d.values())


# ------------------------------------------------------------------------------- subsets

SUBSET = ("0.weight", "2.bias")


@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize("how", ["names", "predicate"])
def test_a_subset_is_penalised_alone_and_other_gradients_are_zero(mode: str, how: str) -> None:
    model = tiny_model()
    parameters = list(SUBSET) if how == "names" else (lambda name, p: name in SUBSET)
    reg = EWC(model, lam=3.0, mode=mode, gamma=1.0, parameters=parameters)
    assert reg.parameters == SUBSET
    tasks = random_tasks(model, 1 if mode == "online" else 3)
    consolidate_all(reg, tasks)  # the Fishers name every parameter: only the subset is kept
    assert set(reg.precisions()) == set(SUBSET) and set(reg.anchors()) == set(SUBSET)
    value, grad = hand(model, 3.0, tasks, SUBSET)
    assert_matches(reg, value, grad)
    _, got = value_and_grad(reg)
    assert all(not got[n].any() for n in got if n not in SUBSET)
    n_subset = sum(p.numel() for n, p in model.named_parameters() if n in SUBSET)
    assert reg.memory_bytes() == len(tasks if mode == "separate" else tasks[:1]) * 2 * 4 * n_subset


def test_consolidate_computes_the_fisher_of_the_subset_only(monkeypatch) -> None:
    model = tiny_model()
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    full = diagonal_fisher(model, x)
    seen = []

    def spy(m: nn.Module, data, **kw):
        seen.append({n for n, p in m.named_parameters() if p.requires_grad})
        return diagonal_fisher(m, data, **kw)

    monkeypatch.setattr(penalty_module, "diagonal_fisher", spy)
    model[2].bias.requires_grad_(False)  # selected though frozen: computed all the same
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    reg = EWC(model, parameters=SUBSET)
    out = reg.consolidate(x)
    assert seen == [set(SUBSET)]  # the engine saw only the selected parameters require grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    assert set(out) == set(SUBSET)
    for n in SUBSET:
        torch.testing.assert_close(out[n], full[n], rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match="empty data"):
        reg.consolidate(x[:0])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored on error


def test_a_frozen_base_consolidates_only_the_trainable_parameters_by_default() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    model[4].weight.requires_grad_(True)  # the "adapter"
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    reg = EWC(model, lam=2.0)
    assert reg.parameters is None
    fisher = reg.consolidate(x)
    assert set(fisher) == {"4.weight"} and set(reg.precisions()) == {"4.weight"}
    anchor = snapshot(model)
    with torch.no_grad():
        model[4].weight.add_(0.1)
    value, grad = hand(model, 2.0, [(anchor, fisher)], ["4.weight"])
    model.zero_grad(set_to_none=True)
    penalty = reg.penalty()
    penalty.backward()
    assert float(penalty.detach()) == pytest.approx(value, rel=1e-5)
    torch.testing.assert_close(model[4].weight.grad.double(), grad["4.weight"], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "4.weight")
    l2 = L2(model)
    assert set(l2.consolidate()) == {"4.weight"}


def test_l2_with_a_subset_anchors_only_it() -> None:
    model = tiny_model()
    reg = L2(model, lam=2.0, parameters=["2.weight"])
    tasks = random_tasks(model, 2)
    consolidate_all(reg, tasks)
    ones = [(a, {n: torch.ones_like(t) for n, t in a.items()}) for a, _ in tasks]
    assert_matches(reg, *hand(model, 2.0, ones, ["2.weight"]))


def test_fisher_diag_is_restricted_to_the_selection_and_checked() -> None:
    model = tiny_model()
    reg = EWC(model, parameters=SUBSET)
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    assert set(reg.consolidate(fisher_diag=fisher)) == set(SUBSET)
    with pytest.raises(ValueError, match="'nope', not a parameter of the model"):
        reg.consolidate(fisher_diag={"nope": torch.ones(2)})
    with pytest.raises(ValueError, match="covers none of the selected parameters"):
        reg.consolidate(fisher_diag={"0.bias": torch.ones(4)})
    assert reg.num_tasks == 1


def test_a_selected_parameter_that_disappears_is_an_error() -> None:
    model = nn.ModuleDict({"body": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
    reg = L2(model, parameters=["head.weight"])
    del model["head"]
    with pytest.raises(ValueError, match=r"selected parameters \['head.weight'\] are missing"):
        reg.consolidate()


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        (["0.weight", "0.wieght", "9.bias"], r"names \['0.wieght', '9.bias'\], not parameters.*did you mean"),
        (["zzz"], r"Valid names: \['0.weight', '0.bias', '2.weight', '2.bias'\]"),
        ([], "parameters= is empty"),
        (lambda n, p: False, "selects none of the model's 4 parameters"),
        ("0.weight", "for one name, pass a list"),
        (3, "parameters must be None, an iterable"),
        ([0], "must name parameters with str"),
    ],
)
def test_bad_selections_are_clear_errors(parameters: object, match: str) -> None:
    for cls in (EWC, L2):
        with pytest.raises(ValueError, match=match):
            cls(tiny_model(), parameters=parameters)


# ------------------------------------------------------------------------------- storage


def bf16_bounds(
    model: nn.Module, lam: float, tasks: list[tuple[Params, Params]], e_f: float
) -> tuple[float, Params]:
    """The derived bounds (module docstring) on value and gradient error of rounded θ*, F."""
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    value, grad = 0.0, {n: torch.zeros_like(t) for n, t in theta.items()}
    for anchor, fisher in tasks:
        for n, t in theta.items():
            a, f = anchor[n].double(), fisher[n].double()
            d = (t - a).abs()
            value += (
                lam / 2 * float((f * (e_f * d**2 + (1 + e_f) * (2 * U * d * a.abs() + U**2 * a**2))).sum())
            )
            value += lam / 2 * SLACK * float((f * (t.abs() + a.abs()) ** 2).sum())
            grad[n] += lam * f * (e_f * d + (1 + e_f) * U * a.abs() + SLACK * (t.abs() + a.abs()))
    return value, grad


def merge_bounds(reg: EWC, lam: float) -> tuple[float, Params]:
    """The extra bound of separate mode's merge, rounded to bfloat16 (from the stored F̄', θ̄')."""
    value, grad = 0.0, {}
    anchors, precisions = reg.anchors(), reg.precisions()
    for n, p in reg.model.named_parameters():
        a, f = anchors[n].double(), precisions[n].double()
        d = p.detach().double() - a
        value += lam / 2 * U * (1 + 3 * U) * float((f * d**2).sum())
        grad[n] = lam * U * (1 + 3 * U) * f * (d.abs() + a.abs())
    return value, grad


@pytest.mark.parametrize(("mode", "n_tasks"), [("separate", 1), ("separate", 3), ("online", 3)])
def test_bfloat16_storage_halves_memory_and_is_accurate_to_the_derived_bound(mode: str, n_tasks: int) -> None:
    lam, gamma = 5.0, 0.9 if mode == "online" else 1.0
    model = tiny_model()
    tasks = random_tasks(model, n_tasks)
    f32 = EWC(model, lam=lam, mode=mode, gamma=gamma)
    bf16 = EWC(model, lam=lam, mode=mode, gamma=gamma, store_dtype=torch.bfloat16)
    consolidate_all(f32, tasks)
    consolidate_all(bf16, tasks)
    assert {t.dtype for t in bf16.anchors().values()} | {t.dtype for t in bf16.precisions().values()} == {
        torch.bfloat16
    }
    assert bf16.memory_bytes() * 2 == f32.memory_bytes() > 0
    assert state_bytes(bf16) * 2 == state_bytes(f32) == f32.memory_bytes()

    if mode == "online":  # one term: F = Σ_k γ^(T−k) F_k at the latest anchor
        weights = [gamma ** (n_tasks - 1 - k) for k in range(n_tasks)]
        fisher = {
            n: sum(w * f[n].double() for w, (_, f) in zip(weights, tasks, strict=True)) for n in tasks[0][1]
        }
        tasks = [(tasks[-1][0], fisher)]
    value, grad = hand(model, lam, tasks, [n for n, _ in model.named_parameters()])
    e_f = (1 + U) ** n_tasks - 1 if mode == "online" else U
    value_bound, grad_bound = bf16_bounds(model, lam, tasks, e_f)
    if mode == "separate" and n_tasks > 1:
        extra_value, extra_grad = merge_bounds(bf16, lam)
        value_bound += extra_value
        grad_bound = {n: g + extra_grad[n] for n, g in grad_bound.items()}

    got_value, got_grad = value_and_grad(bf16)
    assert abs(got_value - value) <= value_bound
    ratios = [float(((got_grad[n].double() - grad[n]).abs() / grad_bound[n]).max()) for n in grad]
    assert max(ratios) <= 1.0
    assert max(ratios) > 0.1  # the bound is not vacuous: bfloat16 really was used
    assert all(got_grad[n].dtype == torch.float32 for n in got_grad)  # computed in float32
    ref_value, ref_grad = value_and_grad(f32)  # float32 storage: float32 accuracy
    assert ref_value == pytest.approx(value, rel=1e-5)
    for n in grad:
        torch.testing.assert_close(ref_grad[n].double(), grad[n], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert float(bf16.penalty()) == pytest.approx(got_value, rel=1e-6)


def test_float16_storage_that_overflows_is_a_clear_error() -> None:
    model = tiny_model()
    reg = EWC(model, store_dtype="float16")
    with pytest.raises(ValueError, match="overflows store_dtype torch.float16"):
        reg.consolidate(fisher_diag={"0.bias": torch.full((4,), 1e6)})
    assert reg.num_tasks == 0


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_cpu_storage_of_cpu_parameters_is_bit_identical_to_the_default(mode: str) -> None:
    model = tiny_model()
    tasks = random_tasks(model, 3)
    default = EWC(model, lam=2.0, mode=mode, gamma=0.8)
    on_cpu = EWC(model, lam=2.0, mode=mode, gamma=0.8, store_device="cpu")
    assert on_cpu.store_device == torch.device("cpu")
    consolidate_all(default, tasks)
    consolidate_all(on_cpu, tasks)
    assert {t.device.type for t in on_cpu.anchors().values()} == {"cpu"}
    a_value, a_grad = value_and_grad(default)
    b_value, b_grad = value_and_grad(on_cpu)
    assert a_value == b_value and all(torch.equal(a_grad[n], b_grad[n]) for n in a_grad)


def test_stored_tensors_are_moved_to_the_parameters_device_for_each_evaluation(monkeypatch) -> None:
    """The path taken for parameters on an accelerator: without one here, check that the penalty
    reads the stored tensors through ``on_device_of`` (and that it keeps same-device tensors)."""
    import ewc.quadratic as quadratic

    calls = []

    def spy(stored, params):
        calls.append(len(stored))
        moved = quadratic_on_device_of(stored, params)
        assert all(m is s for m, s in zip(moved, stored, strict=True))  # same device: no copy
        return moved

    quadratic_on_device_of = quadratic.on_device_of
    monkeypatch.setattr(quadratic, "on_device_of", spy)
    model = tiny_model()
    reg = EWC(model, store_device="cpu", store_dtype=torch.bfloat16)
    consolidate_all(reg, random_tasks(model, 1))
    value_and_grad(reg)
    assert calls == [4, 4]
    default = EWC(model)
    consolidate_all(default, random_tasks(model, 1))
    value_and_grad(default)
    assert calls == [4, 4]  # the default storage never takes that path


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"store_dtype": torch.int32}, "store_dtype must be None or a floating dtype"),
        ({"store_dtype": "int8"}, "store_dtype must be None or a floating dtype"),
        ({"store_dtype": "bogus"}, "store_dtype must be None or a floating dtype"),
        ({"store_dtype": torch.complex64}, "store_dtype must be None or a floating dtype"),
        ({"store_device": "gpu"}, "store_device must be None or a torch device"),
        ({"store_device": "nonsense:x"}, "store_device must be None or a torch device"),
        ({"store_device": 3.5}, "store_device must be None or a torch device"),
    ],
)
def test_bad_storage_is_a_clear_error(kwargs: dict, match: str) -> None:
    for cls in (EWC, L2):
        with pytest.raises(ValueError, match=match):
            cls(tiny_model(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_a_device_that_is_not_here_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="store_device 'cuda' is not available here"):
        EWC(tiny_model(), store_device="cuda")


# ---------------------------------------------------------------------------------- state


@pytest.mark.parametrize("cls", [EWC, L2])
@pytest.mark.parametrize(
    "options",
    [
        {"parameters": list(SUBSET)},
        {"parameters": lambda n, p: n.endswith("weight")},
        {"store_dtype": torch.bfloat16},
        {"store_device": "cpu"},
        {"parameters": ["2.weight"], "store_dtype": "bfloat16", "store_device": "cpu"},
    ],
)
def test_selection_and_storage_round_trip_through_save_and_load(cls, options: dict, tmp_path) -> None:
    model = tiny_model()
    reg = cls(model, lam=4.0, **options)
    consolidate_all(reg, random_tasks(model, 2))
    value, grad = value_and_grad(reg)
    reg.save(tmp_path / "reg.pt")
    config = safe_load(tmp_path / "reg.pt")["config"]  # plain data, loaded weights-only
    assert config["parameters"] == (None if reg.parameters is None else list(reg.parameters))
    loaded = cls.load(tmp_path / "reg.pt", model)
    assert (loaded.parameters, loaded.store_dtype, loaded.store_device) == (
        reg.parameters,
        reg.store_dtype,
        reg.store_device,
    )
    again = cls(model, store_dtype=reg.store_dtype, store_device=reg.store_device)
    again.load_state_dict(reg.state_dict())
    assert again.parameters == reg.parameters  # load_state_dict takes the saved selection
    for other in (loaded, again):
        other_value, other_grad = value_and_grad(other)
        assert other_value == value and all(torch.equal(other_grad[n], grad[n]) for n in grad)
    assert loaded.memory_bytes() == reg.memory_bytes()


def test_loading_into_another_store_dtype_converts_to_this_storage() -> None:
    model = tiny_model()
    tasks = random_tasks(model, 2)
    f32, bf16 = EWC(model), EWC(model, store_dtype=torch.bfloat16)
    consolidate_all(f32, tasks)
    consolidate_all(bf16, tasks)
    widened = EWC(model)
    widened.load_state_dict(bf16.state_dict())  # exact: every bfloat16 is a float32
    narrowed = EWC(model, store_dtype=torch.bfloat16)
    narrowed.load_state_dict(f32.state_dict())  # rounded to nearest, as bf16 stored it
    assert widened.store_dtype is None and narrowed.store_dtype == torch.bfloat16
    for k in widened.keys:
        for n, t in widened.precisions(k).items():
            assert t.dtype == torch.float32 and torch.equal(t, bf16.precisions(k)[n].float())
            assert torch.equal(narrowed.precisions(k)[n], bf16.precisions(k)[n])
            assert torch.equal(narrowed.anchors(k)[n], bf16.anchors(k)[n])
    assert widened.memory_bytes() == 2 * narrowed.memory_bytes()


def test_states_saved_before_these_options_load_as_all_parameters() -> None:
    model = tiny_model()
    reg = EWC(model, parameters=SUBSET, store_dtype=torch.bfloat16)
    consolidate_all(reg, random_tasks(model, 1))
    state = reg.state_dict()
    for key in ("parameters", "store_dtype", "store_device"):
        del state["config"][key]
    reg.load_state_dict(state)
    assert reg.parameters is None and reg.store_dtype == torch.bfloat16  # storage stays this one's
    assert EWC(model).load_state_dict(state) is None


def test_a_saved_selection_the_model_lacks_is_rejected_and_changes_nothing() -> None:
    model = tiny_model()
    reg = EWC(model, parameters=SUBSET)
    consolidate_all(reg, random_tasks(model, 1))
    state = reg.state_dict()
    state["config"] = {**state["config"], "parameters": ["0.weight", "head.weight"]}
    with pytest.raises(ValueError, match=r"names \['head.weight'\], not parameters of the model"):
        reg.load_state_dict(state)
    assert reg.parameters == SUBSET and reg.num_tasks == 1


@pytest.mark.parametrize("options", [{"store_dtype": torch.bfloat16}, {"store_device": "cpu"}])
def test_compact_storage_follows_a_model_moved_to_another_dtype(options: dict) -> None:
    model = tiny_model()
    reg = EWC(model, lam=2.0, **options)
    consolidate_all(reg, random_tasks(model, 1))
    value_and_grad(reg)  # builds the float32 scratch buffers
    model.double()
    stored = [(reg.anchors(), reg.precisions())]  # as stored (float64 if the storage follows p)
    value, grad = hand(model, 2.0, stored, [n for n, _ in model.named_parameters()])
    got_value, got_grad = value_and_grad(reg)
    assert got_value == pytest.approx(value, rel=1e-12)
    for n in grad:
        assert got_grad[n].dtype == torch.float64
        torch.testing.assert_close(got_grad[n], grad[n], rtol=1e-12, atol=1e-12)
    assert {t.dtype for t in reg.anchors().values()} == {options.get("store_dtype", torch.float64)}
