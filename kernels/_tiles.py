"""Shared pieces of the fused kernels: tile helpers (Triton), launch configuration and host-side plumbing.

Every kernel works on a matrix X (M, N) in tiles of BM×BN and on the bases U (M, K), V (N, K). The two-sided
projection is evaluated in its expanded form

    P(D) = D − U C' − (DV) Vᵀ,   C = UᵀD (K×N),   C' = C (I − VVᵀ) = C − (CV)Vᵀ,

which equals (I − UUᵀ) D (I − VVᵀ). Pass 1 reads each tile once and accumulates C and DV with fp32 atomics
(:func:`reduce_tile`); the host forms C' (a K×N update, O(K²N)); pass 2 re-reads the tile and subtracts
U C' and (DV) Vᵀ (:func:`apply_tile`). One-sided variants drop the other term (C' = C for "left").
Math is fp32 whatever the storage dtype; every tensor is converted to fp32 right after its load (also because
bf16 arithmetic is wrong in Triton's CPU interpreter).

Because pass 1 sums with atomics, results on a GPU are not bitwise reproducible from run to run (they agree to
fp32 rounding); the torch reference is.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from offprincipal.projection import AllReduce, uses_left, uses_right

DEFAULT_PRECISION = "ieee"
PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def tile_indices(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Rows and columns of this program's tile and their in-bounds masks."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return rows, cols, rows < M, cols < N


@triton.jit
def load_tile(X, rows, cols, mask, s0, s1):
    """X[rows, cols] as fp32, 0 outside ``mask``; X has strides (s0, s1)."""
    offsets = rows[:, None].to(tl.int64) * s0 + cols[None, :].to(tl.int64) * s1
    return tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(X, x, rows, cols, mask, s0, s1):
    """X[rows, cols] ← x, converted to X's dtype."""
    offsets = rows[:, None].to(tl.int64) * s0 + cols[None, :].to(tl.int64) * s1
    tl.store(X + offsets, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def reduce_tile(
    d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 1 for one fp32 tile d = D[rows, cols] (BM×BN, zero outside the matrix).

    LEFT:  C[:, cols] += U[rows, :]ᵀ d   (K×BN)
    RIGHT: DV[rows, :] += d V[cols, :]   (BM×K)
    U (M, K), V (N, K), C (K, N), DV (M, K) are contiguous fp32; K is walked in chunks of BK.
    """
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < K
        if LEFT:
            u = tl.load(U + r64[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            part = tl.dot(tl.trans(u), d, input_precision=PRECISION)
            tl.atomic_add(
                C + ks[:, None].to(tl.int64) * N + c64[None, :], part,
                mask=k_mask[:, None] & col_mask[None, :], sem="relaxed",
            )
        if RIGHT:
            v = tl.load(V + c64[:, None] * K + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            part = tl.dot(d, v, input_precision=PRECISION)
            tl.atomic_add(
                DV + r64[:, None] * K + ks[None, :], part,
                mask=row_mask[:, None] & k_mask[None, :], sem="relaxed",
            )


@triton.jit
def apply_tile(
    d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 2 for one fp32 tile: d − U[rows, :] C'[:, cols] (LEFT) − DV[rows, :] V[cols, :]ᵀ (RIGHT)."""
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < K
        if LEFT:
            u = tl.load(U + r64[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            c = tl.load(
                C + ks[:, None].to(tl.int64) * N + c64[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0
            )
            acc = tl.dot(u, c, acc, input_precision=PRECISION)
        if RIGHT:
            dv = tl.load(DV + r64[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            v = tl.load(V + c64[:, None] * K + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(dv, tl.trans(v), acc, input_precision=PRECISION)
    return d - acc


@triton.jit
def _probe():  # an empty kernel: its type tells whether triton.jit ran in interpreter mode
    pass


def _is_interpreted() -> bool:
    """Whether ``triton.jit`` produced interpreter functions in this process (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(_probe, InterpretedFunction)


INTERPRETED = _is_interpreted()


def tile_configs() -> list:
    """Autotune candidates for the BM×BN tile; one pinned config under the interpreter (its cost is per program)."""
    if INTERPRETED:
        return [triton.Config({"BM": 64, "BN": 64}, num_warps=4)]
    return [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 128, 8, 2), (64, 256, 8, 1), (32, 128, 4, 3),
        ]
    ]


def block_k(k: int) -> int:
    """Chunk of the K dimension: ≥16 (tl.dot's minimum; missing columns are masked to 0), ≤64."""
    return min(64, max(16, triton.next_power_of_2(k)))


def grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


class Bases:
    """The bases and pass-1 accumulators of one projection of an (m, n) matrix, ready for the kernels.

    ``U`` (m, k) and ``V`` (n, k) become contiguous fp32 on the matrix's device (an empty placeholder for an
    unused side); ``C`` (k, n) and ``DV`` (m, k) are zeroed fp32 accumulators.
    """

    def __init__(self, shape: tuple[int, int], U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str,
                 device: torch.device, what: str = "D"):
        m, n = shape
        self.left, self.right = uses_left(sides), uses_right(sides)
        placeholder = torch.empty(0, device=device, dtype=torch.float32)
        ks = []
        if self.left:
            if U is None or U.ndim != 2 or U.shape[0] != m:
                raise ValueError(f"sides={sides!r} needs U of shape ({m}, k) for {what} of shape {shape}, got "
                                 f"{None if U is None else tuple(U.shape)}")
            ks.append(U.shape[1])
        if self.right:
            if V is None or V.ndim != 2 or V.shape[0] != n:
                raise ValueError(f"sides={sides!r} needs V of shape ({n}, k) for {what} of shape {shape}, got "
                                 f"{None if V is None else tuple(V.shape)}")
            ks.append(V.shape[1])
        if len(set(ks)) != 1 or ks[0] < 1:
            raise ValueError(f"U and V must have the same number k ≥ 1 of columns for {what}; got k = {ks}")
        self.k = k = ks[0]
        self.U = U.to(device=device, dtype=torch.float32).contiguous() if self.left else placeholder
        self.V = V.to(device=device, dtype=torch.float32).contiguous() if self.right else placeholder
        self.C = torch.zeros(k, n, device=device, dtype=torch.float32) if self.left else placeholder
        self.DV = torch.zeros(m, k, device=device, dtype=torch.float32) if self.right else placeholder

    def combine_(self, all_reduce: Optional[AllReduce]) -> None:
        """Between the passes: sum C over row shards, then C ← C − (CV)Vᵀ when both sides are projected."""
        if self.left and all_reduce is not None:
            all_reduce(self.C)
        if self.left and self.right:
            self.C -= (self.C @ self.V) @ self.V.T

    def launch_args(self) -> tuple:
        return self.U, self.V, self.C, self.DV

    def constexprs(self, precision: str) -> dict:
        return dict(LEFT=self.left, RIGHT=self.right, BK=block_k(self.k), PRECISION=check_precision(precision))


def check_device(what: str, t: torch.Tensor) -> None:
    if not (t.is_cuda or (INTERPRETED and t.device.type == "cpu")):
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, but {what} is on {t.device}; use offprincipal.projection's "
            "backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before importing offprincipal.kernels."
        )
