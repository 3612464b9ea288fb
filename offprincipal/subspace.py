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
(W·V = U·diag(S), Uᵀ·W = diag(S)·Vᵀ), and the top k (the residual W − U·diag(S)·Vᵀ has no singular value
much above the smallest kept one).
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

from .files import WRITE_ERRORS, cache_unwritable

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

CERTIFY_TOPK_TOL = 0.5
"""Default ``topk_tol`` of :func:`certify_subspace`: the part of W outside the bases may have a top singular value
of at most ``S_k · 1.5``. A fresh SVD gives σ_{k+1} ≤ S_k; off-principal training adds at most ‖ΔW‖₂ to it."""

CERTIFY_NITER = 4
"""Default ``niter`` of :func:`certify_subspace`: block Krylov steps on the residual (one product with it and one
with its transpose each; the first step shares its passes over W with the singular-pair checks)."""

CERTIFY_BLOCK = 4
"""Block size (columns) of :func:`certify_subspace`'s Krylov iteration."""

_CERTIFY_SIDES = ("both", "left", "right")


class SubspaceMismatch(ValueError):
    """Bases that are not a top-k singular basis of the weight they are checked against
    (raised by :func:`certify_subspace`; its message says which check failed and by how much)."""


def pair_tolerance(dtype: torch.dtype) -> float:
    """Default relative tolerance of the singular-pair identities for a weight stored in ``dtype``:
    ``max(1e-3, 8·eps(dtype))`` — 1e-3 for fp32/fp64, 7.8e-3 for fp16, 0.0625 for bf16 (rounding of the stored
    weight after training moves W·V away from U·diag(S) by a few units of its last place)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(1e-3, 8.0 * eps)


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
    topk_tol: float = CERTIFY_TOPK_TOL,
    niter: int = CERTIFY_NITER,
    seed: int = DEFAULT_SEED,
    name: str = "",
) -> None:
    """Check that ``subspace`` is a top-k singular basis of ``weight`` (m×n, (out, in) orientation); raise
    :class:`SubspaceMismatch` saying what does not match, else return ``None``.

    A ``(U, V)`` tuple gets ``S = diag(Uᵀ W V)`` (:func:`subspace_from_bases`). The checks, in fp32 on the
    weight's device, with ``tol = pair_tolerance(weight.dtype)`` unless given:

    1. shapes U (m, k), S (k,), V (n, k); every entry of U, S, V finite;
    2. orthonormal columns: ``max |UᵀU − I|, max |VᵀV − I| ≤ 1e-4``;
    3. singular pairs: ``‖W·V − U·diag(S)‖_F ≤ tol·‖S‖_F`` (right) and ``‖Uᵀ·W − diag(S)·Vᵀ‖_F ≤ tol·‖S‖_F``
       (left). ``sides`` names the identities that must hold: off-principal training with ``sides="both"``
       keeps both exactly (Uᵀ P(D) = 0 and P(D) V = 0), ``"left"`` keeps the left one, ``"right"`` the right one;
       a fresh SVD satisfies both;
    4. top k: ``σ₁(W − U·diag(S)·Vᵀ) ≤ min|S| · (1 + topk_tol) + 1e-6·‖S‖_F`` (the last term absorbs the fp32
       rounding of the products). A fresh SVD gives σ_{k+1} ≤ σ_k; after off-principal training σ₁ grows by at
       most ‖ΔW‖₂, so the default ``topk_tol`` passes any resume whose update is smaller than half of the k-th
       singular value, while bases of minor directions (σ₁(W) against a small S) fail.

       σ₁ of the residual R = W − U·diag(S)·Vᵀ (applied as an operator, never formed) is estimated by ``niter``
       steps of block Golub–Kahan–Lanczos with full reorthogonalization, block b = min(``CERTIFY_BLOCK``, m, n),
       from a Gaussian start Q₁ (n×b, orthonormalized) seeded by ``seed``: step j computes R·Q_j and
       orthonormalizes it against P₁ … P_{j−1} into P_j (m×b), computes P_jᵀ·R, and orthonormalizes (P_jᵀ·R)ᵀ
       against Q₁ … Q_j into Q_{j+1}; the steps stop early once another block would not fit, (j + 1)·b >
       min(m, n). With P = [P₁ … P_j] and c the top left singular vector of Pᵀ·R, the estimate is
       ``‖Rᵀ·(P·c)‖ / ‖P·c‖``: the norm ratio of Rᵀ on one vector, so a lower bound of σ₁(R) however the
       orthogonalizations round, and this check never refuses a genuine basis because of ``niter``. In exact
       arithmetic it is the largest Ritz value of Rᵀ on span(R·K), K = span(Q₁, (RᵀR)·Q₁, …, (RᵀR)^(j−1)·Q₁),
       hence at least ``‖R·Q‖₂`` for every Q with orthonormal columns in K — in particular at least the estimate
       of ``niter − 1`` block power iterations from the same Q₁.

    Cost: the first Krylov step shares its passes over W with the pair checks: one product W·[V Q₁] ([V Q₁] is
    n×(k+b); W·Q₁ alone when ``sides="left"``) and one [U P₁]ᵀ·W ([U P₁] is m×(k+b); P₁ᵀ·W alone when
    ``sides="right"``); each further step makes one product W·Q_j and one P_jᵀ·W with b columns. In all at most
    ``2·niter`` passes over W and O(m·n·(k + 2·b·niter) + (m + n)·(k + b·niter)²) flops, against
    O(m·n·min(m, n)) for the SVD it replaces.
    """
    what = f"the bases of {name!r}" if name else "the bases"
    if sides not in _CERTIFY_SIDES:
        raise ValueError(f"certify_subspace: sides must be one of {_CERTIFY_SIDES}, got {sides!r}")
    if weight.ndim != 2:
        raise ValueError(f"certify_subspace: expected a 2-D weight, got shape {tuple(weight.shape)}")
    if tol is None:
        tol = pair_tolerance(weight.dtype)
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
    top = _certify_pairs_and_residual_norm(W, U, S, V, sides, tol, scale, niter, seed, what)
    s_k = float(S.abs().min())
    bound = s_k * (1 + topk_tol)
    if not top <= bound + 1e-6 * scale:
        raise SubspaceMismatch(
            f"{what} are singular pairs of this weight but not its top {k}: the part of the weight outside them has a "
            f"singular value ≥ {top:.4g}, above the smallest kept one {s_k:.4g} × (1 + {topk_tol:g})"
        )


def _pairs_failed(what: str, label: str, rel: float, tol: float) -> SubspaceMismatch:
    return SubspaceMismatch(
        f"{what} are not singular pairs of this weight: ‖{label}‖_F / ‖S‖_F = {rel:.2e} > {tol:.1e} (they belong "
        "to another weight, or are damaged)"
    )


def _orthonormal_against(X: torch.Tensor, basis: Optional[torch.Tensor]) -> torch.Tensor:
    """Orthonormal columns spanning X with the span of ``basis`` (orthonormal columns) removed (two Gram–Schmidt
    passes, then QR)."""
    if basis is not None:
        for _ in range(2):
            X = torch.addmm(X, basis, basis.T @ X, alpha=-1)
    return torch.linalg.qr(X).Q


def _certify_pairs_and_residual_norm(W, U, S, V, sides, tol, scale, niter, seed, what) -> float:
    """Steps 3 and 4 of :func:`certify_subspace`: raise if a singular-pair identity of ``sides`` fails, else return
    the Krylov lower bound of σ₁(W − U diag(S) Vᵀ) (the first Krylov step fused into the pair products)."""
    m, n = W.shape
    k = S.shape[0]
    b = min(CERTIFY_BLOCK, m, n)
    gen = torch.Generator(device=W.device).manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, b, device=W.device, dtype=W.dtype, generator=gen)).Q
    SVt = S[:, None] * V.T  # (k, n), formed once: Uᵀ·W − SVt is the left identity, Yᵀ·R = Yᵀ·W − (Yᵀ·U)·SVt
    right, left = sides in ("both", "right"), sides in ("both", "left")
    Ps: Optional[torch.Tensor] = None  # left blocks (m, j·b)
    Qs: Optional[torch.Tensor] = None  # right blocks (n, j·b)
    PtR: list[torch.Tensor] = []  # P_jᵀ·R, (b, n) each
    steps = max(int(niter), 1)
    for j in range(steps):
        if j == 0 and right:
            WVQ = W @ torch.cat([V, Q], dim=1)  # one pass: the right pairs and W·Q₁
            rel = float(torch.addcmul(WVQ[:, :k], U, S, value=-1).norm()) / scale
            if not rel <= tol:
                raise _pairs_failed(what, "W·V − U·diag(S)", rel, tol)
            WQ = WVQ[:, k:]
        else:
            WQ = W @ Q
        RQ = torch.addmm(WQ, U, SVt @ Q, alpha=-1)  # R·Q_j = W·Q_j − U·(diag(S)·Vᵀ·Q_j), (m, b)
        P = _orthonormal_against(RQ, Ps)
        if j == 0 and left:
            UPW = torch.cat([U, P], dim=1).T @ W  # one pass: the left pairs and P₁ᵀ·W
            rel = float((UPW[:k] - SVt).norm()) / scale
            if not rel <= tol:
                raise _pairs_failed(what, "Uᵀ·W − diag(S)·Vᵀ", rel, tol)
            PtW = UPW[k:]
        else:
            PtW = P.T @ W
        PtR.append(torch.addmm(PtW, P.T @ U, SVt, alpha=-1))  # P_jᵀ·R, (b, n)
        Qs = Q if Qs is None else torch.cat([Qs, Q], dim=1)
        Ps = P if Ps is None else torch.cat([Ps, P], dim=1)
        if j + 1 < steps:
            if Qs.shape[1] + b > n or Ps.shape[1] + b > m:
                break  # the Krylov space fills the whole space: no room for another block
            Q = _orthonormal_against(PtR[-1].T, Qs)
    M = torch.cat(PtR, dim=0)  # Pᵀ·R, (j·b, n)
    G = M @ M.T
    if not torch.isfinite(G).all():
        return float("inf")
    c = torch.linalg.eigh(G).eigenvectors[:, -1:]  # top left singular vector of M, (j·b, 1)
    den = float((Ps @ c).norm())
    return float((M.T @ c).norm()) / den if den > 0 else 0.0


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
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tensors = {"U": sub.U.detach().contiguous().cpu(), "S": sub.S.detach().cpu(), "V": sub.V.detach().contiguous().cpu()}
        meta = {"fingerprint": fp, "method": tag, "version": CACHE_FORMAT_VERSION, "shape": f"{sub.shape}"}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
            return True
        except WRITE_ERRORS as exc:  # a full disk raises SafetensorError from save_file, not OSError
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
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

