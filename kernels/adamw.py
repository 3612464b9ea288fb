"""Fused projected-AdamW step: W ← W − P(D) with D the whole AdamW update, in two passes.

With g the gradient (negated when maximizing), t the step, bc1 = 1 − β1ᵗ, bc2 = 1 − β2ᵗ:

    m ← m + (1 − β1)(g − m),   v ← β2 v + (1 − β2) g²                   (stored in m's / v's dtype)
    D = A + lr·wd · W,   A = (step_size · m) / (√v / √bc2 + ε),   step_size = lr / bc1
    W ← W − P(D),   P(D) = D − U C' − (DV) Vᵀ   (see ``_tiles``)

Pass 1 reads g, m, v, writes m, v, and reduces UᵀD and DV of the update; pass 2 reads W, m, v, recomputes D
bit-identically (from the moments as stored), subtracts the projections and writes W. Traffic per element
(fp32): 36 bytes (fused AdamW: 28), plus pass 1's partials (see ``_tiles``).

Weight decay without reading W in pass 1: UᵀD = UᵀA + lr·wd·(UᵀW) and DV = AV + lr·wd·(WV). While W changes
only by off-principal updates, UᵀW (sides "both"/"left") and WV ("both"/"right") keep their values at the
bases' construction, so the caller passes them once (``wd_terms``) and pass 1 reads 3 tensors instead of 4.
Without ``wd_terms``, pass 1 reads W (40 bytes per element).

The step scalars (step_size, bc2_sqrt, lr_wd) may be Python numbers or 0-d tensors on the parameter's device
(a capturable step: no host synchronisation, the values are read by the kernels at run time).

Device-side skip (``ok``): a 0-d int32 tensor on the parameter's device, read by both kernels at run time. Where
it is 0 the moments and the weight are not stored (pass 1 and pass 2 mask their stores), so W, m and v keep their
values bit for bit; the partial sums are still formed and combined (all ranks run the same collectives).
Torch reference: :func:`offprincipal.optim.adamw_update_` with backend="torch".
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from offprincipal._sides import DEFAULT_PRECISION, AllReduce, check_sides

from ._tiles import (
    NOT_SPECIALIZED, Bases, apply_tile, check_device, load_tile, on_device, rectangle, reduce_tile, span, store_partial,
    store_tile, tile_indices,
)

Scalar = Union[float, torch.Tensor]
_SCALAR_POINTERS = ("HYPER", "OK")  # read one element at a time: their alignment would only multiply the variants


@triton.jit
def _load_scalars(HYPER, step_size, bc2_sqrt, lr_wd, HYPER_ON_DEVICE: tl.constexpr):
    """(step_size, bc2_sqrt, lr_wd) from the device vector HYPER, or the values passed by value."""
    if HYPER_ON_DEVICE:
        step_size = tl.load(HYPER)
        bc2_sqrt = tl.load(HYPER + 1)
        lr_wd = tl.load(HYPER + 2)
    return step_size, bc2_sqrt, lr_wd


@triton.jit
def _load_ok(OK, HAS_OK: tl.constexpr):
    """The device flag OK (int32, nonzero = store this step's results) as an int32 scalar; 1 without HAS_OK."""
    if HAS_OK:
        ok = tl.load(OK)
    else:
        ok = 1
    return ok


@triton.jit
def _store_mask(mask, ok, HAS_OK: tl.constexpr):
    """``mask`` where the step stores (the flag ``ok`` nonzero), all false where it is skipped."""
    if HAS_OK:
        mask = mask & (tl.zeros_like(mask.to(tl.int32)) + ok != 0)
    return mask


@triton.jit
def _adam_direction(m, v, step_size, bc2_sqrt, eps):
    """A = step_size·m / (√v/√bc2 + ε) (fp32), in torch AdamW's order of operations."""
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), bc2_sqrt) + eps
    return tl.math.div_rn(m * step_size, denom)


@triton.jit(do_not_specialize=NOT_SPECIALIZED, do_not_specialize_on_alignment=_SCALAR_POINTERS)
def _adamw_reduce_kernel(
    W, G, EXP_AVG, EXP_AVG_SQ, U, V, CP, DVP, HYPER, OK, M, N, K, RT, QT,
    sw0, sw1, sg0, sg1, sm0, sm1, sv0, sv1,
    one_minus_beta1, beta2, one_minus_beta2, grad_sign, step_size, bc2_sqrt, eps, lr_wd,
    READ_W: tl.constexpr, HYPER_ON_DEVICE: tl.constexpr, HAS_OK: tl.constexpr, LEFT: tl.constexpr,
    RIGHT: tl.constexpr, KP: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 1 over this program's rectangle of tiles: update and store the moments, reduce UᵀD and DV of the
    update (of A alone unless READ_W: the weight-decay part is then added on the host). With HAS_OK, the moments
    are stored only where the device flag OK is nonzero."""
    step_size, bc2_sqrt, lr_wd = _load_scalars(HYPER, step_size, bc2_sqrt, lr_wd, HYPER_ON_DEVICE)
    ok = _load_ok(OK, HAS_OK)
    r, q, i0, i1, j0, j1 = rectangle(M, N, RT, QT, BM, BN)
    for j in range(j0, j1):
        cols, col_mask = span(j, N, BN)
        acc = tl.zeros((BK, BN), dtype=tl.float32)  # used when BK == KP (UᵀD kept in registers)
        for i in range(i0, i1):
            rows, row_mask = span(i, M, BM)
            mask = row_mask[:, None] & col_mask[None, :]
            g = load_tile(G, rows, cols, mask, sg0, sg1) * grad_sign
            m = load_tile(EXP_AVG, rows, cols, mask, sm0, sm1)
            v = load_tile(EXP_AVG_SQ, rows, cols, mask, sv0, sv1)
            m = m + one_minus_beta1 * (g - m)
            v = v * beta2 + one_minus_beta2 * (g * g)
            keep = _store_mask(mask, ok, HAS_OK)
            store_tile(EXP_AVG, m, rows, cols, keep, sm0, sm1)
            store_tile(EXP_AVG_SQ, v, rows, cols, keep, sv0, sv1)
            m = m.to(EXP_AVG.dtype.element_ty).to(tl.float32)  # the values pass 2 will read back
            v = v.to(EXP_AVG_SQ.dtype.element_ty).to(tl.float32)
            d = _adam_direction(m, v, step_size, bc2_sqrt, eps)
            if READ_W:
                d = d + lr_wd * load_tile(W, rows, cols, mask, sw0, sw1)
            d = tl.where(mask, d, 0.0)
            acc = reduce_tile(d, acc, rows, cols, row_mask, col_mask, U, V, CP, DVP, M, N, K, r, q, i - i0, j - j0,
                              LEFT, RIGHT, KP, BK, PRECISION)
        if LEFT and BK == KP:
            store_partial(CP, acc, cols, col_mask, N, K, r, KP)


@triton.jit(do_not_specialize=NOT_SPECIALIZED, do_not_specialize_on_alignment=_SCALAR_POINTERS)
def _adamw_apply_kernel(
    W, EXP_AVG, EXP_AVG_SQ, U, V, C, DV, HYPER, OK, M, N, K,
    sw0, sw1, sm0, sm1, sv0, sv1,
    step_size, bc2_sqrt, eps, lr_wd,
    HAS_WD: tl.constexpr, HYPER_ON_DEVICE: tl.constexpr, HAS_OK: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
    BK: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Pass 2: recompute D from the stored moments, W ← W − (D − U C' − (DV) Vᵀ) (stored only where the device
    flag OK is nonzero, with HAS_OK)."""
    step_size, bc2_sqrt, lr_wd = _load_scalars(HYPER, step_size, bc2_sqrt, lr_wd, HYPER_ON_DEVICE)
    ok = _load_ok(OK, HAS_OK)
    rows, cols, row_mask, col_mask = tile_indices(M, N, BM, BN)
    mask = row_mask[:, None] & col_mask[None, :]
    w = load_tile(W, rows, cols, mask, sw0, sw1)
    m = load_tile(EXP_AVG, rows, cols, mask, sm0, sm1)
    v = load_tile(EXP_AVG_SQ, rows, cols, mask, sv0, sv1)
    d = _adam_direction(m, v, step_size, bc2_sqrt, eps)
    if HAS_WD:
        d = d + lr_wd * w
    d = apply_tile(d, rows, cols, row_mask, col_mask, U, V, C, DV, N, K, LEFT, RIGHT, BM, BN, BK, PRECISION)
    store_tile(W, w - d, rows, cols, _store_mask(mask, ok, HAS_OK), sw0, sw1)


def _scalars(values: tuple, device: torch.device):
    """(HYPER tensor or placeholder, the three values as floats or 0.0, on-device flag)."""
    if not any(torch.is_tensor(x) for x in values):
        return torch.empty(0, device=device, dtype=torch.float32), tuple(float(x) for x in values), False
    parts = [x.to(device=device, dtype=torch.float32).reshape(1) if torch.is_tensor(x)
             else torch.full((1,), float(x), device=device, dtype=torch.float32) for x in values]
    return torch.cat(parts), (0.0, 0.0, 0.0), True


def wd_terms(param: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str,
             all_reduce: Optional[AllReduce] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(UᵀW, WV) of a weight in fp32 at full precision, for ``projected_adamw_step_(wd_terms=...)``: compute them
    once (e.g. when the bases are made) — they stay fixed while W changes only by off-principal updates.
    ``all_reduce`` sums UᵀW over row shards (a collective). A side that is not projected gives None."""
    from offprincipal._sides import fp32_matmuls, uses_left, uses_right

    with torch.no_grad(), fp32_matmuls("ieee"):
        W = param.float()
        utw = wv = None
        if uses_left(sides):
            utw = U.to(W).T @ W
            if all_reduce is not None:
                all_reduce(utw)
        if uses_right(sides):
            wv = W @ V.to(W)
    return utw, wv


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
    step_size: Scalar,
    bc2_sqrt: Scalar,
    lr_wd: Scalar,
    maximize: bool = False,
    all_reduce: Optional[AllReduce] = None,
    precision: str = DEFAULT_PRECISION,
    wd_terms: Optional[tuple] = None,
    ok: Optional[torch.Tensor] = None,
) -> None:
    """One fused projected-AdamW step on a 2-D ``param`` (m, n), in place on param, exp_avg, exp_avg_sq.

    The four tensors share the shape (m, n) and may each be fp32, bf16 or fp16 with any strides; U (m, k),
    V (n, k), k ≤ 256. The step scalars (``step_size = lr/bc1``, ``bc2_sqrt = √bc2``, ``lr_wd = lr·weight_decay``,
    as :func:`offprincipal.optim.adam_scalars` computes them) are numbers or 0-d tensors: with tensors the
    step has no host synchronisation and can be captured in a CUDA graph. A number ``lr_wd == 0`` skips the
    weight decay. ``wd_terms``: (UᵀW, WV) from :func:`wd_terms` (None entries for an unprojected side): pass 1
    then does not read W. ``all_reduce``: the tensors are row shards and UᵀD is summed over the shards between
    the passes (``wd_terms``' UᵀW is then the full sum, its WV the local rows). Launches on param's device and
    current stream. Deterministic: the same inputs on the same device give bit-identical results. ``ok``: a
    one-element tensor on param's device (any dtype; read at run time, no host synchronisation): where it is 0
    the step stores nothing (param, exp_avg and exp_avg_sq keep their values bit for bit); None always steps.
    """
    check_sides(sides)
    for what, t in (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_device(what, t)
        if t.shape != param.shape or t.ndim != 2:
            raise ValueError(f"{what} has shape {tuple(t.shape)}; expected the 2-D param shape {tuple(param.shape)}")
    m, n = param.shape
    bases = Bases((m, n), U, V, sides, param.device, precision, what="param")
    has_wd = torch.is_tensor(lr_wd) or lr_wd != 0
    read_w = has_wd and wd_terms is None
    with on_device(param):
        hyper, (step_size, bc2_sqrt, lr_wd), on_dev = _scalars((step_size, bc2_sqrt, lr_wd), param.device)
        scalars = dict(step_size=step_size, bc2_sqrt=bc2_sqrt, eps=eps, lr_wd=lr_wd, HYPER_ON_DEVICE=on_dev,
                       HAS_OK=ok is not None)
        if ok is None:
            ok_flag = hyper  # placeholder pointer, never read
        else:
            if ok.numel() != 1 or ok.device != param.device:
                raise ValueError(f"ok must be a one-element tensor on {param.device}; "
                                 f"got shape {tuple(ok.shape)} on {ok.device}")
            ok_flag = ok.reshape(1) if ok.dtype == torch.int32 else ok.reshape(1).to(torch.int32)
        if param.numel():
            _adamw_reduce_kernel[bases.reduce_grid()](
                param, grad, exp_avg, exp_avg_sq, *bases.reduce_args(), hyper, ok_flag, m, n, bases.K, bases.RT,
                bases.QT,
                *param.stride(), *grad.stride(), *exp_avg.stride(), *exp_avg_sq.stride(),
                one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                grad_sign=-1.0 if maximize else 1.0, READ_W=read_w, **scalars, **bases.reduce_constexprs(),
            )
        extra_c = extra_dv = None
        if has_wd and not read_w:
            scale = hyper[2] if on_dev else lr_wd
            utw, wv = wd_terms
            extra_c = utw * scale if bases.left else None
            extra_dv = wv * scale if bases.right else None
        bases.combine_(all_reduce, extra_c, extra_dv)
        if param.numel():
            _adamw_apply_kernel[bases.apply_grid()](
                param, exp_avg, exp_avg_sq, *bases.apply_args(), hyper, ok_flag, m, n, bases.K,
                *param.stride(), *exp_avg.stride(), *exp_avg_sq.stride(), HAS_WD=has_wd, **scalars,
                **bases.apply_constexprs(),
            )
