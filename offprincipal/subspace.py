"""The subspace bank: top-k singular bases of pretrained weights.

For a weight W0 of shape (m, n) (``out_features × in_features``, the orientation of ``nn.Linear.weight``)
with SVD W0 = U S Vᵀ, the *principal subspace* of order k is spanned by the first k columns of U
(m×k, left) and of V (n×k, right). Everything downstream (projection, adapter, optimizer, metrics) uses
these bases, always in fp32, whatever the weight's dtype.

Two methods:

- ``"exact"``: full fp32 SVD (``torch.linalg.svd``), the default. Where the spectral gap σ_k/σ_{k+1} is close
  to 1 (as in SmolLM2-class weights), approximate methods pick a visibly different top-k subspace.
- ``"randomized"``: Halko–Martinsson–Tropp range finder with ``oversample`` extra columns and ``niter``
  QR-stabilised power iterations, seeded so it is deterministic. Its quality figure is the captured energy
  ``‖U_kᵀ W V_k‖_F² / Σ_{i≤k} σ_i²`` (:func:`captured_energy`), 1.0 for the exact basis; it rises with ``niter``
  and ``oversample``, which default to the settings measured closest to 1 on SmolLM2
  (benchmarks/results/subspaces_smollm2_cpu.md, benchmarks/results/design_figures.md).

Results are cached on disk (safetensors, one file per weight) under a key made of a fingerprint of the
weight's bytes, k and the method with its settings (:class:`SubspaceCache`; keys are validated data, never
paths). A cached file whose stored fingerprint, shape or k does not match, or whose bases fail
:func:`certify_subspace` against the weight, is recomputed (with a warning naming the file) and overwritten,
never used. An unwritable cache location gives one warning and the run goes on uncached.

Bases that do not come from a fresh SVD of the live weight — cache hits, optimizer state dicts, bases given by
the user — are certified with :func:`certify_subspace` before use: finite, orthonormal, singular pairs of W
(W·V = U·diag(S), Uᵀ·W = diag(S)·Vᵀ, up to fp32 rounding plus one rounding of a 16-bit weight), and the top k
(the residual W − U·diag(S)·Vᵀ has no singular value above the smallest kept one beyond the tie tolerance
:data:`CERTIFY_TIE_TOL`, decided exactly by a Cholesky factorization).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .files import WRITE_ERRORS, atomic_file, cache_unwritable

logger = logging.getLogger(__name__)

SVD_METHODS = ("exact", "randomized")
CACHE_FORMAT_VERSION = "1"
DEFAULT_OVERSAMPLE = 64
DEFAULT_NITER = 16
DEFAULT_SEED = 0

TopK = Union[int, float]


@dataclass(frozen=True)
class Subspace:
    """Top-k singular triplets of one weight W (m×n): ``U`` (m×k), ``S`` (k,), ``V`` (n×k), all fp32.

    ``U`` and ``V`` have orthonormal columns; ``W ≈ U diag(S) Vᵀ`` is the best rank-k approximation.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def k(self) -> int:
        return self.S.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[0])

    def to(self, device=None, dtype=None) -> "Subspace":
        return Subspace(*(t.to(device=device, dtype=dtype) for t in (self.U, self.S, self.V)))


def default_cache_dir() -> Path:
    """``$OFFPRINCIPAL_CACHE_DIR/subspaces``, else ``~/.cache/offprincipal/subspaces``."""
    root = os.environ.get("OFFPRINCIPAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "offprincipal")
    return Path(root) / "subspaces"


def resolve_top_k(
    top_k: TopK, shape: tuple[int, int], name: str = "", top_k_pattern: Optional[Mapping[str, TopK]] = None
) -> int:
    """The k used for the weight called ``name`` with ``shape`` (m, n).

    ``top_k`` is an int, or a float in (0, 1) meaning ``max(1, floor(top_k · min(m, n)))``. A key of
    ``top_k_pattern`` (regex, matched like PEFT's ``rank_pattern`` against the end of the module name) overrides
    ``top_k`` for the modules it matches. Raises ``ValueError`` naming the module unless 1 ≤ k < min(m, n).
    """
    if top_k_pattern:
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(top_k_pattern.keys()), name)
        top_k = top_k_pattern.get(key, top_k)
    m, n = shape
    limit = min(m, n)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)):
        raise TypeError(f"top_k for {name or 'weight'} must be an int or a float in (0, 1), got {top_k!r}")
    if isinstance(top_k, float):
        if not 0.0 < top_k < 1.0:
            raise ValueError(f"top_k for {name or 'weight'} is a float, so it must lie in (0, 1); got {top_k}")
        k = max(1, int(top_k * limit))
    else:
        k = top_k
    if k < 1 or k >= limit:
        raise ValueError(
            f"top_k={k} is invalid for {name or 'weight'} of shape {m}×{n}: it needs 1 ≤ k < min(m, n) = {limit}. "
            "Lower top_k, or override it for this module with top_k_pattern."
        )
    return k


def _randomized_svd(W: torch.Tensor, k: int, oversample: int, niter: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Halko et al. range finder with QR after every product; W is fp32 (m, n). Returns U (m,k), S (k,), V (n,k)."""
    m, n = W.shape
    q = min(k + oversample, m, n)
    gen = torch.Generator(device=W.device).manual_seed(seed)
    omega = torch.randn(n, q, device=W.device, dtype=W.dtype, generator=gen)
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(W.T @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return (Q @ Ub[:, :k]).contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous()


def top_k_subspace(
    weight: torch.Tensor,
    k: int,
    method: str = "exact",
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    niter: int = DEFAULT_NITER,
    seed: int = DEFAULT_SEED,
) -> Subspace:
    """Top-k singular triplets of a 2-D ``weight`` (m, n), computed in fp32 on the weight's device."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    W = weight.detach().to(torch.float32)
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Subspace(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous())
    if method == "randomized":
        return Subspace(*_randomized_svd(W, k, oversample, niter, seed))
    raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {method!r}")


BASIS_KINDS = ("top", "random")
"""What an adapter's bases are: ``"top"`` the top-k singular bases (the method), ``"random"`` seeded random
orthonormal k-column bases of the same shapes (the control that asks whether the *principal* directions matter)."""


def random_subspace(weight: torch.Tensor, k: int, seed: int, name: str = "") -> Subspace:
    """Seeded random orthonormal bases of the shapes of the top-k bases of ``weight`` (m, n): U (m×k), V (n×k).

    U and V are the Q factors of two Gaussian blocks drawn in fp64 on the CPU from a generator seeded by a BLAKE2b
    digest of ``(seed, name, m, n, k)``, so they depend only on those (not on the weight's values or device) and are
    bit-identical in every process; each weight (``name``) gets its own pair. Columns are orthonormal to fp64
    rounding before the cast to fp32. Uniform on the Stiefel manifold up to the sign convention of the QR.
    ``S = diag(Uᵀ W V)`` (the weight's Rayleigh quotients on the random pairs: NOT singular values, and these bases
    are not certifiable as top-k — they are never stored in or read from the :class:`SubspaceCache`)."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if not 1 <= k < min(m, n):
        raise ValueError(f"random_subspace: k={k} needs 1 ≤ k < min(m, n) = {min(m, n)} for {name or 'weight'}")
    digest = hashlib.blake2b(f"{int(seed)}|{name}|{m}|{n}|{k}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen)).Q.to(torch.float32).contiguous()
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen)).Q.to(torch.float32).contiguous()
    return subspace_from_bases(weight, U.to(weight.device), V.to(weight.device))


def random_subspaces(
    weights: Mapping[str, torch.Tensor], top_k: TopK, seed: int, *, top_k_pattern: Optional[Mapping[str, TopK]] = None
) -> dict[str, Subspace]:
    """:func:`random_subspace` of every weight (name → (out, in) tensor), k resolved as in :func:`compute_subspaces`."""
    return {name: random_subspace(w, resolve_top_k(top_k, tuple(w.shape), name, top_k_pattern), seed, name)
            for name, w in weights.items()}


def _batched_exact(weights: list[torch.Tensor], k: int) -> list[Subspace]:
    """Exact top-k of several equal-shape weights with one batched ``torch.linalg.svd`` call."""
    U, S, Vh = torch.linalg.svd(torch.stack([w.detach().float() for w in weights]), full_matrices=False)
    return [
        Subspace(U[i, :, :k].contiguous(), S[i, :k].contiguous(), Vh[i, :k].T.contiguous()) for i in range(len(weights))
    ]


def minor_right_directions(weight: torch.Tensor, k: int, r: int) -> torch.Tensor:
    """The r right singular directions of smallest singular value outside the top-k, as rows (r, n), fp32.

    Used by the adapter's ``init="minor"``: for W = U S Vᵀ (m, n) these are rows ``Vᵀ[p−r:p]`` with p = min(m, n).
    """
    m, n = weight.shape
    p = min(m, n)
    if k + r > p:
        raise ValueError(f"init='minor' needs top_k + r ≤ min(m, n) = {p} for a {m}×{n} weight; got k={k}, r={r}")
    Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False).Vh
    return Vh[p - r : p].contiguous()


def captured_energy(weight: torch.Tensor, subspace: Subspace) -> float:
    """Quality of a basis: ``‖Uᵀ W V‖_F² / Σ_{i≤k} σ_i²`` with σ the exact singular values of W (1.0 = exact)."""
    W = weight.detach().to(torch.float64)
    U, V = subspace.U.to(W), subspace.V.to(W)
    sigma = torch.linalg.svdvals(W)[: subspace.k]
    return float((U.T @ W @ V).square().sum() / sigma.square().sum())


# ---------------------------------------------------------------------------------------------------------------
# certification: bases that do not come from a fresh SVD of the live weight prove themselves before use

CERTIFY_TIE_TOL = 1e-4
"""The tie tolerance of :func:`certify_subspace`'s top-k check (its default ``topk_tol``): bases pass when no
singular value left out exceeds the smallest kept one by more than this fraction of it (plus the fp32 rounding
term ``CERTIFY_ROUNDING · ‖W‖_F``). Pairs whose singular values differ by less are treated as tied: at a tie
σ_k = σ_{k+1} every orthonormal basis of the tied pairs is equally "top k", and so is any choice among pairs within
the tolerance. A fresh fp32 SVD leaves nothing out above S_k (σ₁ of its residual is σ_{k+1} ≤ σ_k to ~1e-6
relative); the smallest gap σ₃₂/σ₃₃ measured on SmolLM2 (the q_proj weights of its 30 layers) is 1.00099, ten times
this tolerance, so its k-th pair swapped for the (k+1)-th is refused (benchmarks/results/certificate_smollm2_cpu.md
counts the refusals)."""

CERTIFY_ROUNDING = 16 * torch.finfo(torch.float32).eps
"""Absolute slack of the top-k check, as a fraction of ‖W‖_F: the fp32 rounding of forming the residual
W − U·diag(S)·Vᵀ and its Gram matrix (≈ 1.9e-6·‖W‖_F)."""

CERTIFY_PAIR_TOL = 1e-4
"""Floor of the singular-pair tolerance, relative to ‖S‖_F: a fresh fp32 SVD leaves ‖W·V − U·diag(S)‖_F / ‖S‖_F
between 7e-7 and 1e-6 (measured on SmolLM2's q_proj weights, fp32 and bf16-rounded), and fp32 training adds about
2⁻²⁴ relative per step; 1e-4 leaves a hundredfold margin."""

CERTIFY_ROUNDING_SIGMAS = 2.0
"""Multiple of the expected size of one rounding of the stored weight (see :func:`rounding_allowance`) that the
singular-pair identities may be off by for a 16-bit weight (bf16, fp16)."""

_CERTIFY_SIDES = ("both", "left", "right")


class SubspaceMismatch(ValueError):
    """Bases that are not a top-k singular basis of the weight they are checked against
    (raised by :func:`certify_subspace`; its message says which check failed and by how much)."""


def rounding_allowance(weight: torch.Tensor, basis: torch.Tensor, side: str) -> float:
    """Expected Frobenius size of one rounding of ``weight`` to its stored dtype, seen through ``basis``: with E the
    rounding error (entries independent, zero-mean, uniform within ± half the spacing ulp_ij of the dtype at
    W_ij, so Var E_ij = ulp_ij²/12), ``sqrt(E‖E·V‖_F²) = sqrt(Σ_ij ulp_ij²/12 · ‖V_j,:‖²)`` for ``side="right"``
    (basis V, n×k) and ``sqrt(E‖Uᵀ·E‖_F²) = sqrt(Σ_ij ulp_ij²/12 · ‖U_i,:‖²)`` for ``side="left"`` (basis U, m×k).

    bf16 keeps 8 significant bits, so ulp_ij / |W_ij| ∈ (2⁻⁸, 2⁻⁷] and one rounding moves an entry by about 2⁻⁹
    of its size (rms); 0.0 for fp32 and fp64 weights, whose rounding the floor ``CERTIFY_PAIR_TOL`` covers. A
    weight trained off-principal with fp32 master weights is stored as round(W0 + ΔW): its pairs hold up to
    exactly this one rounding (a weight rounded at every step without master weights drifts further).
    """
    if not weight.is_floating_point() or weight.dtype in (torch.float32, torch.float64):
        return 0.0
    info = torch.finfo(weight.dtype)
    W = weight.detach().to(torch.float32)
    exponent = torch.frexp(W).exponent  # W = f · 2^e, f ∈ [0.5, 1): the spacing there is eps · 2^(e − 1)
    ulp = torch.ldexp(torch.full_like(W, info.eps / 2), exponent).clamp_min_(info.tiny * info.eps)
    var = ulp.square_().div_(12.0)
    if side == "right":
        expected = var.sum(dim=0) @ basis.square().sum(dim=1)
    else:
        expected = var.sum(dim=1) @ basis.square().sum(dim=1)
    return float(expected.sqrt())


def subspace_from_bases(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> Subspace:
    """A :class:`Subspace` from bases given without singular values: ``S = diag(Uᵀ W V)`` (fp32).

    For a true top-k pair (U, V) of W this is exactly the top-k singular values (with the columns' signs);
    :func:`certify_subspace` then checks the pairs against W as for any other basis.
    """
    W = weight.detach().to(torch.float32)
    U = U.detach().to(device=W.device, dtype=torch.float32)
    V = V.detach().to(device=W.device, dtype=torch.float32)
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1] or U.shape[0] != W.shape[0] or V.shape[0] != W.shape[-1]:
        raise SubspaceMismatch(
            f"bases U {tuple(U.shape)}, V {tuple(V.shape)} do not fit a weight of shape {tuple(W.shape)}: "
            "U must be (out, k) and V (in, k)"
        )
    S = ((U.T @ W) * V.T).sum(dim=1)
    return Subspace(U.contiguous(), S.contiguous(), V.contiguous())


def certify_subspace(
    weight: torch.Tensor,
    subspace: Union[Subspace, tuple[torch.Tensor, torch.Tensor]],
    *,
    sides: str = "both",
    tol: Optional[float] = None,
    topk_tol: float = CERTIFY_TIE_TOL,
    name: str = "",
) -> None:
    """Check that ``subspace`` is a top-k singular basis of ``weight`` (m×n, (out, in) orientation); raise
    :class:`SubspaceMismatch` saying what does not match, else return ``None``.

    A ``(U, V)`` tuple gets ``S = diag(Uᵀ W V)`` (:func:`subspace_from_bases`). The checks, in fp32 on the
    weight's device:

    1. shapes U (m, k), S (k,), V (n, k); every entry of U, S, V finite;
    2. orthonormal columns: ``max |UᵀU − I|, max |VᵀV − I| ≤ 1e-4``;
    3. singular pairs: ``‖W·V − U·diag(S)‖_F ≤ tol·‖S‖_F + CERTIFY_ROUNDING_SIGMAS·rounding_allowance(W, V)``
       (right) and ``‖Uᵀ·W − diag(S)·Vᵀ‖_F ≤ tol·‖S‖_F + CERTIFY_ROUNDING_SIGMAS·rounding_allowance(W, U)``
       (left), ``tol = CERTIFY_PAIR_TOL`` (1e-4) unless given. The second term is twice the expected size of one
       rounding of W to its dtype (0 for fp32; ≈ 2⁻⁹ relative per entry for bf16, seen through the k basis
       vectors), so a bf16 weight trained off-principal with fp32 master weights passes while the bases of a bf16
       weight 0.5% away (≈ 3 roundings' worth) fail. ``sides`` names the identities that must hold: off-principal
       training with ``sides="both"`` keeps both exactly (Uᵀ P(D) = 0 and P(D) V = 0), ``"left"`` keeps the left
       one, ``"right"`` the right one; a fresh SVD satisfies both;
    4. top k: no singular value of the residual R = W − U·diag(S)·Vᵀ exceeds
       ``s = min|S| · (1 + topk_tol) + CERTIFY_ROUNDING·‖W‖_F``. Decided exactly (not estimated): σ₁(R) < s iff
       ``s²·I − G`` is positive definite, G = R·Rᵀ (m ≤ n) or Rᵀ·R, i.e. iff its Cholesky factorization
       (``torch.linalg.cholesky_ex``) succeeds. For genuine pairs, R holds exactly the singular pairs left out,
       so this refuses any choice of pairs that leaves out a singular value above the smallest kept one by more
       than ``topk_tol`` (relative). The default ``topk_tol = CERTIFY_TIE_TOL`` (1e-4) is the tie tolerance for
       bases of the weight itself (fresh SVDs, cache hits); pairs within it are tied and any basis of them passes.
       Bases of a weight that has trained since they were computed need an allowance for the training: off-
       principal training adds ΔW to R, raising σ₁(R) by up to ‖ΔW‖₂
       (:data:`offprincipal.optim.bases.TRAINED_TOPK_TOL`).

    Cost: two products with W for the pairs (W·V, Uᵀ·W: O(m·n·k)), forming R (O(m·n·k)), its Gram matrix on the
    smaller side (O(m·n·min(m, n)), one GEMM) and a Cholesky factorization (O(min(m, n)³/3)); a 16-bit weight adds
    a few elementwise passes over W. Measured 7.8% of the fp32 SVD it replaces on SmolLM2
    (benchmarks/results/certificate_smollm2_cpu.md). On failure σ₁(R) is computed for the message.
    """
    what = f"the bases of {name!r}" if name else "the bases"
    if sides not in _CERTIFY_SIDES:
        raise ValueError(f"certify_subspace: sides must be one of {_CERTIFY_SIDES}, got {sides!r}")
    if weight.ndim != 2:
        raise ValueError(f"certify_subspace: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if tol is None:
        tol = CERTIFY_PAIR_TOL
    if not isinstance(subspace, Subspace):
        U, V = subspace
        if not (torch.isfinite(U).all() and torch.isfinite(V).all()):
            raise SubspaceMismatch(f"{what}: U or V has a non-finite entry (NaN or inf)")
        subspace = subspace_from_bases(weight, U, V)
    W = weight.detach().to(torch.float32)
    U, S, V = (t.detach().to(device=W.device, dtype=torch.float32) for t in (subspace.U, subspace.S, subspace.V))
    m, n = W.shape
    if U.ndim != 2 or V.ndim != 2 or S.ndim != 1 or U.shape != (m, S.shape[0]) or V.shape != (n, S.shape[0]):
        raise SubspaceMismatch(
            f"{what}: shapes U {tuple(U.shape)}, S {tuple(S.shape)}, V {tuple(V.shape)} do not fit a weight of "
            f"shape {(m, n)} (U must be (out, k), S (k,), V (in, k))"
        )
    k = S.shape[0]
    if not torch.isfinite(S).all():
        raise SubspaceMismatch(f"{what}: S has a non-finite entry (NaN or inf)")
    eye = torch.eye(k, device=W.device)
    for label, t in (("U", U), ("V", V)):
        gram = t.T @ t  # a non-finite entry of column j makes (tᵀt)_jj non-finite: the finiteness check of t
        if not torch.isfinite(gram.diagonal()).all():
            raise SubspaceMismatch(f"{what}: {label} has a non-finite entry (NaN or inf)")
        err = float((gram - eye).abs().max())
        if not err <= 1e-4:
            raise SubspaceMismatch(f"{what}: the columns of {label} are not orthonormal (max |{label}ᵀ{label} − I| = {err:.2e} > 1e-4)")
    scale = float(S.norm()) or float(W.norm()) or 1.0
    SVt = S[:, None] * V.T  # (k, n)
    for side, used, basis in (("right", sides in ("both", "right"), V), ("left", sides in ("both", "left"), U)):
        if not used:
            continue
        off = torch.addcmul(W @ V, U, S, value=-1) if side == "right" else U.T @ W - SVt
        allowed = tol * scale + CERTIFY_ROUNDING_SIGMAS * rounding_allowance(weight, basis, side)
        rel, limit = float(off.norm()) / scale, allowed / scale
        if not rel <= limit:
            label = "W·V − U·diag(S)" if side == "right" else "Uᵀ·W − diag(S)·Vᵀ"
            raise SubspaceMismatch(
                f"{what} are not singular pairs of this weight: ‖{label}‖_F / ‖S‖_F = {rel:.2e} > {limit:.2e} "
                f"(the fp32 floor {tol:.0e} plus twice one rounding of the {str(weight.dtype).replace('torch.', '')} "
                "weight): they belong to another weight, or are damaged"
            )
    s_k = float(S.abs().min())
    bound = s_k * (1 + topk_tol) + CERTIFY_ROUNDING * float(W.norm())
    R = torch.addmm(W, U, SVt, alpha=-1)  # W − U·diag(S)·Vᵀ, (m, n)
    G = R @ R.T if m <= n else R.T @ R
    if bool(torch.isfinite(G).all()):
        G.neg_().diagonal().add_(bound * bound)  # s²·I − G
        if int(torch.linalg.cholesky_ex(G).info) == 0:
            return
    raise SubspaceMismatch(
        f"{what} are singular pairs of this weight but not its top {k}: the part of the weight outside them has a "
        f"singular value ≥ {_top_singular_value(R):.6g}, above the smallest kept one {s_k:.6g} × (1 + {topk_tol:g}) "
        f"(+ rounding {CERTIFY_ROUNDING * float(W.norm()):.2g})"
    )


def _top_singular_value(R: torch.Tensor, iters: int = 30) -> float:
    """A lower bound of σ₁(R) for a message: ``iters`` power iterations on the smaller Gram matrix from a fixed start
    (cheap: O(min(m, n)²) each once the Gram matrix is formed)."""
    if not bool(torch.isfinite(R).all()):
        return float("inf")
    G = R @ R.T if R.shape[0] <= R.shape[1] else R.T @ R
    x = torch.ones(G.shape[0], dtype=G.dtype, device=G.device)
    for _ in range(iters):
        y = G @ x
        norm = float(y.norm())
        if norm == 0.0:
            return 0.0
        x = y / norm
    return float(x @ (G @ x)) ** 0.5


def fingerprint(weight: torch.Tensor) -> str:
    """BLAKE2b digest (32 hex chars) of a tensor's dtype, shape and bytes."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


FINGERPRINT_RE = re.compile(r"[0-9a-f]{32}")
"""The only form a fingerprint (:func:`fingerprint`) takes: 32 lowercase hex digits."""
_TAG_RE = re.compile(r"exact|randomized-o[0-9]{1,6}-n[0-9]{1,6}-s[0-9]{1,20}")


class SubspaceCache:
    """Content-addressed store of :class:`Subspace` files: ``<dir>/<fp[:2]>/<fp>-<tag>-k<k>.safetensors``.

    Keys are data, never paths: a fingerprint is 32 lowercase hex digits, a tag one of :meth:`tag`'s forms and k
    a positive int; :meth:`path` refuses anything else (e.g. a crafted ``../`` in a state dict's metadata), so
    no file outside :attr:`directory` is ever read or written. Files are written to a temporary name and renamed
    (the temporary file is removed on failure). A location that cannot be written (a file where a folder should
    be, no permission, a full disk: any of :data:`~offprincipal.files.WRITE_ERRORS`) gives one warning per folder
    and :meth:`store` returns ``False``; callers go on without the cache. What :meth:`load` returns has the file's header checked (fingerprint, tag, format version,
    shapes, k, fp32) and, when the ``weight`` is given, is certified against it (:func:`certify_subspace`).
    """

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = Path(directory)

    @classmethod
    def for_dir(cls, cache_dir: Union[str, os.PathLike, None, bool]) -> Optional["SubspaceCache"]:
        """The cache a ``cache_dir`` option names: ``None``/``True`` → :func:`default_cache_dir`, ``False`` → no
        cache (``None``), else that folder."""
        if cache_dir is False:
            return None
        return cls(default_cache_dir() if cache_dir in (None, True) else cache_dir)

    @staticmethod
    def tag(method: str, oversample: int = DEFAULT_OVERSAMPLE, niter: int = DEFAULT_NITER, seed: int = DEFAULT_SEED) -> str:
        """The part of a key that names the SVD method and its settings: ``"exact"`` or
        ``"randomized-o<oversample>-n<niter>-s<seed>"``."""
        if method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {method!r}")
        return "exact" if method == "exact" else f"randomized-o{int(oversample)}-n{int(niter)}-s{int(seed)}"

    @staticmethod
    def check_key(fp, k, tag) -> None:
        """Raise ``ValueError`` unless ``fp`` is a fingerprint, ``k`` a positive int and ``tag`` a :meth:`tag`."""
        if not isinstance(fp, str) or not FINGERPRINT_RE.fullmatch(fp):
            raise ValueError(f"subspace cache: {fp!r} is not a weight fingerprint (32 lowercase hex digits)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"subspace cache: k must be a positive int, got {k!r}")
        if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
            raise ValueError(f"subspace cache: {tag!r} is not an SVD method tag ('exact' or 'randomized-o<int>-n<int>-s<int>')")

    def path(self, fp: str, k: int, tag: str) -> Path:
        """Where the entry (fp, k, tag) lives; ``ValueError`` for a malformed key."""
        self.check_key(fp, k, tag)
        return self.directory / fp[:2] / f"{fp}-{tag}-k{k}.safetensors"

    def load(
        self, fp: str, shape: tuple[int, int], k: int, tag: str, device, *, weight: Optional[torch.Tensor] = None
    ) -> Optional[Subspace]:
        """The stored entry, or ``None`` (with a warning naming the file) when it is missing, unreadable, its
        header does not match the key, or — with ``weight`` — it fails :func:`certify_subspace` against it
        (randomized entries are checked on their exact identity, Uᵀ·W = diag(S)·Vᵀ: Rayleigh–Ritz pairs satisfy
        that one exactly and the other only up to the range finder's error)."""
        path = self.path(fp, k, tag)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path), device=str(device))
            sub = Subspace(tensors["U"], tensors["S"], tensors["V"])
            ok = (
                meta.get("fingerprint") == fp
                and meta.get("method") == tag
                and meta.get("version") == CACHE_FORMAT_VERSION
                and sub.shape == tuple(shape)
                and sub.k == k
                and all(t.dtype == torch.float32 for t in (sub.U, sub.S, sub.V))
            )
        except Exception as exc:  # unreadable or truncated file: recompute it
            logger.warning("subspace cache file %s is unreadable (%s); recomputing", path, exc)
            return None
        if not ok:
            logger.warning("subspace cache file %s does not match its weight (fingerprint/shape/k); recomputing", path)
            return None
        if weight is not None:
            try:
                certify_subspace(weight, sub, sides="both" if tag == "exact" else "left")
            except SubspaceMismatch as exc:
                logger.warning("subspace cache file %s failed its check against the weight (%s); recomputing", path, exc)
                return None
        return sub

    def store(self, fp: str, k: int, tag: str, sub: Subspace) -> bool:
        """Write the entry atomically; ``False`` (one warning per folder, no file left behind) when the location
        cannot be written."""
        path = self.path(fp, k, tag)
        tensors = {"U": sub.U.detach().contiguous().cpu(), "S": sub.S.detach().cpu(), "V": sub.V.detach().contiguous().cpu()}
        meta = {"fingerprint": fp, "method": tag, "version": CACHE_FORMAT_VERSION, "shape": f"{sub.shape}"}
        try:
            with atomic_file(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
            return True
        except WRITE_ERRORS as exc:  # a full disk raises SafetensorError from save_file, not OSError
            cache_unwritable("subspace cache", self.directory, exc, "Point cache_dir (or $OFFPRINCIPAL_CACHE_DIR) at "
                             "a writable folder with free space to keep the bases between runs.")
            return False


def compute_subspaces(
    weights: Mapping[str, torch.Tensor],
    top_k: TopK,
    *,
    top_k_pattern: Optional[Mapping[str, TopK]] = None,
    method: str = "exact",
    cache_dir: Union[str, os.PathLike, None, bool] = None,
    progress: bool = True,
    batch_exact: bool = False,
    batch_size: int = 16,
    oversample: int = DEFAULT_OVERSAMPLE,
    niter: int = DEFAULT_NITER,
    seed: int = DEFAULT_SEED,
) -> dict[str, Subspace]:
    """Top-k bases of every weight in ``weights`` (name → 2-D tensor in (out, in) orientation).

    ``cache_dir``: ``None`` uses :func:`default_cache_dir`, ``False`` disables the cache. Cache hits skip the
    SVD; misses are computed, stored, and timed. With ``batch_exact`` the exact SVDs of equal-shape weights run
    as batched ``torch.linalg.svd`` calls of up to ``batch_size`` matrices. Off by default: batching was measured
    sometimes faster and sometimes far slower than one by one (benchmarks/results/design_figures.md). Bases are
    returned on each weight's device.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {method!r}")
    cache = SubspaceCache.for_dir(cache_dir)
    tag = SubspaceCache.tag(method, oversample, niter, seed)
    ks = {name: resolve_top_k(top_k, tuple(w.shape), name, top_k_pattern) for name, w in weights.items()}

    result: dict[str, Subspace] = {}
    fps: dict[str, str] = {}
    misses: list[str] = []
    start = time.perf_counter()
    for name, w in weights.items():
        if cache is not None:
            fps[name] = fingerprint(w)
            hit = cache.load(fps[name], tuple(w.shape), ks[name], tag, w.device, weight=w)
            if hit is not None:
                result[name] = hit
                continue
        misses.append(name)

    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in misses:
        w = weights[name]
        key = (tuple(w.shape), ks[name], str(w.device), w.dtype) if (batch_exact and method == "exact") else (name,)
        groups[key].append(name)
    chunks = [names[i : i + batch_size] for names in groups.values() for i in range(0, len(names), batch_size)]

    with tqdm(total=len(misses), desc="principal subspaces", unit="weight", disable=not progress or not misses) as bar:
        for names in chunks:
            if len(names) > 1:
                subs = _batched_exact([weights[n] for n in names], ks[names[0]])
            else:
                subs = [top_k_subspace(weights[names[0]], ks[names[0]], method, oversample=oversample, niter=niter, seed=seed)]
            for name, sub in zip(names, subs):
                result[name] = sub
                if cache is not None and not cache.store(fps[name], ks[name], tag, sub):
                    cache = None  # unusable location: warned once, the run goes on uncached
            bar.update(len(names))
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{len(weights) - len(misses)} cached, total {elapsed:.2f} s")
    if weights:
        logger.info(
            "principal subspaces: %d computed (%s), %d from cache, in %.2f s",
            len(misses), method, len(weights) - len(misses), elapsed,
        )
    return {name: result[name] for name in weights}


def weight_matrix(module: torch.nn.Module, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The (out, in) weight matrix of a linear-like module; GPT-2 ``Conv1D`` stores (in, out) and is transposed."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight
    return weight.T if (fan_in_fan_out or isinstance(module, Conv1D)) else weight

