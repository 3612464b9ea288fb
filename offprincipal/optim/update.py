"""The one projected-AdamW update function: torch reference and dispatch to the fused Triton step."""

from __future__ import annotations

from typing import Optional

import torch

from .._sides import DEFAULT_PRECISION
from ..projection import project_, resolve_backend


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------------------------
# the update function


def adam_scalars(step: float, lr: float, beta1: float, beta2: float, weight_decay: float) -> tuple[float, float, float]:
    """Host-side AdamW constants for 1-based ``step``, in torch AdamW's arithmetic (Python floats):
    ``step_size = lr / (1 − β1ᵗ)``, ``bc2_sqrt = (1 − β2ᵗ)^½``, ``lr_wd = lr · weight_decay``. ``step`` and ``lr``
    may be 0-d tensors (the results are then tensors); ``lr_wd`` is the number 0.0 whenever ``weight_decay`` is 0,
    so that a tensor ``lr`` does not make the fused step read W to add zero."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, (lr * weight_decay if weight_decay else 0.0)


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: float,
    U: Optional[torch.Tensor],
    V: Optional[torch.Tensor],
    sides: Optional[str] = "both",
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    all_reduce=None,
    backend: str = "auto",
    precision: str = DEFAULT_PRECISION,
    wd_terms=None,
    ok: Optional[torch.Tensor] = None,
) -> None:
    """One projected AdamW step on a 2-D parameter (m, n), in place on ``param``, ``exp_avg``, ``exp_avg_sq``.

    With g = grad (−grad if ``maximize``) and t = ``step`` (already incremented, 1-based)::

        m ← lerp(m, g, 1 − β1);  v ← β2·v + (1 − β2)·g²                      (stored in their dtypes)
        D = (lr/(1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε) + lr·wd·W             (from the stored m, v)
        W ← W − P(D)

    Math in fp32 (bf16/fp16 storage is read into fp32 and rounded once at the store). ``sides=None`` applies D
    unprojected (used to check the arithmetic against torch AdamW). ``all_reduce``: the tensors are row shards
    and U holds the matching rows (see :func:`offprincipal.projection.project_`). ``backend``: "auto" runs the
    fused Triton step for CUDA tensors, the torch code below otherwise. ``precision``: fp32 product precision
    (see ``offprincipal._sides``). ``step`` and ``lr`` may be 0-d device tensors (no host synchronisation).
    ``wd_terms``: (UᵀW, WV) of the weight (``offprincipal.kernels.wd_terms``), fixed under off-principal updates:
    the fused step then does not read W in its first pass. ``ok``: a one-element tensor on the parameter's device
    (a device-side skip: no host synchronisation); where it is 0, ``param``, ``exp_avg`` and ``exp_avg_sq`` keep
    their values bit for bit (the torch code selects the old values, the fused kernels do not store); where it
    is nonzero the step is bit-identical to ``ok=None``.
    """
    step_size, bc2_sqrt, lr_wd = adam_scalars(step, lr, beta1, beta2, weight_decay)
    if sides is not None and resolve_backend(backend, param, "param") == "triton":
        from ..kernels import projected_adamw_step_

        projected_adamw_step_(
            param, grad, exp_avg, exp_avg_sq, U, V, sides, beta1=beta1, beta2=beta2, eps=eps, step_size=step_size,
            bc2_sqrt=bc2_sqrt, lr_wd=lr_wd, maximize=maximize, all_reduce=all_reduce, precision=precision,
            wd_terms=wd_terms, ok=ok,
        )
        return
    with torch.no_grad():
        g = grad.float()
        if maximize:
            g = -g
        keep = None if ok is None else ok.reshape(()) != 0
        if keep is None:
            m, v = exp_avg.float(), exp_avg_sq.float()  # the tensors themselves when fp32
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if m is not exp_avg:
                exp_avg.copy_(m)
            if v is not exp_avg_sq:
                exp_avg_sq.copy_(v)
        else:  # the same arithmetic out of place, then the old values where the step is skipped
            m = exp_avg.float().lerp(g, 1 - beta1)
            v = exp_avg_sq.float().mul(beta2).addcmul_(g, g, value=1 - beta2)
            exp_avg.copy_(torch.where(keep, m, exp_avg))
            exp_avg_sq.copy_(torch.where(keep, v, exp_avg_sq))
        denom = exp_avg_sq.float().sqrt().div_(bc2_sqrt).add_(eps)
        D = exp_avg.float().mul(step_size).div_(denom)
        if torch.is_tensor(lr_wd):
            D.add_(param.float() * lr_wd)
        elif lr_wd != 0:
            D.add_(param.float(), alpha=lr_wd)
        if sides is not None:
            project_(D, U, V, sides, backend="torch", all_reduce=all_reduce, precision=precision)
        if keep is None:
            param.sub_(D)
        else:
            param.copy_(torch.where(keep, param - D, param))
