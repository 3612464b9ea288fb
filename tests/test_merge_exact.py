"""Exact merge → unmerge without a copy of the base weight (issue 16, finding 4).

TRL's vLLM sync merges every layer, sends the weights and unmerges (``_iter_named_params``). The adapter used to keep
a full copy of each merged base weight for a bit-exact unmerge; it now keeps the entries where fl(W − ΔW) misses W0
(offprincipal/tuner/merge.py). These tests state exactness (bit-identical W0) for every dtype and for adversarial ΔW,
and that the correction is what is held, not a copy. Memory as TRL's sync sees it: benchmarks/sync_memory.py.
"""

import pytest
import torch
from peft import get_peft_model

from offprincipal import OffPrincipalConfig
from offprincipal.tuner import OffPrincipalLayer
from offprincipal.tuner import merge as merge_mod
from offprincipal.tuner.merge import Factors, merge_exact, unmerge_exact
from conftest import make_tiny_model, tiny_batch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t):
    return t.detach().contiguous().view(torch.uint8).clone()


def full_rank(delta):
    """ΔW as factors L = ΔW, R = I: L @ I reproduces ΔW exactly, so any ΔW can be merged."""
    return Factors(delta.float(), torch.eye(delta.shape[1]), 1.0)


def base(dtype, shape=(40, 24), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def adversarial(W, kind):
    """ΔW (fp32) for each adversarial case, built from W0."""
    W32 = W.float()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(W.shape, generator=gen)
    tiny = torch.finfo(W.dtype).tiny
    return {
        "large": noise * 1e3 * W32.abs().max(),  # ΔW ≫ W0: every entry moves by many binades
        "tiny": noise * 1e-30,  # far below an ulp: the merge changes nothing
        "denormal": -W32 + noise * tiny * 0.25,  # W0 + ΔW lands in the subnormals (or flushes to ±0)
        "sign_flip": -2.0 * W32,  # W0 + ΔW = −W0
        "cancel": -W32,  # W0 + ΔW = ±0 exactly
        "ulp": noise * W32.abs() * float(torch.finfo(W.dtype).eps),  # about one ulp: ties and binade crossings
        "overflow": torch.full(W.shape, float(torch.finfo(W.dtype).max)) * torch.sign(noise),  # merged = ±inf
    }[kind]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["large", "tiny", "denormal", "sign_flip", "cancel", "ulp", "overflow"])
def test_unmerge_restores_w0_bit_for_bit_for_adversarial_deltas(dtype, kind):
    W = base(dtype)
    W0 = bits(W)
    record = merge_exact(W, [full_rank(adversarial(W, kind))])
    assert unmerge_exact(W, record)
    assert torch.equal(bits(W), W0)
    assert record.nbytes <= W.numel() * W.element_size()  # never more than a copy of the weight


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_in_the_base_survive(dtype):
    W = base(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), torch.finfo(dtype).tiny / 4])
    W.view(-1)[: special.numel()] = special.to(dtype)
    W0 = bits(W)
    gen = torch.Generator().manual_seed(2)
    record = merge_exact(W, [full_rank(torch.randn(W.shape, generator=gen) * 1e-2)])
    assert unmerge_exact(W, record) and torch.equal(bits(W), W0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_merge_with_several_adapters_restores_w0(dtype, monkeypatch):
    """Chunks of 3 rows (row count not a multiple), two low-rank adapters merged in one call, then a third in a
    second call: the stack of corrections unwinds to W0."""
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 3 * 24)
    W = base(dtype, shape=(41, 24))
    W0 = bits(W)
    gen = torch.Generator().manual_seed(3)
    f = lambda s: Factors(torch.randn(41, 4, generator=gen), torch.randn(4, 24, generator=gen), s)
    first = merge_exact(W, [f(1e-2), f(3e-3)])
    W1 = bits(W)
    second = merge_exact(W, [f(5e-1)])
    assert unmerge_exact(W, second) and torch.equal(bits(W), W1)
    assert unmerge_exact(W, first) and torch.equal(bits(W), W0)


def test_merged_weight_is_one_rounding_of_w0_plus_delta():
    W = base(torch.bfloat16)
    W0 = W.clone()
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(W.shape, generator=gen) * 1e-2
    merge_exact(W, [full_rank(delta)])
    assert torch.equal(W, (W0.float() + delta).to(torch.bfloat16))


def test_a_chunk_whose_exceptions_would_cost_more_keeps_a_copy_of_its_rows(monkeypatch):
    monkeypatch.setattr(merge_mod, "CHUNK_ELEMENTS", 10 * 24)
    W = base(torch.float32)
    delta = torch.zeros(W.shape)
    delta[:10] = adversarial(W, "large")[:10]  # first chunk: ΔW ≫ W0; the others: exactly 0
    record = merge_exact(W, [full_rank(delta)])
    assert list(record.dense) == [0] and record.exceptions == 0
    assert record.nbytes == 10 * 24 * 4


# ------------------------------------------------------------------ through the adapter (PEFT's merge_adapter)


def cfg(**kw):
    return OffPrincipalConfig(**{**dict(r=4, alpha=8, top_k=8, target_modules="all-linear"), **kw})


def layers(model):
    return [m for m in model.modules() if isinstance(m, OffPrincipalLayer)]


def train(model, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tiny_batch(length=6)
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_peft_merge_unmerge_cycles_are_exact_and_hold_no_copy(arch, dtype, one_thread):
    """Repeated sync cycles (merge, read, unmerge) with training in between: the base is bit-identical after every
    unmerge, and while merged each layer holds a correction of at most a quarter of its weight (ΔW here ≈ 2% of W per entry;
    the old code held a full
    copy: correction = 1× the weight)."""
    model = get_peft_model(make_tiny_model(arch, dtype=dtype), cfg())
    W0 = {id(m): bits(m.get_base_layer().weight) for m in layers(model)}
    for _ in range(3):
        train(model, steps=1, lr=1e-3)
        model.merge_adapter()
        for m in layers(model):
            weight = m.get_base_layer().weight
            assert m.merge_correction_bytes() <= 0.25 * weight.numel() * weight.element_size()
            assert torch.equal(bits(m.unmerged_base_weight()), W0[id(m)])
        model.unmerge_adapter()
        for m in layers(model):
            assert torch.equal(bits(m.get_base_layer().weight), W0[id(m)])
            assert m.merge_correction_bytes() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_adapters_merged_in_two_calls_unmerge_exactly(dtype):
    model = get_peft_model(make_tiny_model("llama", dtype=dtype), cfg())
    model.add_adapter("second", cfg(r=8, alpha=64))
    for name in ("default", "second"):
        model.base_model.set_adapter(name)
        train(model, steps=2, lr=1e-2)
    W0 = {id(m): bits(m.get_base_layer().weight) for m in layers(model)}
    for m in layers(model):
        m.merge(adapter_names=["default"])
        m.merge(adapter_names=["second"])
        assert m.merged_adapters == ["default", "second"]
    model.unmerge_adapter()
    for m in layers(model):
        assert torch.equal(bits(m.get_base_layer().weight), W0[id(m)])


def test_a_large_adapter_unmerges_exactly_in_bf16():
    """An update as large as the weights (B drawn at random, scaled up): many exceptions, dense chunks; still exact."""
    model = get_peft_model(make_tiny_model("llama", dtype=torch.bfloat16), cfg(alpha=400))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "offprincipal_B" in n:
                p.normal_()
    W0 = {id(m): bits(m.get_base_layer().weight) for m in layers(model)}
    model.merge_adapter()
    model.unmerge_adapter()
    for m in layers(model):
        assert torch.equal(bits(m.get_base_layer().weight), W0[id(m)])
