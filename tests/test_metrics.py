"""The paper's parameter-level metrics (offprincipal.metrics) and their live versions (offprincipal.diagnostics)
against hand-computed values on planted matrices."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_model, tiny_batch
from offprincipal import diagnostics as D
from offprincipal import metrics as M
from offprincipal.projection import principal_leak, project
from offprincipal.subspace import Subspace


def orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen)).Q


def planted(m: int, n: int, sigma: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = L diag(sigma) Rᵀ with random orthogonal L (m×m), R (n×n); returns (W, L, R), fp64."""
    L, R = orthogonal(m, seed), orthogonal(n, seed + 1)
    S = torch.zeros(m, n, dtype=torch.float64)
    S[range(len(sigma)), range(len(sigma))] = torch.tensor(sigma, dtype=torch.float64)
    return L @ S @ R.T, L, R


def plane_rotation(m: int, i: int, j: int, degrees: float, basis: torch.Tensor) -> torch.Tensor:
    """Rotation by ``degrees`` in the plane of columns i and j of the orthogonal ``basis`` (m×m)."""
    t = math.radians(degrees)
    G = torch.eye(m, dtype=torch.float64)
    G[i, i] = G[j, j] = math.cos(t)
    G[i, j], G[j, i] = -math.sin(t), math.sin(t)
    return basis @ G @ basis.T


def sub_of(W: torch.Tensor, k: int) -> Subspace:
    return M.spectrum(W, k).top


# --- bf16 update masks -------------------------------------------------------------------------------------------


def test_update_mask_hand_values():
    w0 = torch.tensor([1.0, 1.0, 100.0, 1e-6, 0.0, -0.0])
    w1 = torch.tensor([1.0 + 1e-4, 1.0 + 2**-7, 100.01, 2e-6, -0.0, 1e-30])
    assert M.update_mask(w0, w1).tolist() == [False, True, False, True, False, True]
    assert M.update_sparsity(w0, w1) == pytest.approx(0.5)


def test_bitwise_bf16_equals_relative_tolerance():
    """bf16(w1) ≠ bf16(w0)  ⇔  |b1 − b0| > 1e-3·max(|b0|, |b1|) for the bf16 values b (η < the bf16 spacing)."""
    gen = torch.Generator().manual_seed(0)
    exponents = torch.randint(-128, 60, (20000,), generator=gen).double()  # normal and subnormal bf16
    w0 = (torch.randn(20000, generator=gen, dtype=torch.float64) * 2.0**exponents).float()
    w0 = w0[w0.to(torch.bfloat16) != 0]  # a ±1 step from bf16 zero's bit pattern would make a NaN
    bits = w0.to(torch.bfloat16).view(torch.int16)
    kind = torch.randint(0, 4, w0.shape, generator=gen)
    ulp_step = (bits + torch.where(kind == 0, 1, -1).to(torch.int16)).view(torch.bfloat16).float()
    tiny = w0 * (1 + 1e-4 * torch.randn(w0.shape, generator=gen))  # usually rounds to the same bf16
    big = w0 * (1 + 0.01 * torch.randn(w0.shape, generator=gen))
    w1 = torch.where(kind <= 1, ulp_step, torch.where(kind == 2, tiny, big))
    b0, b1 = w0.to(torch.bfloat16).double(), w1.to(torch.bfloat16).double()
    tolerance = (b1 - b0).abs() > M.BF16_RELATIVE_TOLERANCE * torch.maximum(b0.abs(), b1.abs())
    mask = M.update_mask(w0, w1)
    assert torch.equal(mask, tolerance)
    assert 0.2 < mask.float().mean() < 0.9  # both outcomes well represented


def test_update_mask_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="same shape"):
        M.update_mask(torch.zeros(2, 3), torch.zeros(3, 2))


# --- spectral drift ----------------------------------------------------------------------------------------------


def test_nss_diagonal_hand_value():
    w0 = torch.diag(torch.tensor([5.0, 4.0, 3.0]))
    w1 = torch.diag(torch.tensor([6.0, 4.0, 3.0]))
    assert M.spectral_drift(w0, w1) == pytest.approx(1 / math.sqrt(50))
    # σ is sorted: swapping magnitudes and signs changes nothing
    assert M.spectral_drift(w0, torch.diag(torch.tensor([-3.0, 5.0, 4.0]))) == pytest.approx(0.0, abs=1e-12)
    # top-k restriction: only σ1 counted
    assert M.spectral_drift(w0, w1, k=1) == pytest.approx(1 / 5)


def test_nss_invariant_to_orthogonal_rotations():
    W0, L, R = planted(12, 8, [9, 7, 5, 3, 2, 1, 0.5, 0.1])
    assert M.spectral_drift(W0, orthogonal(12, 5) @ W0 @ orthogonal(8, 6)) == pytest.approx(0.0, abs=1e-12)
    assert M.spectral_drift(W0, 1.1 * W0) == pytest.approx(0.1)


# --- principal angles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [30.0, 60.0, 1e-6])
def test_rotation_by_known_angle(degrees):
    m, n, k = 10, 7, 3
    W0, L, R = planted(m, n, [10, 9, 8, 1, 0.5, 0.2, 0.1])
    W1 = plane_rotation(m, 0, k, degrees, L) @ W0  # turns u1 toward u_{k+1}: left top-k subspace rotates by θ
    rot = M.subspace_rotation(sub_of(W0, k), sub_of(W1, k))
    assert rot.max_left == pytest.approx(degrees, rel=1e-6)
    assert rot.left[:-1].abs().max() < 1e-6 * max(degrees, 1)
    assert rot.max_right == pytest.approx(0.0, abs=1e-6)
    assert M.spectral_drift(W0, W1) == pytest.approx(0.0, abs=1e-12)


def test_principal_angles_orthogonal_and_identical():
    Q = orthogonal(6, 3)
    assert M.principal_angles(Q[:, :2], Q[:, 2:4]).tolist() == pytest.approx([90.0, 90.0])
    assert M.principal_angles(Q[:, :3], Q[:, :3]).abs().max() < 1e-6
    angles = M.principal_angles(Q[:, :3], Q[:, [0, 4]])  # different widths: 2 angles
    assert angles.tolist() == pytest.approx([0.0, 90.0], abs=1e-6)


# --- masks, overlaps, Jaccard ------------------------------------------------------------------------------------


def test_principal_and_low_magnitude_masks_hand_values():
    W0 = torch.outer(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 1.0]))  # [[6, 3], [2, 1]], rank 1
    sub = sub_of(W0, 1)
    principal = M.principal_weight_mask(sub, 0.5)
    low = M.low_magnitude_mask(W0, 0.5)
    assert principal.tolist() == [[True, True], [False, False]]
    assert low.tolist() == [[False, False], [True, True]]
    updated = torch.tensor([[True, False], [True, True]])
    assert M.mask_overlap(principal, updated) == pytest.approx(1 / 3)
    assert M.mask_overlap(low, updated) == pytest.approx(2 / 3)
    assert math.isnan(M.mask_overlap(principal, torch.zeros(2, 2, dtype=torch.bool)))


def test_principal_mask_uses_rank_k_reconstruction_not_w0():
    W0 = torch.tensor([[10.0, 0.0], [0.0, -9.0]])  # rank-1 reconstruction keeps only the 10
    assert M.principal_weight_mask(sub_of(W0, 1), 0.5).sum() == 2  # count is round(α·numel) despite ties
    assert M.principal_weight_mask(sub_of(W0, 1), 0.25).tolist() == [[True, False], [False, False]]
    assert M.low_magnitude_mask(W0, 0.25).sum() == 1


def test_jaccard_and_random_baseline():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    c = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    assert M.jaccard(a, b) == pytest.approx(1 / 3)
    assert M.random_jaccard(0.5, 0.5) == pytest.approx(1 / 3)
    cons = M.mask_consistency([a, b, c])
    assert cons.jaccard == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)
    r = M.random_jaccard
    assert cons.random_baseline == pytest.approx((r(0.5, 0.5) + 2 * r(0.5, 0.75)) / 3)
    with pytest.raises(ValueError, match="at least 2"):
        M.mask_consistency([a])


def test_random_baseline_matches_simulation():
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(200_000, generator=gen) < 0.3
    b = torch.rand(200_000, generator=gen) < 0.6
    assert M.jaccard(a, b) == pytest.approx(M.random_jaccard(0.3, 0.6), abs=3e-3)


# --- weight pairs, model pairs -----------------------------------------------------------------------------------


def test_weight_pair_record_on_planted_update():
    m, n, k = 16, 12, 3
    W0, L, R = planted(m, n, [float(12 - i) for i in range(12)])
    W0 = W0.float()
    gen = torch.Generator().manual_seed(2)
    off = project(torch.randn(m, n, generator=gen, dtype=torch.float64), L[:, :k], R[:, :k]).float()
    rec = M.weight_pair_metrics(W0, W0 + 0.05 * off, k, alpha=0.25, name="layer")
    assert rec.leak_left < 1e-5 and rec.leak_right < 1e-5  # ΔW is off-principal
    assert rec.update_sparsity < 0.2 and rec.shape == (m, n) and len(rec.angles_left) == k
    assert rec.max_angle_left < 5 and rec.nss < 0.05
    on = torch.outer(L[:, 0], R[:, 0]).float()
    rec_on = M.weight_pair_metrics(W0, W0 + 0.5 * on, k, alpha=0.25)
    assert rec_on.leak_left == pytest.approx(1.0, abs=1e-3) and rec_on.leak_right == pytest.approx(1.0, abs=1e-3)
    assert rec_on.max_angle_left == pytest.approx(0.0, abs=1e-3)  # same singular vectors, σ1 grows by 0.5
    assert rec_on.nss == pytest.approx(0.5 / torch.arange(1.0, 13).norm().item(), rel=1e-4)
    # ‖ΔW‖/‖W0‖: σ1's growth of 0.5 against ‖W0‖_F = ‖(12, 11, …, 1)‖
    assert rec_on.update_rel == pytest.approx(0.5 / torch.arange(1.0, 13).norm().item(), rel=1e-4)
    assert rec.update_rel == pytest.approx(0.05 * off.double().norm().item() / W0.double().norm().item(), rel=1e-4)
    assert M.summarize([rec, rec_on])["mean_update_rel"] == pytest.approx((rec.update_rel + rec_on.update_rel) / 2)
    with pytest.raises(ValueError, match="k=20"):
        M.weight_pair_metrics(W0, W0, 20)


def test_compare_weights_and_summary():
    model = make_tiny_model()
    base = M.linear_weights(model)
    assert "model.layers.0.self_attn.q_proj" in base and not any("lm_head" in n for n in base)
    tuned = {name: w.clone() for name, w in base.items()}
    first = next(iter(tuned))
    tuned[first][0] += 1.0  # change one row of one layer
    records, summary = M.compare_weights(base, tuned, k=4, alpha=0.5, progress=False)
    assert len(records) == len(base) == summary["layers"]
    changed = tuned[first].shape[1]
    assert summary["update_sparsity"] == pytest.approx(1 - changed / summary["parameters"])
    assert records[0].update_sparsity == pytest.approx(1 - 1 / tuned[first].shape[0])
    assert all(r.nss == 0 and r.max_angle_left < 1e-4 for r in records[1:])
    assert summary["overlap_random_baseline"] == 0.5 and not math.isnan(summary["mean_overlap_principal"])
    with pytest.raises(KeyError, match="tuned lacks"):
        M.compare_weights(base, {}, progress=False)


def test_run_consistency_planted():
    base = {"a": torch.ones(2, 2), "b": torch.ones(1, 4)}

    def run(a_changed, b_changed):
        return {"a": base["a"] + 0.5 * torch.tensor(a_changed).view(2, 2), "b": base["b"] + 0.5 * torch.tensor(b_changed).view(1, 4)}

    runs = [run([1, 1, 0, 0], [1, 0, 0, 0]), run([1, 0, 1, 0], [1, 0, 0, 0])]
    per_layer, overall = M.run_consistency(base, runs)
    assert per_layer["a"].jaccard == pytest.approx(1 / 3) and per_layer["b"].jaccard == 1.0
    assert overall.jaccard == pytest.approx(2 / 4)  # concatenated masks: ∩ = 2, ∪ = 4
    assert overall.random_baseline == pytest.approx(M.random_jaccard(3 / 8, 3 / 8))


def test_linear_weights_transposes_conv1d():
    weights = M.linear_weights(make_tiny_model("gpt2"))
    assert weights["transformer.h.0.attn.c_attn"].shape == (144, 48)  # (out, in)


# --- live versions and the low-rank path -------------------------------------------------------------------------


def gapped(m=40, n=30, k=4, seed=0):
    sigma = [20.0 - i for i in range(k)] + [2.0 * 0.9**i for i in range(min(m, n) - k)]
    return planted(m, n, sigma, seed)[0]


def test_live_drift_matches_exact_top_k_nss():
    W0, k = gapped(), 4
    sub = sub_of(W0, k)
    assert D.live_spectral_drift(1.2 * W0, sub) == pytest.approx(0.2)
    assert D.live_spectral_drift(1.2 * W0, sub) == pytest.approx(M.spectral_drift(W0, 1.2 * W0, k))
    gen = torch.Generator().manual_seed(3)
    for scale, rel in ((0.005, 0.01), (0.05, 0.1)):  # agree to first order; the gap shrinks like ‖E‖²/σ
        W1 = W0 + scale * torch.randn(W0.shape, generator=gen, dtype=torch.float64)
        exact, live = M.spectral_drift(W0, W1, k), D.live_spectral_drift(W1, sub)
        assert live == pytest.approx(exact, rel=rel)


def test_live_angles_match_exact_on_gapped_matrix():
    W0, k = gapped(), 4
    sub = sub_of(W0, k)
    gen = torch.Generator().manual_seed(4)
    W1 = W0 + 0.3 * torch.randn(W0.shape, generator=gen, dtype=torch.float64)
    exact = M.subspace_rotation(sub, sub_of(W1, k))
    live = D.live_principal_angles(W1, sub, steps=4)  # error shrinks ~(σ5/σ4)² ≈ 0.04 per step
    assert exact.max_left > 1.0
    assert live.left.tolist() == pytest.approx(exact.left.tolist(), abs=1e-4)
    assert live.right.tolist() == pytest.approx(exact.right.tolist(), abs=1e-4)
    one_step = D.live_principal_angles(W1, sub, steps=1)  # warm start: fewer steps → biased toward 0
    assert exact.max_left - 0.1 > one_step.max_left > 0.5 * exact.max_left


def test_live_angles_recover_planted_rotation():
    m, k = 12, 3
    W0, L, R = planted(m, 9, [10, 9, 8, 1, 0.5, 0.4, 0.3, 0.2, 0.1])
    W1 = plane_rotation(m, 1, k, 20.0, L) @ W0
    live = D.live_principal_angles(W1, sub_of(W0, k), steps=1)
    assert live.max_left == pytest.approx(20.0, abs=1e-6) and live.max_right == pytest.approx(0.0, abs=1e-6)


def test_lowrank_weight_paths_match_dense():
    W0, k = gapped(), 4
    sub = sub_of(W0, k)
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(6, 30, generator=gen, dtype=torch.float64)
    lr = D.LowRankWeight(B, A, scale=0.1, base=W0)
    dense = lr.dense()
    X, Y = torch.randn(30, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    assert torch.allclose(lr.matmul(X), dense @ X) and torch.allclose(lr.rmatmul(Y), dense.T @ Y)
    assert D.live_spectral_drift(lr, sub) == pytest.approx(D.live_spectral_drift(dense, sub), rel=1e-10)
    assert D.live_principal_angles(lr, sub).left.tolist() == pytest.approx(
        D.live_principal_angles(dense, sub).left.tolist(), abs=1e-8
    )
    with pytest.raises(ValueError, match="B \\(m, r\\) and A \\(r, n\\)"):
        D.LowRankWeight(B, A.T)


def test_lowrank_leak_equals_dense_leak():
    W0, k = gapped(), 4
    sub = sub_of(W0, k)
    gen = torch.Generator().manual_seed(6)
    B = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    A = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    expected = principal_leak(B @ A, sub.U, sub.V)
    assert D.lowrank_principal_leak(B, A, sub.U, sub.V) == pytest.approx(expected, rel=1e-10)
    assert D.lowrank_principal_leak(B, A, None, sub.V) == pytest.approx((0.0, expected[1]), rel=1e-10)
    Bp = project(B, sub.U, None, "left")
    assert D.lowrank_principal_leak(Bp, A, sub.U, sub.V)[0] < 1e-12


def test_lowrank_norm_matches_dense():
    B, A = torch.randn(50, 4, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
    assert D.lowrank_norm(B, A) == pytest.approx(float(torch.linalg.matrix_norm(B @ A)), rel=1e-12)
    delta = D.LowRankWeight(B, A, scale=0.25)
    assert delta.update_norm() == pytest.approx(0.25 * float(torch.linalg.matrix_norm(B @ A)), rel=1e-12)


def test_adapter_diagnostics_match_dense_layer_values():
    """leak_max and update_rel_mean through the r-sized factors equal the dense ΔW computations of each layer."""
    from peft import get_peft_model

    from offprincipal import OffPrincipalConfig
    from offprincipal.tuner import OffPrincipalLayer

    torch.manual_seed(0)
    model = get_peft_model(make_tiny_model("llama"), OffPrincipalConfig(r=4, alpha=8, top_k=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "offprincipal_B" in name:
                p.normal_()
    layers = [m for m in model.modules() if isinstance(m, OffPrincipalLayer)]
    dense_leak = max(max(layer.principal_leak("default")) for layer in layers)
    dense_rel = [
        float(torch.linalg.matrix_norm(layer.get_delta_weight("default").detach().double()))
        / float(torch.linalg.matrix_norm(layer.get_base_layer().weight.double()))
        for layer in layers
    ]
    logged = D.AdapterDiagnostics()(model)
    assert set(logged) == {"offprincipal/leak_max", "offprincipal/update_rel_mean"}
    assert logged["offprincipal/leak_max"] == pytest.approx(dense_leak, abs=1e-6) and logged["offprincipal/leak_max"] < 1e-5
    assert logged["offprincipal/update_rel_mean"] == pytest.approx(sum(dense_rel) / len(dense_rel), rel=1e-5)
    assert logged["offprincipal/update_rel_mean"] > 0
    assert D.AdapterDiagnostics("absent")(model) == {}


def test_principal_blocks_shift_is_zero_off_principal_and_sees_principal_moves():
    from offprincipal.optim import OffPrincipalAdamW

    model = make_tiny_model("llama")
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-2, top_k=4, progress=False)
    named = dict(model.named_parameters())
    blocks = D.PrincipalBlocks(opt, named)
    assert blocks.blocks and blocks.shift(named) == 0.0
    batch = tiny_batch()
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert blocks.shift(named) < 1e-5
    name = next(iter(blocks.blocks))
    with torch.no_grad():
        named[name].mul_(1.1)  # scales the principal blocks by 1.1: shift 0.1
    assert blocks.shift(named) == pytest.approx(0.1, rel=1e-3)


def test_fp32_svd_path_agrees_with_fp64():
    W0 = gapped().float()
    W1 = W0 + 0.01 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(7))
    exact = M.weight_pair_metrics(W0, W1, 4)
    fast = M.weight_pair_metrics(W0, W1, 4, dtype=torch.float32)
    assert fast.nss == pytest.approx(exact.nss, rel=1e-3)
    assert fast.max_angle_left == pytest.approx(exact.max_angle_left, abs=1e-2)
    assert fast.update_sparsity == exact.update_sparsity and fast.overlap_principal == exact.overlap_principal
