"""The OffPrincipal adapter with seeded random bases (``basis="random"``, the ``offprincipal-random`` control)."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

from offprincipal import OffPrincipalConfig
from offprincipal.subspace import default_cache_dir, random_subspace, top_k_subspace
from offprincipal.tuner import OffPrincipalLayer, max_principal_leak
from conftest import make_tiny_model, tiny_batch
from test_tuner import logits, offprincipal_layers, train_steps


def cfg(**kw):
    return OffPrincipalConfig(**{**dict(r=4, alpha=8, top_k=8, target_modules="all-linear"), **kw})


def bases(model):
    return {n: (m.offprincipal_U["default"], m.offprincipal_V["default"]) for n, m in offprincipal_layers(model)}


def test_random_bases_are_orthonormal_reproducible_and_not_top_k():
    W = torch.randn(48, 40)
    a, b = random_subspace(W, 8, seed=3, name="q"), random_subspace(W, 8, seed=3, name="q")
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)  # the seed (and name) fix them bit for bit
    eye = torch.eye(8, dtype=torch.float64)
    for X in (a.U, a.V):
        assert X.dtype == torch.float32
        assert (X.double().T @ X.double() - eye).abs().max() <= 1e-6
    other_seed, other_name = random_subspace(W, 8, seed=4, name="q"), random_subspace(W, 8, seed=3, name="k")
    assert not torch.equal(a.U, other_seed.U) and not torch.equal(a.U, other_name.U)
    top = top_k_subspace(W, 8)
    # projector distance to the top-k subspace: ~√2·√k for independent subspaces, 0 for the same one
    for X, T in ((a.U, top.U), (a.V, top.V)):
        assert torch.linalg.matrix_norm(X @ X.T - T @ T.T) > 3.0
    with pytest.raises(ValueError, match="k=40"):
        random_subspace(W, 40, seed=0)


def test_adapter_random_bases_differ_from_top_k_and_do_not_leak():
    top = get_peft_model(make_tiny_model("llama"), cfg())
    rnd = get_peft_model(make_tiny_model("llama"), cfg(basis="random", basis_seed=7))
    tb, rb = bases(top), bases(rnd)
    assert tb.keys() == rb.keys() and tb
    for name in tb:
        (tU, tV), (rU, rV) = tb[name], rb[name]
        assert rU.shape == tU.shape and rV.shape == tV.shape  # same k, same sides
        assert torch.linalg.matrix_norm(rU @ rU.T - tU @ tU.T) > 1.0
    batch = tiny_batch()
    ref = logits(make_tiny_model("llama"), batch)
    assert torch.equal(logits(rnd, batch), ref)  # same init: ΔW = 0
    train_steps(rnd, batch, steps=10, lr=3e-2)
    assert max_principal_leak(rnd) <= 1e-6  # off the random subspace, exactly as the top-k adapter is off its own


def test_random_basis_reload_is_bit_identical_and_never_touches_the_cache(tmp_path):
    batch = tiny_batch()
    peft_model = get_peft_model(make_tiny_model("llama"), cfg(basis="random", basis_seed=5))
    assert not default_cache_dir().exists() or not any(default_cache_dir().rglob("*.safetensors"))
    train_steps(peft_model, batch, steps=3)
    out = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["basis"] == "random" and saved["basis_seed"] == 5
    loaded = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), out)
    for name, (U, V) in bases(peft_model).items():
        assert torch.equal(bases(loaded)[name][0], U) and torch.equal(bases(loaded)[name][1], V)
    # a top-k adapter built afterwards on the same weights gets the top-k bases (the cache holds only those)
    top = get_peft_model(make_tiny_model("llama"), cfg())
    for name, (U, _) in bases(top).items():
        layer = dict(offprincipal_layers(top))[name]
        W = layer.get_base_layer().weight
        assert torch.allclose((U @ U.T) @ top_k_subspace(W, 8).U, top_k_subspace(W, 8).U, atol=1e-4)
        assert not torch.equal(U, bases(peft_model)[name][0])


def test_basis_option_is_validated():
    with pytest.raises(ValueError, match="OffPrincipalConfig.basis must be one of"):
        cfg(basis="principal")
    with pytest.raises(ValueError, match="OffPrincipalConfig.basis_seed"):
        cfg(basis="random", basis_seed=-1)
