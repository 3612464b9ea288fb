"""Off-principal optimizers for full-parameter training.

Every update of a projected weight W (m×n, a 2-D parameter with top-k bases U (m×k), V (n×k) of its value at
construction) is kept off W's principal subspace:

    W ← W − P(Δ),   P(Δ) = (I − UUᵀ) Δ (I − VVᵀ)   (sides="both"; "left"/"right" keep one factor)

The *update* Δ is projected, not the gradient: Adam's elementwise scaling would move a projected gradient back
into the principal subspace.

- :class:`OffPrincipalAdamW`: torch AdamW's arithmetic with Δ = lr·(m̂/(√v̂+ε) + wd·W), the whole AdamW update
  including the decoupled weight decay. Parameters that are not projected (not 2-D, not floating point, frozen
  at construction, excluded by name — embeddings and the LM head by default, see :data:`DEFAULT_EXCLUDE`) step
  exactly as ``torch.optim.AdamW`` (its own functional code is called for them).
- :class:`OffPrincipalOptimizer`: wraps any torch optimizer; Δ = W_before − W_after of the base step.
- :func:`adamw_update_`: the one projected-AdamW update function (torch reference and Triton dispatch).

State dicts keep torch's layout (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) plus one
top-level ``"offprincipal"`` entry of plain metadata (sides, and per projected weight the fingerprint of the
weight the bases came from, k and the SVD method). Loading it into an optimizer constructed from *trained*
weights fetches the original bases from the subspace cache, so a resumed run follows the same trajectory.

What is checked (nothing is trusted because of its name or key):

- bases given by the user (``subspaces=``) and bases named by a saved state are certified against the live
  weights (:func:`offprincipal.subspace.certify_subspace`, top-k tolerance :data:`TRAINED_TOPK_TOL`) and
  refused with :class:`~offprincipal.subspace.SubspaceMismatch` when they do not fit; fingerprints in a saved
  state are validated as data (32 hex digits), so no file outside the cache folder is ever read;
- ``load_state_dict`` checks param groups, parameter counts, names and per-parameter state shapes before
  anything is loaded; a refused state leaves the optimizer as it was;
- parameter names are unique; ``add_param_group`` takes named parameters only and gives them bases;
- non-finite updates: a projected matrix whose gradient has a NaN or inf entry does not step (a
  ``RuntimeWarning`` names it; weight, moments and step count stay as they were), since projecting a NaN
  update would spread it over the whole matrix. The check and the skip run on the device (no host
  synchronisation in ``step()``); on CUDA the warning comes at a later step or from ``report_nonfinite()``.
  Unprojected parameters follow torch AdamW (entrywise).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from .distributed import (
    broadcast_bases,
    broadcast_object,
    check_not_flattened,
    comm_device,
    flattened_error,
    full_weight,
    is_distributed,
    local_device,
)
from ._sides import DEFAULT_PRECISION
from .options import DEFAULT_EXCLUDE, ProjectionOptions  # noqa: F401  (DEFAULT_EXCLUDE: re-exported)
from .projection import project_, resolve_backend, row_shard
from .subspace import (
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

TRAINED_TOPK_TOL = 2.0
"""``topk_tol`` of :func:`~offprincipal.subspace.certify_subspace` for bases checked against weights that may have
trained since the bases were computed (a saved state's bases, bases given in ``subspaces=``): the part of the live
weight outside the bases may have a top singular value up to 3× the smallest kept one. Off-principal training
raises that value by at most ‖ΔW‖₂, so a resume passes unless the update's spectral norm reached about twice the
k-th singular value; bases of minor directions (σ₁(W) against the smallest singular values) fail."""

BasesInput = Mapping[str, Union[Subspace, tuple[torch.Tensor, torch.Tensor]]]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------------------------
# the update function


def adam_scalars(step: float, lr: float, beta1: float, beta2: float, weight_decay: float) -> tuple[float, float, float]:
    """Host-side AdamW constants for 1-based ``step``, in torch AdamW's arithmetic (Python floats):
    ``step_size = lr / (1 − β1ᵗ)``, ``bc2_sqrt = (1 − β2ᵗ)^½``, ``lr_wd = lr · weight_decay``."""
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, lr * weight_decay


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
        from offprincipal import kernels

        kernels.projected_adamw_step_(
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
            fps: dict[str, str] = {}

            def compute(name):
                W = full_weight(chosen[name])  # collective for DTensors: every rank calls it
                if torch.distributed.get_rank() != 0:
                    return None
                fps[name] = fingerprint(W)
                sub = compute_subspaces({name: W}, ks[name], method=method, cache_dir=cache_dir, progress=False)
                return sub[name].U, sub[name].V

            uv = broadcast_bases(
                {name: (tuple(p.shape), ks[name]) for name, p in chosen.items()}, compute,
                lambda name: local_device(chosen[name]), progress=o.progress,
            )
            fps = broadcast_object(fps)
        else:
            weights = {name: full_weight(p) for name, p in chosen.items()}
            subs = compute_subspaces(
                weights, o.top_k, top_k_pattern=pattern, method=method, cache_dir=cache_dir, progress=o.progress,
            )
            uv = {name: (s.U, s.V) for name, s in subs.items()}
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
                                 topk_tol=TRAINED_TOPK_TOL, name=name)
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
                certify_subspace(W, hit, sides=self.options.sides, topk_tol=TRAINED_TOPK_TOL, name=name)
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
                "it was saved from. If it is this model's own state and training moved the weights by more than about "
                "twice their k-th singular value, raise offprincipal.optim.TRAINED_TOPK_TOL.",
            )
        shapes = {name: (tuple(info["shape"]), info["k"]) for name, info in stale.items()}
        device_of = lambda name: self.entries[name].U.device  # noqa: E731
        if is_distributed():
            uv = broadcast_bases(shapes, lambda name: (found[name].U, found[name].V) if name in found else None,
                                 device_of, progress=False)
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


class _ProjectionOptionsView:
    """Read-only shortcuts to the fields of ``self.options`` (a :class:`ProjectionOptions`) the step uses."""

    options: ProjectionOptions

    sides = property(lambda self: self.options.sides, doc="Which factors the projection keeps (``options.sides``).")
    backend = property(lambda self: self.options.backend, doc="``options.backend``.")
    precision = property(lambda self: self.options.precision, doc="``options.precision``.")


# ---------------------------------------------------------------------------------------------------------------
# OffPrincipalAdamW


class OffPrincipalAdamW(_ProjectionOptionsView, torch.optim.AdamW):
    r"""AdamW whose whole update of each projected 2-D weight stays off the weight's top-k singular subspace.

    Constructed like ``torch.optim.AdamW`` but from *named* parameters — ``model.named_parameters()``, or param
    groups whose ``"params"`` are ``(name, tensor)`` pairs — because bases are found again by name.

    Args (beyond AdamW's ``lr, betas, eps, weight_decay, maximize, foreach, fused``; ``amsgrad`` is refused):
        options: a :class:`~offprincipal.options.ProjectionOptions` (default: its defaults): ``top_k``,
            ``top_k_pattern`` (k per weight, see :func:`offprincipal.subspace.resolve_top_k`), ``sides`` (in the
            parameter's stored (out, in) layout), ``exclude`` (regexes of parameter names that step as plain
            AdamW, default :data:`DEFAULT_EXCLUDE`), ``svd_method``, ``cache_dir``, ``backend`` (``"auto"``: fused
            Triton step for CUDA params, torch elsewhere), ``precision`` (fp32 product precision of the
            projection, see ``offprincipal._sides``) and ``progress``.
        **projection_kwargs: the same fields as keywords (``top_k=8, sides="left"``); with ``options`` they
            replace its fields. An unknown keyword raises ``TypeError``; every value is validated before any
            parameter is touched (with several ranks, on every rank, before any collective).
        subspaces: precomputed bases ``{name: Subspace or (U, V)}``; exactly these weights are projected. They
            are certified against the parameters' current values (a ``(U, V)`` pair gets S = diag(Uᵀ W V));
            bases that are not a top-k singular basis of the weight are refused. Otherwise bases are computed from the parameters' current values (the pretrained weights) with the
            subspace bank (``svd_method``, ``cache_dir``); with several ranks, on rank 0 and broadcast.
        master_weights: keep an fp32 copy (``state["master_param"]``) and fp32 moments for every bf16/fp16
            parameter; the step runs on the copy, which stays exactly off-principal, and the stored parameter is
            its rounding. Without it, the rounding of the bf16/fp16 parameter at each step leaks into the
            principal subspace; the rounding of the stored copy still does with it, the fp32 copy only at fp32
            rounding (figures: benchmarks/results/design_figures.md).

    Projected params cost two fused passes per step on CUDA (≈36 bytes/param without weight decay, 40 with,
    against fused AdamW's 28). Under FSDP2 (DTensor ``Shard(0)``) the step is shard-local plus one all-reduce of
    a k×n matrix per projected weight (left side). DeepSpeed ZeRO is refused (use the adapter form).

    Non-finite policy: a projected weight whose gradient has a NaN or inf entry skips its step (weight, moments
    and step count unchanged) with a ``RuntimeWarning`` naming it. The check and the skip run on the device,
    without a host synchronisation: one batched max-|g| reduction per param group (``torch._foreach_norm`` with
    ord ∞: one extra read of the projected gradients; under FSDP2 one small all-reduce of the flags, a device
    tensor, so every rank skips the same weights) gives a flag per weight, and the update keeps the old values
    where the flag is 0 (the fused kernels mask their stores; the torch code selects the old values; the step
    count adds the flag). The projected weights' step counts therefore live on the parameter's device.

    When the warning appears: for CPU parameters, during the step that skipped. For CUDA parameters the flags
    are copied asynchronously to pinned host memory behind a CUDA event, and the warning is emitted at the
    beginning of a later ``step()`` once that event has completed (pending otherwise), or by
    :meth:`report_nonfinite`, which waits for the copies. Unprojected parameters follow torch AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        options: Optional[ProjectionOptions] = None,
        subspaces: Optional[BasesInput] = None,
        master_weights: bool = False,
        **projection_kwargs,
    ):
        options = ProjectionOptions.resolve("OffPrincipalAdamW", options, projection_kwargs)
        if amsgrad:
            raise ValueError("OffPrincipalAdamW does not implement amsgrad; use amsgrad=False")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         foreach=foreach, fused=fused)
        named = _named_params(self.param_groups, "OffPrincipalAdamW")
        self.options = options
        self._wd_cache: dict = {}
        self.master_weights = master_weights
        self.bases = PrincipalBases.build("OffPrincipalAdamW", named, options, subspaces)
        self._nonfinite_pending: list = []  # (CUDA event or None, host flags, names), oldest first
        self._defer_nonfinite: Optional[bool] = None  # None: defer on CUDA only; True: also on CPU (tests)

    def _init_state(self, p: torch.Tensor, group: dict, step_on_device: bool = False) -> dict:
        """torch AdamW's lazy state (same keys, dtypes and devices), plus the fp32 master copy when enabled.
        ``step_on_device``: the step count lives on the parameter's device (projected weights: it is advanced by
        a device-side flag), as in torch's capturable AdamW; a count loaded elsewhere is moved there once."""
        state = self.state[p]
        if not state:
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
                if group["fused"] or step_on_device else torch.tensor(0.0, dtype=_get_scalar_dtype())
            )
            target = p
            if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
                target = state["master_param"] = p.detach().to(torch.float32, copy=True)
            state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(target, memory_format=torch.preserve_format)
        elif step_on_device and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)
        return state

    def report_nonfinite(self) -> list[str]:
        """Wait for the pending non-finite flags (a host synchronisation on CUDA), emit one ``RuntimeWarning`` per
        skipped weight and step not reported yet, and return those weights' names (oldest step first)."""
        return self._report_nonfinite(wait=True)

    def _report_nonfinite(self, wait: bool) -> list[str]:
        """Warn for the pending flags whose copy has completed (all of them with ``wait``), in step order."""
        skipped = []
        while self._nonfinite_pending:
            event, host, names = self._nonfinite_pending[0]
            if event is not None:
                if not wait and not event.query():
                    break
                event.synchronize()
            self._nonfinite_pending.pop(0)
            for name, flag in zip(names, host.numpy().tolist()):  # host memory: no device read
                if not flag:
                    skipped.append(name)
                    _warn_nonfinite("OffPrincipalAdamW", name,
                                    "its step is skipped: weight, moments and step count unchanged")
        return skipped

    def _record_nonfinite(self, flags: torch.Tensor, names: list[str]) -> None:
        """Queue the device flags of one group's step for reporting (CUDA: asynchronous copy to pinned memory
        behind an event; CPU: reported now unless deferral is forced)."""
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._nonfinite_pending.append((event, host, names))
        else:
            self._nonfinite_pending.append((None, flags.clone(), names))
            if not self._defer_nonfinite:
                self._report_nonfinite(wait=True)

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every parameter with a gradient (parameters whose ``grad`` is None are skipped)."""
        loss = None
        if self._nonfinite_pending:
            self._report_nonfinite(wait=False)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names = group.get("param_names")
            if names is None or len(names) != len(group["params"]):
                raise flattened_error("OffPrincipalAdamW", "a param group's parameters")
            plain: tuple[list, ...] = ([], [], [], [], [])
            projected = []
            mastered = []
            for p, name in zip(group["params"], names):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"OffPrincipalAdamW does not support sparse gradients ({name!r})")
                state = self._init_state(p, group, step_on_device=name in self.bases)
                target = state.get("master_param", p)
                grad = p.grad if p.grad.dtype == target.dtype else p.grad.to(target.dtype)
                if "master_param" in state:
                    mastered.append((p, target))
                if name in self.bases:
                    projected.append((name, target, grad, state))
                else:
                    for lst, t in zip(plain, (target, grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                        lst.append(t)
            beta1, beta2 = group["betas"]
            if plain[0]:
                _torch_adam(
                    *plain[:4], [], plain[4], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    foreach=group["foreach"], fused=group["fused"], capturable=False, differentiable=False,
                    has_complex=any(torch.is_complex(t) for t in plain[0]), decoupled_weight_decay=True,
                )
            if not projected:
                continue
            finite = _finite_device_flags([grad for _, _, grad, _ in projected])  # int32, 1 = finite
            for i, (name, target, grad, state) in enumerate(projected):
                ok = finite[i]  # a 0-d view on the device: the skip is decided there
                step = state["step"]
                step.add_(ok)
                shard, U, V = self.bases.local(name, target)
                lr = group["lr"]  # tensors stay tensors: no host synchronisation
                adamw_update_(
                    shard.local, _local(grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                    step if step.is_cuda else step.double(), U, V, self.sides,
                    lr=lr, beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"], all_reduce=shard.all_reduce,
                    backend=self.backend, precision=self.precision,
                    wd_terms=self._wd_terms(name, shard, U, V, group["weight_decay"]), ok=ok,
                )
            self._record_nonfinite(finite, [name for name, *_ in projected])
            for p, master in mastered:
                p.copy_(master)
        return loss

    def _wd_terms(self, name, shard, U, V, weight_decay):
        """(UᵀW, WV) of a projected weight for the fused step (computed at its first step, kept while the bases
        are the same): fixed under off-principal updates, they spare the fused step a read of W."""
        if not weight_decay or resolve_backend(self.backend, shard.local, "param") != "triton":
            return None
        key = (id(U), id(V), shard.start, shard.stop)
        cached = self._wd_cache.get(name)
        if cached is None or cached[0] != key:
            from offprincipal import kernels

            cached = self._wd_cache[name] = (key, kernels.wd_terms(shard.local, U, V, self.sides, shard.all_reduce))
        return cached[1]

    def state_dict(self) -> dict:
        """torch AdamW's state dict plus ``"offprincipal"``: plain metadata (no tensors) naming the bases."""
        sd = super().state_dict()
        sd["offprincipal"] = {"sides": self.sides, "bases": self.bases.metadata()}
        return sd

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of *named* parameters (``(name, tensor)`` pairs): its eligible weights get bases by the
        construction's rules (``top_k``, ``top_k_pattern``, ``exclude``, ``svd_method``, cache), computed now
        (with several ranks every rank must call it). Unnamed parameters and names already present are refused."""
        if "bases" not in self.__dict__:  # torch's __init__ adds the constructor's groups
            return super().add_param_group(param_group)
        param_group, named = _named_group(param_group, "OffPrincipalAdamW")
        check_unique_names("OffPrincipalAdamW", list(self.bases.params) + list(named))
        super().add_param_group(param_group)
        try:
            self.bases.extend(named)
        except Exception:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by this class (or a plain AdamW state, whose bases are then not checked).

        Checked before anything is loaded: the same number of groups and parameters, the same parameter names
        (when both sides have names), moments and master copies of each parameter's shape, the metadata's
        weights and shapes; then the saved bases are certified against the live weights
        (:meth:`PrincipalBases.reconcile`). A state from another model is refused with an error naming the
        first mismatch. fp32 master copies and moments of bf16/fp16 params stay fp32 (torch would cast them to
        the param dtype).
        """
        meta = state_dict.get("offprincipal")
        self._wd_cache.clear()  # (UᵀW, WV) are recomputed from the loaded weights at the next step
        check_state_fits("OffPrincipalAdamW", self.param_groups, state_dict)
        if meta is not None:
            if meta.get("sides", self.sides) != self.sides:
                raise ValueError(f"the saved state used sides={meta['sides']!r}, this optimizer sides={self.sides!r}")
            self.bases.reconcile(meta.get("bases"), _named_params(self.param_groups, "OffPrincipalAdamW"))
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "offprincipal"})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            if "master_param" in saved:
                p = params[index]
                for key in ("master_param", "exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)


_NAMES_NEEDED = (
    "{owner} needs parameter names to find each weight's bases: pass model.named_parameters(), or param groups "
    "whose 'params' are (name, parameter) pairs"
)


def _named_params(param_groups: list[dict], owner: str) -> dict[str, torch.Tensor]:
    """{name: parameter} over all groups; refuses unnamed groups and repeated names."""
    for group in param_groups:
        if "param_names" not in group:
            raise ValueError(_NAMES_NEEDED.format(owner=owner))
    names = [name for group in param_groups for name in group["param_names"]]
    check_unique_names(owner, names)
    return dict(zip(names, (p for group in param_groups for p in group["params"])))


def _named_group(param_group: dict, owner: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A param group for ``add_param_group`` with its ``params`` as a list, and its {name: parameter}; refuses
    a group without names (its weights could not get bases)."""
    if not isinstance(param_group, Mapping):
        raise TypeError(f"{owner}.add_param_group takes a dict, got {type(param_group).__name__}")
    group = dict(param_group)
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    group["params"] = params
    if "param_names" in group:
        names = list(group["param_names"])
    elif params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        names = [name for name, _ in params]
    else:
        raise ValueError(
            _NAMES_NEEDED.format(owner=f"{owner}.add_param_group") + "; unnamed parameters would train without projection"
        )
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    check_unique_names(owner, names)
    return group, dict(zip(names, tensors))


_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param", "momentum_buffer", "square_avg",
                 "acc_delta", "sum", "grad_avg")


def check_state_fits(owner: str, param_groups: list[dict], state_dict: Mapping) -> None:
    """Refuse (``ValueError`` naming the first mismatch) a state dict whose groups, parameter counts, parameter
    names or per-parameter state shapes do not fit ``param_groups``. Runs before anything is loaded."""
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        raise ValueError(f"{owner}: not an optimizer state dict (it needs 'state' and 'param_groups')")
    if len(groups) != len(param_groups):
        raise ValueError(f"{owner}: the saved state has {len(groups)} param groups, this optimizer {len(param_groups)}")
    by_index: dict = {}
    for g, (saved, live) in enumerate(zip(groups, param_groups)):
        if len(saved["params"]) != len(live["params"]):
            raise ValueError(
                f"{owner}: param group {g} of the saved state has {len(saved['params'])} parameters, this optimizer's "
                f"{len(live['params'])}: the state is from a different model or parameter selection"
            )
        names = live.get("param_names") or [f"parameter {i} of group {g}" for i in range(len(live["params"]))]
        saved_names = saved.get("param_names")
        if saved_names is not None and live.get("param_names") is not None and list(saved_names) != list(names):
            first = next(i for i, (a, b) in enumerate(zip(saved_names, names)) if a != b)
            raise ValueError(
                f"{owner}: param group {g} of the saved state names parameter {first} {saved_names[first]!r}, this "
                f"optimizer {names[first]!r}: the state is from a different model or parameter order"
            )
        by_index.update({index: (name, p) for index, name, p in zip(saved["params"], names, live["params"])})
    for index, entry in state.items():
        if index not in by_index or not isinstance(entry, Mapping):
            continue
        name, p = by_index[index]
        for key in _PARAM_SHAPED:
            t = entry.get(key)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{owner}: the saved {key!r} of {name!r} has shape {tuple(t.shape)}, the parameter here has shape "
                    f"{tuple(p.shape)}: the state is from a different model"
                )


def _finite_flags(tensors: list[torch.Tensor], sharded: Optional[bool] = None) -> list[bool]:
    """For each tensor, whether every entry is finite. Row shards (DTensors, or ``sharded=True``) are agreed over
    the ranks with one all-reduce. One host synchronisation for the whole list."""
    if not tensors:
        return []
    locals_ = [_local(t) for t in tensors]
    if sharded is None:
        sharded = any(loc is not t for loc, t in zip(locals_, tensors))
    device = comm_device() if sharded else locals_[0].device
    flags = torch.stack([torch.isfinite(loc).all().to(device) for loc in locals_]).to(torch.int32)
    if sharded:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    return [bool(f) for f in flags.tolist()]


def _finite_device_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """For each tensor, 1 (int32) if every entry is finite, else 0: one batched max-|x| reduction
    (``torch._foreach_norm``, ord ∞, which propagates NaN and inf) on the tensors' device, no host
    synchronisation. Row shards (DTensors) are agreed over the ranks with one all-reduce (MIN) of the flags as
    a device tensor. An empty shard counts as finite."""
    locals_ = [_local(t) for t in tensors]
    sharded = any(loc is not t for loc, t in zip(locals_, tensors))
    device = locals_[0].device
    nonempty = [loc for loc in locals_ if loc.numel()]
    if len(nonempty) == len(locals_):
        flags = torch.isfinite(torch.stack(torch._foreach_norm(locals_, float("inf"), dtype=torch.float32)))
    else:
        norms = iter(torch._foreach_norm(nonempty, float("inf"), dtype=torch.float32) if nonempty else [])
        zero = torch.zeros((), device=device)
        flags = torch.isfinite(torch.stack([next(norms) if loc.numel() else zero for loc in locals_]))
    flags = flags.to(torch.int32)
    if sharded:
        comm = comm_device()
        flags = flags.to(comm)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        flags = flags.to(device)
    return flags


def _warn_nonfinite(owner: str, name: str, what: str) -> None:
    warnings.warn(
        f"{owner}: the update of {name!r} has non-finite entries (NaN or inf in its gradient); {what}. Projecting "
        "it would spread the NaN over the whole matrix. Lower the learning rate or clip gradients if it repeats.",
        RuntimeWarning, stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------------------------
# OffPrincipalOptimizer: any base optimizer


def _delegated(attr: str) -> property:
    """A property read from and written to the wrapped optimizer's attribute of the same name."""
    return property(lambda self: getattr(self.optimizer, attr), lambda self, value: setattr(self.optimizer, attr, value))


class OffPrincipalOptimizer(_ProjectionOptionsView, torch.optim.Optimizer):
    """Makes the update of any torch optimizer exact off-principal: after the base step,
    ``W ← W_before − P(W_before − W_after)`` for every projected weight.

    It installs a step pre-hook (snapshot of the projected weights) and post-hook (projection) on
    ``base_optimizer``, so the projection happens whoever calls ``base_optimizer.step()`` (a Trainer, accelerate,
    an LR scheduler's wrapper); this object also behaves as the optimizer itself (``step``, ``zero_grad``,
    ``param_groups``, ``state_dict`` … delegate to the base). :meth:`remove` detaches the hooks.

    Memory: the snapshot holds one copy of every projected weight that has a gradient, in its dtype, during
    the step (1× those weights: e.g. 2 bytes/param for bf16), plus one fp32 matrix at a time for Δ. Parameters
    whose ``grad`` is None are assumed unchanged by the base step (true for torch's optimizers).
    For bf16/fp16 weights the base optimizer has already rounded W_after; Δ is exact in fp32 and the result is
    rounded once more, so the stored weights leak by their rounding, as in :class:`OffPrincipalAdamW`.

    Names: taken from ``named_parameters`` (matched by identity at construction), else from the base optimizer's
    ``param_names`` (when it was built from named parameters); each name once. ``add_param_group`` takes named
    parameters and gives them bases. A projected weight whose update Δ has a non-finite entry is restored to
    its value before the step, with a ``RuntimeWarning`` (the base optimizer's own state has already stepped).

    ``options`` / ``**projection_kwargs`` and ``subspaces``: as in :class:`OffPrincipalAdamW` (validated before the
    base optimizer is touched).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        named_parameters: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
        *,
        options: Optional[ProjectionOptions] = None,
        subspaces: Optional[BasesInput] = None,
        **projection_kwargs,
    ):
        options = ProjectionOptions.resolve("OffPrincipalOptimizer", options, projection_kwargs)
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"OffPrincipalOptimizer wraps a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        self.optimizer = base_optimizer
        self.options = options
        self._positions = self._names_by_position(base_optimizer, named_parameters)
        named = {name: base_optimizer.param_groups[g]["params"][i] for (g, i), name in self._positions.items()}
        self.bases = PrincipalBases.build("OffPrincipalOptimizer", named, options, subspaces)
        self._before: dict[tuple[int, int], torch.Tensor] = {}
        self._handles = [
            base_optimizer.register_step_pre_hook(self._snapshot),
            base_optimizer.register_step_post_hook(self._project),
        ]

    @staticmethod
    def _names_by_position(base, named_parameters) -> dict[tuple[int, int], str]:
        if named_parameters is not None:
            pairs = list(named_parameters)
            check_unique_names("OffPrincipalOptimizer", [name for name, _ in pairs])
            by_id = {id(p): name for name, p in pairs}
            return {
                (g, i): by_id[id(p)]
                for g, group in enumerate(base.param_groups) for i, p in enumerate(group["params"]) if id(p) in by_id
            }
        if all("param_names" in group for group in base.param_groups):
            positions = {
                (g, i): name for g, group in enumerate(base.param_groups) for i, name in enumerate(group["param_names"])
            }
            check_unique_names("OffPrincipalOptimizer", list(positions.values()))
            return positions
        raise ValueError(
            "OffPrincipalOptimizer needs the parameter names: pass named_parameters=model.named_parameters(), or "
            "build the base optimizer from model.named_parameters()"
        )

    def _projected(self):
        for (g, i), name in self._positions.items():
            if name in self.bases:
                params = self.optimizer.param_groups[g]["params"]
                if i >= len(params):
                    raise flattened_error("OffPrincipalOptimizer", name)
                yield (g, i), name, params[i]

    @torch.no_grad()
    def _snapshot(self, optimizer, args, kwargs) -> None:
        self._before = {
            pos: self.bases.local(name, p)[0].local.clone() for pos, name, p in self._projected() if p.grad is not None
        }

    @torch.no_grad()
    def _project(self, optimizer, args, kwargs) -> None:
        before, self._before = self._before, {}
        for pos, name, p in self._projected():
            if pos not in before:
                continue
            shard, U, V = self.bases.local(name, p)
            old = before.pop(pos).float()
            delta = old - shard.local.float()
            if not _finite_flags([delta], sharded=shard.all_reduce is not None)[0]:
                _warn_nonfinite("OffPrincipalOptimizer", name, "the weight is restored (the base optimizer's own state "
                                "has taken the step)")
                shard.local.copy_(old)
                continue
            project_(delta, U, V, self.sides, backend=self.backend, all_reduce=shard.all_reduce, precision=self.precision)
            shard.local.copy_(old.sub_(delta))

    def remove(self) -> None:
        """Detach the hooks: the base optimizer steps unprojected again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # delegation to the base optimizer
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of *named* parameters (``(name, tensor)`` pairs) to the base optimizer; its eligible
        weights get bases by the construction's rules, computed now. Unnamed parameters and names already
        present are refused."""
        param_group, named = _named_group(param_group, "OffPrincipalOptimizer")
        check_unique_names("OffPrincipalOptimizer", list(self.bases.params) + list(named))
        if not all("param_names" in group for group in self.optimizer.param_groups):  # torch: all named or none
            param_group = {k: v for k, v in param_group.items() if k != "param_names"}
            param_group["params"] = list(named.values())
        self.optimizer.add_param_group(param_group)
        g = len(self.optimizer.param_groups) - 1
        try:
            self.bases.extend(named)
        except Exception:
            self.optimizer.param_groups.pop()
            raise
        self._positions.update({(g, i): name for i, name in enumerate(named)})

    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def state_dict(self) -> dict:
        """The base optimizer's state dict plus the ``"offprincipal"`` metadata entry."""
        sd = self.optimizer.state_dict()
        sd["offprincipal"] = {"sides": self.sides, "bases": self.bases.metadata()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """The base optimizer's state plus the bases it was trained with, checked first as in
        :meth:`OffPrincipalAdamW.load_state_dict` (groups, parameter counts, names, state shapes, certified bases)."""
        meta = state_dict.get("offprincipal")
        check_state_fits("OffPrincipalOptimizer", self.optimizer.param_groups, state_dict)
        if meta is not None:
            if meta.get("sides", self.sides) != self.sides:
                raise ValueError(f"the saved state used sides={meta['sides']!r}, this optimizer sides={self.sides!r}")
            live = {name: self.optimizer.param_groups[g]["params"][i] for (g, i), name in self._positions.items()}
            self.bases.reconcile(meta.get("bases"), live)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "offprincipal"})

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OffPrincipalOptimizer(sides={self.sides!r}, projected={len(self.bases)}, base={self.optimizer!r})"
