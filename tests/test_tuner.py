"""The OffPrincipal PEFT method on tiny Llama / Qwen2 / GPT-2 models built from configs."""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import offprincipal
from offprincipal import OffPrincipalConfig, principal_leak
from offprincipal.tuner import OffPrincipalLayer, max_principal_leak
from conftest import make_tiny_model, tiny_batch

ARCHS = ["llama", "qwen2", "gpt2"]


def offprincipal_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OffPrincipalLayer)]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batch, steps=5, lr=1e-2, weight_decay=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def cfg(**kw):
    base = dict(r=4, alpha=8, top_k=8, target_modules="all-linear")
    base.update(kw)
    return OffPrincipalConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init_and_disabled_adapter_is_base(arch):
    model = make_tiny_model(arch)
    batch = tiny_batch()
    ref = logits(model, batch)
    peft_model = get_peft_model(model, cfg())
    assert torch.equal(logits(peft_model, batch), ref)  # bit for bit
    train_steps(peft_model, batch, steps=2)
    assert not torch.equal(logits(peft_model, batch), ref)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, batch), ref)  # TRL's reference policy


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_params_change_base_params_do_not(arch):
    model = make_tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, cfg())
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("offprincipal_A" in n or "offprincipal_B" in n for n in trainable)
    train_steps(peft_model, tiny_batch(), steps=3)
    for n, p in peft_model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable[n]), f"adapter param {n} did not change"
        else:
            key = n.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, before[key]), f"base param {n} changed"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_update_stays_off_principal_under_adamw(arch, sides):
    peft_model = get_peft_model(make_tiny_model(arch), cfg(sides=sides))
    train_steps(peft_model, tiny_batch(), steps=20, lr=3e-2)
    assert max_principal_leak(peft_model) <= 1e-6
    name, layer = offprincipal_layers(peft_model)[0]
    assert ("default" in layer.offprincipal_U) == (sides != "right")
    assert ("default" in layer.offprincipal_V) == (sides != "left")


def test_one_sided_leaves_other_side_free():
    peft_model = get_peft_model(make_tiny_model("llama"), cfg(sides="left"))
    train_steps(peft_model, tiny_batch(), steps=10, lr=3e-2)
    from offprincipal.subspace import top_k_subspace, weight_matrix

    _, layer = offprincipal_layers(peft_model)[0]
    V = top_k_subspace(weight_matrix(layer.get_base_layer()), 8).V
    assert principal_leak(layer.get_delta_weight("default"), None, V)[1] > 1e-3


def test_structure_for_trl_and_fsdp():
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    for _, layer in offprincipal_layers(peft_model):
        assert isinstance(layer.offprincipal_A, nn.ModuleDict) and isinstance(layer.offprincipal_B, nn.ModuleDict)
        assert type(layer.offprincipal_A["default"]) is nn.Linear and type(layer.offprincipal_B["default"]) is nn.Linear
        assert layer.base_layer is layer.get_base_layer()
    assert peft_model.base_model.prefix == "offprincipal_"
    for n, p in peft_model.named_parameters():
        assert p.requires_grad == ("offprincipal_" in n)


def test_print_trainable_parameters(capsys):
    peft_model = get_peft_model(make_tiny_model("llama"), cfg(r=2))
    trainable, total = peft_model.get_nb_trainable_parameters()
    expected = sum(2 * (l.in_features + l.out_features) for _, l in offprincipal_layers(peft_model))
    assert trainable == expected
    peft_model.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_save_reload_bit_identical_and_continue_training(tmp_path):
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    train_steps(peft_model, batch, steps=3)
    out = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFFPRINCIPAL" and config["top_k"] == 8

    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "adapter", is_trainable=True)
    assert torch.equal(logits(loaded, batch), out)
    for (_, a), (_, b) in zip(offprincipal_layers(peft_model), offprincipal_layers(loaded)):
        assert torch.equal(a.offprincipal_U["default"], b.offprincipal_U["default"])  # same subspaces
        assert torch.equal(a.offprincipal_V["default"], b.offprincipal_V["default"])
    train_steps(loaded, batch, steps=3)
    assert max_principal_leak(loaded) <= 1e-6


def test_reload_without_cache_recomputes_same_bases(tmp_path, monkeypatch):
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    train_steps(peft_model, batch, steps=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path / "empty-cache"))
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), logits(peft_model, batch))


def test_adapter_file_size_vs_lora(tmp_path):
    get_peft_model(make_tiny_model("llama"), cfg(r=4)).save_pretrained(tmp_path / "op")
    get_peft_model(make_tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "lora")
    size = lambda d: os.path.getsize(tmp_path / d / "adapter_model.safetensors")
    assert size("op") <= 1.2 * size("lora")


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_merge_and_unload_unload(arch):
    batch = tiny_batch()
    base_out = logits(make_tiny_model(arch), batch)
    peft_model = get_peft_model(make_tiny_model(arch), cfg())
    train_steps(peft_model, batch, steps=3)
    out = logits(peft_model, batch)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, batch), out, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(logits(peft_model, batch), out, atol=1e-5, rtol=1e-5)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, batch), base_out, atol=1e-5, rtol=1e-5)
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, OffPrincipalLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), out, atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(make_tiny_model(arch), cfg())
    train_steps(peft_model, batch, steps=1)
    assert torch.equal(logits(peft_model.unload(), batch), base_out)


def test_merged_weight_update_is_off_principal_conv1d():
    """GPT-2 stores Conv1D weights as (in, out): the merged update must be off-principal in (out, in)."""
    from offprincipal.subspace import top_k_subspace, weight_matrix

    peft_model = get_peft_model(make_tiny_model("gpt2"), cfg(target_modules=["c_attn", "c_fc"]))
    train_steps(peft_model, tiny_batch(), steps=5)
    _, layer = offprincipal_layers(peft_model)[0]
    W0 = weight_matrix(layer.get_base_layer()).detach().clone()
    peft_model.merge_adapter()
    delta = weight_matrix(layer.get_base_layer()).detach() - W0
    sub = top_k_subspace(W0, 8)
    assert max(principal_leak(delta, sub.U, sub.V)) < 1e-5


def test_multiple_adapters():
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("llama"), cfg(), adapter_name="first")
    peft_model.add_adapter("second", cfg(top_k=4, sides="left"))
    _, layer = offprincipal_layers(peft_model)[0]
    assert layer.offprincipal_U["second"].shape[1] == 4 and "second" not in layer.offprincipal_V
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".second." in n)
    train_steps(peft_model, batch, steps=2)
    out_a = logits(peft_model, batch)
    peft_model.set_adapter("second")
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if ".second." in n)
    train_steps(peft_model, batch, steps=2)
    out_b = logits(peft_model, batch)
    assert not torch.equal(out_a, out_b)
    assert max_principal_leak(peft_model, "first") <= 1e-6 and max_principal_leak(peft_model, "second") <= 1e-6
    peft_model.set_adapter("first")
    assert torch.equal(logits(peft_model, batch), out_a)
    peft_model.delete_adapter("second")
    assert "second" not in layer.offprincipal_U and "second" not in layer.offprincipal_A
    assert torch.equal(logits(peft_model, batch), out_a)


def test_export_to_plain_lora(tmp_path):
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("gpt2"), cfg(target_modules=["c_attn", "c_proj", "c_fc"]))
    train_steps(peft_model, batch, steps=3)
    out = logits(peft_model, batch)
    offprincipal.save_as_lora(peft_model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(make_tiny_model("gpt2"), tmp_path / "lora")
    assert isinstance(lora.peft_config["default"], LoraConfig)
    torch.testing.assert_close(logits(lora, batch), out, atol=1e-6, rtol=1e-5)


def test_minor_init():
    from offprincipal.subspace import top_k_subspace, weight_matrix

    model = make_tiny_model("llama")
    batch = tiny_batch()
    ref = logits(model, batch)
    peft_model = get_peft_model(model, cfg(init="minor"))
    assert torch.equal(logits(peft_model, batch), ref)
    _, layer = offprincipal_layers(peft_model)[0]
    A = layer.offprincipal_A["default"].weight
    V = top_k_subspace(weight_matrix(layer.get_base_layer()), 8).V
    assert (A @ V).abs().max() < 1e-5  # rows outside the top-k
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)


def test_bf16_base_model():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    batch = tiny_batch()
    ref = logits(model, batch)
    peft_model = get_peft_model(model, cfg())
    _, layer = offprincipal_layers(peft_model)[0]
    assert layer.offprincipal_A["default"].weight.dtype == torch.float32  # PEFT's autocast of adapter weights
    assert layer.offprincipal_U["default"].dtype == torch.float32  # bases stay fp32
    assert torch.equal(logits(peft_model, batch), ref)
    train_steps(peft_model, batch, steps=3)
    assert logits(peft_model, batch).dtype == torch.bfloat16
    assert max_principal_leak(peft_model) <= 1e-6
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, batch), ref)


def test_top_k_pattern_and_layers_to_transform():
    config = cfg(
        target_modules=["q_proj", "down_proj"], top_k_pattern={"down_proj": 3}, layers_to_transform=[1], layers_pattern="layers"
    )
    peft_model = get_peft_model(make_tiny_model("llama"), config)
    names = dict(offprincipal_layers(peft_model))
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["down_proj", "q_proj"]
    assert all(".layers.1." in n for n in names)
    for n, layer in names.items():
        assert layer.offprincipal_U["default"].shape[1] == (3 if n.endswith("down_proj") else 8)


def test_errors_name_the_module():
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        get_peft_model(make_tiny_model("llama"), cfg(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"k_proj of shape 24×48"):
        get_peft_model(make_tiny_model("llama"), cfg(top_k=24))
    with pytest.raises(ValueError, match="bias"):
        cfg(bias="all")
    with pytest.raises(ValueError, match="sides"):
        cfg(sides="up")
    with pytest.raises(ValueError, match="init"):
        cfg(init="pissa")


def test_registration_is_idempotent():
    import importlib

    import offprincipal.tuner as tuner
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import PeftType

    importlib.reload(tuner)
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.OFFPRINCIPAL] == "offprincipal_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.OFFPRINCIPAL].__name__ == "OffPrincipalConfig"


def test_no_grad_factor_cache_follows_parameter_changes():
    """Generation reuses the projected factors; any optimizer step, reload or re-added adapter refreshes them."""
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    train_steps(peft_model, batch, steps=2)
    _, layer = offprincipal_layers(peft_model)[0]
    with torch.no_grad():
        cached = layer.effective_factors("default")
        assert layer.effective_factors("default")[0] is cached[0]  # reused
        fresh = layer._project_factors(
            layer.offprincipal_A["default"].weight, layer.offprincipal_B["default"].weight,
            layer.offprincipal_U["default"], layer.offprincipal_V["default"],
        )
    assert torch.equal(cached[0], fresh[0]) and torch.equal(cached[1], fresh[1])
    out = logits(peft_model, batch)
    train_steps(peft_model, batch, steps=1)  # in-place optimizer update: the cache must not be used
    with torch.no_grad():
        assert not torch.equal(layer.effective_factors("default")[1], cached[1])
    assert not torch.equal(logits(peft_model, batch), out)
    peft_model.train()
    with torch.enable_grad():  # training forwards never use the cache
        assert layer.effective_factors("default")[0].requires_grad
    second = get_peft_model(make_tiny_model("llama"), cfg(), adapter_name="first")
    second.add_adapter("second", cfg())
    _, l2 = offprincipal_layers(second)[0]
    with torch.no_grad():
        l2.effective_factors("second")
    second.delete_adapter("second")
    assert "second" not in l2._factor_cache


def test_factor_cache_is_fresh_after_fused_adamw_steps():
    """Fused optimizers update parameters without bumping their version counters: the cache must not rely on
    them alone (a grad-enabled forward drops it)."""
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    _, layer = offprincipal_layers(peft_model)[0]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for _ in range(3):
        with torch.no_grad():
            layer.effective_factors("default")  # e.g. generation before the policy update
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            cached = layer.effective_factors("default")
            fresh = layer._project_factors(
                layer.offprincipal_A["default"].weight, layer.offprincipal_B["default"].weight,
                layer.offprincipal_U["default"], layer.offprincipal_V["default"],
            )
        assert torch.equal(cached[1], fresh[1]) and torch.equal(cached[0], fresh[0])
    assert max_principal_leak(peft_model) > 0  # B moved
