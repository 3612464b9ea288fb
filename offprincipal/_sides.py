"""Pieces shared by the torch reference (``offprincipal.projection``, ``offprincipal.optim``) and the fused
kernels (``offprincipal.kernels``): which sides a projection keeps, the row-shard all-reduce type, and the fp32
dot-product precision. It imports nothing from either, so every import between the layers points one way.

Precision (``precision=`` of :func:`offprincipal.projection.project_`, :class:`offprincipal.OffPrincipalAdamW`,
:class:`offprincipal.OffPrincipalOptimizer`): how the fp32 products UᵀD, DV, U·C′ and (DV)·Vᵀ are evaluated.

- ``"tf32x3"`` (default): each fp32 operand x is split as x = hi + lo with hi = tf32(x), lo = tf32(x − hi), and
  a·b ≈ hi_a·hi_b + hi_a·lo_b + lo_a·hi_b on tensor cores (fp32 accumulation). The dropped terms are O(2⁻²²)
  relative, so the projection's leak stays at fp32 level (≤ 1e-6; see tests/test_kernels_precision.py, which
  emulates every choice in fp64).
- ``"ieee"``: plain fp32 FMAs (no tensor cores): the most exact, the slowest on a GPU.
- ``"tf32"``: one tensor-core product with 10-bit mantissas: a leak of ~1e-4 relative. Only for experiments.

The torch path runs its fp32 matmuls at fp32 ("ieee") for "ieee" and "tf32x3", whatever the global switches
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.set_float32_matmul_precision("high")``) say, through
:func:`fp32_matmuls`; "tf32" lets it use tf32.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

SIDES = ("both", "left", "right")

AllReduce = Callable[[torch.Tensor], None]
"""Sums a tensor in place over the ranks that hold the other row shards (``None``: D is the whole matrix)."""

PRECISIONS = ("tf32x3", "ieee", "tf32")
DEFAULT_PRECISION = "tf32x3"


def check_sides(sides: str) -> str:
    if sides not in SIDES:
        raise ValueError(f"sides must be one of {SIDES}, got {sides!r}")
    return sides


def uses_left(sides: str) -> bool:
    return check_sides(sides) in ("both", "left")


def uses_right(sides: str) -> bool:
    return check_sides(sides) in ("both", "right")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _matmul_backends() -> list:
    """The torch backends whose fp32 matmul precision a global switch can lower (new API, torch ≥ 2.9)."""
    found = []
    for path in (("cuda", "matmul"), ("mkldnn", "matmul")):
        obj = torch.backends
        for part in path:
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


@contextlib.contextmanager
def fp32_matmuls(precision: str = DEFAULT_PRECISION) -> Iterator[None]:
    """Inside: torch's fp32 matmuls run at full fp32 ("ieee"/"tf32x3") or may use tf32 ("tf32"), whatever the
    global switches are; on exit every switch is restored. Sets process-wide flags: not for concurrent threads
    that want other settings in the meantime."""
    want = "tf32" if check_precision(precision) == "tf32" else "ieee"
    backends = _matmul_backends()
    if backends:
        saved = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                # CPU (oneDNN) has no tf32; "ieee" there turns off bf16 products ("medium") too
                b.fp32_precision = want if (want == "ieee" or b is torch.backends.cuda.matmul) else "ieee"
            yield
        finally:
            for b, value in zip(backends, saved):
                b.fp32_precision = value
        return
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32  # pragma: no cover - torch < 2.9
    saved_prec = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = want == "tf32"
        torch.set_float32_matmul_precision("high" if want == "tf32" else "highest")
        yield
    finally:
        torch.set_float32_matmul_precision(saved_prec)
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
