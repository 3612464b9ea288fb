"""The subspace bank: top-k singular bases of pretrained weights.

For a weight W0 of shape (m, n) (``out_features × in_features``, the orientation of ``nn.Linear.weight``)
with SVD W0 = U S Vᵀ, the *principal subspace* of order k is spanned by the first k columns of U
(m×k, left) and of V (n×k, right). Everything downstream (projection, adapter, optimizer, metrics) uses
these bases, always in fp32, whatever the weight's dtype.

Two methods:

- ``"exact"``: full fp32 SVD (``torch.linalg.svd``), the default. SmolLM2-class weights have tiny spectral
  gaps (σ_k/σ_{k+1} ≈ 1.001–1.013), where approximate methods pick a visibly different top-k subspace.
- ``"randomized"``: Halko–Martinsson–Tropp range finder with ``oversample`` extra columns and ``niter``
  QR-stabilised power iterations, seeded so it is deterministic. Its quality figure is the captured energy
  ``‖U_kᵀ W V_k‖_F² / Σ_{i≤k} σ_i²`` (:func:`captured_energy`). Measured on SmolLM2-135M-Instruct (14 of its
  210 linear weights, k = 32; min / mean): niter 2, oversample 32: 0.918 / 0.963; niter 8, oversample 32:
  0.9955 / 0.9989; niter 8, oversample 64: 0.9992 / 0.9999; niter 16, oversample 64 (the defaults):
  0.99999 / 1.0000.

Results are cached on disk (safetensors, one file per weight) under a key made of a fingerprint of the
weight's bytes, k and the method with its settings. A cached file whose stored fingerprint, shape or k
does not match is recomputed and overwritten, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

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


def fingerprint(weight: torch.Tensor) -> str:
    """BLAKE2b digest (32 hex chars) of a tensor's dtype, shape and bytes."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _method_tag(method: str, oversample: int, niter: int, seed: int) -> str:
    return "exact" if method == "exact" else f"randomized-o{oversample}-n{niter}-s{seed}"


class SubspaceCache:
    """Content-addressed store of :class:`Subspace` files: ``<dir>/<fp[:2]>/<fp>-<method>-k<k>.safetensors``."""

    def __init__(self, directory: Union[str, os.PathLike]):
        self.directory = Path(directory)

    def path(self, fp: str, k: int, tag: str) -> Path:
        return self.directory / fp[:2] / f"{fp}-{tag}-k{k}.safetensors"

    def load(self, fp: str, shape: tuple[int, int], k: int, tag: str, device) -> Optional[Subspace]:
        path = self.path(fp, k, tag)
        if not path.exists():
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
        return sub

    def store(self, fp: str, k: int, tag: str, sub: Subspace) -> None:
        path = self.path(fp, k, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tensors = {"U": sub.U.detach().contiguous().cpu(), "S": sub.S.detach().cpu(), "V": sub.V.detach().contiguous().cpu()}
        meta = {"fingerprint": fp, "method": tag, "version": CACHE_FORMAT_VERSION, "shape": f"{sub.shape}"}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)


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
    as batched ``torch.linalg.svd`` calls of up to ``batch_size`` matrices. Off by default: on the shared 2-core
    CPU it was sometimes faster (10 random 576×576: 5.5 s vs 14.3 s one by one) and sometimes far slower (21 of
    SmolLM2's weights: 80 s and 12.9 s batched vs 34 s and 34 s one by one; all 210: 359 s batched vs 20.5 s
    one by one in benchmarks/results/subspaces_smollm2_cpu.md). Bases are returned on each weight's device.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {method!r}")
    cache = None if cache_dir is False else SubspaceCache(default_cache_dir() if cache_dir in (None, True) else cache_dir)
    tag = _method_tag(method, oversample, niter, seed)
    ks = {name: resolve_top_k(top_k, tuple(w.shape), name, top_k_pattern) for name, w in weights.items()}

    result: dict[str, Subspace] = {}
    fps: dict[str, str] = {}
    misses: list[str] = []
    start = time.perf_counter()
    for name, w in weights.items():
        if cache is not None:
            fps[name] = fingerprint(w)
            hit = cache.load(fps[name], tuple(w.shape), ks[name], tag, w.device)
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
                if cache is not None:
                    cache.store(fps[name], ks[name], tag, sub)
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

