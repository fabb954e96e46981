"""Two tasks through EWCCallback with Lightning's ``strategy="ddp"``, ``accelerator="cpu"``,
``devices=2`` (gloo; Lightning starts rank 1 by running this file again); run by
tests/test_integrations_distributed.py, which checks what each rank writes to ``OUT/rank{r}.pt``.

Usage: python THIS_FILE OUT
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from test_integration_lightning import Classifier, EWCCallback, L, Recorder, Task, params, trainer


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ddp = {"strategy": "ddp", "accelerator": "cpu", "devices": 2}
    model = Classifier()
    cb = EWCCallback(lam=20.0, fisher="exact")
    fit_a = trainer(out, [cb], **ddp)
    fit_a.fit(model, datamodule=Task(1))  # consolidated on task A at the end, ranks sharing the data
    theta_a, state_a = params(model), copy.deepcopy(cb.state_dict())
    fisher = {n: f.clone() for n, f in cb.ewc.precisions().items()}

    rec = Recorder(cb)
    logger = L.loggers.CSVLogger(out, name="b")
    ckpt = L.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit_b = trainer(out, [cb, rec, ckpt], logger=logger, enable_checkpointing=True, **ddp)
    fit_b.fit(model, datamodule=Task(2))  # Lightning's DistributedSampler: shuffled, seed 0
    record = {
        "theta_a": theta_a,
        "fisher": fisher,
        "state_a": state_a,
        "theta_b": params(model),
        "state": cb.state_dict(),
        "saved": rec.saved[0],
        "metrics": logger.log_dir,
    }
    torch.save(record, out / f"rank{fit_b.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
