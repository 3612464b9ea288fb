"""Triton kernels against their torch references (offprincipal.projection.project, offprincipal.optim.adamw_update_).

On a machine with a CUDA GPU the kernels run compiled on CUDA tensors. Without one, this module re-runs itself
in a child process with TRITON_INTERPRET=1 (the interpreter must be on before ``offprincipal.kernels`` is first
imported, and must not leak into the other tests), on small shapes with one pinned tile config.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if not ON_GPU and not INTERPRETED:

    def test_kernels_under_the_triton_interpreter():
        """Runs every test of this file in a child pytest under TRITON_INTERPRET=1 (see the module docstring)."""
        env = dict(os.environ, TRITON_INTERPRET="1")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", __file__],
            env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=900,
        )
        assert result.returncode == 0, f"kernel tests failed under the interpreter:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"

else:
    from offprincipal import kernels
    from offprincipal.optim import OffPrincipalAdamW, adamw_update_
    from offprincipal.projection import principal_leak, project, project_

    DEVICE = "cuda" if ON_GPU else "cpu"
    DTYPES = [torch.float32, torch.bfloat16, torch.float16]
    SIDES = ["both", "left", "right"]
    # (m, n, k): odd sizes (not multiples of the block), k = 1, k close to min(m, n), tall and wide
    CASES = [(37, 53, 1), (37, 53, 36), (53, 37, 5), (130, 20, 19), (20, 130, 1), (97, 75, 40)]
    if ON_GPU:
        CASES += [(300, 517, 64), (1031, 257, 256), (4096 + 3, 130, 16)]
    # elementwise error allowed, as a fraction of the largest reference value: storage rounding of the dtype
    TOL = {torch.float32: 4e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

    def case_id(case):
        m, n, k = case
        return f"{m}x{n}-k{k}"

    def bases(m, n, k, gen):
        U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q.float()
        V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q.float()
        return U.to(DEVICE), V.to(DEVICE)

    pytestmark = pytest.mark.usefixtures("one_thread")

    def assert_within(actual, expected, bound, what):
        """Elementwise |actual − expected| ≤ bound (a tensor or number); the message names the worst index."""
        actual, expected = actual.double().cpu(), expected.double().cpu()
        bound = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(expected)
        excess = (actual - expected).abs() - bound
        worst = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), expected.shape))
        assert excess.flatten()[worst] <= 0, (
            f"{what}: differs by {(actual - expected).abs().flatten()[worst]:.3g} at index {index} "
            f"(allowed {bound.flatten()[worst]:.3g}; expected {expected.flatten()[worst]:.6g}, got {actual.flatten()[worst]:.6g})"
        )

    def assert_close(actual, expected, dtype, what):
        """Computed values: |actual − expected| ≤ TOL[dtype]·max|expected| elementwise."""
        assert_within(actual, expected, TOL[dtype] * expected.double().abs().max().item(), what)

    def assert_stored_close(actual, expected, dtype, roundings, what):
        """Stored state after ``roundings`` steps: TOL of the scale plus one storage rounding per step either way."""
        expected64 = expected.double()
        bound = TOL[dtype] * expected64.abs().max() + roundings * torch.finfo(dtype).eps * expected64.abs()
        assert_within(actual, expected, bound, what)

    @pytest.mark.parametrize("sides", SIDES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_project_matches_reference(case, dtype, sides):
        m, n, k = case
        gen = torch.Generator().manual_seed(m * 1000 + n + k)
        U, V = bases(m, n, k, gen)
        D = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
        expected = project(D.double(), U.double(), V.double(), sides)
        out = D.clone()
        assert project_(out, U, V, sides, backend="triton") is out
        assert_close(out, expected, dtype, f"project_ {m}x{n} k={k} {dtype} sides={sides}")
        if dtype == torch.float32:
            left, right = principal_leak(out, U if sides != "right" else None, V if sides != "left" else None)
            assert max(left, right) < 1e-5, f"leak {left:.1e}/{right:.1e} for {m}x{n} k={k} sides={sides}"

    @pytest.mark.parametrize("sides", SIDES)
    def test_project_non_contiguous_and_precisions(sides):
        """A transposed view is projected in place through its strides; tf32x3 keeps ~fp32 accuracy."""
        gen = torch.Generator().manual_seed(7)
        U, V = bases(45, 70, 9, gen)
        base = torch.randn(70, 45, generator=gen).to(DEVICE)
        D = base.T  # (45, 70), strides (1, 45)
        expected = project(D.double(), U.double(), V.double(), sides)
        project_(D, U, V, sides, backend="triton")
        assert_close(base.T, expected, torch.float32, f"project_ on a transposed view, sides={sides}")
        for precision in ("tf32x3", "ieee"):
            X = torch.randn(45, 70, generator=gen).to(DEVICE)
            expected = project(X.double(), U.double(), V.double(), sides)
            kernels.project_(X, U, V, sides, precision=precision)
            assert_close(X, expected, torch.float32, f"precision={precision} sides={sides}")

    def test_project_row_shards_with_all_reduce():
        """Two row shards projected one after the other, with an all_reduce that adds the other shard's UᵀD:
        each shard equals the matching rows of the full projection (what FSDP2 ranks compute)."""
        gen = torch.Generator().manual_seed(3)
        m, n, k = 41, 29, 6
        U, V = bases(m, n, k, gen)
        D = torch.randn(m, n, generator=gen).to(DEVICE)
        expected = project(D.double(), U.double(), V.double(), "both")
        split = 21
        for rows, other in ((slice(0, split), slice(split, m)), (slice(split, m), slice(0, split))):
            other_coeff = U[other].T @ D[other]
            shard = D[rows].clone()
            kernels.project_(shard, U[rows], V, "both", all_reduce=lambda C, extra=other_coeff: C.add_(extra))
            assert_close(shard, expected[rows], torch.float32, f"row shard {rows}")
        empty = torch.empty(0, n, device=DEVICE)
        seen = []
        kernels.project_(empty, U[:0], V, "left", all_reduce=seen.append)
        assert len(seen) == 1 and seen[0].shape == (k, n), "a rank with no rows still joins the all-reduce"

    @pytest.mark.parametrize("sides", SIDES)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_projected_adamw_step_matches_reference(case, dtype, sides):
        m, n, k = case
        gen = torch.Generator().manual_seed(m + 7 * n + k)
        U, V = bases(m, n, k, gen)
        weight_decay = 0.1 if (m + n + k) % 2 else 0.0  # both branches over the cases
        maximize = case == CASES[0]
        W = (0.02 * torch.randn(m, n, generator=gen)).to(DEVICE, dtype)  # weight-like scale: updates are visible
        ref = [W.clone(), torch.zeros_like(W), torch.zeros_like(W)]
        ours = [W.clone(), torch.zeros_like(W), torch.zeros_like(W)]
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, maximize=maximize)
        steps = 3
        for step in range(1, steps + 1):
            grad = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
            adamw_update_(ref[0], grad, ref[1], ref[2], step, U, V, sides, backend="torch", **hyper)
            adamw_update_(ours[0], grad, ours[1], ours[2], step, U, V, sides, backend="triton", **hyper)
        what = f"adamw {m}x{n} k={k} {dtype} sides={sides} wd={weight_decay} maximize={maximize}"
        for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), ours, ref):
            assert_stored_close(a, b, dtype, steps, f"{what}: {name}")
        if dtype == torch.float32:
            left, right = principal_leak(ours[0] - W, U if sides != "right" else None, V if sides != "left" else None)
            assert max(left, right) < 1e-5, f"{what}: leak {left:.1e}/{right:.1e}"

    def test_adamw_step_mixed_dtypes_master_weights():
        """fp32 master weight and moments with a bf16 gradient, as OffPrincipalAdamW(master_weights=True) runs it."""
        gen = torch.Generator().manual_seed(11)
        U, V = bases(33, 47, 4, gen)
        W = (0.02 * torch.randn(33, 47, generator=gen)).to(DEVICE)
        runs = {}
        for backend in ("torch", "triton"):
            p, m, v = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
            g = torch.randn(33, 47, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
            adamw_update_(p, g, m, v, 1, U, V, "both", lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.01, backend=backend)
            runs[backend] = p
        assert_stored_close(runs["triton"], runs["torch"], torch.float32, 1, "fp32 master with bf16 grad")

    def test_kernel_input_errors_name_the_problem():
        U = torch.linalg.qr(torch.randn(8, 2)).Q.to(DEVICE)
        with pytest.raises(ValueError, match=r"needs V of shape \(6, k\)"):
            kernels.project_(torch.randn(8, 6, device=DEVICE), U, None, "both")
        with pytest.raises(ValueError, match="same number k"):
            kernels.project_(torch.randn(8, 6, device=DEVICE), U, torch.randn(6, 3, device=DEVICE), "both")
        with pytest.raises(ValueError, match="precision"):
            kernels.project_(torch.randn(8, 6, device=DEVICE), U, None, "left", precision="fp64")

    @pytest.mark.skipif(not ON_GPU, reason="1000 optimizer steps are too slow for the interpreter")
    @pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
    def test_optimizer_on_cuda_matches_torch_backend_and_stays_off_principal(dtype, master):
        """OffPrincipalAdamW picks the fused step for CUDA params ("auto"); it follows the torch backend and keeps
        the fp32 trajectory off-principal to 1e-5 over 1000 steps."""
        from offprincipal.optim import OffPrincipalAdamW

        gen = torch.Generator().manual_seed(0)
        W0 = (0.02 * torch.randn(300, 517, generator=gen)).to(DEVICE, dtype)
        runs = {}
        for backend in ("auto", "torch"):
            p = torch.nn.Parameter(W0.clone())
            opt = OffPrincipalAdamW([("w", p)], lr=1e-3, weight_decay=0.01, top_k=16, cache_dir=False,
                                    progress=False, master_weights=master, backend=backend)
            g = torch.Generator(device=DEVICE).manual_seed(1)
            for _ in range(1000):
                p.grad = torch.randn(p.shape, device=DEVICE, generator=g).to(dtype)
                opt.step()
            runs[backend] = (opt.state[p].get("master_param", p).detach(), opt.bases["w"])
        (ours, (U, V)), (ref, _) = runs["auto"], runs["torch"]
        start = W0.float()
        # rounding differences are amplified by Adam's normalisation over 1000 steps: a loose check for gross errors
        change = (ref - start).abs().max().item()
        assert_within(ours - start, ref - start, 1e-3 * change, "1000 CUDA steps, auto vs torch backend")
        left, right = principal_leak(ours - start, U, V)
        assert max(left, right) <= 1e-5, f"leak {left:.1e}/{right:.1e} after 1000 fused steps"

    def test_pass_one_is_deterministic_over_several_rectangles():
        """Pass 1 sums per-rectangle partials in a fixed order (no atomics): two runs give bit-identical results,
        also when the grid has several rectangles of several tiles each (the partials' read-modify-write)."""
        from offprincipal.kernels._tiles import Bases

        gen = torch.Generator().manual_seed(5)
        m, n, k = 200, 300, 12
        U, V = bases(m, n, k, gen)
        layout = Bases((m, n), U, V, "both", torch.device(DEVICE))
        assert layout.R * layout.Q > 1 and layout.RT * layout.QT > 1, "the case must exercise partials and rectangles"
        D = torch.randn(m, n, generator=gen).to(DEVICE)
        first, second = D.clone(), D.clone()
        kernels.project_(first, U, V, "both")
        kernels.project_(second, U, V, "both")
        assert torch.equal(first, second)
        assert_close(first, project(D.double(), U.double(), V.double()), torch.float32, "rectangles vs reference")
        runs = []
        for _ in range(2):
            p, mom, var = (0.02 * D).clone(), torch.zeros_like(D), torch.zeros_like(D)
            kernels.projected_adamw_step_(p, D, mom, var, U, V, "both", beta1=0.9, beta2=0.999, eps=1e-8,
                                          step_size=1e-2, bc2_sqrt=0.0316, lr_wd=1e-4)
            runs.append(p)
        assert torch.equal(runs[0], runs[1])

    @pytest.mark.parametrize("sides", SIDES)
    def test_k_above_64_adds_chunks_into_the_partials(sides):
        """k > 64: pass 1 adds UᵀD into its partial 64 columns of U at a time (not in registers)."""
        from offprincipal.kernels._tiles import padded_k, reduce_block_k

        gen = torch.Generator().manual_seed(8)
        m, n, k = 140, 90, 70
        assert reduce_block_k(k) < padded_k(k)
        U, V = bases(m, n, k, gen)
        D = torch.randn(m, n, generator=gen).to(DEVICE)
        out = D.clone()
        kernels.project_(out, U, V, sides)
        assert_close(out, project(D.double(), U.double(), V.double(), sides), torch.float32, f"k={k} sides={sides}")
        W = (0.02 * torch.randn(m, n, generator=gen)).to(DEVICE)
        runs = {}
        for backend in ("torch", "triton"):
            p, mom, var = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
            adamw_update_(p, D, mom, var, 1, U, V, sides, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, backend=backend)
            runs[backend] = p
        assert_stored_close(runs["triton"], runs["torch"], torch.float32, 1, f"adamw k={k} sides={sides}")

    @pytest.mark.parametrize("sides", SIDES)
    def test_weight_decay_from_invariants_matches_reference(sides):
        """wd_terms = (UᵀW, WV), computed once: pass 1 does not read W, and 3 steps of off-principal training still
        follow the reference that reads W at every step (the terms stay fixed under off-principal updates)."""
        gen = torch.Generator().manual_seed(9)
        m, n, k = 70, 45, 6
        U, V = bases(m, n, k, gen)
        W = (0.5 * torch.randn(m, n, generator=gen)).to(DEVICE)  # large: weight decay dominates the update
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5)
        ref = [W.clone(), torch.zeros_like(W), torch.zeros_like(W)]
        ours = [W.clone(), torch.zeros_like(W), torch.zeros_like(W)]
        terms = kernels.wd_terms(W, U, V, sides)
        for step in range(1, 4):
            grad = torch.randn(m, n, generator=gen).to(DEVICE)
            adamw_update_(ref[0], grad, ref[1], ref[2], step, U, V, sides, backend="torch", **hyper)
            adamw_update_(ours[0], grad, ours[1], ours[2], step, U, V, sides, backend="triton", wd_terms=terms, **hyper)
        assert_stored_close(ours[0], ref[0], torch.float32, 3, f"wd from invariants, sides={sides}")
        left, right = principal_leak(ours[0] - W, U if sides != "right" else None, V if sides != "left" else None)
        assert max(left, right) < 1e-5

    def test_step_scalars_as_tensors_match_numbers():
        """step and lr as 0-d tensors (a capturable step: read by the kernels, no host sync) give the same update."""
        gen = torch.Generator().manual_seed(4)
        U, V = bases(40, 30, 3, gen)
        W = (0.02 * torch.randn(40, 30, generator=gen)).to(DEVICE)
        grad = torch.randn(40, 30, generator=gen).to(DEVICE)
        runs = []
        for as_tensor in (False, True):
            p, mom, var = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
            step = torch.tensor(2.0, device=DEVICE) if as_tensor else 2.0
            lr = torch.tensor(1e-2, device=DEVICE) if as_tensor else 1e-2
            adamw_update_(p, grad, mom, var, step, U, V, "both", lr=lr, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, backend="triton")
            runs.append(p)
        # fp32 bias corrections on the device (as torch's capturable AdamW) vs fp64 ones on the host: 1 − β2ᵗ
        # loses ~eps/(1 − β2ᵗ) ≈ 3e-5 relative at t = 2
        change = (runs[0] - W).abs().max().item()
        assert_within(runs[1] - W, runs[0] - W, 1e-4 * change, "tensor vs number scalars")

    @pytest.mark.parametrize("backend", ["triton", "torch"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_device_flag_skips_or_steps_the_update(dtype, backend):
        """adamw_update_(ok=...): a 0 flag (a device tensor, read at run time) leaves weight and moments bit for
        bit; a 1 flag is bit-identical to no flag. Both with weight decay from (UᵀW, WV) and read from W."""
        gen = torch.Generator().manual_seed(9)
        U, V = bases(37, 53, 5, gen)
        W = (0.02 * torch.randn(37, 53, generator=gen)).to(DEVICE, dtype)
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, backend=backend)
        start = [W.clone(), torch.zeros_like(W), torch.zeros_like(W)]
        adamw_update_(*start[:1], torch.randn(37, 53, generator=gen).to(DEVICE, dtype), *start[1:], 1, U, V, "both",
                      **hyper)
        grad = torch.randn(37, 53, generator=gen).to(DEVICE, dtype)
        grad[3, 5] = float("nan")  # what a skipped step sees
        wd = kernels.wd_terms(start[0], U, V, "both") if backend == "triton" else None
        for terms in (None, wd) if backend == "triton" else (None,):
            for flag in (None, 0, 1):
                ours = [t.clone() for t in start]
                g = grad if flag == 0 else torch.nan_to_num(grad)
                ok = None if flag is None else torch.tensor(flag, dtype=torch.int32, device=DEVICE)
                adamw_update_(ours[0], g, ours[1], ours[2], 2, U, V, "both", wd_terms=terms, ok=ok, **hyper)
                if flag == 0:
                    for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), ours, start):
                        assert torch.equal(a, b), f"{backend} {dtype}: {name} changed by a skipped step"
                elif flag is None:
                    stepped = ours
                else:
                    for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq"), ours, stepped):
                        assert torch.equal(a, b), f"{backend} {dtype}: {name} differs with ok=1"

    def test_optimizer_skips_a_nonfinite_matrix_on_the_fused_path():
        """OffPrincipalAdamW(backend="triton"): a NaN in one matrix's gradient leaves that weight, its moments and
        step count bit for bit, the other matrix steps exactly as without the poisoned one, and the skip is
        reported (during the step on CPU, by report_nonfinite() on CUDA)."""
        gen = torch.Generator().manual_seed(5)
        W0 = {name: (0.02 * torch.randn(40, 30, generator=gen)).to(DEVICE) for name in ("a", "b")}
        grads = [{name: torch.randn(40, 30, generator=gen).to(DEVICE) for name in W0} for _ in range(2)]
        runs = []
        for poison in (True, False):
            params = {name: torch.nn.Parameter(w.clone()) for name, w in W0.items()}
            opt = OffPrincipalAdamW(list(params.items()), lr=1e-2, weight_decay=0.1, top_k=3, cache_dir=False,
                                    progress=False, backend="triton")
            for name, p in params.items():
                p.grad = grads[0][name].clone()
            opt.step()
            before = {k: v.clone() for k, v in opt.state[params["a"]].items()}
            weight_a = params["a"].detach().clone()
            params["b"].grad = grads[1]["b"].clone()
            if poison:
                params["a"].grad = grads[1]["a"].clone()
                params["a"].grad[7, 11] = float("nan")
                with pytest.warns(RuntimeWarning, match="'a'"):
                    opt.step()
                    opt.report_nonfinite()
                assert torch.equal(params["a"], weight_a)
                for key, value in before.items():
                    assert torch.equal(opt.state[params["a"]][key], value), key
            else:
                params["a"].grad = None
                opt.step()
            runs.append(params["b"].detach().clone())
        assert torch.equal(runs[0], runs[1]), "the other matrix steps as without the skipped one"

    @pytest.mark.parametrize("weight_decay,lr_tensor", [(0.1, False), (0.0, False), (0.0, True), (0.1, True)],
                             ids=["wd", "no-wd", "no-wd-lr-tensor", "wd-lr-tensor"])
    def test_optimizer_precision_and_weight_decay_on_the_fused_path(weight_decay, lr_tensor):
        """OffPrincipalAdamW(backend="triton", precision=...) — its real launches: step counts as device tensors,
        weight decay from its cached (UᵀW, WV) or none, lr a number or a tensor — follows the torch backend, at
        k = 5 and n = 36 (not multiples of 16); a bad precision is refused at construction."""
        from offprincipal.optim import OffPrincipalAdamW

        gen = torch.Generator().manual_seed(2)
        W0 = (0.02 * torch.randn(48, 36, generator=gen)).to(DEVICE)
        runs = {}
        for backend in ("triton", "torch"):
            p = torch.nn.Parameter(W0.clone())
            lr = torch.tensor(1e-2, device=DEVICE) if lr_tensor else 1e-2
            opt = OffPrincipalAdamW([("w", p)], lr=lr, weight_decay=weight_decay, top_k=5, cache_dir=False,
                                    progress=False, backend=backend, precision="ieee")
            g = torch.Generator().manual_seed(3)
            for _ in range(3):
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
                opt.step()
            runs[backend] = p.detach().clone()
        assert_stored_close(runs["triton"], runs["torch"], torch.float32, 3, "optimizer, fused vs torch")
        with pytest.raises(ValueError, match="precision"):
            OffPrincipalAdamW([("w", torch.nn.Parameter(W0.clone()))], top_k=2, cache_dir=False, progress=False,
                              precision="fp16")
