"""The adapter on the embedded SmolLM2-135M-Instruct (fp32, CPU): subspace quality, identity at init,
off-principal after AdamW steps, save/reload."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from offprincipal import OffPrincipalConfig, captured_energy, top_k_subspace
from offprincipal.subspace import weight_matrix
from offprincipal.tuner import OffPrincipalLayer, max_principal_leak

pytestmark = pytest.mark.real_model

PROMPT = [{"role": "user", "content": "What is 17 + 25?"}]


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    from offprincipal.experiment.models import load_model

    model, tokenizer = load_model(smollm2_dir)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return model, tokenizer, dict(ids)


def fresh_model(smollm2_dir):
    from offprincipal.experiment.models import load_model

    return load_model(smollm2_dir)[0]


def test_subspace_quality(loaded):
    model = loaded[0]
    layer = model.model.layers[7]
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        W = weight_matrix(module)
        assert captured_energy(W, top_k_subspace(W, 32, "randomized")) >= 0.999
        assert captured_energy(W, top_k_subspace(W, 32)) == pytest.approx(1.0, abs=1e-5)


def test_identity_train_off_principal_save_reload(loaded, smollm2_dir, tmp_path):
    model, tokenizer, ids = loaded
    with torch.no_grad():
        ref = model(**ids).logits
    config = OffPrincipalConfig(r=8, top_k=32, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        assert torch.equal(peft_model(**ids).logits, ref)

    text = tokenizer.apply_chat_template(PROMPT + [{"role": "assistant", "content": "17 + 25 = 42."}], tokenize=False)
    batch = tokenizer([text], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    layers = [m for m in peft_model.modules() if isinstance(m, OffPrincipalLayer)]
    assert len(layers) == 210
    worst = max_principal_leak(peft_model)
    assert worst <= 1e-6, f"principal leak {worst:.2e}"
    with torch.no_grad():
        out = peft_model(**ids).logits
        assert not torch.equal(out, ref)
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(**ids).logits, ref)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(fresh_model(smollm2_dir), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, out)
