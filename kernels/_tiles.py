"""Shared pieces of the fused kernels: tile helpers (Triton), launch configuration and host-side plumbing.

Every kernel works on a matrix X (M, N) in tiles of BM×BN and on the bases U (M, K), V (N, K). The two-sided
projection is evaluated in its expanded form

    P(D) = D − U C' − (DV) Vᵀ,   C = UᵀD (K×N),   C' = C (I − VVᵀ) = C − (CV)Vᵀ,

which equals (I − UUᵀ) D (I − VVᵀ). One-sided variants drop the other term (C' = C for "left").

Pass 1 (reduction, deterministic: no atomics). The grid is R × Q programs; program (r, q) owns a rectangle of
RT row tiles × QT column tiles of X. For each of its column tiles it walks its row tiles, accumulating
UᵀD[:, cols] (KP×BN, KP = K padded to a power of two) in registers, and writes it once to the partial
``CP[r, :, cols]``; for each row tile it adds d·V[cols] into ``DVP[q, rows, :]``, a slice only this program
touches (read-modify-write in program order, a barrier between the iterations). The host then sums the R (Q)
partials with one ``torch.sum`` over the leading dimension: a fixed order, so two runs on the same device give
bit-identical results. Extra traffic: 4·K·(R/M + Q/N) bytes per element written and read once (R, Q ≈ the
square root of the program count), see ``benchmarks/bench_kernels.py``'s roofline.

Pass 2 (apply) re-reads each tile and subtracts U C' and (DV) Vᵀ, walking K in chunks of BK (:func:`apply_tile`).
Math is fp32 whatever the storage dtype; every tensor is converted to fp32 right after its load (also because
bf16 arithmetic is wrong in Triton's CPU interpreter).

Launch configurations are fixed per (pass, padded K, precision): no autotuning. Autotuning would clone the
moments (``restore_value``) and compile every candidate on the first step (seconds per config); the shipped
choices are the ones ``benchmarks/bench_kernels_sm90.py`` compiles for sm_90/sm_80 without spills, see
``benchmarks/results/kernels_sm90.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the platform
    raise ImportError(
        "offprincipal.kernels needs Triton (Linux x86_64 with a CUDA GPU); the torch backend works without it"
    ) from exc

from offprincipal._sides import (
    DEFAULT_PRECISION, PRECISIONS, AllReduce, check_precision, fp32_matmuls, uses_left, uses_right,
)

__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "check_precision"]


NOT_SPECIALIZED = ("M", "RT", "QT")
"""Integer arguments the kernels are not specialized on (``triton.jit(do_not_specialize=...)``): the row count and
pass 1's rectangle size only bound loops and row masks, so a value of 1 or a multiple of 16 would only multiply the
compiled variants (by matrix height and GPU size). N, K and the strides stay specialized: N's and the row stride's
divisibility by 16 let the loads along a row be vectorized, and K is always a multiple of 16 (:func:`stored_k`)."""


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
def rectangle(M, N, RT, QT, BM: tl.constexpr, BN: tl.constexpr):
    """Pass 1: (r, q, first row tile, end row tile, first column tile, end column tile) of this program."""
    r, q = tl.program_id(0), tl.program_id(1)
    i0, j0 = r * RT, q * QT
    return r, q, i0, tl.minimum(i0 + RT, tl.cdiv(M, BM)), j0, tl.minimum(j0 + QT, tl.cdiv(N, BN))


@triton.jit
def span(t, size, B: tl.constexpr):
    """Indices of tile ``t`` (B wide) along a dimension of ``size`` and their in-bounds mask."""
    idx = t * B + tl.arange(0, B)
    return idx, idx < size


@triton.jit
def tile_indices(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Rows and columns of this program's tile (grid = row tiles × column tiles) and their in-bounds masks."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    return rows, cols, rows < M, cols < N


@triton.jit
def _accumulate(P, offsets, mask, again, part):
    """P[offsets] ← part (+ P[offsets] when ``again``): a partial only this program writes, in program order."""
    part += tl.load(P + offsets, mask=mask & again, other=0.0)
    tl.store(P + offsets, part, mask=mask)


@triton.jit
def reduce_tile(
    d, acc, rows, cols, row_mask, col_mask, U, V, CP, DVP, M, N, K, r, q, i_again, j_again,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 1 for one fp32 tile d = D[rows, cols] (BM×BN, zero outside the matrix); returns the new ``acc``.

    LEFT:  UᵀD[:, cols] of this row tile: into ``acc`` (KP×BN, registers) when BK == KP, else added into the
           partial CP[r, :, cols] chunk by chunk of BK (``i_again``: not the rectangle's first row tile)
    RIGHT: DVP[q, rows, :] ← (DVP[q, rows, :] if ``j_again`` else 0) + d V[cols, :]   (BM×K, chunks of BK)
    U (M, K), V (N, K), CP (R, K, N), DVP (Q, M, K) are contiguous fp32.
    """
    r64, c64 = rows.to(tl.int64), cols.to(tl.int64)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < K
        if LEFT:
            u = tl.load(U + r64[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if BK == KP:
                acc = tl.dot(tl.trans(u), d, acc, input_precision=PRECISION)
            else:
                part = tl.dot(tl.trans(u), d, input_precision=PRECISION)
                again = (cols * 0 + i_again) != 0  # tensors: scalar masks are not broadcast by every Triton version
                _accumulate(CP, r.to(tl.int64) * K * N + ks[:, None].to(tl.int64) * N + c64[None, :],
                            k_mask[:, None] & col_mask[None, :], again[None, :], part)
        if RIGHT:
            v = tl.load(V + c64[:, None] * K + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            part = tl.dot(d, v, input_precision=PRECISION)
            again = (ks * 0 + j_again) != 0
            _accumulate(DVP, q.to(tl.int64) * M * K + r64[:, None] * K + ks[None, :],
                        row_mask[:, None] & k_mask[None, :], again[None, :], part)
    tl.debug_barrier()  # the partials are re-read later by this program, maybe by other threads
    return acc


@triton.jit
def store_partial(CP, acc, cols, col_mask, N, K, r, KP: tl.constexpr):
    """CP[r, :K, cols] ← acc (the UᵀD partial of row chunk r, when it was kept in registers)."""
    ks = tl.arange(0, KP)
    offsets = r.to(tl.int64) * K * N + ks[:, None].to(tl.int64) * N + cols.to(tl.int64)[None, :]
    tl.store(CP + offsets, acc, mask=(ks < K)[:, None] & col_mask[None, :])


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


# ---------------------------------------------------------------------------------------------------------------
# launch configurations


@dataclass(frozen=True)
class TileConfig:
    """A launch configuration. ``maxnreg``: the register cap given to ptxas. Without one, ptxas picked 32–128
    registers and spilled 8–24 bytes in some one-sided variants (sm_90 and sm_80 compile report); with the cap at
    255 it takes what the kernel needs (≈ 60–240) and spills nothing."""

    BM: int
    BN: int
    num_warps: int
    num_stages: int
    maxnreg: int = 255

    def launch(self) -> dict:
        return dict(BM=self.BM, BN=self.BN, num_warps=self.num_warps, num_stages=self.num_stages,
                    **({} if INTERPRETED else {"maxnreg": self.maxnreg}))


KPS = (16, 32, 64, 128, 256)
"""Padded K of pass 1 (tl.dot needs ≥ 16); larger k is refused (the bases of one weight are rarely wider)."""
MAX_K = KPS[-1]

# The shipped configurations by (padded k, precision) for pass 1 and (K chunk, precision) for pass 2, chosen from the
# sm_90 / sm_80 compile report (no spills, every dtype); tests/test_kernels_sm90.py checks the committed report (tf32x3
# at padded k 128/256 moved from 32×64 to 32×32 tiles: 32×64 spilled 8 B on sm_80 in bf16/fp16 with n not a multiple of
# 16). Pass 1
# at padded k > 64 adds UᵀD into its partial chunk by chunk (BK = 64), so 128 and 256 share their tiles.
_T = TileConfig
REDUCE_CONFIGS: dict[tuple[int, str], TileConfig] = {
    (16, "tf32x3"): _T(16, 64, 8, 1), (16, "ieee"): _T(64, 32, 8, 1), (16, "tf32"): _T(32, 32, 4, 1),
    (32, "tf32x3"): _T(64, 32, 8, 1), (32, "ieee"): _T(32, 32, 8, 1), (32, "tf32"): _T(64, 32, 8, 1),
    (64, "tf32x3"): _T(32, 32, 8, 1), (64, "ieee"): _T(32, 32, 8, 1), (64, "tf32"): _T(32, 32, 8, 1),
    **{(kp, precision): cfg for kp in (128, 256) for precision, cfg in
       (("tf32x3", _T(32, 32, 8, 1)), ("ieee", _T(32, 32, 8, 1)), ("tf32", _T(32, 64, 8, 1)))},
}
APPLY_CONFIGS: dict[tuple[int, str], TileConfig] = {
    (bk, precision): _T(32, 64, 8, 1) for bk in (16, 32) for precision in PRECISIONS
}
INTERPRETER_CONFIG = TileConfig(64, 64, 4, 1)  # its cost is per program: few, large tiles


def padded_k(k: int) -> int:
    """Padded K of pass 1: the next power of two ≥ max(k, 16) (the width of its UᵀD accumulator)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"the fused kernels support 1 ≤ k ≤ {MAX_K} principal directions, got k = {k}")
    return max(16, triton.next_power_of_2(k))


K_ALIGN = 16


def stored_k(k: int) -> int:
    """Columns of U and V as the kernels see them: k rounded up to a multiple of 16, the extra columns zero.

    Zero columns change no result (they add exact zeros to every product, and the K chunks of both passes are the
    same as for k), but a multiple of 16 lets the compiler prove the bases' rows 64-byte aligned: with k = 40 or 100
    (not a multiple of 16) pass 1 spilled 8–40 B on sm_80 (benchmarks/results/kernels_sm90.md)."""
    padded_k(k)
    return -(-k // K_ALIGN) * K_ALIGN


def block_k(k: int) -> int:
    """Chunk of the K dimension in pass 2: ≥16 (tl.dot's minimum; missing columns are masked to 0), ≤32 (its
    operands are split in two for tf32x3: larger chunks spill, see the compile report)."""
    return min(32, padded_k(k))


def reduce_block_k(k: int) -> int:
    """K chunk of pass 1: all of the padded k up to 64 (UᵀD then accumulates in registers), else 64."""
    return min(64, padded_k(k))


def reduce_config(k: int, precision: str) -> TileConfig:
    return INTERPRETER_CONFIG if INTERPRETED else REDUCE_CONFIGS[padded_k(k), check_precision(precision)]


def apply_config(k: int, precision: str) -> TileConfig:
    return INTERPRETER_CONFIG if INTERPRETED else APPLY_CONFIGS[block_k(k), check_precision(precision)]


def target_programs(device: torch.device) -> int:
    """Programs of pass 1: two per multiprocessor on a GPU (a fixed number per device, so results repeat)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rectangles(m: int, n: int, cfg: TileConfig, programs: int) -> tuple[int, int, int, int]:
    """(R, Q, RT, QT): pass 1's grid R×Q of rectangles of RT×QT tiles covering the (m, n) matrix, about
    ``programs`` of them, shaped so that the partials (R·K·n + Q·m·K) stay small."""
    row_tiles, col_tiles = max(1, triton.cdiv(m, cfg.BM)), max(1, triton.cdiv(n, cfg.BN))
    # partial elements R·K·n + Q·m·K with R·Q = P are smallest at R/Q = m/n
    R = max(1, min(row_tiles, round(math.sqrt(programs * m / max(n, 1)))))
    Q = max(1, min(col_tiles, triton.cdiv(programs, R)))
    RT, QT = triton.cdiv(row_tiles, R), triton.cdiv(col_tiles, Q)
    return triton.cdiv(row_tiles, RT), triton.cdiv(col_tiles, QT), RT, QT


class Bases:
    """The bases, pass-1 partials and pass-2 coefficients of one projection of an (m, n) matrix.

    ``U`` (m, K) and ``V`` (n, K) become contiguous fp32 on the matrix's device, K = :func:`stored_k` (k padded
    with zero columns to a multiple of 16; an empty placeholder for an unused side); ``CP`` (R, K, n) and
    ``DVP`` (Q, m, K) receive pass 1's partials, :meth:`combine_` sums them into ``C`` (K, n) and ``DV`` (m, K),
    whose rows / columns past k are zero.
    """

    def __init__(self, shape: tuple[int, int], U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str,
                 device: torch.device, precision: str = DEFAULT_PRECISION, what: str = "D"):
        m, n = shape
        self.shape = shape
        self.left, self.right = uses_left(sides), uses_right(sides)
        self.placeholder = torch.empty(0, device=device, dtype=torch.float32)
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
        self.K = K = stored_k(k)
        self.U = _padded(U, K, device) if self.left else self.placeholder
        self.V = _padded(V, K, device) if self.right else self.placeholder
        self.precision = check_precision(precision)
        self.reduce_cfg, self.apply_cfg = reduce_config(k, precision), apply_config(k, precision)
        self.R, self.Q, self.RT, self.QT = rectangles(m, n, self.reduce_cfg, target_programs(device))
        self.CP = torch.empty(self.R, K, n, device=device, dtype=torch.float32) if self.left else self.placeholder
        self.DVP = torch.empty(self.Q, m, K, device=device, dtype=torch.float32) if self.right else self.placeholder
        self.C = self.DV = self.placeholder

    def reduce_grid(self) -> tuple[int, int]:
        return self.R, self.Q

    def apply_grid(self) -> tuple[int, int]:
        m, n = self.shape
        return triton.cdiv(m, self.apply_cfg.BM), triton.cdiv(n, self.apply_cfg.BN)

    def reduce_args(self) -> tuple:
        return self.U, self.V, self.CP, self.DVP

    def apply_args(self) -> tuple:
        return self.U, self.V, self.C, self.DV

    def combine_(self, all_reduce: Optional[AllReduce], extra_c=None, extra_dv=None) -> None:
        """Between the passes: sum the partials (fixed order), the shards (``all_reduce``) and the optional
        exact additions (``extra_c`` k×n after the all-reduce, ``extra_dv`` m×k, into the first k rows / columns),
        then C ← C − (CV)Vᵀ when both sides are projected. The all-reduce gets C's first k rows (k×n, contiguous:
        the padding rows are zero on every rank)."""
        m, n = self.shape
        k = self.k
        if self.left:
            self.C = self.CP.sum(0) if m else torch.zeros(self.K, n, device=self.CP.device)
            if all_reduce is not None:
                all_reduce(self.C[:k])
            if extra_c is not None:
                self.C[:k] += extra_c
        if self.right:
            self.DV = self.DVP.sum(0) if n else torch.zeros(m, self.K, device=self.DVP.device)
            if extra_dv is not None:
                self.DV[:, :k] += extra_dv
        if self.left and self.right:
            with fp32_matmuls(self.precision):
                self.C -= (self.C @ self.V) @ self.V.T

    def reduce_constexprs(self) -> dict:
        return dict(LEFT=self.left, RIGHT=self.right, KP=padded_k(self.k), BK=reduce_block_k(self.k),
                    PRECISION=self.precision, **self.reduce_cfg.launch())

    def apply_constexprs(self) -> dict:
        return dict(LEFT=self.left, RIGHT=self.right, BK=block_k(self.k), PRECISION=self.precision,
                    **self.apply_cfg.launch())


def _padded(B: torch.Tensor, K: int, device: torch.device) -> torch.Tensor:
    """B (rows, k) as contiguous fp32 on ``device`` with K − k zero columns appended (B itself when nothing changes)."""
    B = B.to(device=device, dtype=torch.float32)
    if B.shape[1] == K:
        return B.contiguous()
    out = torch.zeros(B.shape[0], K, device=device, dtype=torch.float32)
    out[:, : B.shape[1]] = B
    return out


def check_device(what: str, t: torch.Tensor) -> None:
    if not (t.is_cuda or (INTERPRETED and t.device.type == "cpu")):
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, but {what} is on {t.device}; use offprincipal.projection's "
            "backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before importing offprincipal.kernels."
        )


def on_device(t: torch.Tensor):
    """Launch context: the tensor's CUDA device current (its current stream is where Triton launches)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
