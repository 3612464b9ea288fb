"""Gradient checkpointing with the adapter: reentrant and non-reentrant recomputation give the gradients of the
plain forward (same process, fp32), and a TRL GRPO step trains with it on."""

import pytest
import torch
from peft import get_peft_model

from offprincipal import OffPrincipalConfig
from conftest import make_tiny_model, tiny_batch


def adapter_grads(checkpointing):
    """Gradients of the adapter factors for one loss on a tiny Llama, with ``checkpointing`` None (off) or the
    ``use_reentrant`` value. B starts non-zero so both factors get a gradient through the projection."""
    model = get_peft_model(
        make_tiny_model("llama"), OffPrincipalConfig(r=4, top_k=6, target_modules="all-linear", subspace_cache_dir=False)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "offprincipal_B" in name:
                p.normal_(std=0.05)
    model.train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        assert model.base_model.model.model.gradient_checkpointing
    batch = tiny_batch(batch=2, length=9)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointed_gradients_equal_plain_ones(use_reentrant, one_thread):
    plain = adapter_grads(None)
    checkpointed = adapter_grads(use_reentrant)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28  # A and B of 7 linears × 2 layers
    assert all(g.abs().max() > 0 for n, g in plain.items()), "every factor should get a gradient"
    for name, g in plain.items():  # the same ops recomputed in the same order: bit-identical
        assert torch.equal(checkpointed[name], g), f"{name}: checkpointed gradient differs by {(checkpointed[name] - g).abs().max():.2e}"


def grpo_step(tmp_path, checkpointing):
    """The adapter's factors after one TRL GRPO step (β = 0.1: the reference pass runs with the adapter disabled)."""
    trl = pytest.importorskip("trl")
    from test_trainer import digit_reward, grpo_args, prompts
    from conftest import make_tokenizer

    kwargs = dict(gradient_checkpointing=checkpointing is not None)
    if checkpointing is not None:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": checkpointing}
    trainer = trl.GRPOTrainer(
        model=make_tiny_model("llama"), reward_funcs=digit_reward, train_dataset=prompts(8),
        processing_class=make_tokenizer(), args=grpo_args(tmp_path / str(checkpointing), max_steps=1, beta=0.1, **kwargs),
        peft_config=OffPrincipalConfig(r=4, top_k=8, target_modules="all-linear", subspace_cache_dir=False),
    )
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    if checkpointing is not None:
        assert trainer.model.base_model.model.model.gradient_checkpointing
    return start, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_grpo_step_with_reentrant_checkpointing_equals_one_without(tmp_path, one_thread):
    """TRL's default is non-reentrant (tests/test_trainer.py runs it); reentrant checkpointing needs the inputs to
    require grad (PEFT arranges that): the same step, bit for bit, as without checkpointing."""
    start, plain = grpo_step(tmp_path, None)
    _, checkpointed = grpo_step(tmp_path, True)
    assert any(not torch.equal(plain[n], start[n]) for n in plain if "offprincipal_B" in n), "the step did not train"
    for name in plain:
        assert torch.equal(checkpointed[name], plain[name]), f"{name} differs after a checkpointed GRPO step"
