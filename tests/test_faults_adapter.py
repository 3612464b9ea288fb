"""Fault injection on the adapter (issue 9): each test reproduces a finding and fails without its fix.

Findings covered: 1 (save_as_lora deleted folders), 5 (fan_in_fan_out on nn.Linear), 8 (an adapter loaded onto a
different base), 9 (bf16 merge → unmerge drifted the base), 10 (factor cache under inference mode), and PEFT's
wording of the NaN-merge error.
"""

import json
import os
import re

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

import offprincipal
from offprincipal import OffPrincipalConfig
from offprincipal.subspace import top_k_subspace
from offprincipal.tuner import OffPrincipalLayer, max_principal_leak
from conftest import make_tiny_model, tiny_batch

LINEAR_FLAG_WARNING = "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."


def cfg(**kw):
    base = dict(r=4, alpha=8, top_k=8, target_modules="all-linear")
    base.update(kw)
    return OffPrincipalConfig(**base)


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OffPrincipalLayer)]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train_steps(model, batch, steps=2, lr=1e-2, opt=None):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def base_weights(model):
    return {n: m.get_base_layer().weight for n, m in layers(model)}


# ---------------------------------------------------------------- finding 1: save_as_lora deletes folders


def trained_adapter():
    peft_model = get_peft_model(make_tiny_model("llama"), cfg(target_modules=["q_proj", "v_proj"]))
    train_steps(peft_model, tiny_batch())
    return peft_model


def test_save_as_lora_refuses_a_folder_with_other_files_and_keeps_them(tmp_path):
    peft_model = trained_adapter()
    user = tmp_path / "work"
    (user / "src").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "src" / "main.py").write_text("print(1)")
    with pytest.raises(FileExistsError) as err:
        offprincipal.save_as_lora(peft_model, user)
    message = str(err.value)
    assert str(user) in message and "notes.txt" in message and "src" in message
    assert (user / "notes.txt").read_text() == "mine" and (user / "src" / "main.py").read_text() == "print(1)"
    assert sorted(os.listdir(user)) == ["notes.txt", "src"]  # nothing written, no temp file left behind


def test_save_as_lora_into_cwd_keeps_the_cwd(tmp_path, monkeypatch):
    peft_model = trained_adapter()
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="keep.txt"):
        offprincipal.save_as_lora(peft_model, ".")
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_save_as_lora_replaces_only_its_own_files(tmp_path):
    batch = tiny_batch()
    peft_model = trained_adapter()
    out = tmp_path / "adapter"
    peft_model.save_pretrained(out)  # adapter-only folder: adapter_config.json, adapter_model.safetensors, README.md
    readme = (out / "README.md").read_text()
    offprincipal.save_as_lora(peft_model, out)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "README.md").read_text() == readme
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = PeftModel.from_pretrained(make_tiny_model("llama"), out)
    torch.testing.assert_close(logits(lora, batch), logits(peft_model, batch), atol=1e-6, rtol=1e-5)
    offprincipal.save_as_lora(peft_model, out)  # again, over its own files
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(FileExistsError, match="not a folder"):
        offprincipal.save_as_lora(peft_model, out / "README.md")


# ---------------------------------------------------------------- finding 5: fan_in_fan_out on nn.Linear


def test_fan_in_fan_out_on_linear_warns_like_lora_and_keeps_the_true_bases():
    batch = tiny_batch()
    config = cfg(fan_in_fan_out=True)
    with pytest.warns(UserWarning, match=re.escape(LINEAR_FLAG_WARNING)):
        peft_model = get_peft_model(make_tiny_model("llama"), config)  # square and non-square (k_proj 24×48)
    assert config.fan_in_fan_out is False
    train_steps(peft_model, batch, steps=5)
    for name, layer in layers(peft_model):
        W = layer.get_base_layer().weight
        sub = top_k_subspace(W, 8)  # the bases of W (out, in), not of Wᵀ
        delta = layer.get_delta_weight("default")
        assert delta.shape == W.shape
        assert max(offprincipal.principal_leak(delta, sub.U, sub.V)) < 1e-5, name
    out = logits(peft_model, batch)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, batch), out, atol=1e-5, rtol=1e-5)


def test_minor_init_with_fan_in_fan_out_on_linear_uses_the_weight_orientation():
    with pytest.warns(UserWarning, match=re.escape(LINEAR_FLAG_WARNING)):
        peft_model = get_peft_model(make_tiny_model("llama"), cfg(init="minor", fan_in_fan_out=True))
    for name, layer in layers(peft_model):
        A = layer.offprincipal_A["default"].weight
        V = top_k_subspace(layer.get_base_layer().weight, 8).V
        assert (A @ V).abs().max() < 1e-5, name


def test_conv1d_export_says_fan_in_fan_out():
    """GPT-2's Conv1D stores (in, out): the exported LoRA config must say so without the user setting the flag."""
    peft_model = get_peft_model(make_tiny_model("gpt2"), cfg(target_modules=["c_attn"]))
    assert offprincipal.to_lora(peft_model)[0].fan_in_fan_out is True
    llama = get_peft_model(make_tiny_model("llama"), cfg(target_modules=["q_proj"]))
    assert offprincipal.to_lora(llama)[0].fan_in_fan_out is False


# ---------------------------------------------------------------- finding 8: an adapter knows its base


def saved_adapter(tmp_path, **kw):
    peft_model = get_peft_model(make_tiny_model("llama"), cfg(**kw))
    train_steps(peft_model, tiny_batch())
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, tmp_path / "adapter"


def test_adapter_config_records_the_base_and_same_base_loads_quietly(tmp_path, recwarn):
    peft_model, path = saved_adapter(tmp_path)
    recorded = json.loads((path / "adapter_config.json").read_text())["base_fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{32}", recorded)
    assert peft_model.peft_config["default"].base_fingerprint == recorded
    recwarn.clear()
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), path)
    assert not [w for w in recwarn if "base" in str(w.message)]
    assert torch.equal(logits(loaded, tiny_batch()), logits(peft_model, tiny_batch()))


@pytest.mark.parametrize(
    "other",
    [
        lambda: make_tiny_model("llama", seed=1),  # unrelated model of the same shapes
        lambda: make_tiny_model("llama", dtype=torch.bfloat16),  # a bf16 copy of the same base
    ],
    ids=["unrelated", "bf16-copy"],
)
def test_other_base_warns_by_default_and_refuses_when_strict(tmp_path, monkeypatch, other):
    _, path = saved_adapter(tmp_path)
    with pytest.warns(UserWarning, match="different base"):
        PeftModel.from_pretrained(other(), path)
    with pytest.raises(ValueError, match=r"different base.*strict_base"):
        PeftModel.from_pretrained(other(), path, strict_base=True)
    config = PeftConfig.from_pretrained(path)
    config.strict_base = True
    with pytest.raises(ValueError, match="different base"):
        PeftModel.from_pretrained(other(), path, config=config)
    monkeypatch.setenv("OFFPRINCIPAL_STRICT_BASE", "1")
    with pytest.raises(ValueError, match="OFFPRINCIPAL_STRICT_BASE"):
        PeftModel.from_pretrained(other(), path)
    assert isinstance(PeftModel.from_pretrained(make_tiny_model("llama"), path), PeftModel)  # the right base loads


def test_strict_base_recorded_at_training_applies_on_load(tmp_path):
    _, path = saved_adapter(tmp_path, strict_base=True)
    with pytest.raises(ValueError, match="different base"):
        PeftModel.from_pretrained(make_tiny_model("llama", seed=1), path)
    with pytest.raises(ValueError, match="base_fingerprint"):
        cfg(base_fingerprint="../../etc/passwd")


# ---------------------------------------------------------------- finding 9: merge → unmerge restores the base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_unmerge_cycles_leave_the_base_byte_identical(dtype, one_thread):
    """TRL's vLLM weight sync merges and unmerges at every step; 50 cycles with training in between."""
    peft_model = get_peft_model(make_tiny_model("llama", dtype=dtype), cfg())
    before = {n: w.detach().clone() for n, w in base_weights(peft_model).items()}
    batch = tiny_batch(length=6)
    opt = None
    for _ in range(50):
        opt = train_steps(peft_model, batch, steps=1, lr=2e-4, opt=opt)
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    for n, w in base_weights(peft_model).items():
        assert torch.equal(w.view(torch.int16), before[n].view(torch.int16)), n
    assert max_principal_leak(peft_model) < 1e-5


def test_merged_weight_is_base_plus_delta_and_disable_restores_it():
    peft_model = get_peft_model(make_tiny_model("llama", dtype=torch.bfloat16), cfg())
    train_steps(peft_model, tiny_batch(), steps=2)
    name, layer = layers(peft_model)[0]
    W0 = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    expected = (W0.float() + layer.get_delta_weight("default")).to(W0.dtype)
    assert torch.equal(layer.get_base_layer().weight, expected)
    peft_model.add_adapter("second", cfg())  # while merged: its base is the unmerged one
    assert peft_model.peft_config["second"].base_fingerprint == peft_model.peft_config["default"].base_fingerprint
    with peft_model.disable_adapter():
        peft_model(**tiny_batch())  # a disabled forward unmerges
    assert torch.equal(layer.get_base_layer().weight, W0)


def test_unmerge_after_an_in_place_change_of_the_merged_weight_subtracts_and_warns():
    """The saved copy is only right while the merged weight is untouched; otherwise ΔW is subtracted (with a
    warning), as before, so the in-place change is kept."""
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    train_steps(peft_model, tiny_batch(), steps=2)
    _, layer = layers(peft_model)[0]
    weight = layer.get_base_layer().weight
    W0 = weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        weight.add_(1.0)
    with pytest.warns(UserWarning, match="modified while merged"):
        layer.unmerge()
    torch.testing.assert_close(weight.detach(), W0 + 1.0, atol=1e-5, rtol=0)
    assert not layer.merged and layer.unmerged_base_weight() is weight


# ---------------------------------------------------------------- finding 10: factor cache under inference mode


def test_factors_cached_under_inference_mode_do_not_break_a_later_backward(tmp_path):
    _, path = saved_adapter(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), path)  # frozen adapter (inference)
    batch = tiny_batch()
    with torch.inference_mode():
        ref = loaded(**batch).logits
    embeds = loaded.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    out = loaded(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    out.sum().backward()  # grads w.r.t. the inputs through the frozen adapter
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    torch.testing.assert_close(out.detach(), ref.clone(), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- NaN merge: PEFT's wording


def test_safe_merge_of_a_broken_adapter_uses_peft_wording_and_leaves_the_base():
    peft_model = get_peft_model(make_tiny_model("llama"), cfg())
    name, layer = layers(peft_model)[0]
    W0 = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.offprincipal_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=re.escape("NaNs detected in the merged weights. The adapter default seems to be broken")):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, W0) and not layer.merged


# ---------------------------------------------------------------- issue 17, finding 3: an adapter keeps its k and sides


def delta_weights(model, adapter="default"):
    return {n: m.get_delta_weight(adapter).detach().clone() for n, m in layers(model) if adapter in m.offprincipal_A}


@pytest.mark.parametrize("change", [dict(top_k=4), dict(sides="left"), dict(sides="right"), dict(top_k=0.5)])
def test_loading_with_other_top_k_or_sides_is_refused(tmp_path, change):
    trained, path = saved_adapter(tmp_path)
    config = PeftConfig.from_pretrained(path)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=r"(top_k|sides).*saved"):
        PeftModel.from_pretrained(make_tiny_model("llama"), path, config=config)
    edited = json.loads((path / "adapter_config.json").read_text())
    edited.update(change)
    (path / "adapter_config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"(top_k|sides).*saved"):
        PeftModel.from_pretrained(make_tiny_model("llama"), path)


@pytest.mark.parametrize("saved, change", [
    (dict(), dict(basis="random")),
    (dict(basis="random", basis_seed=3), dict(basis="top")),
    (dict(basis="random", basis_seed=3), dict(basis_seed=4)),
])
def test_loading_with_another_basis_is_refused(tmp_path, saved, change):
    """The basis kind and seed fix U, V as much as k and sides do: an edited adapter_config.json that switches a
    random-basis adapter to top-k bases (or to another seed), or the reverse, is refused, not silently loaded."""
    trained, path = saved_adapter(tmp_path, **saved)
    edited = json.loads((path / "adapter_config.json").read_text())
    edited.update(change)
    (path / "adapter_config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"basis.*saved"):
        PeftModel.from_pretrained(make_tiny_model("llama"), path)
    config = PeftConfig.from_pretrained(path)
    with pytest.raises(ValueError, match=r"basis.*saved"):
        PeftModel.from_pretrained(make_tiny_model("llama"), path, config=config)


def test_loading_with_the_saved_settings_reproduces_delta_w_exactly(tmp_path):
    trained, path = saved_adapter(tmp_path, top_k_pattern={"q_proj": 4}, sides="left")
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), path)
    want, got = delta_weights(trained), delta_weights(loaded)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_load_adapter_with_an_edited_top_k_pattern_is_refused(tmp_path):
    _, path = saved_adapter(tmp_path)
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama"), path)
    edited = json.loads((path / "adapter_config.json").read_text())
    edited["top_k_pattern"] = {"v_proj": 3}
    (path / "adapter_config.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"top_k.*saved"):
        peft_model.load_adapter(path, adapter_name="other")


# ---------------------------------------------------------------- finding 4: load_adapter while another is merged


def test_load_adapter_while_another_is_merged_takes_bases_from_the_unmerged_base(tmp_path):
    _, path_a = saved_adapter(tmp_path / "a")
    peft_b = get_peft_model(make_tiny_model("llama"), cfg(init="minor"))
    train_steps(peft_b, tiny_batch(seed=1), lr=3e-2)
    peft_b.save_pretrained(tmp_path / "b")
    reference = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "b")
    merged = PeftModel.from_pretrained(make_tiny_model("llama"), path_a)
    merged.merge_adapter()
    merged.load_adapter(tmp_path / "b", adapter_name="b")
    want, got = delta_weights(reference), delta_weights(merged, "b")
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name}: ΔW of the adapter loaded while another is merged differs"
    merged.unmerge_adapter()
    merged.set_adapter("b")
    reference.set_adapter("default")
    assert torch.allclose(logits(merged, tiny_batch()), logits(reference, tiny_batch()), atol=1e-5)


# ---------------------------------------------------------------- finding 5: a LoRA under the OffPrincipal layer


def test_merge_and_unload_keeps_a_lora_injected_under_the_offprincipal_layer():
    from peft import LoraConfig, inject_adapter_in_model

    base = make_tiny_model("llama")
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), base)
    with pytest.warns(UserWarning):
        peft_model = get_peft_model(base, cfg(target_modules=["q_proj", "v_proj"]))
    train_steps(peft_model, tiny_batch())
    before = logits(peft_model, tiny_batch())
    merged = peft_model.merge_and_unload()
    assert torch.allclose(logits(merged, tiny_batch()), before, atol=1e-5)


# ---------------------------------------------------------------- finding 14: out_proj inside nn.MultiheadAttention


class WithMHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.mha(x, x, x)[0])


@pytest.mark.parametrize("targets", [["out_proj"], ["mha.out_proj", "proj"], "all-linear"])
def test_out_proj_inside_multihead_attention_is_refused_with_the_reason(targets):
    with pytest.raises((ValueError, TypeError), match=r"MultiheadAttention.*out_proj\.weight"):
        get_peft_model(WithMHA(), OffPrincipalConfig(r=2, top_k=2, target_modules=targets))
    get_peft_model(WithMHA(), OffPrincipalConfig(r=2, top_k=2, target_modules=["proj"]))  # the plain Linear is fine


def test_the_settings_travel_in_the_weights_file_and_an_adapter_without_them_loads_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    trained, path = saved_adapter(tmp_path, top_k_pattern={"q_proj": 4})
    tensors = load_file(str(path / "adapter_model.safetensors"))
    settings = {k: v.tolist() for k, v in tensors.items() if k.endswith("offprincipal_settings")}
    assert settings and all(v == [4 if "q_proj" in k else 8, 0, 0, 0] for k, v in settings.items())  # k, sides, basis, seed
    save_file({k: v for k, v in tensors.items() if k not in settings}, str(path / "adapter_model.safetensors"))
    with pytest.warns(UserWarning, match="saved without its settings"):
        loaded = PeftModel.from_pretrained(make_tiny_model("llama"), path)
    assert torch.equal(logits(loaded, tiny_batch()), logits(trained, tiny_batch()))


def test_meta_weights_without_a_process_group_are_refused_with_what_to_do():
    """Weights on the meta device have no values: without a process group (whose rank 0 would compute the bases
    from its real weights and broadcast them) the adapter says so instead of failing inside the SVD."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ValueError, match=r"is on the meta device.*process group initialised on every rank"):
        get_peft_model(model, OffPrincipalConfig(r=4, top_k=4, target_modules="all-linear", subspace_cache_dir=False))
