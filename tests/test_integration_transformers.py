"""ewc.integrations.transformers: EWCTrainer with the real `transformers` package (and `peft`).

Tiny GPT-2 language models built from configs (no download) are trained on two "languages"
(disjoint token ranges) through the Hugging Face Trainer. What the Trainer reports is read back
from its own records (``state.log_history``, checkpoint folders) and checked against independent
references: the float64-free per-sample Fisher loop of conftest, the penalty λ/2 Σ F (θ − θ*)²
written out by hand at the parameters each step started from, and the SGD update difference a
penalty must cause, λ·F·(θ − θ*) once per optimizer step.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys

import pytest
import torch
from conftest import assert_fisher_close, reference_sequence_fisher, same_state

from ewc import EWC

transformers = pytest.importorskip("transformers")
from ewc.integrations.transformers import EWC_STATE_NAME, PENALTY_LOG_NAME, EWCTrainer  # noqa: E402

V, T = 20, 8
LR = 0.5


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    cfg.bos_token_id = cfg.eos_token_id = 0
    return transformers.GPT2LMHeadModel(cfg)


def language(lo: int, hi: int, n: int = 8, seed: int = 0, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    """Sequences of tokens in [lo, hi); with ``pad``, a random tail of each is padding (token 0,
    attention 0, label -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, hi, (n, T), generator=gen)
    lengths = torch.randint(3, T + 1, (n,), generator=gen) if pad else torch.full((n,), T)
    out = []
    for row, k in zip(ids, lengths.tolist(), strict=True):
        mask = (torch.arange(T) < k).long()
        row = row.masked_fill(mask == 0, 0)
        out.append(
            {
                "input_ids": row,
                "attention_mask": mask,
                "position_ids": torch.arange(T),  # [N, T] positions keep GPT-2's fast Fisher rule
                "labels": row.masked_fill(mask == 0, -100),
            }
        )
    return out


def arguments(out: os.PathLike, **kw: object) -> transformers.TrainingArguments:
    """Plain SGD with a constant rate and no clipping: the update is −lr times the gradient."""
    base = {
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "optim": "sgd",
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "train_sampling_strategy": "sequential",
        "seed": 0,
    }
    return transformers.TrainingArguments(**(base | kw))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def penalty_by_hand(lam: float, fisher: dict, anchor: dict, theta: dict) -> float:
    """λ/2 Σ F (θ − θ*)², in float64."""
    total = sum((fisher[n].double() * (theta[n].double() - anchor[n].double()) ** 2).sum() for n in fisher)
    return 0.5 * lam * float(total)


class StepStart(transformers.TrainerCallback):
    """The trainable parameters at the start of every optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.seen = model, []

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        self.seen.append(params(self.model))


def test_two_languages_fisher_and_logged_penalty(tmp_path: os.PathLike) -> None:
    """Task A, consolidate, task B: the Fisher of the Trainer's own batches (padding masked,
    causal shift) matches the per-sample reference, and every logged ``ewc_penalty`` is
    λ/2 Σ F (θ − θ*)² at the parameters its step started from."""
    model = tiny_lm()
    a, b = language(1, 10, seed=1), language(10, V, seed=2)
    reg = EWC(model, lam=50.0, fisher="empirical", batch_size=3)
    args = arguments(tmp_path)
    trainer = EWCTrainer(model=model, args=args, train_dataset=a, ewc=reg, consolidate_after_train=True)
    trainer.train()  # then consolidated on train_dataset, task A
    assert all(h[PENALTY_LOG_NAME] == 0.0 for h in trainer.state.log_history if "loss" in h)
    assert reg.keys == (0,)
    anchor, fisher = params(model), reg.precisions(0)
    pairs = [({k: v for k, v in s.items() if k != "labels"}, s["labels"]) for s in a]
    stacked = [({k: v.unsqueeze(0) for k, v in x.items()}, y.unsqueeze(0)) for x, y in pairs]
    ref = reference_sequence_fisher(model, stacked, "empirical", shift=True, output=lambda o: o.logits)
    assert_fisher_close(fisher, ref, model, tol=1e-4)

    steps = StepStart(model)
    trainer.add_callback(steps)
    trainer.train_dataset, trainer.consolidate_after_train = b, False
    trainer.train()
    logged = [h[PENALTY_LOG_NAME] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == len(steps.seen) == 3
    expected = [penalty_by_hand(50.0, fisher, anchor, theta) for theta in steps.seen]
    assert expected[0] == 0.0 < expected[1] < expected[2]
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # evaluation reports the task loss alone
    plain = transformers.Trainer(model=model, args=arguments(tmp_path), eval_dataset=b)
    assert trainer.evaluate(b)["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("accumulate", "bf16", "scaled"),
    [(2, False, None), (2, False, False), (1, True, None), (2, True, False)],
    ids=["ga2-scaled-loss", "ga2-per-batch-loss", "bf16", "bf16-ga2-per-batch-loss"],
)
def test_penalty_gradient_once_per_optimizer_step(
    tmp_path: os.PathLike, accumulate: int, bf16: bool, scaled: bool | None
) -> None:
    """One SGD step with λ against the same step with λ = 0: the parameters differ by exactly
    −lr·λ·F·(θ − θ*), whether the loss is normalised over the accumulated batch (the Trainer's
    ``num_items_in_batch``) or per micro-batch (divided by the Trainer), and under bf16 autocast."""
    lam = 3.0
    model = tiny_lm()
    reg = EWC(model, lam=lam, fisher="empirical")
    args = arguments(
        tmp_path, max_steps=1, gradient_accumulation_steps=accumulate, bf16=bf16, logging_steps=50
    )
    data = language(10, V, n=2 * accumulate, seed=3, pad=False)
    trainer = EWCTrainer(model=model, args=args, train_dataset=data, ewc=reg)
    trainer.loss_is_scaled_for_ga = scaled
    trainer.consolidate(language(1, 10, seed=1))
    anchor, fisher = params(model), {n: f.clone() for n, f in reg.precisions().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    start = params(model)

    after = {}
    for value in (lam, 0.0):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        reg.lam = value
        trainer.train()
        after[value] = params(model)
    assert trainer._loss_is_scaled(1) is (scaled is None)
    for n in fisher:
        expected = -LR * lam * fisher[n] * (start[n] - anchor[n])
        torch.testing.assert_close(after[lam][n] - after[0.0][n], expected, rtol=1e-4, atol=2e-6)
    assert max(float((after[lam][n] - after[0.0][n]).abs().max()) for n in fisher) > 1e-3


def test_checkpoint_resumes_the_ewc_state(tmp_path: os.PathLike) -> None:
    """A checkpoint holds ewc_state.pt; a fresh trainer resumed from it has the same state, the
    same penalty there, and finishes the task exactly as the uninterrupted run (which it could
    not without the penalty)."""
    a, b = language(1, 10, seed=1), language(10, V, seed=2)

    def run(out: str, **kw: object) -> tuple[EWCTrainer, EWC]:
        model = tiny_lm()
        reg = EWC(model, lam=50.0, fisher="empirical")
        args = arguments(tmp_path / out, max_steps=4, **kw)
        return EWCTrainer(model=model, args=args, train_dataset=b, ewc=reg, consolidate_after_train=a), reg

    whole, reg = run("whole", save_strategy="steps", save_steps=2)
    whole.train_dataset = a
    whole.train()  # task A, then consolidated on it (consolidate_after_train=a)
    assert reg.num_tasks == 1
    whole.train_dataset, whole.args.output_dir = b, str(tmp_path / "b")
    whole.consolidate_after_train = False
    at_checkpoint = {}
    whole.add_callback(Snapshot(reg, at_checkpoint))
    whole.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / EWC_STATE_NAME).is_file()

    resumed, reg2 = run("whole")
    resumed.consolidate_after_train = False
    assert reg2.num_tasks == 0
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert same_state(reg2.state_dict(), at_checkpoint["state"])
    final = params(whole.model)
    for n, p in params(resumed.model).items():
        torch.testing.assert_close(p, final[n], rtol=0, atol=1e-6)
    with torch.no_grad():  # the penalty at the checkpoint's parameters, before and after
        for n, p in resumed.model.named_parameters():
            p.copy_(at_checkpoint["theta"][n])
    assert reg2.penalty().item() == at_checkpoint["penalty"] > 0

    plain = transformers.Trainer(model=tiny_lm(), args=arguments(tmp_path / "plain", max_steps=1))
    plain.save_model(str(tmp_path / "plain-model"))
    with pytest.raises(ValueError, match="not saved by an EWCTrainer"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "plain-model"))


class Snapshot(transformers.TrainerCallback):
    """The EWC state, parameters and penalty when the step-2 checkpoint is written."""

    def __init__(self, reg: EWC, into: dict) -> None:
        self.reg, self.into = reg, into

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if state.global_step == 2:
            self.into["state"] = copy.deepcopy(self.reg.state_dict())
            self.into["theta"] = {n: p.detach().clone() for n, p in self.reg.model.named_parameters()}
            self.into["penalty"] = self.reg.penalty().item()


def test_lora_model_consolidates_and_saves_only_its_adapters(tmp_path: os.PathLike) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(tiny_lm(), lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    reg = EWC(model, lam=50.0, fisher="empirical")
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = EWCTrainer(model=model, args=args, train_dataset=language(1, 10, seed=1), ewc=reg)
    trainer.train()
    fisher = trainer.consolidate()
    assert set(fisher) == set(reg.precisions()) == trainable
    assert any(float(f.sum()) > 0 for n, f in fisher.items() if "lora_A" in n)
    b = language(10, V, seed=2)
    trainer.train_dataset, trainer.args.output_dir, trainer.args.max_steps = b, str(tmp_path / "b"), 4
    trainer.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / EWC_STATE_NAME).is_file()

    fresh = peft.get_peft_model(tiny_lm(), lora)
    reg2 = EWC(fresh, lam=50.0, fisher="empirical")
    EWCTrainer(model=fresh, args=arguments(tmp_path / "c", max_steps=4), train_dataset=b, ewc=reg2).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert same_state(reg2.state_dict(), reg.state_dict())
    final = params(model)
    for n, p in params(fresh).items():  # steps 3 and 4 were trained with the same penalty
        torch.testing.assert_close(p, final[n], rtol=0, atol=1e-6)
    assert reg2.penalty().item() == pytest.approx(reg.penalty().item(), rel=1e-6) and reg.penalty().item() > 0


def test_bad_arguments_are_refused(tmp_path: os.PathLike) -> None:
    model = tiny_lm()
    with pytest.raises(ValueError, match="another model"):
        EWCTrainer(model=model, args=arguments(tmp_path), ewc=EWC(tiny_lm()))
    with pytest.raises(ValueError, match="model_init"):
        EWCTrainer(model_init=lambda: tiny_lm(), args=arguments(tmp_path))
    with pytest.raises(ValueError, match="train_dataset"):
        EWCTrainer(model=model, args=arguments(tmp_path)).consolidate()


def test_a_missing_extra_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ewc.integrations.transformers", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'ewc\[transformers\]'"):
        importlib.import_module("ewc.integrations.transformers")
