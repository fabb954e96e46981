"""ewc.integrations.lightning: EWCCallback with the real `lightning` package.

A small classifier is fitted on two tasks by Lightning's own Trainer. What Lightning records is
read back with Lightning's tools (CSVLogger's metrics.csv, its checkpoints and ``fit(ckpt_path=)``)
and checked against independent references: the per-sample Fisher loop of conftest, the penalty
λ/2 Σ F (θ − θ*)² written out at the parameters each step started from, and the SGD update
difference the penalty must cause, λ·F·(θ − θ*) once per optimizer step.
"""

from __future__ import annotations

import copy
import csv
import importlib
import os
import sys

import pytest
import torch
from conftest import assert_fisher_close, reference_fisher, same_state
from torch import nn

from ewc import EWC

L = pytest.importorskip("lightning.pytorch")
from ewc.integrations.lightning import PENALTY_LOG_NAME, EWCCallback  # noqa: E402

LR = 0.5
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
]


class Classifier(L.LightningModule):
    def __init__(self, head_only: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.head_only = head_only  # the optimizer steps the last layer only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net[2].parameters() if self.head_only else self.parameters(), lr=LR)


def task(seed: int, n: int = 16) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    w = torch.randn(4, 3, generator=gen)
    return torch.utils.data.TensorDataset(x, (x @ w).argmax(1))


class Task(L.LightningDataModule):
    def __init__(self, seed: int, shuffle: bool = True, batch_size: int = 4) -> None:
        super().__init__()
        self.data, self.shuffle, self.batch_size = task(seed), shuffle, batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=self.shuffle)


def trainer(root: os.PathLike, callbacks: list, **kw: object) -> L.Trainer:
    base = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "default_root_dir": str(root),
    }
    return L.Trainer(callbacks=callbacks, **(base | kw))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def penalty_by_hand(lam: float, fisher: dict, anchor: dict, theta: dict) -> float:
    total = sum((fisher[n].double() * (theta[n].double() - anchor[n].double()) ** 2).sum() for n in fisher)
    return 0.5 * lam * float(total)


class Recorder(L.Callback):
    """Parameters before every optimizer step; penalty and state when a checkpoint is written and
    when training starts."""

    def __init__(self, cb: EWCCallback) -> None:
        self.cb, self.steps, self.saved, self.started = cb, [], {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001, ANN201
        self.steps.append(params(pl_module))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):  # noqa: ANN001, ANN201
        self.saved[trainer.current_epoch] = (
            self.cb.ewc.penalty().item(),
            copy.deepcopy(self.cb.state_dict()),
        )

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self.started.update(penalty=self.cb.ewc.penalty().item(), state=copy.deepcopy(self.cb.state_dict()))


def test_two_tasks_fisher_logs_and_checkpoint(tmp_path: os.PathLike) -> None:
    """fit(task A) consolidates on the datamodule's loader (the per-sample reference Fisher);
    fit(task B) logs λ/2 Σ F (θ − θ*)² at each step's parameters (read back from CSVLogger's
    file); a checkpoint of task B resumed by a fresh Trainer, module and callback has the same EWC
    state and penalty, and finishes exactly as the uninterrupted run."""
    model, a, b = Classifier(), Task(1), Task(2, shuffle=False)
    cb = EWCCallback(lam=20.0, fisher="exact")
    trainer(tmp_path, [cb]).fit(model, datamodule=a)
    assert cb.ewc.num_tasks == 1
    anchor, fisher = params(model), {n: f.clone() for n, f in cb.ewc.precisions().items()}
    x, y = a.data.tensors
    assert_fisher_close(fisher, reference_fisher(model, [(x, y)], "exact"), model, tol=1e-5)
    state_a = copy.deepcopy(cb.state_dict())

    rec = Recorder(cb)
    logger = L.loggers.CSVLogger(tmp_path, name="b")
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit_b = trainer(tmp_path, [cb, rec, ckpt], logger=logger, max_epochs=2, enable_checkpointing=True)
    fit_b.fit(model, datamodule=b)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get(PENALTY_LOG_NAME)]
    logged = [float(r[PENALTY_LOG_NAME]) for r in sorted(rows, key=lambda r: int(r["step"]))]
    expected = [penalty_by_hand(20.0, fisher, anchor, theta) for theta in rec.steps]
    assert len(logged) == len(expected) == 8 and expected[0] == 0.0 < expected[-1]
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert cb.ewc.num_tasks == 2  # task B consolidated at the end of its fit

    first = next(p for p in sorted(os.listdir(tmp_path / "ckpt")) if p.startswith("epoch=0"))
    fresh, fresh_cb = Classifier(), EWCCallback(lam=20.0, fisher="exact")
    rec2 = Recorder(fresh_cb)
    trainer(tmp_path, [fresh_cb, rec2], max_epochs=2).fit(
        fresh, datamodule=b, ckpt_path=tmp_path / "ckpt" / first
    )
    assert same_state(rec.saved[0][1], state_a) and same_state(rec2.started["state"], state_a)
    assert rec2.started["penalty"] == rec.saved[0][0] > 0
    final = params(model)
    for n, p in params(fresh).items():
        torch.testing.assert_close(p, final[n], rtol=0, atol=1e-6)
    assert fresh_cb.ewc.num_tasks == 2


@pytest.mark.parametrize(
    ("accumulate", "precision", "head_only"),
    [
        (2, "32-true", False),
        (1, "bf16-mixed", False),
        (2, "bf16-mixed", False),
        (2, "16-mixed-scaled", False),
        (2, "32-true", True),
    ],
    ids=["ga2", "bf16", "bf16-ga2", "fp16-loss-scaling-ga2", "ga2-optimizer-of-the-head"],
)
def test_penalty_gradient_once_per_optimizer_step(
    tmp_path: os.PathLike, accumulate: int, precision: str, head_only: bool
) -> None:
    """One SGD step with λ against the same step with λ = 0: the parameters differ by exactly
    −lr·λ·F·(θ − θ*), with gradient accumulation, under bf16 autocast and under fp16 with a loss
    scaler (Lightning's MixedPrecision plugin given a CPU GradScaler: the gradients are unscaled
    before the penalty's is added); an optimizer that steps only the head gets the head's part
    (the autograd.grad path) and leaves the rest."""
    lam = 3.0
    model, cb = Classifier(head_only), EWCCallback(lam=lam, fisher="exact", consolidate=False)
    trainer(tmp_path, [cb], max_steps=0).fit(model, datamodule=Task(1))  # builds the EWC
    cb.consolidate(Task(1).train_dataloader())
    anchor, fisher = params(model), {n: f.clone() for n, f in cb.ewc.precisions().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    start = params(model)
    after = {}
    for value in (lam, 0.0):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        cb.ewc.lam = value
        amp: dict[str, object] = {"precision": precision}
        if precision == "16-mixed-scaled":  # Lightning makes a GradScaler on CUDA only
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            amp = {"plugins": [L.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
        run = trainer(tmp_path, [cb], max_steps=1, accumulate_grad_batches=accumulate, **amp)
        run.fit(model, datamodule=Task(2, shuffle=False))
        after[value] = params(model)
        if "plugins" in amp:  # the loss really was scaled (and the step not skipped)
            assert run.precision_plugin.scaler.get_scale() == 2.0**12
    for n in fisher:
        stepped = n.startswith("net.2.") or not head_only
        expected = -LR * lam * fisher[n] * (start[n] - anchor[n]) if stepped else torch.zeros_like(start[n])
        torch.testing.assert_close(after[lam][n] - after[0.0][n], expected, rtol=1e-4, atol=2e-6)
        assert stepped or torch.equal(after[lam][n], start[n])
    assert max(float((after[lam][n] - after[0.0][n]).abs().max()) for n in fisher) > 1e-3


def test_named_data_submodule_and_manual_consolidation(tmp_path: os.PathLike) -> None:
    """data= (a callable here) is what the Fisher is computed on; module= penalises a submodule;
    consolidate=False leaves consolidation to the caller."""
    model = Classifier()
    other = task(5)
    cb = EWCCallback(lam=1.0, fisher="empirical", module="net", data=lambda trainer, module: other.tensors)
    trainer(tmp_path, [cb]).fit(model, datamodule=Task(1))
    assert set(cb.ewc.precisions()) == {n for n, _ in model.net.named_parameters()}
    ref = reference_fisher(model.net, [other.tensors], "empirical")
    assert_fisher_close(cb.ewc.precisions(), ref, model.net, tol=1e-5)

    manual = EWCCallback(lam=1.0, fisher="empirical", consolidate=False)
    trainer(tmp_path, [manual]).fit(Classifier(), datamodule=Task(1))
    assert manual.ewc.num_tasks == 0
    manual.consolidate(Task(1).train_dataloader(), key="A")
    assert manual.ewc.keys == ("A",)
    with pytest.raises(ValueError, match="not both"):
        EWCCallback(EWC(model), lam=2.0)
    with pytest.raises(ValueError, match=r"unknown EWC option\(s\) \['lamda'\]"):
        EWCCallback(lamda=2.0)
    with pytest.raises(RuntimeError, match="setup"):
        EWCCallback().ewc  # noqa: B018


def test_a_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ewc.integrations.lightning", raising=False)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ewc\[lightning\]'"):
        importlib.import_module("ewc.integrations.lightning")
