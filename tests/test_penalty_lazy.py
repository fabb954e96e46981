"""The penalty's value is computed when read, its gradient added after backward: both stay exact.

``reg.penalty()`` returns a :class:`ewc.deferred.Deferred` 0-dim tensor whose value waits until it
is read, and ``loss.backward()`` adds λF(θ − θ*) into ``.grad`` at its end (or hands it through
autograd where that is not safe). Every test compares against a float64 hand computation of
λ/2 Σ_k F_k (θ − θ*_k)² and λ Σ_k F_k (θ − θ*_k) from tensors chosen here, taken at the parameters
the penalty was evaluated at, whatever happened to them afterwards.
"""

from __future__ import annotations

import pytest
import torch
from penalty_helpers import Params, random_tasks, set_params, snapshot, tiny_model
from torch import Tensor, nn

from ewc import EWC, L2
from ewc.deferred import Deferred, known_part

torch.set_num_threads(1)

LAM = 1.7


def consolidated(mode: str = "separate", n: int = 3, store_dtype=None, seed: int = 0) -> tuple[EWC, list]:
    """An EWC on the tiny model with ``n`` random terms, the parameters moved off every anchor."""
    model = tiny_model(seed)
    tasks = random_tasks(model, n, seed)
    reg = EWC(model, lam=LAM, mode=mode, gamma=1.0, store_dtype=store_dtype)
    start = snapshot(model)
    for anchor, fisher in tasks:
        set_params(model, anchor)
        reg.consolidate(fisher_diag=fisher)
    set_params(model, start)
    if mode == "online":  # online anchors at the last consolidation, with the summed Fisher
        total = {k: sum(f[k] for _, f in tasks) for k in start}
        tasks = [(tasks[-1][0], total)]
    return reg, tasks


def reference(model: nn.Module, tasks: list[tuple[Params, Params]], lam: float = LAM) -> tuple[float, Params]:
    """float64 λ/2 Σ_k F_k (θ − θ*_k)² and its gradient at the model's current parameters."""
    value, grad = 0.0, {}
    for n, p in model.named_parameters():
        theta = p.detach().double()
        grad[n] = torch.zeros_like(theta)
        for anchor, fisher in tasks:
            d = theta - anchor[n].double()
            value += lam / 2 * float((fisher[n].double() * d * d).sum())
            grad[n] += lam * fisher[n].double() * d
    return value, grad


def grads_of(model: nn.Module) -> Params:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_close(got: Params, want: Params) -> None:
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-5, atol=1e-6, msg=n)


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, generator=gen), torch.randint(0, 2, (6,), generator=gen)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_a_training_step_reads_the_value_after_the_optimiser_step(mode: str) -> None:
    """``loss = ce + penalty; backward; step; loss.item()``: the value at the old parameters."""
    reg, tasks = consolidated(mode)
    model = reg.model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        want_value, want_pen_grad = reference(model, tasks)
        x, y = data()
        ce = nn.functional.cross_entropy(model(x), y)
        ce_grads = dict(
            zip(
                [n for n, _ in model.named_parameters()],
                torch.autograd.grad(ce, list(model.parameters()), retain_graph=True),
                strict=True,
            )
        )
        ce_value = float(ce.detach())
        opt.zero_grad(set_to_none=True)
        loss = ce + reg.penalty()
        assert isinstance(loss, Deferred) and float(known_part(loss)) == ce_value
        loss.backward()
        assert_close(grads_of(model), {n: g + ce_grads[n].double() for n, g in want_pen_grad.items()})
        opt.step()
        assert loss.item() == pytest.approx(ce_value + want_value, rel=1e-6)
        assert type(loss) is Tensor  # settled: an ordinary tensor from now on


@pytest.mark.parametrize("store_dtype", [None, torch.bfloat16])
def test_the_value_is_bit_identical_whichever_path_computed_it(store_dtype) -> None:
    reg, _ = consolidated("online", store_dtype=store_dtype)
    before = reg.penalty()  # read before backward: computed with the gradient
    first = before.item()
    before.backward()
    after = reg.penalty()  # the previous value was read: this one is computed in the forward
    after.backward()
    late = reg.penalty()  # not computed before its backward: computed from the buffer later
    late.backward()
    with torch.no_grad():
        for p in reg.model.parameters():
            p.add_(1.0)  # the optimiser step
    assert late.item() == after.item() == first
    with torch.no_grad():
        unread = reg.penalty()  # without autograd: computed at once (at the new parameters)
    assert not isinstance(unread, Deferred) and unread.item() != first


@pytest.mark.parametrize("store_dtype", [None, torch.bfloat16])
def test_every_gradient_path_matches_the_reference(store_dtype) -> None:
    reg, tasks = consolidated("separate", store_dtype=store_dtype)
    model, params = reg.model, list(reg.model.parameters())
    names = [n for n, _ in model.named_parameters()]
    value, want = reference(model, tasks)
    tol = {"rtol": 2e-2, "atol": 1e-2} if store_dtype else {"rtol": 1e-5, "atol": 1e-6}

    def check(got: Params) -> None:
        for n in want:
            torch.testing.assert_close(got[n].double(), want[n], **tol, msg=n)

    reg.penalty().backward()  # added into .grad after the backward
    direct = grads_of(model)
    check(direct)
    model.zero_grad(set_to_none=True)
    returned = dict(zip(names, torch.autograd.grad(reg.penalty(), params), strict=True))  # autograd
    check(returned)
    for n in names:  # a fused .grad += λF(θ − θ*) against a fresh λF(θ − θ*): one rounding apart
        torch.testing.assert_close(direct[n], returned[n], rtol=1e-6, atol=1e-7)
    pen = reg.penalty()
    assert pen.item() == pytest.approx(value, rel=2e-2 if store_dtype else 1e-6)
    pen.backward()  # read first: w computed with the value, handed over through autograd
    check(grads_of(model))
    model.zero_grad(set_to_none=True)
    grads = torch.autograd.grad(reg.penalty(), params, create_graph=True)  # differentiable
    check(dict(zip(names, grads, strict=True)))


def test_the_gradient_is_added_to_what_backward_accumulated() -> None:
    """Two backwards without zero_grad add up; a parameter without a task gradient gets the
    penalty's alone."""
    reg, tasks = consolidated("separate")
    model = reg.model
    _, want = reference(model, tasks)
    x, y = data()
    head = model[2]
    out = model[1](model[0](x))  # the head's parameters get no gradient from this loss
    (out.sum() + reg.penalty()).backward()
    first = grads_of(model)
    assert_close(
        {"2.weight": first["2.weight"], "2.bias": first["2.bias"]},
        {k: want[k] for k in ("2.weight", "2.bias")},
    )
    (head(model[1](model[0](x))).sum() * 0 + reg.penalty()).backward()
    second = grads_of(model)
    for n in want:
        torch.testing.assert_close(second[n].double(), first[n].double() + want[n], rtol=1e-5, atol=1e-6)


def test_scaled_losses_and_hooks_see_the_whole_gradient() -> None:
    reg, tasks = consolidated("online")
    model = reg.model
    _, want = reference(model, tasks)
    seen: dict[str, Tensor] = {}
    after: dict[str, Tensor] = {}
    weight, bias = model[0].weight, model[0].bias
    weight.register_hook(lambda g: seen.setdefault("0.weight", g.clone()))

    def keep(p: Tensor) -> None:
        after["0.bias"] = p.grad.clone()

    bias.register_post_accumulate_grad_hook(keep)
    (2.0 * reg.penalty()).backward()
    assert_close(grads_of(model), {n: 2 * g for n, g in want.items()})
    torch.testing.assert_close(seen["0.weight"].double(), 2 * want["0.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after["0.bias"].double(), 2 * want["0.bias"], rtol=1e-5, atol=1e-6)


def test_kept_losses_keep_their_values() -> None:
    """Losses kept unread over several steps (one diff buffer) each read their own parameters'."""
    reg, tasks = consolidated("online")
    model = reg.model
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    kept, want = [], []
    for _ in range(4):
        want.append(reference(model, tasks)[0])
        opt.zero_grad()
        loss = reg.penalty()
        loss.backward()
        opt.step()
        kept.append(loss)
    assert [v.item() for v in kept] == pytest.approx(want, rel=1e-6)
    assert len(set(want)) == 4  # the parameters really moved


def test_a_value_lost_to_an_in_place_change_is_an_error() -> None:
    reg, _ = consolidated("online")
    pen = reg.penalty()
    with torch.no_grad():
        next(reg.model.parameters()).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        pen.item()


def test_deferred_sums_round_as_the_eager_sums() -> None:
    """``+`` keeps the value deferred; reading gives the bits the eager sum would have."""
    reg, _ = consolidated("separate")
    v = reg.penalty().item()
    ce = torch.tensor(0.123456789, requires_grad=True)
    assert reg.penalty().item() == v
    eager = torch.tensor(v)
    cases = {
        "ce + p": (lambda p, q: ce + p, ce.detach() + eager),
        "p + ce": (lambda p, q: p + ce, eager + ce.detach()),
        "p + 1.5": (lambda p, q: p + 1.5, eager + 1.5),
        "1.5 + p": (lambda p, q: 1.5 + p, 1.5 + eager),
        "sum": (lambda p, q: sum([p, q]), 0 + eager + eager),
        "ce + (p + q)": (lambda p, q: ce + (p + q), ce.detach() + (eager + eager)),
        "(ce + p) + q": (lambda p, q: (ce + p) + q, (ce.detach() + eager) + eager),
        "(ce + p) * 3": (lambda p, q: (ce + p) * 3, (ce.detach() + eager) * 3),
        "torch.add": (lambda p, q: torch.add(ce, p), ce.detach() + eager),
        "stack": (lambda p, q: torch.stack([p, q]).sum(), torch.stack([eager, eager]).sum()),
    }
    for name, (build, want) in cases.items():
        got = build(reg.penalty(), reg.penalty())
        assert got.item() == want.item(), name
    deferred = ce + reg.penalty()
    assert isinstance(deferred, Deferred) and deferred.shape == () and deferred.requires_grad
    assert isinstance(deferred, Deferred)  # metadata reads settle nothing
    assert f"{deferred:.6f}" == f"{(ce.detach() + eager).item():.6f}" and type(deferred) is Tensor


def test_l2_and_the_eval_path_are_unchanged() -> None:
    model = tiny_model(3)
    reg = L2(model, lam=0.5)
    reg.consolidate()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    n = sum(p.numel() for p in model.parameters())
    pen = reg.penalty()
    pen.backward()
    assert pen.item() == pytest.approx(0.5 / 2 * n * 0.25**2, rel=1e-6)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5 * 0.25))


def test_which_parameters_get_their_gradient_after_the_backward(monkeypatch) -> None:
    """``backward()`` adds into ``.grad`` after the backward; ``autograd.grad``, hooked parameters
    and a scaled loss go through autograd (the gradients are checked by the tests above)."""
    import ewc.quadratic_eval as quadratic_eval

    added: list[list[int]] = []
    original = quadratic_eval.Evaluation.add_into_grads

    def spy(self, idx):
        added.append(list(idx))
        return original(self, idx)

    monkeypatch.setattr(quadratic_eval.Evaluation, "add_into_grads", spy)
    reg, _ = consolidated("online")
    params = list(reg.model.parameters())
    reg.penalty().backward()
    assert added == [[0, 1, 2, 3]]
    torch.autograd.grad(reg.penalty(), params)
    (2.0 * reg.penalty()).backward()  # the product reads the value; the gradient is scaled
    assert added == [[0, 1, 2, 3]]
    reg.penalty().backward()  # after a read the value is computed in the forward: added the same
    assert added == [[0, 1, 2, 3]] * 2
    params[1].register_hook(lambda g: g)
    reg.penalty().backward()
    assert added[-1] == [0, 2, 3]


def test_reading_the_value_does_not_change_the_training() -> None:
    """The same steps with the loss read never, after every step or before every backward:
    bit-identical parameters (the gradient is computed the same way whatever was read)."""
    runs = []
    for read in ("never", "after", "before"):
        reg, _ = consolidated("online")
        model = reg.model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            x, y = data(step)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y) + reg.penalty()
            if read == "before":
                loss.item()
            loss.backward()
            opt.step()
            if read == "after":
                loss.item()
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))
