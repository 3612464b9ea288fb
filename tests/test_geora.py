"""GeoRA (offprincipal/experiment/geora.py) on a tiny Llama: the mask is the docstring's, the model at init is the
base, the residual is frozen, the factors train."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from offprincipal.experiment.geora import GEORA_ALPHA, GeoRACallback, geora_factors, geora_init
from offprincipal.experiment.methods import get_method
from offprincipal.metrics import linear_weights, low_magnitude_mask, principal_weight_mask
from offprincipal.subspace import top_k_subspace
from conftest import make_tiny_model, tiny_batch
from test_tuner import logits, train_steps

TOP_K, RANK = 4, 4


def lora_model(alpha=RANK):
    return get_peft_model(make_tiny_model("llama"), LoraConfig(r=RANK, lora_alpha=alpha, target_modules="all-linear"))


def lora_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("alpha", [RANK, 2 * RANK])
def test_model_at_init_is_the_base_and_the_residual_is_frozen(alpha):
    batch = tiny_batch()
    base = make_tiny_model("llama")
    ref, weights = logits(base, batch), linear_weights(base)
    model = lora_model(alpha)
    geora_init(model, TOP_K, progress=False)
    assert torch.allclose(logits(model, batch), ref, rtol=0, atol=1e-5)  # W_res + s·B0A0 = W0 to fp32 rounding
    for name, layer in lora_layers(model).items():
        W_res = layer.get_base_layer().weight
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert torch.allclose(W_res + delta, weights[name], rtol=0, atol=1e-6)
        assert not W_res.requires_grad and not torch.equal(W_res, weights[name])


def test_mask_is_non_principal_or_low_magnitude_and_init_is_its_top_r_svd():
    model = lora_model()
    base = linear_weights(make_tiny_model("llama"))
    masks = geora_init(model, TOP_K, progress=False)
    assert masks.keys() == base.keys()
    for name, W in base.items():
        spectral = ~principal_weight_mask(top_k_subspace(W, TOP_K), GEORA_ALPHA)  # not among the top-½ of |U_k S_k V_kᵀ|
        euclidean = low_magnitude_mask(W, GEORA_ALPHA)  # among the bottom-½ of |W0|
        assert torch.equal(masks[name], spectral | euclidean)
        assert 0.5 < masks[name].float().mean() < 1.0
        layer = lora_layers(model)[name]
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        U, S, Vh = torch.linalg.svd(W * masks[name], full_matrices=False)
        best = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]  # Eckart–Young: the best rank-r approximation of W ⊙ M
        assert torch.allclose(delta, best, rtol=0, atol=1e-5)


def test_factors_split_the_singular_values_symmetrically():
    W, mask = torch.randn(12, 10), torch.rand(12, 10) > 0.3
    A, B = geora_factors(W, mask, 3, scaling=2.0)
    assert A.shape == (3, 10) and B.shape == (12, 3)
    assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-5)  # ‖row i of A‖ = ‖column i of B‖ = √(σ_i/s)


def test_geora_trains_only_its_factors():
    batch = tiny_batch()
    model = lora_model()
    callback = GeoRACallback(top_k=TOP_K)
    callback.on_train_begin(None, None, None, model=model)
    residual = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_layers(model).items()}
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    start = model(**batch, labels=batch["input_ids"]).loss.item()
    end = train_steps(model, batch, steps=5, lr=1e-2)
    assert end < start
    assert all(not torch.equal(p, factors[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(m.get_base_layer().weight, residual[n]) for n, m in lora_layers(model).items())
    callback.on_train_begin(None, None, None, model=model)  # a second train() call does not re-initialise
    assert all(torch.equal(m.get_base_layer().weight, residual[n]) for n, m in lora_layers(model).items())


def test_registry_and_errors():
    method = get_method("geora")
    assert method.adapter and method.merges_base and method.family == "lora"
    assert isinstance(method.callback(8), GeoRACallback)
    assert isinstance(method.peft_config(16, 8, 0), LoraConfig)
    random = get_method("offprincipal-random").peft_config(16, 8, 3)
    assert random.basis == "random" and random.basis_seed == 3 and random.top_k == 8
    assert get_method("offprincipal").peft_config(16, 8, 3).basis == "top"
    with pytest.raises(ValueError, match="no LoRA layer"):
        geora_init(make_tiny_model("llama"), TOP_K)
    with pytest.raises(ValueError, match="top_k"):
        GeoRACallback(top_k=0)
