"""The paper's parameter-level metrics (arXiv 2511.08567), exact and offline (full SVDs, dense masks).

All weights are in ``nn.Linear`` orientation, W (m, n) = (out, in). W0 is the pretrained weight, W1 the tuned
one and ΔW = W1 − W0. Definitions (``notes/paper.md``):

- **bf16 update mask / sparsity.** Coordinate j is *unchanged* when bf16(w1_j) == bf16(w0_j), which for
  bf16-representable values equals |w1 − w0| ≤ η·max(|w0|, |w1|) with η = 1e-3 (distinct bf16 numbers differ
  relatively by ≥ 2⁻⁸ > η). Update sparsity = 1 − #changed / #coordinates. (+0 and −0 count as equal.)
- **Spectral drift.** NSS = ‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂ over the full singular-value vector (fp64).
- **Principal-subspace rotation.** Principal angles between the top-k left (right) singular subspaces of W0
  and W1: cos θ_i = σ_i(U0ᵀ U1) (same for V); curve in degrees, ascending, and its maximum.
- **Mask overlaps.** Principal-weight mask: the top-α entries of |U_k diag(S_k) V_kᵀ| (rank-k reconstruction
  of W0); low-magnitude mask: the bottom-α entries of |W0|. Overlap of a mask M• with the update mask M is
  |M• ∩ M| / |M|; its random baseline is α.
- **Run-to-run consistency.** Jaccard |A ∩ B| / |A ∪ B| of update masks, mean over pairs of runs; random
  baseline for densities p, q: pq / (p + q − pq).
- **Principal leak** of ΔW: (‖U0ᵀ ΔW‖_F, ‖ΔW V0‖_F) / ‖ΔW‖_F, computed by
  :func:`offprincipal.projection.principal_leak`.

Live versions for training loops (cached top-k bases, O(m·n·k), low-rank path for adapters) are in
:mod:`offprincipal.diagnostics`; they share :class:`Rotation` and :func:`principal_angles` with this module.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .projection import principal_leak
from .subspace import Subspace, weight_matrix

BF16_RELATIVE_TOLERANCE = 1e-3


# --- bf16 update masks -------------------------------------------------------------------------------------------


def _check_pair(w0: torch.Tensor, w1: torch.Tensor, what: str = "w0/w1") -> None:
    if w0.shape != w1.shape:
        raise ValueError(f"{what} must have the same shape, got {tuple(w0.shape)} and {tuple(w1.shape)}")


def update_mask(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Boolean mask (shape of w0) of coordinates whose bf16 value changed: bf16(w1) ≠ bf16(w0)."""
    _check_pair(w0, w1)
    return w0.detach().to(torch.bfloat16) != w1.detach().to(torch.bfloat16)


def update_sparsity(w0: torch.Tensor, w1: torch.Tensor) -> float:
    """1 − (#coordinates changed in bf16) / (#coordinates)."""
    return _sparsity(update_mask(w0, w1))


def _sparsity(updated: torch.Tensor) -> float:
    """Fraction of False entries of an update mask (1.0 for an empty one)."""
    return 1.0 - float(updated.float().mean()) if updated.numel() else 1.0


# --- spectra and subspaces ---------------------------------------------------------------------------------------


def _svdvals64(W: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(W.detach().to(torch.float64))


def spectral_drift(w0: torch.Tensor, w1: torch.Tensor, k: Optional[int] = None) -> float:
    """NSS = ‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂ in fp64; ``k`` restricts both vectors to their top-k (for comparing
    with :func:`offprincipal.diagnostics.live_spectral_drift`). Returns 0.0 when W0 is zero and W1 equals it."""
    _check_pair(w0, w1)
    s0, s1 = _svdvals64(w0)[:k], _svdvals64(w1)[:k]
    return _relative_distance(s1, s0)


def _relative_distance(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖₂ / ‖ref‖₂ (0.0 for x == ref == 0, inf for ref == 0 ≠ x)."""
    diff, norm = float(torch.linalg.vector_norm(x - ref)), float(torch.linalg.vector_norm(ref))
    return diff / norm if norm else (0.0 if diff == 0 else math.inf)


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees, ascending, between span(A) and span(B), A (m, k), B (m, l) orthonormal columns.

    cos θ_i = σ_i(AᵀB); angles with cos² θ ≥ ½ are taken from the sines σ((I − AAᵀ)B) instead (Björck–Golub),
    which keeps small angles accurate. Returns min(k, l) angles (fp64).
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[0]:
        raise ValueError(f"principal_angles needs bases (m, k) and (m, l), got {tuple(A.shape)} and {tuple(B.shape)}")
    A64, B64 = A.detach().to(torch.float64), B.detach().to(torch.float64)
    if A64.shape[1] < B64.shape[1]:
        A64, B64 = B64, A64  # the sines below need the wider basis as A
    C = A64.T @ B64
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)  # descending → angles ascending
    sin = torch.linalg.svdvals(B64 - A64 @ C).clamp(0.0, 1.0).flip(0)  # ascending → angles ascending
    theta = torch.where(cos.square() >= 0.5, torch.arcsin(sin), torch.arccos(cos))
    return torch.rad2deg(theta)


@dataclass(frozen=True)
class Rotation:
    """Principal angles (degrees, ascending) between the top-k subspaces of two weights, left and right."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def max_left(self) -> float:
        return float(self.left.max()) if self.left.numel() else 0.0

    @property
    def max_right(self) -> float:
        return float(self.right.max()) if self.right.numel() else 0.0


def subspace_rotation(sub0: Subspace, sub1: Subspace) -> Rotation:
    """Principal angles between the bases of two :class:`Subspace` objects (left: U's, right: V's)."""
    return Rotation(principal_angles(sub0.U, sub1.U), principal_angles(sub0.V, sub1.V))


@dataclass(frozen=True)
class Spectrum:
    """All singular values of W (descending) and its top-k basis from one SVD, in the SVD's dtype (fp64 by
    default, unlike the fp32 bases of the subspace bank: the exact metrics resolve tiny drifts and angles)."""

    sigma: torch.Tensor
    top: Subspace


def spectrum(W: torch.Tensor, k: int, dtype: torch.dtype = torch.float64) -> Spectrum:
    """One SVD of W (m, n) in ``dtype``: the full σ vector and the top-k :class:`Subspace`."""
    U, S, Vh = torch.linalg.svd(W.detach().to(dtype), full_matrices=False)
    return Spectrum(S, Subspace(U[:, :k], S[:k], Vh[:k].T))


# --- masks and overlaps ------------------------------------------------------------------------------------------


def _top_fraction_mask(scores: torch.Tensor, alpha: float, largest: bool) -> torch.Tensor:
    """Mask of the round(α·numel) entries with the largest (or smallest) ``scores``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    count = int(round(alpha * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        mask[torch.topk(scores.flatten(), count, largest=largest).indices] = True
    return mask.view(scores.shape)


def principal_weight_mask(sub0: Subspace, alpha: float) -> torch.Tensor:
    """Top-α entries of |U_k diag(S_k) V_kᵀ| (the rank-k reconstruction of W0), shape (m, n)."""
    reconstruction = (sub0.U * sub0.S) @ sub0.V.T
    return _top_fraction_mask(reconstruction.abs(), alpha, largest=True)


def low_magnitude_mask(w0: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bottom-α entries of |W0|, shape of w0."""
    return _top_fraction_mask(w0.detach().abs(), alpha, largest=False)


def mask_overlap(mask: torch.Tensor, updated: torch.Tensor) -> float:
    """|mask ∩ updated| / |updated| (NaN when nothing was updated). Random baseline: the density of ``mask``."""
    _check_pair(mask, updated, "mask/updated")
    n_updated = int(updated.sum())
    return int((mask & updated).sum()) / n_updated if n_updated else math.nan


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two boolean masks (1.0 when both are empty)."""
    _check_pair(a, b, "a/b")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def random_jaccard(p: float, q: float) -> float:
    """Expected Jaccard of independent random masks of densities p and q: pq / (p + q − pq) (0 when both are 0)."""
    denominator = p + q - p * q
    return p * q / denominator if denominator else 0.0


@dataclass(frozen=True)
class Consistency:
    """Mean off-diagonal Jaccard of several update masks, and its random baseline (mean over the same pairs)."""

    jaccard: float
    random_baseline: float


def mask_consistency(masks: Sequence[torch.Tensor]) -> Consistency:
    """:class:`Consistency` over all unordered pairs of ``masks`` (at least two, same shape)."""
    if len(masks) < 2:
        raise ValueError(f"mask_consistency needs the update masks of at least 2 runs, got {len(masks)}")
    densities = [float(m.float().mean()) for m in masks]
    pairs = list(itertools.combinations(range(len(masks)), 2))
    observed = sum(jaccard(masks[i], masks[j]) for i, j in pairs) / len(pairs)
    baseline = sum(random_jaccard(densities[i], densities[j]) for i, j in pairs) / len(pairs)
    return Consistency(observed, baseline)


# --- per weight pair and per model pair --------------------------------------------------------------------------


@dataclass
class LayerRecord:
    """The paper's diagnostics for one weight pair (W0, W1) of shape (m, n) with top-k subspaces and mask size α."""

    name: str
    shape: tuple[int, int]
    k: int
    alpha: float
    update_sparsity: float
    nss: float
    angles_left: list[float] = field(repr=False)
    angles_right: list[float] = field(repr=False)
    max_angle_left: float
    max_angle_right: float
    overlap_principal: float
    overlap_low_magnitude: float
    leak_left: float
    leak_right: float
    update_rel: float = math.nan  # ‖ΔW‖_F / ‖W0‖_F (NaN in records written before it existed)

    def as_dict(self) -> dict:
        return asdict(self)


def weight_pair_metrics(
    w0: torch.Tensor, w1: torch.Tensor, k: int, alpha: float = 0.5, name: str = "", dtype: torch.dtype = torch.float64
) -> LayerRecord:
    """All diagnostics of one pair W0 → W1 (both (m, n)) from two SVDs in ``dtype``, O(m·n·min(m, n)).

    fp64 (default) resolves the tiny drifts and angles of RL; fp32 is faster, with a noise floor set by fp32
    rounding and the spectral gap at k (figures: benchmarks/results/design_figures.md)."""
    _check_pair(w0, w1, f"weights of {name or 'the pair'}")
    if w0.ndim != 2 or not 1 <= k <= min(w0.shape):
        raise ValueError(f"{name or 'weight'}: need a 2-D weight and 1 ≤ k ≤ min(m, n); got shape {tuple(w0.shape)}, k={k}")
    spec0, spec1 = spectrum(w0, k, dtype), spectrum(w1, k, dtype)
    rotation = subspace_rotation(spec0.top, spec1.top)
    updated = update_mask(w0, w1)
    delta = w1.detach().double() - w0.detach().double()
    leak_left, leak_right = principal_leak(delta, spec0.top.U, spec0.top.V)
    return LayerRecord(
        name=name,
        shape=tuple(w0.shape),
        k=k,
        alpha=alpha,
        update_sparsity=_sparsity(updated),
        nss=_relative_distance(spec1.sigma, spec0.sigma),
        angles_left=rotation.left.tolist(),
        angles_right=rotation.right.tolist(),
        max_angle_left=rotation.max_left,
        max_angle_right=rotation.max_right,
        overlap_principal=mask_overlap(principal_weight_mask(spec0.top, alpha), updated),
        overlap_low_magnitude=mask_overlap(low_magnitude_mask(w0, alpha), updated),
        leak_left=leak_left,
        leak_right=leak_right,
        update_rel=float(delta.norm() / w0.detach().double().norm().clamp_min(torch.finfo(torch.float64).tiny)),
    )


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize(records: Sequence[LayerRecord]) -> dict:
    """Model-level summary: parameter-weighted update sparsity, and layer means of the other metrics
    (overlaps skip layers with no update; ``overlap_random_baseline`` is α)."""
    if not records:
        raise ValueError("summarize needs at least one LayerRecord")
    sizes = [r.shape[0] * r.shape[1] for r in records]
    keys = ("nss", "max_angle_left", "max_angle_right", "overlap_principal", "overlap_low_magnitude", "leak_left", "leak_right",
            "update_rel")
    summary = {"layers": len(records), "parameters": sum(sizes)}
    summary["update_sparsity"] = sum(r.update_sparsity * s for r, s in zip(records, sizes)) / sum(sizes)
    summary.update({f"mean_{key}": _nanmean([getattr(r, key) for r in records]) for key in keys})
    summary["overlap_random_baseline"] = records[0].alpha
    return summary


def _common_names(base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str) -> list[str]:
    missing = [name for name in base if name not in other]
    if missing:
        raise KeyError(f"{what} lacks {len(missing)} weight(s) of the base, e.g. {missing[:3]}; pass matching names")
    return list(base)


def compare_weights(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    k: int = 64,
    alpha: float = 0.5,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[LayerRecord], dict]:
    """Per-layer :class:`LayerRecord` for every name of ``base`` (name → (m, n) weight) and the :func:`summarize`
    summary. ``k`` is clipped to min(m, n) per layer; ``dtype`` is the SVD precision (see :func:`weight_pair_metrics`).
    Cost: two SVDs per weight, O(m·n·min(m, n)) each."""
    names = _common_names(base, tuned, "tuned")
    records = [
        weight_pair_metrics(base[name], tuned[name], min(k, *base[name].shape), alpha, name, dtype)
        for name in tqdm(names, desc="parameter metrics", unit="weight", disable=not progress)
    ]
    return records, summarize(records)


def run_consistency(base: Mapping[str, torch.Tensor], runs: Sequence[Mapping[str, torch.Tensor]]) -> tuple[dict, Consistency]:
    """Per-layer :class:`Consistency` of the bf16 update masks of several runs from the same base, and the
    model-level one (masks of all layers concatenated): the paper's run-to-run consistency. ``base`` and each run
    map weight names to tensors of the same shapes (every name of ``base`` must be in every run). Public API for
    comparing seeds of one method; the CLI's ``analyze`` compares two checkpoints and does not call it."""
    if len(runs) < 2:
        raise ValueError(f"run_consistency needs at least 2 runs, got {len(runs)}")
    for i, run in enumerate(runs):
        _common_names(base, run, f"run {i}")
    masks = {name: [update_mask(base[name], run[name]).flatten() for run in runs] for name in base}
    per_layer = {name: mask_consistency(ms) for name, ms in masks.items()}
    overall = mask_consistency([torch.cat([masks[name][i] for name in base]) for i in range(len(runs))])
    return per_layer, overall


def linear_weights(model: torch.nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict[str, torch.Tensor]:
    """Module name → (out, in) weight of every linear-like module (``nn.Linear``, GPT-2 ``Conv1D``), except those
    whose name contains an entry of ``skip`` (default: the output head, a 49k-row matrix on SmolLM2)."""
    from transformers.pytorch_utils import Conv1D

    return {
        name: weight_matrix(module).detach()
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not any(s in name for s in skip)
    }
