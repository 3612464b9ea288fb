"""The bases of the weights an optimizer projects (:class:`PrincipalBases`): built, certified, cached,
broadcast and found again by parameter name; shared by both optimizers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..distributed import (
    bases_on_rank0,
    broadcast_bases,
    broadcast_object,
    full_weight,
    is_distributed,
    local_device,
    subspace_bases,
)
from ..integrations.deepspeed import check_not_flattened
from ..options import ProjectionOptions
from ..projection import row_shard
from ..subspace import (
    CERTIFY_TIE_TOL,
    DEFAULT_NITER,
    DEFAULT_OVERSAMPLE,
    DEFAULT_SEED,
    Subspace,
    SubspaceCache,
    SubspaceMismatch,
    certify_subspace,
    compute_subspaces,
    fingerprint,
    resolve_top_k,
)


TRAINED_TOPK_TOL = 1.0
"""``topk_tol`` of :func:`~offprincipal.subspace.certify_subspace` for bases checked against weights that may have
trained since the bases were computed (a saved state's bases, bases given in ``subspaces=``): the allowance for the
training, on top of the tie tolerance :data:`~offprincipal.subspace.CERTIFY_TIE_TOL` that bases of the weight itself
get. With W = W0 + ΔW and ΔW off-principal, the residual W − U·diag(S)·Vᵀ is W0's residual plus ΔW, so its top
singular value is at most σ_{k+1}(W0) + ‖ΔW‖₂ ≤ S_k + ‖ΔW‖₂: a resume passes while training has moved the weight by
less than its k-th singular value in spectral norm (RLVR's updates are far smaller; the resume test at lr 3e-2
reaches about that). The pair identities (tolerance: twice one rounding of the stored weight) are what refuse a
state of another model; this allowance is what the top-k part cannot tell apart: genuine singular pairs whose
left-out values are below 2·S_k pass it, exactly as a weight trained by that much would."""

BasesInput = Mapping[str, Union[Subspace, tuple[torch.Tensor, torch.Tensor]]]



# ---------------------------------------------------------------------------------------------------------------
# the bases of the projected weights


@dataclass
class _Basis:
    U: torch.Tensor  # (m, k) fp32, all rows
    V: torch.Tensor  # (n, k) fp32
    meta: dict  # fingerprint ("" if given by the user), k, method, shape


def _on_rank0_then_everywhere(names: Sequence[str], work) -> dict[str, str]:
    """Run ``work(name)`` for every name on every rank, in order (it may contain collectives, e.g. gathering a
    DTensor); the ``{name: reason}`` of rank 0's failures (``work`` returns a string) reaches every rank."""
    failures = {}
    for name in names:
        reason = work(name)
        if reason is not None:
            failures[name] = reason
    return broadcast_object(failures) if is_distributed() else failures


def _rank0() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def _mismatch_error(owner: str, what: str, failures: Mapping[str, str], advice: str) -> SubspaceMismatch:
    listed = "; ".join(f"{name}: {reason}" for name, reason in list(failures.items())[:3])
    more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
    return SubspaceMismatch(f"{owner}: {what} do not fit the live weights — {listed}{more}. {advice}")


class PrincipalBases:
    """The bases of the weights an optimizer projects, by parameter name (never by parameter object: wrappers
    such as accelerate swap the objects after construction), with their local row slices for sharded params.

    Every basis is either computed from the live weight (a fresh SVD, or a cache entry certified against it) or
    certified against the live weight with :func:`~offprincipal.subspace.certify_subspace` before it is used
    (bases given by the user, bases named by a saved state). With several ranks the certification runs on rank
    0, where the real weights are, and its verdict is broadcast.

    ``options`` (validated when it was built, so before any collective) chooses the weights (``exclude``), their k
    (``top_k``, ``top_k_pattern``), how bases are computed (``svd_method``, ``cache_dir``, ``progress``) and the
    ``sides`` certified; ``explicit``: the bases came from the user (``subspaces=``), so none are computed.
    """

    def __init__(self, owner: str, entries: dict[str, _Basis], options: ProjectionOptions, *,
                 params: Optional[Mapping[str, torch.Tensor]] = None, explicit: bool = False):
        if not isinstance(options, ProjectionOptions):
            raise TypeError(f"{owner}: PrincipalBases takes a ProjectionOptions, got {type(options).__name__}")
        self.owner = owner
        self.entries = entries
        self.options = options
        self.explicit = explicit
        self.params: dict[str, torch.Tensor] = dict(params or {})
        self._local: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def eligible(name: str, p: torch.Tensor, exclude: Sequence[str]) -> bool:
        return (p.ndim == 2 and p.is_floating_point() and p.requires_grad
                and not any(re.search(pat, name) for pat in exclude))

    @classmethod
    def build(
        cls,
        owner: str,
        named: Mapping[str, torch.Tensor],
        options: ProjectionOptions,
        subspaces: Optional[BasesInput] = None,
    ) -> "PrincipalBases":
        bases = cls(owner, {}, options, params=named, explicit=subspaces is not None)
        for name, p in named.items():
            check_not_flattened(owner, name, p)
        bases.entries = bases._given(named, subspaces) if subspaces is not None else bases._computed(named)
        return bases

    def _computed(self, named: Mapping[str, torch.Tensor]) -> dict[str, _Basis]:
        """Fresh bases (or certified cache entries) of the eligible weights among ``named``."""
        o = self.options
        tag = SubspaceCache.tag(o.svd_method, DEFAULT_OVERSAMPLE, DEFAULT_NITER, DEFAULT_SEED)
        chosen = {name: p for name, p in named.items() if self.eligible(name, p, o.exclude)}
        pattern = dict(o.top_k_pattern)
        ks = {name: resolve_top_k(o.top_k, tuple(p.shape), name, pattern) for name, p in chosen.items()}
        method, cache_dir = o.svd_method, o.cache_dir
        if is_distributed():
            def compute(name, W):
                return compute_subspaces({name: W}, ks[name], method=method, cache_dir=cache_dir, progress=False)[name]

            subs, fps = bases_on_rank0(
                chosen, {name: (tuple(p.shape), ks[name]) for name, p in chosen.items()}, compute, progress=o.progress,
            )
            uv = subspace_bases(subs)
        else:
            weights = {name: full_weight(p) for name, p in chosen.items()}
            subs = compute_subspaces(
                weights, o.top_k, top_k_pattern=pattern, method=method, cache_dir=cache_dir, progress=o.progress,
            )
            uv = subspace_bases(subs)
            fps = {name: fingerprint(w) for name, w in weights.items()}
        return {
            name: _Basis(U, V, dict(fingerprint=fps[name], k=ks[name], method=tag, shape=list(chosen[name].shape)))
            for name, (U, V) in uv.items()
        }

    def _given(self, named: Mapping[str, torch.Tensor], subspaces: BasesInput) -> dict[str, _Basis]:
        """The user's bases, checked for shape on every rank, then certified against the live weights."""
        owner = self.owner
        unknown = sorted(set(subspaces) - set(named))
        if unknown:
            raise ValueError(f"{owner}: subspaces were given for {unknown}, which are not among the optimizer's parameters")
        tag = SubspaceCache.tag(self.options.svd_method, DEFAULT_OVERSAMPLE, DEFAULT_NITER, DEFAULT_SEED)
        entries = {}
        for name, sub in subspaces.items():
            U, V = (sub.U, sub.V) if isinstance(sub, Subspace) else sub
            shape = tuple(named[name].shape)
            if len(shape) != 2 or U.shape[0] != shape[0] or V.shape[0] != shape[1] or U.shape[1] != V.shape[1]:
                raise ValueError(
                    f"{owner}: the bases given for {name!r} have shapes U {tuple(U.shape)}, V {tuple(V.shape)}; a weight "
                    f"of shape {shape} needs U ({shape[0] if shape else '?'}, k) and V ({shape[-1] if shape else '?'}, k)"
                )
            device = local_device(named[name])
            entries[name] = _Basis(
                U.to(device, torch.float32).contiguous(), V.to(device, torch.float32).contiguous(),
                dict(fingerprint="", k=int(U.shape[1]), method=tag, shape=list(shape)),
            )

        def certify(name):
            W = full_weight(named[name])  # collective for DTensors
            if not _rank0():
                return None
            sub = subspaces[name]
            try:
                certify_subspace(W, sub if isinstance(sub, Subspace) else (sub[0], sub[1]), sides=self.options.sides,
                                 topk_tol=CERTIFY_TIE_TOL + TRAINED_TOPK_TOL, name=name)
            except SubspaceMismatch as exc:
                return str(exc)
            return None

        failures = _on_rank0_then_everywhere(list(subspaces), certify)
        if failures:
            raise _mismatch_error(
                owner, "the bases given in subspaces=", failures,
                "Pass the top-k singular bases of these weights (offprincipal.subspace.compute_subspaces), or leave "
                "subspaces=None to compute them.",
            )
        return entries

    def extend(self, named: Mapping[str, torch.Tensor]) -> None:
        """Bases for parameters added after construction (``add_param_group``), by the construction's rules
        (``top_k``, ``top_k_pattern``, ``exclude``, ``svd_method``, cache). Refused where the optimizer was built
        from explicit ``subspaces=`` and an added weight would need a basis."""
        check_unique_names(self.owner, list(self.params) + list(named))
        for name, p in named.items():
            check_not_flattened(self.owner, name, p)
        if self.explicit:
            needing = sorted(n for n, p in named.items() if self.eligible(n, p, self.options.exclude))
            if needing:
                raise ValueError(
                    f"{self.owner}: it was built with explicit subspaces=, so it cannot choose bases for the added "
                    f"weights {needing}; construct it again with subspaces for every weight to project"
                )
            new = {}
        else:
            new = self._computed(named)
        self.params.update(named)
        self.entries.update(new)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` of the projected weight ``name``: fp32, all rows, U (m, k), V (n, k)."""
        basis = self.entries[name]
        return basis.U, basis.V

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self.entries[name].meta["shape"])

    def local(self, name: str, p: torch.Tensor):
        """(row shard of ``p``, U rows of that shard, V) for the projected parameter ``p`` called ``name``."""
        check_not_flattened(self.owner, name, p, self.shape(name))
        shard = row_shard(p, name)
        key = (shard.start, shard.stop, shard.local.device)
        cached = self._local.get(name)
        if cached is None or cached[0] != key:
            basis = self.entries[name]
            U = basis.U.to(shard.local.device)[shard.start : shard.stop].contiguous()
            cached = self._local[name] = (key, U, basis.V.to(shard.local.device))
        return shard, cached[1], cached[2]

    def metadata(self) -> dict:
        return {name: dict(b.meta) for name, b in self.entries.items()}

    def _check_saved(self, saved) -> None:
        """The saved metadata names the same weights, with their shapes, and keys that are data (no collective)."""
        if not isinstance(saved, Mapping) or not all(isinstance(v, Mapping) for v in saved.values()):
            raise ValueError(f"{self.owner}: the saved state's 'offprincipal' metadata is malformed (bases must map names to dicts)")
        ours, theirs = set(self.entries), set(saved)
        if ours != theirs:
            raise ValueError(
                f"{self.owner}: the saved state projects a different set of weights (only in the saved state: "
                f"{sorted(theirs - ours)}; only here: {sorted(ours - theirs)}). Construct the optimizer with the same "
                "top_k, top_k_pattern and exclude as the run that saved it, on the same model."
            )
        for name, info in saved.items():
            shape = info.get("shape")
            if not isinstance(shape, (list, tuple)) or [int(s) for s in shape] != list(self.shape(name)):
                raise ValueError(
                    f"{self.owner}: the saved state was made for {name!r} of shape {shape}, this weight has shape "
                    f"{list(self.shape(name))}: the state is from a different model"
                )
            try:
                if info.get("fingerprint"):
                    SubspaceCache.check_key(info["fingerprint"], info.get("k"), info.get("method"))
                k = info.get("k")
                if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(shape):
                    raise ValueError(f"k={k!r} is not valid for a weight of shape {list(shape)}")
            except ValueError as exc:
                raise ValueError(f"{self.owner}: the saved state's metadata for {name!r} is malformed: {exc}") from None

    def reconcile(self, saved: Mapping[str, Mapping[str, Any]], params: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Adopt the bases a saved state was trained with (looked up in the cache by fingerprint) where they
        differ from the ones computed at construction, e.g. when resuming from trained weights.

        The saved metadata is checked first (same weights and shapes, keys that are data); the bases found are
        certified against the live weights (``params``, default: those given at construction) with this
        optimizer's ``sides`` — off-principal training keeps W·V = U·diag(S) and/or Uᵀ·W = diag(S)·Vᵀ, so a
        genuine resume passes — and a state whose bases fail is refused with :class:`SubspaceMismatch`. Nothing
        changes unless every basis is found and certified.
        """
        self._check_saved(saved)
        live = {**self.params, **dict(params or {})}
        stale = {  # bases given by the user (no fingerprint) are kept as they are
            name: info for name, info in saved.items()
            if info.get("fingerprint") and self.entries[name].meta["fingerprint"]
            and (info["fingerprint"], info["k"], info["method"])
            != tuple(self.entries[name].meta[key] for key in ("fingerprint", "k", "method"))
        }
        if not stale:
            return
        cache = SubspaceCache.for_dir(self.options.cache_dir)
        found: dict[str, Subspace] = {}

        def fetch(name):
            info = stale[name]
            W = full_weight(live[name])  # collective for DTensors: every rank calls it
            if not _rank0():
                return None
            hit = None if cache is None else cache.load(info["fingerprint"], tuple(info["shape"]), info["k"], info["method"], "cpu")
            if hit is None:
                return "missing"
            try:
                certify_subspace(W, hit, sides=self.options.sides, topk_tol=CERTIFY_TIE_TOL + TRAINED_TOPK_TOL, name=name)
            except SubspaceMismatch as exc:
                return str(exc)
            found[name] = hit
            return None

        failures = _on_rank0_then_everywhere(list(stale), fetch)
        missing = sorted(name for name, reason in failures.items() if reason == "missing")
        if missing:
            where = "the subspace cache is disabled (cache_dir=False)" if cache is None else f"not in the cache {cache.directory}"
            raise RuntimeError(
                f"{self.owner}: the saved state was trained with the principal bases of the original weights of "
                f"{missing[:5]}{' …' if len(missing) > 5 else ''}, which differ from the current weights, and "
                f"those bases are {where}. Construct the optimizer with subspaces=compute_subspaces(<the pretrained "
                "weights>, top_k) or with the cache_dir of the original run, then load the state."
            )
        if failures:
            raise _mismatch_error(
                self.owner, "the bases the saved state was trained with", failures,
                "The state was saved by a different model (or its cache entries are damaged); load it into the model "
                "it was saved from. If it is this model's own state and training moved the weights by more than their "
                "k-th singular value (spectral norm), raise offprincipal.optim.bases.TRAINED_TOPK_TOL.",
            )
        shapes = {name: (tuple(info["shape"]), info["k"]) for name, info in stale.items()}
        device_of = lambda name: self.entries[name].U.device  # noqa: E731
        if is_distributed():
            uv = subspace_bases(broadcast_bases(shapes, found.get, device_of, progress=False))
        else:
            uv = {name: (found[name].U.to(device_of(name)), found[name].V.to(device_of(name))) for name in stale}
        for name, (U, V) in uv.items():
            self.entries[name] = _Basis(U.float().contiguous(), V.float().contiguous(), dict(stale[name]))
            self._local.pop(name, None)


def check_unique_names(owner: str, names: Sequence[str]) -> None:
    """Names identify each weight's basis: refuse a name given twice."""
    seen, dups = set(), []
    for name in names:
        if name in seen:
            dups.append(name)
        seen.add(name)
    if dups:
        raise ValueError(
            f"{owner}: the parameter name(s) {sorted(set(dups))} appear more than once; each weight's bases are found by "
            "its name, so names must be unique (pass model.named_parameters() once, without repeating a parameter)"
        )
