"""Fused in-place off-principal projection: D ← P(D) in two passes over D (see ``_tiles`` for the math).

Pass 1 reads D once and forms the partials of UᵀD (k×n) and DV (m×k); pass 2 reads D again and writes P(D)
in place. Traffic: 3·m·n elements of D's dtype (2 reads, 1 write) plus the partials and O(k·(m+n)) for the bases.
Torch reference: :func:`offprincipal.projection.project`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from offprincipal._sides import DEFAULT_PRECISION, AllReduce, check_sides

from ._tiles import (
    NOT_SPECIALIZED, Bases, apply_tile, check_device, load_tile, on_device, rectangle, reduce_tile, span, store_partial,
    store_tile, tile_indices,
)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _project_reduce_kernel(
    D, U, V, CP, DVP, M, N, K, s0, s1, RT, QT,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 1 over this program's rectangle of tiles of D (M, N): partials of UᵀD into CP, of DV into DVP."""
    r, q, i0, i1, j0, j1 = rectangle(M, N, RT, QT, BM, BN)
    for j in range(j0, j1):
        cols, col_mask = span(j, N, BN)
        acc = tl.zeros((BK, BN), dtype=tl.float32)  # used when BK == KP (UᵀD kept in registers)
        for i in range(i0, i1):
            rows, row_mask = span(i, M, BM)
            d = load_tile(D, rows, cols, row_mask[:, None] & col_mask[None, :], s0, s1)
            acc = reduce_tile(d, acc, rows, cols, row_mask, col_mask, U, V, CP, DVP, M, N, K, r, q, i - i0, j - j0,
                              LEFT, RIGHT, KP, BK, PRECISION)
        if LEFT and BK == KP:
            store_partial(CP, acc, cols, col_mask, N, K, r, KP)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _project_apply_kernel(
    D, U, V, C, DV, M, N, K, s0, s1,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 2: D ← D − U C' − (DV) Vᵀ on this program's tile, in place."""
    rows, cols, row_mask, col_mask = tile_indices(M, N, BM, BN)
    mask = row_mask[:, None] & col_mask[None, :]
    d = load_tile(D, rows, cols, mask, s0, s1)
    d = apply_tile(d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K, LEFT, RIGHT, BM, BN, BK, PRECISION)
    store_tile(D, d, rows, cols, mask, s0, s1)


def project_(
    D: torch.Tensor,
    U: Optional[torch.Tensor],
    V: Optional[torch.Tensor],
    sides: str = "both",
    *,
    all_reduce: Optional[AllReduce] = None,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """In place ``D ← P(D)`` for D (m, n) of any float dtype and any strides; U (m, k), V (n, k), k ≤ 256.
    Returns D. Launches on D's device and that device's current stream; no host synchronisation.

    ``all_reduce``: D and U are matching row shards; UᵀD is summed over them between the passes (call it on
    every rank, also with 0 local rows). ``precision``: fp32 dot-product precision (see ``offprincipal._sides``).
    Deterministic: the same inputs on the same device give bit-identical results.
    """
    check_sides(sides)
    check_device("D", D)
    if D.ndim != 2:
        raise ValueError(f"project_ needs a 2-D tensor, got shape {tuple(D.shape)}")
    m, n = D.shape
    bases = Bases((m, n), U, V, sides, D.device, precision)
    with on_device(D):
        if D.numel():
            _project_reduce_kernel[bases.reduce_grid()](
                D, *bases.reduce_args(), m, n, bases.K, D.stride(0), D.stride(1), bases.RT, bases.QT,
                **bases.reduce_constexprs(),
            )
        bases.combine_(all_reduce)
        if D.numel():
            _project_apply_kernel[bases.apply_grid()](
                D, *bases.apply_args(), m, n, bases.K, D.stride(0), D.stride(1), **bases.apply_constexprs()
            )
    return D
