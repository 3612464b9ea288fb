"""Off-principal projection in plain torch: the reference for every kernel.

For an update D (m×n) of a weight with top-k bases U (m×k) and V (n×k) (orthonormal columns):

    sides="both":  P(D) = (I − UUᵀ) D (I − VVᵀ) = D − U(UᵀD) − (DV)Vᵀ + U(UᵀDV)Vᵀ
    sides="left":  P(D) = (I − UUᵀ) D
    sides="right": P(D) = D (I − VVᵀ)

P is an orthogonal projector (P∘P = P), so Uᵀ P(D) = 0 (left/both) and P(D) V = 0 (right/both) up to the
orthonormality error of U, V. Math runs in fp32 (fp64 stays fp64) and the result has D's dtype. Cost
O(k·m·n) — never builds an m×m or n×n projector.

Besides the functional :func:`project` (autograd-friendly, used by the adapter) this module has the in-place
:func:`project_` used by the optimizer. It dispatches to the fused Triton kernels of ``offprincipal.kernels``
for CUDA tensors (``backend="auto"``) and runs the torch reference otherwise. Both accept row shards: when D
holds rows ``[a, b)`` of a matrix sharded by rows over a process group (FSDP2's ``Shard(0)``), pass
``U[a:b]`` and an ``all_reduce`` that sums the k×n coefficient ``UᵀD`` over the group; the right side is
row-local. :func:`row_shard` reads the row range and group from a DTensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._sides import (  # noqa: F401  (re-exported: the public names of sides and precisions live here too)
    DEFAULT_PRECISION, PRECISIONS, SIDES, AllReduce, check_precision, check_sides, fp32_matmuls, uses_left, uses_right,
)

BACKENDS = ("auto", "torch", "triton")


def project(
    D: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str = "both"
) -> torch.Tensor:
    """P(D) for one matrix D (m, n) with U (m, k), V (n, k); returns a new tensor of D's dtype.

    Autograd flows through it (the adapter projects its factors in the forward pass with it).
    """
    return _project(D, U, V, sides, None)


def _project(
    D: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str, all_reduce: Optional[AllReduce],
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """The reference: left factor first, ``D − U(UᵀD)``, then the right one, ``X − (XV)Vᵀ``.

    With ``all_reduce``, D and U are matching row shards and ``UᵀD`` (k×n) is summed over the shards.
    The matmuls run at full fp32 whatever the global TF32 switches say (``precision="tf32"`` allows tf32).
    """
    compute = torch.promote_types(D.dtype, torch.float32)
    out = D.to(compute)
    with fp32_matmuls(precision):
        if uses_left(sides):
            U = U.to(compute)
            coeff = U.T @ out
            if all_reduce is not None:
                all_reduce(coeff)
            out = out - U @ coeff
        if uses_right(sides):
            V = V.to(compute)
            out = out - (out @ V) @ V.T
    return out.to(D.dtype)


class _RepeatedProjection(torch.autograd.Function):
    """Pᵖ(D) with a backward that saves nothing but the bases: P is a symmetric linear map, so the gradient of
    Pᵖ(D) is Pᵖ(grad). (Autograd through :func:`project` would keep every intermediate for the backward.)"""

    @staticmethod
    def forward(ctx, D, U, V, sides, passes):
        ctx.save_for_backward(U, V)
        ctx.sides, ctx.passes = sides, passes
        return _repeat(D, U, V, sides, passes)

    @staticmethod
    def backward(ctx, grad):
        U, V = ctx.saved_tensors
        return _repeat(grad, U, V, ctx.sides, ctx.passes), None, None, None, None


def _repeat(D, U, V, sides, passes):
    for _ in range(passes):
        D = _project(D, U, V, sides, None)
    return D


def project_repeated(
    D: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str = "both", passes: int = 2
) -> torch.Tensor:
    """P applied ``passes`` times, differentiable at the memory cost of nothing but U, V.

    In exact arithmetic P∘P = P; in fp32, bases are orthonormal only to ~1e-6 and one pass leaves
    (I − UᵀU)UᵀD in the principal subspace, which a second pass squares ("twice is enough", Kahan–Parlett).
    The adapter projects its factors with it.
    """
    check_sides(sides)
    if torch.is_grad_enabled() and D.requires_grad:
        return _RepeatedProjection.apply(D, U, V, sides, passes)
    return _repeat(D, U, V, sides, passes)


def project_list(
    Ds: Sequence[torch.Tensor],
    Us: Sequence[Optional[torch.Tensor]],
    Vs: Sequence[Optional[torch.Tensor]],
    sides: str = "both",
) -> list[torch.Tensor]:
    """:func:`project` over matching lists of matrices and bases."""
    if not len(Ds) == len(Us) == len(Vs):
        raise ValueError(f"project_list needs lists of equal length, got {len(Ds)}, {len(Us)}, {len(Vs)}")
    return [project(D, U, V, sides) for D, U, V in zip(Ds, Us, Vs)]


def principal_leak(
    D: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor]
) -> tuple[float, float]:
    """Relative leak of an update into the principal subspace, in fp64: (‖UᵀD‖_F/‖D‖_F, ‖DV‖_F/‖D‖_F).

    A side whose basis is ``None`` reports 0.0; a zero D reports (0.0, 0.0).
    """
    D64 = D.detach().to(torch.float64)
    norm = torch.linalg.matrix_norm(D64)
    if norm == 0:
        return 0.0, 0.0
    left = float(torch.linalg.matrix_norm(U.to(D64).T @ D64) / norm) if U is not None else 0.0
    right = float(torch.linalg.matrix_norm(D64 @ V.to(D64)) / norm) if V is not None else 0.0
    return left, right


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, D: torch.Tensor, what: str = "D") -> str:
    """``"torch"`` or ``"triton"`` for a tensor ``D`` (named ``what`` in errors).

    ``"auto"`` picks Triton for CUDA tensors when Triton is importable, else torch. ``"triton"`` needs a CUDA
    tensor, or CPU tensors with ``TRITON_INTERPRET=1`` set before ``offprincipal.kernels`` is first imported.
    """
    if check_backend(backend) == "torch":
        return "torch"
    if backend == "auto":
        if not D.is_cuda:
            return "torch"
        try:
            from .kernels import INTERPRETED  # noqa: F401  (loads Triton: ImportError where it is missing)
        except ImportError:
            return "torch"
        return "triton"
    try:
        from .kernels import INTERPRETED
    except ImportError as exc:
        raise RuntimeError(
            f"backend='triton' was requested for {what}, but the Triton kernels cannot be imported ({exc}). "
            "Install triton (Linux x86_64) or use backend='torch' / 'auto'."
        ) from exc
    if not (D.is_cuda or (D.device.type == "cpu" and INTERPRETED)):
        raise RuntimeError(
            f"backend='triton' cannot run on {what}: it is on device {D.device}, and the kernels run on CUDA tensors "
            "(or on CPU under Triton's interpreter, with TRITON_INTERPRET=1 set before offprincipal.kernels is first "
            "imported). Use backend='auto' or 'torch' for CPU tensors."
        )
    return "triton"


def project_(
    D: torch.Tensor,
    U: Optional[torch.Tensor],
    V: Optional[torch.Tensor],
    sides: str = "both",
    *,
    backend: str = "auto",
    all_reduce: Optional[AllReduce] = None,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """In place: ``D ← P(D)`` for D (m, n) with U (m, k), V (n, k); returns D. No autograd.

    ``backend`` (see :func:`resolve_backend`): the Triton path is two fused passes over D (one read to form
    UᵀD and DV, one read+write to apply them). ``all_reduce``: D and U are matching row shards of a matrix
    sharded by rows, and UᵀD is summed over the shards (every rank must call this, even with 0 rows).
    A row-sharded DTensor D (FSDP2) with the full U is handled directly: its local rows are projected with the
    matching rows of U and one all-reduce of UᵀD over the shard group (a collective: call it on every rank).
    ``precision``: how fp32 products are evaluated (see ``offprincipal._sides``): "tf32x3" (default) and "ieee"
    keep the leak at fp32 level on both backends; the torch backend runs both as exact fp32 matmuls.
    """
    check_sides(sides)
    check_precision(precision)
    if D.ndim != 2:
        raise ValueError(f"project_ needs a 2-D tensor, got shape {tuple(D.shape)}")
    from torch.distributed.tensor import DTensor

    if isinstance(D, DTensor):
        if all_reduce is not None:
            raise ValueError("project_ takes either a DTensor or an explicit all_reduce for a local shard, not both")
        shard = row_shard(D, "D")
        U_local = U[shard.start : shard.stop] if U is not None else None
        project_(shard.local, U_local, V, sides, backend=backend, all_reduce=shard.all_reduce, precision=precision)
        return D
    if resolve_backend(backend, D) == "triton":
        from .kernels import project_ as fused_project_

        return fused_project_(D, U, V, sides, all_reduce=all_reduce, precision=precision)
    with torch.no_grad():
        return D.copy_(_project(D, U, V, sides, all_reduce, precision))


@dataclass(frozen=True)
class RowShard:
    """Where the local part of a row-sharded matrix lies: rows ``[start, stop)``; ``all_reduce`` sums over the
    ranks that hold the other rows (``None`` when the local tensor holds every row)."""

    local: torch.Tensor
    start: int
    stop: int
    all_reduce: Optional[AllReduce]


def row_shard(t: torch.Tensor, what: str = "tensor") -> RowShard:
    """The local rows of ``t``: a plain tensor is whole; a DTensor may be ``Shard(0)`` on one mesh dimension
    (FSDP2, HSDP) and ``Replicate()`` on the others. Any other sharding raises, naming ``what``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return RowShard(t, 0, t.shape[0], None)
    shard_dims = []
    for dim, placement in enumerate(t.placements):
        if type(placement) is Shard and placement.dim == 0:  # not _StridedShard (FSDP2 + TP)
            shard_dims.append(dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"{what} is a DTensor with placements {t.placements}; the off-principal projection supports row "
                "sharding (Shard(0), as FSDP2 uses) and replication only. For tensor parallelism use the adapter form "
                "(offprincipal.OffPrincipalConfig)."
            )
    if len(shard_dims) > 1:
        raise NotImplementedError(f"{what} is sharded by rows on several mesh dimensions {t.placements}; not supported")
    local = t.to_local()
    if not shard_dims:
        return RowShard(local, 0, t.shape[0], None)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    group = t.device_mesh.get_group(shard_dims[0])

    def all_reduce(x: torch.Tensor) -> None:
        torch.distributed.all_reduce(x, group=group)

    return RowShard(local, offset[0], offset[0] + shape[0], all_reduce)
