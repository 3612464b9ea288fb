"""Subspace bank: exact and randomized top-k bases, k resolution, the fingerprinted disk cache."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import offprincipal.subspace as subspace_mod
from offprincipal.subspace import (
    SubspaceCache,
    captured_energy,
    compute_subspaces,
    fingerprint,
    minor_right_directions,
    resolve_top_k,
    top_k_subspace,
    weight_matrix,
)


def planted(m, n, decay=0.5, gap=1.003, seed=0):
    """W = Q1 diag(σ) Q2ᵀ with a power-law spectrum and tiny gaps (like SmolLM2's σ_k/σ_{k+1} ≈ 1.001–1.013)."""
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, p, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64)).Q
    sigma = (torch.arange(1, p + 1, dtype=torch.float64) ** -decay) * gap ** -torch.arange(p, dtype=torch.float64)
    return (Q1 * sigma) @ Q2.T


def test_exact_matches_svd_and_is_fp32():
    W = torch.randn(40, 25, dtype=torch.bfloat16)
    sub = top_k_subspace(W, 6)
    assert sub.U.dtype == sub.V.dtype == sub.S.dtype == torch.float32
    assert sub.U.shape == (40, 6) and sub.V.shape == (25, 6) and sub.k == 6
    S_ref = torch.linalg.svdvals(W.double())[:6]
    torch.testing.assert_close(sub.S.double(), S_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(sub.U.T.double() @ W.double() @ sub.V.double(), torch.diag(S_ref), rtol=0, atol=1e-4)
    assert captured_energy(W, sub) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_randomized_defaults_capture_energy_on_tiny_gaps(shape):
    W = planted(*shape).float()
    sub = top_k_subspace(W, 16, "randomized")
    assert captured_energy(W, sub) >= 0.999
    weak = top_k_subspace(W, 16, "randomized", niter=0, oversample=2)
    assert captured_energy(W, weak) < captured_energy(W, sub)  # the figure does discriminate
    again = top_k_subspace(W, 16, "randomized")
    assert torch.equal(again.U, sub.U)  # seeded: deterministic


def test_resolve_top_k_int_float_pattern_and_errors():
    assert resolve_top_k(8, (64, 32)) == 8
    assert resolve_top_k(0.25, (64, 32)) == 8
    assert resolve_top_k(0.001, (64, 32)) == 1
    pattern = {"mlp.down_proj": 3, r"layers\.1\..*q_proj": 0.5}
    assert resolve_top_k(8, (64, 32), "model.layers.0.mlp.down_proj", pattern) == 3
    assert resolve_top_k(8, (64, 32), "model.layers.1.self_attn.q_proj", pattern) == 16
    assert resolve_top_k(8, (64, 32), "model.layers.0.self_attn.q_proj", pattern) == 8
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.up_proj of shape 64×32.*min\(m, n\) = 32"):
        resolve_top_k(32, (64, 32), "layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="float"):
        resolve_top_k(1.5, (64, 32), "x")
    with pytest.raises(TypeError):
        resolve_top_k("8", (64, 32), "x")


def test_minor_directions_are_the_smallest():
    W = planted(30, 20).float()
    rows = minor_right_directions(W, k=10, r=3)
    Vh = torch.linalg.svd(W.double(), full_matrices=False).Vh
    # spans the last 3 right singular directions
    torch.testing.assert_close((rows.double() @ Vh[17:].T).abs().sum(1), torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="top_k \\+ r"):
        minor_right_directions(W, k=18, r=3)


def test_conv1d_orientation():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=12, nx=7)  # weight (in=7, out=12)
    assert weight_matrix(conv).shape == (12, 7)
    lin = torch.nn.Linear(7, 12)
    assert weight_matrix(lin) is lin.weight


def test_cache_hit_skips_svd(tmp_path, monkeypatch):
    weights = {"a": torch.randn(30, 20), "b": torch.randn(20, 30)}
    first = compute_subspaces(weights, 4, cache_dir=tmp_path, progress=False)
    calls = []
    monkeypatch.setattr(subspace_mod, "top_k_subspace", lambda *a, **k: calls.append(a) or None)
    second = compute_subspaces(weights, 4, cache_dir=tmp_path, progress=False)
    assert calls == []
    for name in weights:
        assert torch.equal(first[name].U, second[name].U) and torch.equal(first[name].V, second[name].V)


def test_cache_key_changes_with_weight_k_and_method(tmp_path):
    W = torch.randn(30, 20)
    compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)
    W2 = W.clone()
    W2[0, 0] += 1e-3
    compute_subspaces({"w": W2}, 4, cache_dir=tmp_path, progress=False)
    compute_subspaces({"w": W}, 5, cache_dir=tmp_path, progress=False)
    compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False, method="randomized")
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4
    assert fingerprint(W) != fingerprint(W2) and fingerprint(W) == fingerprint(W.clone())
    assert fingerprint(W) != fingerprint(W.to(torch.bfloat16))


def test_tampered_or_truncated_cache_file_is_recomputed(tmp_path):
    W = torch.randn(30, 20)
    good = compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)["w"]
    (path,) = tmp_path.rglob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    # a file at the right key that belongs to another weight: detected by its stored fingerprint
    save_file({"U": torch.randn(30, 4), "S": torch.ones(4), "V": torch.randn(20, 4)}, str(path), {**meta, "fingerprint": "0" * 32})
    again = compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)["w"]
    assert torch.equal(again.U, good.U)
    path.write_bytes(path.read_bytes()[:50])  # truncated
    again = compute_subspaces({"w": W}, 4, cache_dir=tmp_path, progress=False)["w"]
    assert torch.equal(again.U, good.U)
    assert SubspaceCache(tmp_path).load(fingerprint(W), (30, 20), 4, "exact", "cpu") is not None  # rewritten


def test_batched_exact_equals_single(tmp_path):
    weights = {f"w{i}": torch.randn(24, 16) for i in range(3)}
    batched = compute_subspaces(weights, 5, cache_dir=False, progress=False, batch_exact=True)
    for name, W in weights.items():
        single = top_k_subspace(W, 5)
        torch.testing.assert_close(batched[name].S, single.S)
        # same subspace (signs of singular vectors may differ)
        torch.testing.assert_close(batched[name].U @ batched[name].U.T, single.U @ single.U.T, atol=1e-5, rtol=0)


def test_bad_method():
    with pytest.raises(ValueError, match="svd_method"):
        compute_subspaces({"w": torch.randn(5, 4)}, 1, method="qr", cache_dir=False)


def test_cache_owns_its_folder_rule_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path / "root"))
    assert SubspaceCache.for_dir(None).directory == tmp_path / "root" / "subspaces"
    assert SubspaceCache.for_dir(True).directory == tmp_path / "root" / "subspaces"
    assert SubspaceCache.for_dir(False) is None
    assert SubspaceCache.for_dir(tmp_path / "c").directory == tmp_path / "c"
    assert SubspaceCache.tag("exact") == "exact"
    assert SubspaceCache.tag("randomized", 64, 16, 0) == "randomized-o64-n16-s0"
    fp = fingerprint(torch.randn(3, 2))
    assert SubspaceCache(tmp_path).path(fp, 4, "exact").parent == tmp_path / fp[:2]
    for bad in ("0" * 31, "G" * 32, "0" * 32 + "/..", fp.upper()):
        with pytest.raises(ValueError, match="fingerprint"):
            SubspaceCache(tmp_path).path(bad, 4, "exact")
    with pytest.raises(ValueError, match="k must be"):
        SubspaceCache(tmp_path).path(fp, 0, "exact")


# --- the base certificate (certify_subspace): its σ₁ estimate and its cost ----------------------------------------


def _bases(W, lo, hi):
    """Singular pairs lo..hi−1 of W as a Subspace (fp32)."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return subspace_mod.Subspace(U[:, lo:hi].contiguous(), S[lo:hi].contiguous(), Vh[lo:hi].T.contiguous())


def _estimate(W, sub, niter, seed=0):
    return subspace_mod._certify_pairs_and_residual_norm(
        W.float(), sub.U, sub.S, sub.V, "both", 1e-3, float(sub.S.norm()), niter, seed, "w"
    )


def _power_estimate(W, sub, iters, seed=0):
    """The certificate's former estimator: block power iteration from the same seeded start, ‖R·Q‖₂."""
    W = W.float()
    R = W - (sub.U * sub.S) @ sub.V.T
    b = min(subspace_mod.CERTIFY_BLOCK, *W.shape)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(W.shape[1], b, generator=gen)).Q
    for _ in range(iters):
        Q = torch.linalg.qr(R.T @ (R @ Q)).Q
    return float(torch.linalg.matrix_norm(R @ Q, ord=2))


@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (7, 5), (5, 7)])
@pytest.mark.parametrize("niter", [1, 2, 4])
def test_certificate_estimate_is_a_lower_bound_at_least_as_strong_as_power_iteration(shape, niter):
    W = planted(*shape, decay=0.3, seed=1).float()
    k = 2
    for lo in (0, 1, min(shape) - k):  # the top k, the pairs missing the top one, the minor ones
        sub = _bases(W, lo, lo + k)
        R = W.double() - (sub.U.double() * sub.S.double()) @ sub.V.double().T
        sigma1 = float(torch.linalg.matrix_norm(R, ord=2))
        est = _estimate(W, sub, niter)
        assert est <= sigma1 * (1 + 1e-5) + 1e-6
        # the Ritz value on R·K(RᵀR, Q₁) dominates block power iteration to any point of that Krylov space
        assert est >= _power_estimate(W, sub, niter - 1) * (1 - 1e-4)


def test_certificate_krylov_finds_the_missing_top_direction():
    W = planted(300, 120, decay=0.2, gap=1.0, seed=2).float()
    sub = _bases(W, 1, 9)  # singular pairs, but not the top 8: σ₁(W − U S Vᵀ) = σ₁(W)
    sigma1 = float(torch.linalg.svdvals(W)[0])
    assert _estimate(W, sub, subspace_mod.CERTIFY_NITER) >= 0.95 * sigma1
    assert _estimate(W, sub, subspace_mod.CERTIFY_NITER) >= _power_estimate(W, sub, subspace_mod.CERTIFY_NITER - 1)


@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_certificate_refuses_minor_bases_on_every_side_and_passes_fresh_ones(sides):
    W = planted(50, 30, decay=1.0, seed=3).float()
    subspace_mod.certify_subspace(W, top_k_subspace(W, 4), sides=sides)
    with pytest.raises(subspace_mod.SubspaceMismatch, match="not its top 4"):
        subspace_mod.certify_subspace(W, _bases(W, 26, 30), sides=sides)


def test_certificate_non_finite_entries_are_named():
    W = planted(30, 20, seed=4).float()
    good = top_k_subspace(W, 3)
    for label in "USV":
        bad = {"U": good.U.clone(), "S": good.S.clone(), "V": good.V.clone()}
        bad[label].view(-1)[1] = float("inf") if label == "V" else float("nan")
        with pytest.raises(subspace_mod.SubspaceMismatch, match=f"{label} has a non-finite entry"):
            subspace_mod.certify_subspace(W, subspace_mod.Subspace(bad["U"], bad["S"], bad["V"]))


class _CountWeightProducts(torch.overrides.TorchFunctionMode):
    """Counts the matrix products that read the weight's storage (W or a view of it such as W.T)."""

    def __init__(self, W):
        super().__init__()
        self.ptr, self.count = W.data_ptr(), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.addmm):
            if any(isinstance(a, torch.Tensor) and a.data_ptr() == self.ptr for a in args):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("niter", [1, 3, 4])
def test_certificate_reads_the_weight_2_niter_times(niter):
    """The cost contract: the pair checks share their two passes over W with the first Krylov step."""
    W = planted(80, 50, seed=5).float()
    sub = top_k_subspace(W, 6)
    mode = _CountWeightProducts(W)
    with mode:
        subspace_mod.certify_subspace(W, sub, niter=niter)
    assert mode.count == 2 * niter
