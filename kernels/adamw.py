"""Fused projected-AdamW step: W ← W − P(D) with D the whole AdamW update, in two passes.

With g the gradient (negated when maximizing), t the step, bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ:

    m ← m + (1 − β1)(g − m),   v ← β2 v + (1 − β2) g²                   (stored in m's / v's dtype)
    D = (step_size · m) / (√v / √bc2 + ε) + lr·wd · W,   step_size = lr / bc1
    W ← W − P(D),   P(D) = D − U C' − (DV) Vᵀ   (see ``_tiles``)

Pass 1 reads g, m, v (and W when wd ≠ 0), writes m, v, and reduces UᵀD and DV of the update; pass 2 reads
W, m, v, recomputes D bit-identically (from the moments as stored), subtracts the projections and writes W.
Traffic per element (fp32): 36 bytes without weight decay, 40 with it (fused AdamW: 28).
D is computed from the stored (rounded) moments in both passes, so pass 2 applies exactly the update whose
coefficients pass 1 reduced. Torch reference: :func:`offprincipal.optim.adamw_update_` with backend="torch".
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


@triton.jit
def _adam_direction(w, m, v, step_size, bc2_sqrt, eps, lr_wd, HAS_WD: tl.constexpr):
    """The unprojected AdamW update D (fp32), evaluated in torch AdamW's order of operations."""
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    d = tl.math.div_rn(m * step_size, denom)
    if HAS_WD:
        d = d + lr_wd * w
    return d


@triton.autotune(
    configs=tile_configs(), key=["M", "N", "K", "LEFT", "RIGHT", "HAS_WD"],
    reset_to_zero=["C", "DV"], restore_value=["EXP_AVG", "EXP_AVG_SQ"],
)
@triton.jit
def _adamw_reduce_kernel(
    W, G, EXP_AVG, EXP_AVG_SQ, U, V, C, DV, M, N, K,
    sw0, sw1, sg0, sg1, sm0, sm1, sv0, sv1,
    one_minus_beta1, beta2, one_minus_beta2, grad_sign, step_size, bc2_sqrt, eps, lr_wd,
    HAS_WD: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 1: update and store the moments, then C += UᵀD and DV += DV for this tile's update D."""
    rows, cols, row_mask, col_mask = tile_indices(M, N, BM, BN)
    mask = row_mask[:, None] & col_mask[None, :]
    g = load_tile(G, rows, cols, mask, sg0, sg1) * grad_sign
    m = load_tile(EXP_AVG, rows, cols, mask, sm0, sm1)
    v = load_tile(EXP_AVG_SQ, rows, cols, mask, sv0, sv1)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    store_tile(EXP_AVG, m, rows, cols, mask, sm0, sm1)
    store_tile(EXP_AVG_SQ, v, rows, cols, mask, sv0, sv1)
    m = m.to(EXP_AVG.dtype.element_ty).to(tl.float32)  # the values pass 2 will read back
    v = v.to(EXP_AVG_SQ.dtype.element_ty).to(tl.float32)
    w = m  # placeholder, unused without weight decay
    if HAS_WD:
        w = load_tile(W, rows, cols, mask, sw0, sw1)
    d = _adam_direction(w, m, v, step_size, bc2_sqrt, eps, lr_wd, HAS_WD)
    d = tl.where(mask, d, 0.0)
    reduce_tile(d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K, LEFT, RIGHT, BK, PRECISION)


@triton.autotune(configs=tile_configs(), key=["M", "N", "K", "LEFT", "RIGHT", "HAS_WD"], restore_value=["W"])
@triton.jit
def _adamw_apply_kernel(
    W, EXP_AVG, EXP_AVG_SQ, U, V, C, DV, M, N, K,
    sw0, sw1, sm0, sm1, sv0, sv1,
    step_size, bc2_sqrt, eps, lr_wd,
    HAS_WD: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 2: recompute D from the stored moments, W ← W − (D − U C' − (DV) Vᵀ)."""
    rows, cols, row_mask, col_mask = tile_indices(M, N, BM, BN)
    mask = row_mask[:, None] & col_mask[None, :]
    w = load_tile(W, rows, cols, mask, sw0, sw1)
    m = load_tile(EXP_AVG, rows, cols, mask, sm0, sm1)
    v = load_tile(EXP_AVG_SQ, rows, cols, mask, sv0, sv1)
    d = _adam_direction(w, m, v, step_size, bc2_sqrt, eps, lr_wd, HAS_WD)
    d = apply_tile(d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K, LEFT, RIGHT, BM, BN, BK, PRECISION)
    store_tile(W, w - d, rows, cols, mask, sw0, sw1)


def projected_adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    U: Optional[torch.Tensor],
    V: Optional[torch.Tensor],
    sides: str,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    bc2_sqrt: float,
    lr_wd: float,
    maximize: bool = False,
    all_reduce: Optional[AllReduce] = None,
    precision: str = DEFAULT_PRECISION,
) -> None:
    """One fused projected-AdamW step on a 2-D ``param`` (m, n), in place on param, exp_avg, exp_avg_sq.

    The four tensors share the shape (m, n) and may each be fp32, bf16 or fp16 with any strides; U (m, k),
    V (n, k). The scalars are the host-side AdamW constants (``step_size = lr/bc1``, ``bc2_sqrt = √bc2``,
    ``lr_wd = lr·weight_decay``) as computed by :func:`offprincipal.optim.adamw_update_`.
    ``all_reduce``: the tensors are row shards and UᵀD is summed over the shards between the passes.
    """
    check_sides(sides)
    for what, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_device(what, t)
        if t.shape != param.shape or t.ndim != 2:
            raise ValueError(f"{what} has shape {tuple(t.shape)}; expected the 2-D param shape {tuple(param.shape)}")
    m, n = param.shape
    bases = Bases((m, n), U, V, sides, param.device, what="param")
    common = dict(step_size=step_size, bc2_sqrt=bc2_sqrt, eps=eps, lr_wd=lr_wd, HAS_WD=lr_wd != 0,
                  **bases.constexprs(precision))
    if param.numel():
        _adamw_reduce_kernel[grid(m, n)](
            param, grad, exp_avg, exp_avg_sq, *bases.launch_args(), m, n, bases.k,
            *param.stride(), *grad.stride(), *exp_avg.stride(), *exp_avg_sq.stride(),
            one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
            grad_sign=-1.0 if maximize else 1.0, **common,
        )
    bases.combine_(all_reduce)
    if param.numel():
        _adamw_apply_kernel[grid(m, n)](
            param, exp_avg, exp_avg_sq, *bases.launch_args(), m, n, bases.k,
            *param.stride(), *exp_avg.stride(), *exp_avg_sq.stride(), **common,
        )
