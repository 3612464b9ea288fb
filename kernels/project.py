"""Fused in-place off-principal projection: D ← P(D) in two passes over D (see ``_tiles`` for the math).

Pass 1 reads D once and forms UᵀD (k×n) and DV (m×k); pass 2 reads D again and writes P(D) in place.
Traffic: 3·m·n elements of D's dtype (2 reads, 1 write) plus O(k·(m+n)) for the bases.
Torch reference: :func:`offprincipal.projection.project`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from offprincipal.projection import AllReduce, check_sides

from ._tiles import (
    DEFAULT_PRECISION, Bases, apply_tile, check_device, grid, load_tile, reduce_tile, store_tile, tile_configs,
    tile_indices,
)


@triton.autotune(configs=tile_configs(), key=["M", "N", "K", "LEFT", "RIGHT"], reset_to_zero=["C", "DV"])
@triton.jit
def _project_reduce_kernel(
    D, U, V, C, DV, M, N, K, s0, s1,
    LEFT: tl.constexpr, RIGHT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 1: C += UᵀD, DV += DV over this program's tile of D (M, N)."""
    rows, cols, row_mask, col_mask = tile_indices(M, N, BM, BN)
    d = load_tile(D, rows, cols, row_mask[:, None] & col_mask[None, :], s0, s1)
    reduce_tile(d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K, LEFT, RIGHT, BK, PRECISION)


@triton.autotune(configs=tile_configs(), key=["M", "N", "K", "LEFT", "RIGHT"], restore_value=["D"])
@triton.jit
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
    """In place ``D ← P(D)`` for D (m, n) of any float dtype and any strides; U (m, k), V (n, k). Returns D.

    ``all_reduce``: D and U are matching row shards; UᵀD is summed over them between the passes (call it on
    every rank, also with 0 local rows). ``precision``: ``tl.dot`` input precision for fp32 ("ieee" is exact
    fp32; "tf32x3" is ~fp32 accuracy and faster on tensor cores; "tf32" loses ~3 decimal digits).
    """
    check_sides(sides)
    check_device("D", D)
    if D.ndim != 2:
        raise ValueError(f"project_ needs a 2-D tensor, got shape {tuple(D.shape)}")
    m, n = D.shape
    bases = Bases((m, n), U, V, sides, D.device)
    if D.numel():
        _project_reduce_kernel[grid(m, n)](
            D, *bases.launch_args(), m, n, bases.k, D.stride(0), D.stride(1), **bases.constexprs(precision)
        )
    bases.combine_(all_reduce)
    if D.numel():
        _project_apply_kernel[grid(m, n)](
            D, *bases.launch_args(), m, n, bases.k, D.stride(0), D.stride(1), **bases.constexprs(precision)
        )
    return D
