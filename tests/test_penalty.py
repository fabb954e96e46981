"""EWC / L2 penalties against independent float64 hand computations.

The expected values never go through ``ewc``: for stored tasks (θ*_k, F_k) the penalty is
λ/2 · Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² and its gradient λ · Σ_k F_k (θ − θ*_k), evaluated here in
float64 from tensors the tests chose themselves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ewc.penalty as penalty_module
from ewc import EWC, L2, diagonal_fisher

torch.set_num_threads(1)

Params = dict[str, Tensor]
Tasks = list[tuple[Params, Params]]  # (anchor, Fisher) per consolidated task


# ---------------------------------------------------------------------------------- helpers


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def headed_model(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({"body": nn.Linear(3, 4), "head": nn.Linear(4, 2)})


def snapshot(model: nn.Module) -> Params:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def random_fisher(model: nn.Module, gen: torch.Generator, zero_frac: float = 0.0) -> Params:
    out = {}
    for n, p in model.named_parameters():
        f = torch.rand(p.shape, generator=gen) * 2.0 + 0.05
        if zero_frac:
            f = torch.where(torch.rand(p.shape, generator=gen) < zero_frac, 0.0, f)
        out[n] = f
    return out


def move(model: nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def set_params(model: nn.Module, values: Params) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(values[n])


def hand_value(model: nn.Module, lam: float, tasks: Tasks) -> float:
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    total = 0.0  # fisher may come from diagonal_fisher; detach to be safe
    for anchor, fisher in tasks:
        for n, a in anchor.items():
            total += float((fisher[n].detach().double() * (theta[n] - a.double()) ** 2).sum())
    return lam / 2.0 * total


def hand_grad(model: nn.Module, lam: float, tasks: Tasks) -> Params:
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    grad = {n: torch.zeros_like(t) for n, t in theta.items()}
    for anchor, fisher in tasks:
        for n, a in anchor.items():
            grad[n] += lam * fisher[n].double() * (theta[n] - a.double())
    return grad


def value_and_grad(reg: EWC | L2) -> tuple[Tensor, Params]:
    model = reg.model
    model.zero_grad(set_to_none=True)
    value = reg.penalty()
    value.backward()
    grads = {
        n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters()
    }
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def assert_grads_close(got: Params, want: Params, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=rtol, atol=atol, msg=n)


def consolidate_tasks(reg: EWC, gen: torch.Generator, n: int, **kw: float) -> Tasks:
    """n consolidations with random Fishers at moving parameters; returns (anchor, F) per task."""
    tasks = []
    for _ in range(n):
        move(reg.model, gen)
        fisher = random_fisher(reg.model, gen, **kw)
        reg.consolidate(fisher_diag=fisher)
        tasks.append((snapshot(reg.model), fisher))
    move(reg.model, gen)
    return tasks


# ---------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_single_task_value_and_gradient_match_hand_formula(mode: str) -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(1)
    reg = EWC(model, lam=7.5, mode=mode)
    tasks = consolidate_tasks(reg, gen, 1)
    value, grads = value_and_grad(reg)
    assert value.shape == () and value.dtype == torch.float32
    assert value.item() == pytest.approx(hand_value(model, 7.5, tasks), rel=1e-6)
    assert value.item() > 0.1  # the parameters really moved away from the anchor
    assert_grads_close(grads, hand_grad(model, 7.5, tasks))


def test_penalty_is_zero_at_the_anchor_and_gradient_has_the_paper_half() -> None:
    model = tiny_model()
    reg = EWC(model, lam=3.0)
    fisher = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    reg.consolidate(fisher_diag=fisher)
    assert reg.penalty().item() == 0.0
    with torch.no_grad():
        model[0].bias.add_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    value, grads = value_and_grad(reg)
    # λ/2 · F · 1² = 3/2 · 2 = 3 (without the ½ it would be 6); gradient λ·F·1 = 6.
    assert value.item() == pytest.approx(3.0, rel=1e-6)
    assert grads["0.bias"].tolist() == pytest.approx([6.0, 0.0, 0.0, 0.0])
    assert float(grads["0.weight"].abs().max()) == 0.0


def test_separate_sums_one_quadratic_per_task() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(3)
    reg = EWC(model, lam=2.0, mode="separate")
    # Some entries have F = 0 in every task (the merged Fisher is 0 there).
    tasks = consolidate_tasks(reg, gen, 4, zero_frac=0.3)
    assert reg.num_tasks == 4
    for _ in range(3):  # several θ
        move(model, gen)
        value, grads = value_and_grad(reg)
        assert value.item() == pytest.approx(hand_value(model, 2.0, tasks), rel=1e-5)
        assert_grads_close(grads, hand_grad(model, 2.0, tasks))


def test_separate_merge_error_is_below_half_an_ulp_of_the_anchor() -> None:
    """Large weights, tiny moves: the worst case for merging the quadratics."""
    model, gen = tiny_model(), torch.Generator().manual_seed(4)
    reg = EWC(model, lam=1.0, mode="separate")
    base = {n: 100.0 + torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    tasks = []
    for _ in range(3):
        set_params(model, {n: b + 1e-3 * torch.randn(b.shape, generator=gen) for n, b in base.items()})
        fisher = random_fisher(model, gen)
        reg.consolidate(fisher_diag=fisher)
        tasks.append((snapshot(model), fisher))
    set_params(model, {n: b + 1e-3 * torch.randn(b.shape, generator=gen) for n, b in base.items()})
    value, grads = value_and_grad(reg)
    want = hand_grad(model, 1.0, tasks)
    for n, g in grads.items():
        f_sum = sum(f[n].double() for _, f in tasks)
        half_ulp = 2.0**-18  # float32 ulp in [64, 128), where the anchors lie, is 2^-17
        bound = f_sum * half_ulp * 1.01 + 1e-6 * want[n].abs()
        assert bool(((g.double() - want[n]).abs() <= bound).all()), n
    assert value.item() == pytest.approx(hand_value(model, 1.0, tasks), rel=1e-3)


def test_online_with_gamma_one_equals_separate_when_anchors_coincide() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(5)
    online, separate = EWC(model, lam=4.0, mode="online"), EWC(model, lam=4.0, mode="separate")
    move(model, gen)
    for _ in range(2):  # tasks A and B consolidated at the same parameters
        fisher = random_fisher(model, gen)
        online.consolidate(fisher_diag=fisher)
        separate.consolidate(fisher_diag=fisher)
    diffs = []
    for _ in range(3):
        move(model, gen)
        v_on, g_on = value_and_grad(online)
        v_sep, g_sep = value_and_grad(separate)
        for n in g_on:
            torch.testing.assert_close(g_on[n], g_sep[n], rtol=1e-6, atol=1e-7)
        diffs.append(v_on.item() - v_sep.item())
    assert max(abs(d) for d in diffs) < 1e-5 * abs(v_sep.item())


def test_online_with_gamma_one_has_separate_curvature() -> None:
    """Online merges F_A + F_B but centres on θ_B: same Hessian, gradient offset λ·F_A(θ_A − θ_B).

    So "online (γ = 1) equals separate up to a constant" holds for the curvature; the two
    penalties differ by a term linear in θ unless θ_A = θ_B.
    """
    model, gen = tiny_model(), torch.Generator().manual_seed(6)
    lam = 4.0
    online, separate = EWC(model, lam=lam, mode="online"), EWC(model, lam=lam, mode="separate")
    tasks = []
    for _ in range(2):
        move(model, gen)
        fisher = random_fisher(model, gen)
        online.consolidate(fisher_diag=fisher)
        separate.consolidate(fisher_diag=fisher)
        tasks.append((snapshot(model), fisher))
    (a_A, f_A), (a_B, _) = tasks
    offset = {n: lam * f_A[n].double() * (a_A[n].double() - a_B[n].double()) for n in a_A}
    for _ in range(3):
        move(model, gen)
        v_on, g_on = value_and_grad(online)
        v_sep, g_sep = value_and_grad(separate)
        assert_grads_close({n: g_on[n].double() - g_sep[n].double() for n in g_on}, offset, atol=1e-5)
        theta = snapshot(model)
        want = sum(
            float(
                (
                    lam
                    / 2
                    * f_A[n].double()
                    * (a_A[n].double() - a_B[n].double())
                    * (2 * theta[n].double() - a_A[n].double() - a_B[n].double())
                ).sum()
            )
            for n in theta
        )
        assert v_on.item() - v_sep.item() == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert offset["0.weight"].abs().max() > 0.01  # the offset is really there


def test_online_decays_old_fisher_with_gamma() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(7)
    gamma, lam = 0.5, 3.0
    reg = EWC(model, lam=lam, mode="online", gamma=gamma)
    tasks = consolidate_tasks(reg, gen, 3)
    (_, f_a), (_, f_b), (a_c, f_c) = tasks
    merged = {n: gamma**2 * f_a[n] + gamma * f_b[n] + f_c[n] for n in f_a}
    state = reg.state_dict()
    assert reg.num_tasks == 3 and state["num_tasks"] == 3 and len(state["tasks"]) == 1
    for n in merged:
        torch.testing.assert_close(state["tasks"][0]["fisher"][n], merged[n])
        assert torch.equal(state["tasks"][0]["anchor"][n], a_c[n])  # anchor = latest parameters
    value, grads = value_and_grad(reg)
    assert value.item() == pytest.approx(hand_value(model, lam, [(a_c, merged)]), rel=1e-5)
    assert_grads_close(grads, hand_grad(model, lam, [(a_c, merged)]))


def test_online_decays_parameters_missing_from_the_new_fisher() -> None:
    """A name the new Fisher leaves out keeps γ·F_old, anchored at the latest parameters."""
    model, gen = headed_model(), torch.Generator().manual_seed(23)
    reg = EWC(model, lam=1.0, mode="online", gamma=0.25)
    f_old = random_fisher(model, gen)
    reg.consolidate(fisher_diag=f_old)
    move(model, gen)
    f_new = {n: f for n, f in random_fisher(model, gen).items() if n.startswith("head")}
    reg.consolidate(fisher_diag=f_new)
    latest = snapshot(model)
    task = reg.state_dict()["tasks"][0]
    for n in f_old:
        want = 0.25 * f_old[n] + f_new[n] if n in f_new else 0.25 * f_old[n]
        torch.testing.assert_close(task["fisher"][n], want)
        assert torch.equal(task["anchor"][n], latest[n])


def test_l2_equals_ewc_with_unit_fisher() -> None:
    for mode in ("separate", "online"):
        model, gen = tiny_model(), torch.Generator().manual_seed(8)
        l2, ewc_ones = L2(model, lam=5.0, mode=mode), EWC(model, lam=5.0, mode=mode)
        tasks = []
        for _ in range(2):
            move(model, gen)
            ones = l2.consolidate()
            assert all(torch.equal(f, torch.ones_like(f)) for f in ones.values())
            ewc_ones.consolidate(fisher_diag={n: torch.ones_like(p) for n, p in model.named_parameters()})
            tasks.append((snapshot(model), ones))
        move(model, gen)
        v_l2, g_l2 = value_and_grad(l2)
        v_ewc, g_ewc = value_and_grad(ewc_ones)
        assert v_l2.item() == pytest.approx(v_ewc.item(), rel=1e-6)
        assert_grads_close(g_l2, {n: g.double() for n, g in g_ewc.items()})
        if mode == "separate":  # the paper's baseline: λ/2 Σ_k ‖θ − θ*_k‖²
            assert v_l2.item() == pytest.approx(hand_value(model, 5.0, tasks), rel=1e-5)
            assert_grads_close(g_l2, hand_grad(model, 5.0, tasks))


def test_l2_ignores_data_and_frozen_parameters() -> None:
    model = tiny_model()
    model[0].bias.requires_grad_(False)
    l2 = L2(model, lam=1.0)
    ones = l2.consolidate(data=(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)))
    assert "0.bias" not in ones and set(ones) == {"0.weight", "2.weight", "2.bias"}
    assert set(l2.state_dict()["tasks"][0]["anchor"]) == set(ones)


def test_hessian_vector_product_through_the_penalty() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(9)
    reg = EWC(model, lam=2.5)
    tasks = consolidate_tasks(reg, gen, 1)
    params = list(model.parameters())
    grads = torch.autograd.grad(reg.penalty(), params, create_graph=True)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    hvp = torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v, strict=True)), params)
    fisher = tasks[0][1]
    for (n, _), h, u in zip(model.named_parameters(), hvp, v, strict=True):
        torch.testing.assert_close(h, 2.5 * fisher[n] * u)


def test_two_penalties_before_one_backward_keep_their_own_graphs() -> None:
    """Logging the penalty before backward must not corrupt the graph being trained on."""
    model, gen = tiny_model(), torch.Generator().manual_seed(10)
    reg = EWC(model, lam=1.5)
    tasks = consolidate_tasks(reg, gen, 1)
    first = reg.penalty()
    second = reg.penalty()
    (first + second).backward()
    want = hand_grad(model, 1.5, tasks)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, {n: 2 * g for n, g in want.items()})


def test_scaled_and_repeated_backward_give_the_right_gradients() -> None:
    """An upstream gradient other than 1, and a second backward through a retained graph."""
    model, gen = tiny_model(), torch.Generator().manual_seed(24)
    reg = EWC(model, lam=0.5)
    tasks = consolidate_tasks(reg, gen, 2)
    want = hand_grad(model, 0.5, tasks)
    value = reg.penalty()
    (-3.0 * value).backward(retain_graph=True)
    assert_grads_close(
        {n: p.grad for n, p in model.named_parameters()}, {n: -3.0 * g for n, g in want.items()}
    )
    value.backward()
    assert_grads_close(
        {n: p.grad for n, p in model.named_parameters()}, {n: -2.0 * g for n, g in want.items()}
    )


def test_penalty_without_grad_mode_and_with_autograd_grad() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(11)
    reg = EWC(model, lam=1.0)
    tasks = consolidate_tasks(reg, gen, 2)
    want = hand_value(model, 1.0, tasks)
    with torch.no_grad():
        v = reg.penalty()
    assert not v.requires_grad and v.item() == pytest.approx(want, rel=1e-6)
    with torch.inference_mode():
        assert reg.penalty().item() == pytest.approx(want, rel=1e-6)
    grads = torch.autograd.grad(reg.penalty(), list(model.parameters()))
    assert_grads_close(
        dict(zip([n for n, _ in model.named_parameters()], grads, strict=True)), hand_grad(model, 1.0, tasks)
    )
    assert all(p.grad is None for p in model.parameters())


def test_nothing_consolidated_gives_a_zero_tensor() -> None:
    model = tiny_model()
    for reg in (EWC(model), L2(model)):
        v = reg.penalty()
        assert isinstance(v, Tensor) and v.shape == () and v.item() == 0.0
        assert v.device == next(model.parameters()).device
        assert reg.num_tasks == 0


def test_reset_forgets_all_tasks() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(12)
    reg = EWC(model)
    consolidate_tasks(reg, gen, 2)
    assert reg.penalty().item() > 0 and reg.num_tasks == 2
    reg.reset()
    assert reg.penalty().item() == 0.0 and reg.num_tasks == 0 and reg.state_dict()["tasks"] == []


def test_lam_is_settable_and_scales_linearly() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(13)
    reg = EWC(model, lam=1.0)
    consolidate_tasks(reg, gen, 1)
    v1 = reg.penalty().item()
    reg.lam = 4.0
    assert reg.lam == 4.0 and reg.penalty().item() == pytest.approx(4.0 * v1, rel=1e-6)
    reg.lam = 0
    assert reg.penalty().item() == 0.0
    for bad in (-1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="lam"):
            reg.lam = bad  # type: ignore[assignment]
    assert reg.lam == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1.0}, "lam must be a finite number >= 0, got -1.0"),
        ({"lam": float("nan")}, "lam must be a finite number >= 0, got nan"),
        ({"lam": float("inf")}, "lam must be a finite number >= 0, got inf"),
        ({"lam": True}, "lam must be a finite number >= 0, got True"),
        ({"lam": None}, "lam must be a finite number >= 0, got None"),
        ({"gamma": 0.0}, r"gamma must be a finite number in \(0, 1\], got 0.0"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": -0.2}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"mode": "sum"}, "mode must be one of separate, online, got 'sum'"),
        ({"fisher": "diagonal"}, "fisher must be one of exact, sample, empirical, batched, got 'diagonal'"),
        ({"likelihood": "poisson"}, "likelihood must be one of .*, got 'poisson'"),
        ({"max_samples": 0}, "max_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"sigma": 0.0}, "sigma must be a finite number > 0, got 0.0"),
        ({"sigma": "x"}, "sigma must be a finite number > 0, got 'x'"),
    ],
)
def test_invalid_configuration_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EWC(tiny_model(), **kwargs)


def test_numbers_are_read_with_float() -> None:
    """What float() reads is a valid λ, γ or σ (a numpy scalar, a 0-dim tensor, a numeric string)."""
    reg = EWC(tiny_model(), lam=np.float32(2.0), gamma=torch.tensor(0.5), sigma="1.5")
    assert (reg.lam, reg.gamma) == (2.0, 0.5) and type(reg.lam) is float
    assert reg.state_dict()["config"]["sigma"] == 1.5


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"lam": -1.0}, "lam"), ({"gamma": 0.0}, "gamma"), ({"mode": "x"}, "mode")]
)
def test_invalid_l2_configuration_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L2(tiny_model(), **kwargs)


def test_valid_edge_configuration_is_accepted() -> None:
    reg = EWC(tiny_model(), lam=0.0, gamma=1.0, mode="online", fisher="empirical", max_samples=3)
    assert (reg.lam, reg.gamma, reg.mode, reg.fisher_mode) == (0.0, 1.0, "online", "empirical")


# ------------------------------------------------------------------ model changes over time


def test_parameters_added_after_consolidation_are_not_penalised() -> None:
    model, gen = headed_model(), torch.Generator().manual_seed(14)
    reg = EWC(model, lam=2.0)
    tasks = consolidate_tasks(reg, gen, 1)
    before = reg.penalty().item()
    model["head2"] = nn.Linear(4, 3)  # a new task head
    value, grads = value_and_grad(reg)
    assert value.item() == pytest.approx(before, rel=1e-7)
    assert value.item() == pytest.approx(hand_value(model, 2.0, tasks), rel=1e-6)
    assert float(grads["head2.weight"].abs().max()) == 0.0
    assert float(grads["body.weight"].abs().max()) > 0.0
    reg.consolidate(fisher_diag=random_fisher(model, gen))  # now the new head is anchored too
    assert "head2.weight" in reg.state_dict()["tasks"][1]["anchor"]


def test_replaced_module_of_same_shape_is_followed() -> None:
    model, gen = headed_model(), torch.Generator().manual_seed(15)
    reg = EWC(model, lam=1.0)
    tasks = consolidate_tasks(reg, gen, 1)
    reg.penalty()  # resolve and cache the parameters
    model["head"] = nn.Linear(4, 2)  # new parameter objects, same names and shapes
    value, grads = value_and_grad(reg)
    assert value.item() == pytest.approx(hand_value(model, 1.0, tasks), rel=1e-6)
    assert_grads_close(grads, hand_grad(model, 1.0, tasks))


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_changed_shape_raises_naming_the_parameter(mode: str) -> None:
    model, gen = headed_model(), torch.Generator().manual_seed(16)
    reg = EWC(model, mode=mode)
    consolidate_tasks(reg, gen, 1)
    model["head"] = nn.Linear(4, 5)
    with pytest.raises(ValueError, match=r"head\.weight.*shape"):
        reg.penalty()
    with pytest.raises(ValueError, match=r"head\.weight"):
        reg.consolidate(fisher_diag={n: torch.ones_like(p) for n, p in model.named_parameters()})
    assert reg.num_tasks == 1  # the failed consolidation changed nothing


def test_missing_parameter_raises_naming_it() -> None:
    model, gen = headed_model(), torch.Generator().manual_seed(17)
    reg = EWC(model)
    consolidate_tasks(reg, gen, 1)
    del model["head"]
    with pytest.raises(ValueError, match=r"head\.weight.*missing"):
        reg.penalty()


def test_model_moved_to_another_dtype_after_consolidation() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(18)
    reg = EWC(model, lam=2.0)
    tasks = consolidate_tasks(reg, gen, 2)
    model.double()
    value, grads = value_and_grad(reg)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(hand_value(model, 2.0, tasks), rel=1e-12)
    assert_grads_close(grads, hand_grad(model, 2.0, tasks), rtol=1e-12, atol=1e-12)
    assert all(t.dtype == torch.float64 for t in reg.state_dict()["tasks"][0]["anchor"].values())


def test_bfloat16_parameters_work() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(19)
    reg = EWC(model, lam=2.0)
    tasks = consolidate_tasks(reg, gen, 1)
    model.to(torch.bfloat16)
    value, grads = value_and_grad(reg)
    assert grads["0.weight"].dtype == torch.bfloat16
    # bfloat16 keeps ~3 significant digits of θ and θ*.
    assert value.item() == pytest.approx(hand_value(model, 2.0, tasks), rel=5e-2)


# ------------------------------------------------------------------------- consolidation


def test_consolidate_validates_a_precomputed_fisher() -> None:
    model = tiny_model()
    reg = EWC(model)
    good = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    bad_cases = [
        ({**good, "nope.weight": torch.ones(1)}, "nope.weight"),
        ({**good, "0.bias": torch.ones(5)}, r"0\.bias.*shape"),
        ({**good, "0.bias": -torch.ones(4)}, "negative"),
        ({**good, "0.bias": torch.full((4,), float("nan"))}, "NaN"),
        ({}, "non-empty"),
    ]
    for fisher, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            reg.consolidate(fisher_diag=fisher)
    with pytest.raises(ValueError, match="not both"):
        reg.consolidate(torch.randn(4, 3), fisher_diag=good)
    with pytest.raises(ValueError, match="needs data"):
        reg.consolidate()
    assert reg.num_tasks == 0
    subset = {"2.weight": torch.ones(2, 4)}  # only some parameters anchored
    reg.consolidate(fisher_diag=subset)
    assert set(reg.state_dict()["tasks"][0]["anchor"]) == {"2.weight"}


def test_consolidate_copies_its_inputs() -> None:
    model = tiny_model()
    reg = EWC(model, lam=2.0)
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    reg.consolidate(fisher_diag=fisher)
    anchor = snapshot(model)
    for f in fisher.values():
        f.mul_(100.0)  # the caller reuses its tensors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = reg.state_dict()["tasks"][0]
    for n, p in model.named_parameters():
        assert torch.equal(state["fisher"][n], torch.ones_like(p))
        assert torch.equal(state["anchor"][n], anchor[n])


def test_consolidate_computes_the_fisher_with_the_configured_settings(monkeypatch) -> None:
    model = tiny_model()
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return diagonal_fisher(*args, **kwargs)

    monkeypatch.setattr(penalty_module, "diagonal_fisher", recording)
    reg = EWC(model, lam=1.0, fisher="empirical", max_samples=10, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    before = snapshot(model)
    fisher = reg.consolidate((x, y), generator=gen)
    ((args, kwargs),) = calls
    assert args[0] is model and args[1][0] is x
    assert kwargs == {
        "mode": "empirical",
        "max_samples": 10,
        "likelihood": "categorical",
        "sigma": 1.0,
        "batch_size": 4,
        "generator": gen,
    }
    direct = diagonal_fisher(model, (x[:10], y[:10]), mode="empirical")
    state = reg.state_dict()["tasks"][0]
    for n, p in model.named_parameters():
        torch.testing.assert_close(fisher[n], direct[n])
        torch.testing.assert_close(state["fisher"][n], direct[n])
        assert torch.equal(state["anchor"][n], before[n]) and torch.equal(p.detach(), before[n])
        assert p.grad is None
    assert reg.penalty().item() == 0.0


def test_consolidate_on_real_data_then_train_away() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(20)
    x = torch.randn(16, 3, generator=gen)
    reg = EWC(model, lam=10.0, mode="online")
    fisher = reg.consolidate(x)  # exact Fisher needs no labels
    anchor = snapshot(model)
    move(model, gen)
    value, grads = value_and_grad(reg)
    assert value.item() == pytest.approx(hand_value(model, 10.0, [(anchor, fisher)]), rel=1e-6)
    assert_grads_close(grads, hand_grad(model, 10.0, [(anchor, fisher)]))


# ---------------------------------------------------------------- cost independent of tasks


class _OpCounter(TorchDispatchMode):
    """Counts aten calls (backward included) and the elements of their tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.elements += sum(a.numel() for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor))
        return func(*args, **(kwargs or {}))


def _penalty_cost(reg: EWC) -> tuple[int, int]:
    """aten calls of one evaluation: its backward, then a read of its value."""
    reg.penalty().backward()  # allocate the buffers first
    with _OpCounter() as counter:
        value = reg.penalty()
        value.backward()
        value.item()
    return counter.calls, counter.elements


@pytest.mark.parametrize("mode", ["online", "separate"])
def test_penalty_cost_does_not_grow_with_the_number_of_tasks(mode: str) -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(21)
    reg = EWC(model, mode=mode, gamma=0.9)
    consolidate_tasks(reg, gen, 1)
    one = _penalty_cost(reg)
    consolidate_tasks(reg, gen, 4)
    assert reg.num_tasks == 5
    assert _penalty_cost(reg) == one
    assert one[0] > 0 and one[1] >= 3 * sum(p.numel() for p in model.parameters())
    state = reg.state_dict()
    assert len(state["tasks"]) == (1 if mode == "online" else 5)


def test_online_stores_exactly_one_anchor_and_fisher() -> None:
    model, gen = tiny_model(), torch.Generator().manual_seed(22)
    reg = EWC(model, mode="online", gamma=0.7)
    consolidate_tasks(reg, gen, 5)
    state = reg.state_dict()
    n_params = len(list(model.parameters()))
    assert state["num_tasks"] == 5 and len(state["tasks"]) == 1
    assert len(state["tasks"][0]["anchor"]) == len(state["tasks"][0]["fisher"]) == n_params
