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


# --- the base certificate (certify_subspace): its top-k decision and its cost ----------------------------------------


def _bases(W, lo, hi):
    """Singular pairs lo..hi−1 of W as a Subspace (fp32)."""
    return _pairs(W, list(range(lo, hi)))


def _pairs(W, idx):
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    idx = torch.tensor(idx)
    return subspace_mod.Subspace(U[:, idx].contiguous(), S[idx].contiguous(), Vh[idx].T.contiguous())


def _passes(W, sub, **kw):
    try:
        subspace_mod.certify_subspace(W, sub, **kw)
    except subspace_mod.SubspaceMismatch:
        return False
    return True


@pytest.mark.parametrize("shape", [(60, 40), (40, 60), (7, 5), (5, 7)])
def test_certificate_top_k_decision_is_the_exact_one(shape):
    """For genuine singular pairs chosen at random, the certificate passes iff no pair left out has a singular value
    above the smallest kept one × (1 + tie tolerance): the exact decision, not an estimate (cases within 10× the
    tolerance of the threshold are skipped: there rounding may decide either way)."""
    W = planted(*shape, decay=0.3, gap=1.01, seed=1).float()
    sigma = torch.linalg.svdvals(W.double())
    p, k, tie = min(shape), 2, subspace_mod.CERTIFY_TIE_TOL
    g = torch.Generator().manual_seed(0)
    decided = {True: 0, False: 0}
    for _ in range(40):
        idx = sorted(torch.randperm(p, generator=g)[:k].tolist()) if _ % 4 else list(range(k))
        kept, left = sigma[idx].min(), max((float(sigma[i]) for i in range(p) if i not in idx), default=0.0)
        margin = left / float(kept) - 1
        if abs(margin - tie) < 10 * tie:
            continue
        want = margin <= tie
        assert _passes(W, _pairs(W, idx)) == want, (idx, margin)
        decided[want] += 1
    assert decided[True] >= 5 and decided[False] >= 5


def test_certificate_trained_allowance_is_relative_to_the_smallest_kept_value():
    """topk_tol=t passes pairs whose left-out values reach (1 + t)·S_min and refuses beyond (exact decision)."""
    W = planted(80, 50, decay=0.5, gap=1.0, seed=2).float()
    sigma = torch.linalg.svdvals(W.double())
    sub = _bases(W, 1, 9)  # leaves out σ₁: σ₁ / σ₉ − 1 is the allowance this choice needs
    need = float(sigma[0] / sigma[8]) - 1
    assert _passes(W, sub, topk_tol=need * 1.01)
    assert not _passes(W, sub, topk_tol=need * 0.99)


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


def test_certificate_reads_the_weight_three_times():
    """The cost contract: W·V and Uᵀ·W for the pairs, one product forming the residual (its Gram matrix and the
    Cholesky factorization work on the residual, not on W)."""
    W = planted(80, 50, seed=5).float()
    sub = top_k_subspace(W, 6)
    mode = _CountWeightProducts(W)
    with mode:
        subspace_mod.certify_subspace(W, sub)
    assert mode.count == 3
