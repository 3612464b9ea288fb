"""Sparse-FT masks (offprincipal.experiment.sparse): the three kinds against their definitions, and the Trainer callback."""

from __future__ import annotations

import pytest
import torch

from offprincipal.metrics import low_magnitude_mask, principal_weight_mask
from offprincipal.experiment.sparse import SparseMaskCallback, mask_density, sparse_masks
from offprincipal.subspace import top_k_subspace


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(24, 40, generator=gen), "b": torch.randn(33, 17, generator=gen) * 3}


def test_mask_kinds_follow_their_definitions(weights):
    k = 4
    principal = sparse_masks(weights, "principal", k, progress=False)
    safe = sparse_masks(weights, "safe", k, progress=False)
    random = sparse_masks(weights, "random", k, seed=1, progress=False)
    for name, w in weights.items():
        expected = principal_weight_mask(top_k_subspace(w, k), 0.5)
        assert torch.equal(principal[name], expected)
        assert torch.equal(safe[name], low_magnitude_mask(w, 0.5) | ~expected)
        assert int(random[name].sum()) == int(safe[name].sum())  # same density, per weight
        assert not torch.equal(random[name], safe[name])
    assert mask_density(principal) == pytest.approx(0.5, abs=1 / 600)
    assert 0.6 < mask_density(safe) < 0.9  # ≈ 74% in the paper; the two halves overlap partly
    assert all(torch.equal(random[n], m) for n, m in sparse_masks(weights, "random", k, seed=1, progress=False).items())
    assert not all(torch.equal(random[n], m) for n, m in sparse_masks(weights, "random", k, seed=2, progress=False).items())


def test_bad_kind_and_weight_decay_are_refused(weights):
    with pytest.raises(ValueError, match="one of"):
        sparse_masks(weights, "largest", 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        SparseMaskCallback("largest", top_k=4)

    class Args:
        weight_decay = 0.1

    with pytest.raises(ValueError, match="weight_decay=0.1 .*set weight_decay=0"):
        SparseMaskCallback("safe", top_k=4).on_train_begin(Args(), None, None, model=torch.nn.Linear(8, 8))


def test_callback_masks_adam_updates_exactly(tmp_path, monkeypatch):
    """Masked entries of a linear weight stay bit-identical through AdamW steps; the others and the bias train."""
    monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 6))
    base = {name: p.detach().clone() for name, p in model.named_parameters()}

    class Args:
        weight_decay = 0.0

    callback = SparseMaskCallback("principal", top_k=3)
    callback.on_train_begin(Args(), None, None, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        model(torch.randn(16, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for name in ("0", "2"):
        moved = model.get_submodule(name).weight.detach() != base[f"{name}.weight"]
        mask = callback.masks[name]
        assert moved.any() and not (moved & ~mask).any(), name
        assert not torch.equal(model.get_submodule(name).bias.detach(), base[f"{name}.bias"])
    assert callback.trainable_entries(model) == sum(int(m.sum()) for m in callback.masks.values()) + 20 + 6
    callback.remove()
