"""The integrations beyond one process, through the frameworks' own launchers (gloo, CPU).

``torchrun --nproc-per-node 2`` runs tests/integration_ddp_transformers.py (EWCTrainer) and
Lightning's ``strategy="ddp", devices=2`` runs tests/integration_ddp_lightning.py (EWCCallback,
Lightning starting the second process itself); each rank writes what it holds. Checked here: the
consolidated Fisher equals the single-process Fisher on the same data at the same parameters,
every rank holds the same EWC state, and a checkpoint written under DDP resumes in this one
process with the same state and penalty.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_fisher_close, same_state
from torch.utils.data import DataLoader, DistributedSampler

import ewc
from ewc import EWC, diagonal_fisher

HERE = Path(__file__).resolve().parent

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend unavailable"
    ),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
]


def launch(command: list[str], cwd: Path) -> None:
    """Run a launcher to the end (both ranks), with this process's ewc and the tests importable."""
    env = dict(os.environ)
    source = str(Path(ewc.__file__).resolve().parents[1])  # the ewc under test, whatever the cwd
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), source, *filter(None, [env.get("PYTHONPATH")])])
    env.pop("LOCAL_RANK", None)  # a fresh launch, not a rank of some outer one
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def ranks(out: Path) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))  # type: ignore[return-value]


def load_params(model: torch.nn.Module, theta: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])


def test_transformers_trainer_under_torchrun(tmp_path: Path) -> None:
    tr = pytest.importorskip("test_integration_transformers")
    script = HERE / "integration_ddp_transformers.py"
    launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path),
        ],
        tmp_path,
    )
    r0, r1 = ranks(tmp_path)
    assert same_state(r0["state"], r1["state"]) and r0["state"]["num_tasks"] == 1
    assert same_state(r0["theta_end"], r1["theta_end"]) and r0["penalty"] == r1["penalty"] > 0
    assert r0["logged"] == r1["logged"] and r0["logged"][-1] > 0

    model = tr.tiny_lm()
    load_params(model, r0["theta_a"])
    a = tr.language(1, 10, n=10, seed=1)
    whole = {k: torch.stack([s[k] for s in a]) for k in a[0]}
    single = diagonal_fisher(model, whole, "empirical", batch_size=3, distributed=False)
    assert_fisher_close(r0["fisher"], single, model, tol=1e-6)

    # task B again in one process from the same start, 4 sequences a step: what the two ranks'
    # 2 + 2 gave (tokens averaged over both ranks, the penalty's gradient once)
    model = tr.tiny_lm()
    load_params(model, r0["theta_a"])
    reg = EWC(model, lam=50.0, fisher="empirical", batch_size=3)
    reg.load_state_dict(r0["state"])
    args = tr.arguments(tmp_path / "replay", max_steps=2, per_device_train_batch_size=4)
    tr.EWCTrainer(model=model, args=args, train_dataset=tr.language(10, tr.V, seed=2), ewc=reg).train()
    for n, p in tr.params(model).items():
        torch.testing.assert_close(p, r0["theta_end"][n], rtol=0, atol=1e-6)

    fresh = tr.tiny_lm(seed=7)
    reg = EWC(fresh, lam=50.0, fisher="empirical", batch_size=3)
    args = tr.arguments(tmp_path / "b", max_steps=2)  # True: the last checkpoint there, checkpoint-2
    trainer = tr.EWCTrainer(model=fresh, args=args, train_dataset=tr.language(10, tr.V, seed=2), ewc=reg)
    trainer.train(resume_from_checkpoint=True)
    assert same_state(reg.state_dict(), r0["state"])
    load_params(fresh, r0["theta_end"])
    assert reg.penalty().item() == r0["penalty"]


def test_lightning_ddp_strategy(tmp_path: Path) -> None:
    tl = pytest.importorskip("test_integration_lightning")
    launch([sys.executable, str(HERE / "integration_ddp_lightning.py"), str(tmp_path)], tmp_path)
    r0, r1 = ranks(tmp_path)
    assert same_state(r0["state_a"], r1["state_a"]) and r0["state_a"]["num_tasks"] == 1
    assert same_state(r0["state"], r1["state"]) and r0["state"]["num_tasks"] == 2
    assert r0["saved"][0] == r1["saved"][0] > 0

    model = tl.Classifier()
    load_params(model, r0["theta_a"])
    single = diagonal_fisher(model, tl.Task(1).data.tensors, "exact", distributed=False)
    assert_fisher_close(r0["fisher"], single, model, tol=1e-6)
    with open(Path(r0["metrics"]) / "metrics.csv") as f:
        logged = [float(r[tl.PENALTY_LOG_NAME]) for r in csv.DictReader(f) if r.get(tl.PENALTY_LOG_NAME)]
    assert len(logged) == 2 and logged[-1] > 0

    # task B again in one process, from the same start, 8 samples a step: the two ranks' 4 + 4
    # (Lightning's DistributedSampler, shuffled with seed 0), their gradients averaged, the
    # penalty's added once after
    data = tl.task(2)
    shares = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    order = [i for k in (0, 4) for share in shares for i in share[k : k + 4]]
    model, cb = tl.Classifier(), tl.EWCCallback(lam=20.0, fisher="exact", consolidate=False)
    load_params(model, r0["theta_a"])
    cb.load_state_dict(r0["state_a"])  # before setup: kept until the EWC is built
    tl.trainer(tmp_path / "one", [cb]).fit(model, DataLoader(data, batch_size=8, sampler=order))
    for n, p in tl.params(model).items():
        torch.testing.assert_close(p, r0["theta_b"][n], rtol=0, atol=1e-6)

    checkpoint = next((tmp_path / "ckpt").glob("epoch=0*.ckpt"))
    fresh, cb = tl.Classifier(), tl.EWCCallback(lam=20.0, fisher="exact")
    rec = tl.Recorder(cb)
    run = tl.trainer(tmp_path / "one", [cb, rec], max_epochs=2)  # one more epoch, in one process
    run.fit(fresh, datamodule=tl.Task(2), ckpt_path=checkpoint)
    assert same_state(rec.started["state"], r0["state_a"])
    assert rec.started["penalty"] == r0["saved"][0]
