"""Off-principal projection in plain torch: the reference for every kernel.

For an update D (m×n) of a weight with top-k bases U (m×k) and V (n×k) (orthonormal columns):

    sides="both":  P(D) = (I − UUᵀ) D (I − VVᵀ) = D − U(UᵀD) − (DV)Vᵀ + U(UᵀDV)Vᵀ
    sides="left":  P(D) = (I − UUᵀ) D
    sides="right": P(D) = D (I − VVᵀ)

P is an orthogonal projector (P∘P = P), so Uᵀ P(D) = 0 (left/both) and P(D) V = 0 (right/both) up to the
orthonormality error of U, V. Math runs in fp32 (fp64 stays fp64) and the result has D's dtype. Cost
O(k·m·n) — never builds an m×m or n×n projector.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

SIDES = ("both", "left", "right")


def check_sides(sides: str) -> str:
    if sides not in SIDES:
        raise ValueError(f"sides must be one of {SIDES}, got {sides!r}")
    return sides


def uses_left(sides: str) -> bool:
    return check_sides(sides) in ("both", "left")


def uses_right(sides: str) -> bool:
    return check_sides(sides) in ("both", "right")


def project(
    D: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor], sides: str = "both"
) -> torch.Tensor:
    """P(D) for one matrix D (m, n) with U (m, k), V (n, k); returns a new tensor of D's dtype.

    Autograd flows through it (the adapter projects its factors in the forward pass with it).
    """
    compute = torch.promote_types(D.dtype, torch.float32)
    out = D.to(compute)
    if uses_left(sides):
        U = U.to(compute)
        out = out - U @ (U.T @ out)
    if uses_right(sides):
        V = V.to(compute)
        out = out - (out @ V) @ V.T
    return out.to(D.dtype)


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
