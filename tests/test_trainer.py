"""TRL GRPO with the adapter form and the full-parameter callback; resume equivalence; diagnostics in logs."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from offprincipal import OffPrincipalConfig, principal_leak
from offprincipal.optim import OffPrincipalAdamW
from offprincipal.trainer import (
    OffPrincipalCallback,
    OffPrincipalDiagnosticsCallback,
    offprincipal_trainer,
)
from offprincipal.tuner import max_principal_leak
from conftest import make_tiny_model, make_tokenizer

trl = pytest.importorskip("trl")


def digit_reward(completions, **kwargs):
    """Fraction of digits in each completion: varies within a group, so GRPO gets a gradient."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def prompts(n=16):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(n)])


def grpo_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=2, learning_rate=1e-2, logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to=[], save_strategy="no", seed=0,
    )
    base.update(kw)
    return trl.GRPOConfig(**base)


@pytest.mark.parametrize("beta,checkpointing", [(0.0, False), (0.1, True)])
def test_grpo_adapter_form(tmp_path, beta, checkpointing):
    model = make_tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=digit_reward, train_dataset=prompts(), processing_class=make_tokenizer(),
        args=grpo_args(tmp_path, beta=beta, gradient_checkpointing=checkpointing),
        peft_config=OffPrincipalConfig(r=4, top_k=8, target_modules="all-linear"),
        callbacks=[OffPrincipalDiagnosticsCallback(log_every=1)],
    )
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("offprincipal_B" in n for n in changed)
    for n, p in trainer.model.named_parameters():
        if n not in trainable:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), f"base parameter {n} changed"
    assert max_principal_leak(trainer.model) <= 1e-6
    logged = [h for h in trainer.state.log_history if "offprincipal/leak_max" in h]
    assert logged and logged[-1]["offprincipal/leak_max"] <= 1e-6
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()


def test_grpo_full_parameter_callback(tmp_path):
    model = make_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = OffPrincipalCallback(top_k=8, log_every=1)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=digit_reward, train_dataset=prompts(), processing_class=make_tokenizer(),
        args=grpo_args(tmp_path, learning_rate=1e-3), callbacks=[callback],
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, OffPrincipalAdamW)
    bases = callback.optimizer.bases
    assert len(bases) == 14  # the 2-D linear weights; embeddings excluded
    for name, p in model.named_parameters():
        delta = (p.detach() - before[name]).double()
        if name in bases.entries:
            assert delta.abs().max() > 0, f"{name} did not train"
            assert max(principal_leak(delta, bases.entries[name].U, bases.entries[name].V)) <= 1e-5
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    shifts = [h["offprincipal/principal_shift_max"] for h in trainer.state.log_history if "offprincipal/principal_shift_max" in h]
    assert shifts and max(shifts) <= 1e-5


def lm_dataset(n=12, length=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 70, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def lm_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "lm"), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=3e-3, weight_decay=0.1, max_grad_norm=0.5, lr_scheduler_type="linear", warmup_steps=1,
        use_cpu=True, report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, seed=0, data_seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_callback_resume_equals_uninterrupted(tmp_path):
    """Accumulation, clipping, a schedule, a checkpoint at step 2: resuming gives the uninterrupted weights."""
    full = make_tiny_model("llama")
    Trainer(model=full, args=lm_args(tmp_path), train_dataset=lm_dataset(),
            callbacks=[OffPrincipalCallback(top_k=6, log_every=0)]).train()

    resumed = make_tiny_model("llama")  # same schedule (max_steps=4), interrupted after the step-2 checkpoint
    Trainer(model=resumed, args=lm_args(tmp_path, output_dir=str(tmp_path / "lm2")), train_dataset=lm_dataset(),
            callbacks=[OffPrincipalCallback(top_k=6, log_every=0), StopAt(2)]).train()
    Trainer(model=resumed, args=lm_args(tmp_path, output_dir=str(tmp_path / "lm2")), train_dataset=lm_dataset(),
            callbacks=[OffPrincipalCallback(top_k=6, log_every=0)]).train(resume_from_checkpoint=True)
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m: f"{n}: {m}")


def test_callback_wraps_other_optimizers(tmp_path):
    model = make_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = OffPrincipalCallback(top_k=6, log_every=1)
    Trainer(model=model, args=lm_args(tmp_path, optim="sgd", learning_rate=0.1, save_strategy="no"),
            train_dataset=lm_dataset(), callbacks=[callback]).train()
    bases = callback.optimizer.bases
    for name, p in model.named_parameters():
        if name in bases.entries:
            delta = (p.detach() - before[name]).double()
            assert delta.abs().max() > 0
            assert max(principal_leak(delta, bases.entries[name].U, bases.entries[name].V)) <= 1e-5


def test_mixin_builds_offprincipal_adamw(tmp_path):
    model = make_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls = offprincipal_trainer(Trainer, top_k=6)
    trainer = cls(model=model, args=lm_args(tmp_path, save_strategy="no"), train_dataset=lm_dataset())
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, OffPrincipalAdamW)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    for name, p in model.named_parameters():
        if name in opt.bases.entries:
            delta = (p.detach() - before[name]).double()
            assert max(principal_leak(delta, opt.bases.entries[name].U, opt.bases.entries[name].V)) <= 1e-5


def test_merge_unmerge_round_trip_as_in_vllm_sync():
    """TRL's vLLM weight sync merges then unmerges every sync: base weights come back (fp32: to 1e-6)."""
    from peft import get_peft_model

    model = get_peft_model(make_tiny_model("llama"), OffPrincipalConfig(r=4, top_k=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "offprincipal_B" in n:
                p.normal_()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for _ in range(3):
        model.merge_adapter()
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], atol=1e-6, rtol=0)
