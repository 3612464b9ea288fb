"""Live diagnostics: cheap per-step checks of off-principal training, from the cached top-k bases of W0.

The trainer callbacks (:mod:`offprincipal.trainer`) log these every ``log_every`` optimizer steps; the exact,
offline metrics of the paper (full SVDs, bf16 masks) are in :mod:`offprincipal.metrics`. Weights are in
``nn.Linear`` orientation, W (m, n) = (out, in); ``Subspace(U, S, V)`` is W0's top-k basis, U (m, k), V (n, k).

- :class:`AdapterDiagnostics` (adapter form): worst principal leak (‖UᵀΔW‖_F, ‖ΔW V‖_F) / ‖ΔW‖_F over layers and
  mean relative update ‖ΔW‖_F / ‖W0‖_F, all through the r-sized factors of ΔW = s·B̃Ã (:class:`LowRankWeight`,
  :func:`lowrank_principal_leak`, :func:`lowrank_norm`); no m×n matrix is formed.
- :class:`PrincipalBlocks` (full-parameter form): ‖Uᵀ(W_t − W_0)‖_F / ‖UᵀW_0‖_F and ‖(W_t − W_0)V‖_F / ‖W_0V‖_F
  from the k×n and m×k blocks kept at install time (no copy of W0). An off-principal optimizer keeps both at 0.
- :func:`live_spectral_drift`: ‖σ(Uᵀ W_t V) − S‖₂ / ‖S‖₂, the drift of the top-k block seen in the fixed bases.
  To first order in E = W_t − W0 both σ_i(UᵀW_tV) and σ_i(W_t) equal σ_i + u_iᵀ E v_i, so it matches the exact
  top-k NSS (``metrics.spectral_drift(W0, W_t, k)``) up to O(‖E‖²/gap) terms. Cost O(m·n·k).
- :func:`live_principal_angles`: a few steps of subspace iteration U ← qr(W_t V), V ← qr(W_tᵀ U) started from the
  cached V. Each step shrinks the error to the true top-k subspace of W_t by about (σ_{k+1}/σ_k)²; the start is
  the *old* subspace, so with small spectral gaps the estimate is biased toward zero rotation. Use the exact
  angles (:func:`offprincipal.metrics.subspace_rotation`) for reporting.

Low-rank path: pass a :class:`LowRankWeight` (W = base + scale·B A, B (m, r), A (r, n)) instead of a tensor to
the live functions; they then never form the m×n product. The elementwise metrics (sparsity, masks, overlaps)
and the exact NSS and angles need the dense matrices: :meth:`LowRankWeight.dense`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

from .integrations.deepspeed import gathered
from .metrics import Rotation, _relative_distance, principal_angles
from .projection import principal_leak
from .subspace import Subspace
from .tuner import OffPrincipalLayer

PREFIX = "offprincipal/"


# --- the low-rank path ---------------------------------------------------------------------------------------------


def lowrank_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B A‖_F for B (m, r), A (r, n) without forming B A: ‖BA‖_F² = tr((BᵀB)(AAᵀ)), two r×r Gram matrices (fp64)."""
    B, A = B.detach().double(), A.detach().double()
    return float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt())


def lowrank_principal_leak(B: torch.Tensor, A: torch.Tensor, U: Optional[torch.Tensor], V: Optional[torch.Tensor]) -> tuple[float, float]:
    """:func:`~offprincipal.projection.principal_leak` of ΔW = B A (B (m, r), A (r, n)) without forming it.

    With thin QRs B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = Q_B C Q_Aᵀ with the core C = R_B R_Aᵀ (r, r); orthonormal
    Q's preserve Frobenius norms, so the leak equals ``principal_leak(C, Q_Bᵀ U, Q_Aᵀ V)``. Cost O((m+n)·r·(r+k)).
    A scale factor on ΔW does not change the leak. ``None`` for U (V) gives 0.0 on that side.
    """
    QB, RB = torch.linalg.qr(B.detach().to(torch.float64))
    QA, RA = torch.linalg.qr(A.detach().to(torch.float64).T)
    core = RB @ RA.T
    left = QB.T @ U.to(torch.float64) if U is not None else None
    right = QA.T @ V.to(torch.float64) if V is not None else None
    return principal_leak(core, left, right)


@dataclass(frozen=True)
class LowRankWeight:
    """W = base + scale · B A without forming B A: base (m, n) or None (then W = scale · B A), B (m, r), A (r, n).

    The update part ΔW = scale · B A is what an adapter layer adds (:meth:`update_norm`, :meth:`update_leak`)."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float = 1.0
    base: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LowRankWeight needs B (m, r) and A (r, n), got {tuple(self.B.shape)} and {tuple(self.A.shape)}")
        if self.base is not None and tuple(self.base.shape) != (self.B.shape[0], self.A.shape[1]):
            raise ValueError(f"LowRankWeight base has shape {tuple(self.base.shape)}, B A has {(self.B.shape[0], self.A.shape[1])}")

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        """W X for X (n, p), in X's dtype."""
        out = self.scale * (self.B.to(X) @ (self.A.to(X) @ X))
        return out if self.base is None else out + self.base.to(X) @ X

    def rmatmul(self, Y: torch.Tensor) -> torch.Tensor:
        """Wᵀ Y for Y (m, p), in Y's dtype."""
        out = self.scale * (self.A.to(Y).T @ (self.B.to(Y).T @ Y))
        return out if self.base is None else out + self.base.to(Y).T @ Y

    def dense(self) -> torch.Tensor:
        """The m×n matrix (for the elementwise metrics)."""
        delta = self.scale * (self.B @ self.A)
        return delta if self.base is None else self.base + delta

    def update_norm(self) -> float:
        """‖scale · B A‖_F (fp64, :func:`lowrank_norm`)."""
        return lowrank_norm(self.B, self.A) * abs(self.scale)

    def update_leak(self, U: Optional[torch.Tensor], V: Optional[torch.Tensor]) -> tuple[float, float]:
        """(‖UᵀΔW‖_F, ‖ΔW V‖_F) / ‖ΔW‖_F of ΔW = scale · B A (fp64, :func:`lowrank_principal_leak`)."""
        return lowrank_principal_leak(self.B, self.A, U, V)


WeightLike = Union[torch.Tensor, LowRankWeight]


def _matmul(W: WeightLike, X: torch.Tensor) -> torch.Tensor:
    return W.matmul(X) if isinstance(W, LowRankWeight) else W.detach().to(X) @ X


def _rmatmul(W: WeightLike, Y: torch.Tensor) -> torch.Tensor:
    return W.rmatmul(Y) if isinstance(W, LowRankWeight) else W.detach().to(Y).T @ Y


# --- live versions of the paper's spectral metrics ----------------------------------------------------------------


def live_spectral_drift(weight: WeightLike, sub0: Subspace) -> float:
    """‖σ(Uᵀ W_t V) − S‖₂ / ‖S‖₂ with W0's cached basis ``sub0`` (fp64; approximates the top-k NSS, see module doc)."""
    U, S, V = (t.to(torch.float64) for t in (sub0.U, sub0.S, sub0.V))
    core = U.T @ _matmul(weight, V)
    return _relative_distance(torch.linalg.svdvals(core), S)


def live_principal_angles(weight: WeightLike, sub0: Subspace, steps: int = 2) -> Rotation:
    """Principal angles (degrees) between W0's cached top-k subspaces and an estimate of W_t's, obtained by
    ``steps`` subspace-iteration steps warm-started from ``sub0.V`` (fp64; biased toward 0 under small gaps)."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    U0, V0 = sub0.U.to(torch.float64), sub0.V.to(torch.float64)
    V = V0
    for _ in range(steps):
        U = torch.linalg.qr(_matmul(weight, V)).Q
        V = torch.linalg.qr(_rmatmul(weight, U)).Q
    return Rotation(principal_angles(U0, U), principal_angles(V0, V))


# --- what the trainer callbacks log -------------------------------------------------------------------------------


class AdapterDiagnostics:
    """Live diagnostics of an OffPrincipal adapter, all through r-sized factors (no m×n matrix is formed).

    Calling it on a model returns ``{"offprincipal/leak_max": worst principal leak over layers,
    "offprincipal/update_rel_mean": mean of ‖ΔW‖_F/‖W0‖_F}`` for adapter ``adapter_name`` (‖W0‖_F is computed once
    per layer and kept), or ``{}`` when no layer carries that adapter. Under ZeRO-3 each layer's factors (and, once,
    its base weight) are gathered in turn, so every rank must call it (Trainer callbacks run on every rank)."""

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self._base_norms: dict[int, float] = {}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        name = self.adapter_name
        leaks, rel = [], []
        for layer in model.modules():
            if not isinstance(layer, OffPrincipalLayer) or name not in layer.offprincipal_A:
                continue
            params = [layer.offprincipal_A[name].weight, layer.offprincipal_B[name].weight]
            if id(layer) not in self._base_norms:
                params.append(layer.get_base_layer().weight)
            with gathered(params):
                A, B = layer.effective_factors(name)
                delta = LowRankWeight(B, A, scale=layer.scaling[name])
                U = layer.offprincipal_U[name] if name in layer.offprincipal_U else None
                V = layer.offprincipal_V[name] if name in layer.offprincipal_V else None
                leaks.append(max(delta.update_leak(U, V)))
                if id(layer) not in self._base_norms:
                    weight = layer.get_base_layer().weight
                    self._base_norms[id(layer)] = float(torch.linalg.matrix_norm(weight.double()))
                rel.append(delta.update_norm() / self._base_norms[id(layer)])
        if not leaks:
            return {}
        return {PREFIX + "leak_max": max(leaks), PREFIX + "update_rel_mean": sum(rel) / len(rel)}


class PrincipalBlocks:
    """UᵀW_0 (k×n) and W_0V (m×k) of every weight an off-principal optimizer projects (fp32), kept at
    construction, to check live that the principal blocks do not move (:meth:`shift`).

    ``optimizer`` is an :class:`~offprincipal.optim.OffPrincipalAdamW` or
    :class:`~offprincipal.optim.OffPrincipalOptimizer` (its ``bases``); ``named`` maps parameter names to tensors."""

    def __init__(self, optimizer, named: Mapping[str, torch.Tensor]):
        self.bases = optimizer.bases
        self.blocks = {name: self._blocks(name, named[name]) for name in self.bases if name in named}

    @torch.no_grad()
    def _blocks(self, name: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        basis = self.bases.entries[name]
        W = p.detach().float()
        return basis.U.T.to(W) @ W, W @ basis.V.to(W)

    @torch.no_grad()
    def shift(self, named: Mapping[str, torch.Tensor]) -> float:
        """max over weights of ‖Uᵀ(W_t − W_0)‖_F/‖UᵀW_0‖_F and ‖(W_t − W_0)V‖_F/‖W_0V‖_F (0.0 with no weights)."""
        worst = 0.0
        for name, (left0, right0) in self.blocks.items():
            left, right = self._blocks(name, named[name])
            worst = max(
                worst,
                float(torch.linalg.matrix_norm(left - left0) / torch.linalg.matrix_norm(left0)),
                float(torch.linalg.matrix_norm(right - right0) / torch.linalg.matrix_norm(right0)),
            )
        return worst
