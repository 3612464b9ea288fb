"""The fp32 dot-product precision of the projection: an fp64 emulation of each tensor-core scheme, and the torch
path's immunity to global TF32 switches.

Triton's CPU interpreter ignores ``input_precision`` (its dot is a numpy fp32 matmul), so what tf32, tf32x3 and
bf16x3 do to the projection's leak is emulated here in fp64: operands are rounded as the tensor cores round
them (tf32: 11 significant bits, bf16: 8), the split schemes keep hi·hi + hi·lo + lo·hi, products are exact and
each result is rounded to fp32 (the kernels accumulate in fp32). The default precision must keep the leak of a
random update ≤ 1e-6 at k up to 256.
"""

from __future__ import annotations

import pytest
import torch

from offprincipal._sides import DEFAULT_PRECISION, fp32_matmuls
from offprincipal.projection import principal_leak, project, project_


def _round_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (fp64) rounded to ``bits`` significant bits, to nearest (ties away from zero, as cvt.rna.tf32.f32)."""
    mantissa, exponent = torch.frexp(x)
    scaled = mantissa * 2.0**bits
    return torch.ldexp(torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) / 2.0**bits, exponent)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float().double()


def emulated_matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b for fp32 operands (held in fp64) as ``tl.dot(input_precision=precision)`` evaluates it."""
    if precision == "ieee":
        return _fp32(a @ b)
    bits = 11 if precision.startswith("tf32") else 8
    hi_a, hi_b = _round_bits(a, bits), _round_bits(b, bits)
    if precision in ("tf32", "bf16"):
        return _fp32(hi_a @ hi_b)
    lo_a, lo_b = _round_bits(a - hi_a, bits), _round_bits(b - hi_b, bits)
    return _fp32(hi_a @ hi_b + hi_a @ lo_b + lo_a @ hi_b)


def emulated_projection(D, U, V, precision: str) -> torch.Tensor:
    """The kernels' two passes: C = UᵀD, DV = D V (pass 1), C' = C − (CV)Vᵀ (host, fp32), P = D − U C' − (DV)Vᵀ."""
    C = emulated_matmul(U.T, D, precision)
    DV = emulated_matmul(D, V, precision)
    C = _fp32(C - (C @ V) @ V.T)
    return _fp32(D - emulated_matmul(U, C, precision) - emulated_matmul(DV, V.T, precision))


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    m, n = 1024, 768
    D = _fp32(torch.randn(m, n, generator=gen, dtype=torch.float64))
    U = _fp32(torch.linalg.qr(torch.randn(m, 256, generator=gen, dtype=torch.float64)).Q)
    V = _fp32(torch.linalg.qr(torch.randn(n, 256, generator=gen, dtype=torch.float64)).Q)
    return D, U, V


def leak(problem, k: int, precision: str) -> float:
    D, U, V = problem
    P = emulated_projection(D, U[:, :k], V[:, :k], precision)
    return max(principal_leak(P, U[:, :k], V[:, :k]))


@pytest.mark.parametrize("k", [64, 256])
def test_emulated_leak_of_each_precision(problem, k):
    """tf32 leaks ~1e-4 (fails 1e-5); tf32x3 stays at fp32 level like ieee; bf16x3 is between, and over 1e-6 at
    k = 256 — which is why the default is tf32x3."""
    leaks = {precision: leak(problem, k, precision) for precision in ("ieee", "tf32x3", "bf16x3", "tf32")}
    assert leaks["tf32"] > 1e-5, leaks
    assert leaks["ieee"] <= 1e-6 and leaks["tf32x3"] <= 1e-6, leaks
    assert leaks["tf32x3"] <= 5 * leaks["ieee"], leaks
    assert leaks["bf16x3"] > leaks["tf32x3"], leaks
    if k == 256:
        assert leaks["bf16x3"] > 1e-6, leaks
    assert leak(problem, k, DEFAULT_PRECISION) <= 1e-6


def test_emulated_rounding_is_the_hardware_rounding():
    """11 and 8 significant bits: 1 + 2⁻¹¹ rounds to 1 + 2⁻¹⁰ (ties away), 1 + 2⁻¹² to 1 in tf32; bf16 keeps 1 + 2⁻⁷."""
    x = torch.tensor([1 + 2.0**-11, 1 + 2.0**-12, -(1 + 2.0**-11), 3.0], dtype=torch.float64)
    assert _round_bits(x, 11).tolist() == [1 + 2.0**-10, 1.0, -(1 + 2.0**-10), 3.0]
    assert _round_bits(torch.tensor([1 + 2.0**-7, 1 + 2.0**-9], dtype=torch.float64), 8).tolist() == [1 + 2.0**-7, 1.0]


def _switches():
    b = torch.backends
    return (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) if hasattr(b.cuda.matmul, "fp32_precision") \
        else (b.cuda.matmul.allow_tf32,)


def test_torch_path_ignores_global_tf32_switches(monkeypatch):
    """With allow_tf32 / set_float32_matmul_precision("high"/"medium") on, the torch projection is unchanged, runs
    its matmuls with the switches at "ieee", and leaves the switches as it found them."""
    gen = torch.Generator().manual_seed(1)
    D = torch.randn(90, 70, generator=gen)
    U = torch.linalg.qr(torch.randn(90, 8, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(70, 8, generator=gen)).Q
    baseline = project_(D.clone(), U, V, backend="torch")
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(_switches())
        return real_matmul(a, b)

    for precision in ("high", "medium"):
        torch.set_float32_matmul_precision(precision)
        try:
            before = _switches()
            monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
            out = project_(D.clone(), U, V, backend="torch")
            monkeypatch.undo()
            assert torch.equal(out, baseline)
            assert _switches() == before, "the guard restores the global switches"
        finally:
            monkeypatch.undo()
            torch.set_float32_matmul_precision("highest")
    assert seen and all(s[0] in ("ieee", False) for s in seen), seen
    assert torch.equal(project(D, U, V), baseline)


def test_fp32_matmuls_guard_sets_and_restores():
    torch.set_float32_matmul_precision("high")
    try:
        outside = _switches()
        with fp32_matmuls("tf32x3"):
            assert _switches()[0] in ("ieee", False)
        assert _switches() == outside
        with pytest.raises(RuntimeError):
            with fp32_matmuls("ieee"):
                raise RuntimeError("inside")
        assert _switches() == outside, "restored after an exception too"
        with pytest.raises(ValueError, match="precision"):
            with fp32_matmuls("fp64"):
                pass
    finally:
        torch.set_float32_matmul_precision("highest")
