"""OffPrincipal adapter layers.

A wrapped linear layer computes ``y = base(x) + s · (x Ãᵀ) B̃ᵀ`` with s = alpha/r and the projected factors

    Ã = A − (AV)Vᵀ   (r×n, "right")        B̃ = B − U(UᵀB)   (m×r, "left")

so that ΔW = s·B̃Ã satisfies UᵀΔW = 0 and ΔW V = 0 for any A, B. Projecting the factors costs
O(r·k·(m+n)) per forward, independent of the number of tokens; the m×n weight is never rebuilt.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from .._sides import SIDES
from ..distributed import full_weight, local_device
from ..integrations.deepspeed import fetch_for_forward, full_shape, gathered, is_partitioned, require_whole
from ..integrations.fsdp import check_factor_modules, local_rows, local_shard, replicated_bases, sharded_like, storage_key
from ..projection import principal_leak, project_repeated, uses_left, uses_right
from ..subspace import BASIS_KINDS, Subspace, minor_right_directions
from .merge import Factors, MergeRecord, merge_exact, subtract, unmerge_exact



def encode_settings(k: int, sides: str, basis: str = "top", basis_seed: int = 0) -> list[int]:
    """The int64 record of an adapter's settings: ``[k, SIDES index, BASIS_KINDS index, seed]`` (seed 0 for top-k)."""
    return [int(k), SIDES.index(sides), BASIS_KINDS.index(basis), int(basis_seed) if basis == "random" else 0]


def decode_settings(values: list) -> tuple[int, str, str, int]:
    """(k, sides, basis, basis_seed) from :func:`encode_settings`'s record. Out-of-range indices read as
    ``"<invalid i>"``."""
    k, side, basis, seed = (int(v) for v in values)

    def name(table, i):
        return table[i] if 0 <= i < len(table) else f"<invalid {i}>"

    return k, name(SIDES, side), name(BASIS_KINDS, basis), seed

_CACHING_LAYERS: "weakref.WeakSet[OffPrincipalLayer]" = weakref.WeakSet()
_STEP_HOOK: Optional[RemovableHandle] = None
_STEP_HOOK_LOCK = threading.Lock()


def _drop_factor_caches(optimizer, args, kwargs) -> None:
    """Global ``torch.optim`` step post-hook: parameters may have changed, so no cached projection is valid."""
    for layer in list(_CACHING_LAYERS):
        layer.clear_factor_cache()
    _CACHING_LAYERS.clear()


def ensure_step_hook() -> RemovableHandle:
    """Register :func:`_drop_factor_caches` as a process-wide ``torch.optim`` step post-hook, once per process.

    Called when an OffPrincipal layer is created and before a projection is cached, never on import: importing
    ``offprincipal`` leaves ``torch.optim``'s global hooks untouched. Idempotent and safe under threads (double-checked
    under a lock). The hook costs one loop over the layers holding a cache per optimizer step (usually none)."""
    global _STEP_HOOK
    if _STEP_HOOK is None:
        with _STEP_HOOK_LOCK:
            if _STEP_HOOK is None:
                _STEP_HOOK = register_optimizer_step_post_hook(_drop_factor_caches)
    return _STEP_HOOK


def resolve_fan_in_fan_out(base_layer: nn.Module, fan_in_fan_out: bool) -> bool:
    """Whether ``base_layer`` stores its weight as (in, out), decided by its type as LoRA does: GPT-2's ``Conv1D``
    does (True, whatever the flag; LoRA warns there, OffPrincipal needs no flag to know it); ``nn.Linear`` stores
    (out, in), so a ``fan_in_fan_out=True`` there is answered with LoRA's warning and False."""
    if isinstance(base_layer, Conv1D):
        return True
    if fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
        )
    return False


class OffPrincipalLayer(BaseTunerLayer):
    """Adapter state of one wrapped layer. ``offprincipal_U``/``offprincipal_V`` hold the frozen fp32 bases
    (non-persistent: they are not saved with the adapter; see ``OffPrincipalConfig.subspace_cache_dir``).

    Under DeepSpeed ZeRO-3 the layer's forward makes its factors whole through
    :func:`offprincipal.integrations.deepspeed.fetch_for_forward`; ``_keep_in_fp32_modules_strict`` (the transformers
    convention DeepSpeed's ``keep_in_fp32_modules="auto"`` reads) keeps U and V fp32 under an engine's bf16/fp16.

    ``offprincipal_settings`` holds what ΔW depends on besides the factors and the base, saved with the adapter's
    weights: int64 ``[k, index of sides in SIDES, index of the basis kind in BASIS_KINDS, basis seed]``
    (:meth:`settings`; the seed is 0 for top-k bases); loading refuses an adapter whose saved settings differ from
    the ones its config gives (:meth:`OffPrincipalModel._remap_adapter_state_dict_for_load`).
    It is a non-persistent buffer that :meth:`OffPrincipalModel._get_adapter_state_dict` writes into the adapter's
    weights: a persistent one would be in the model's ``state_dict()``, which accelerate's FSDP2 loader
    (``fsdp2_load_full_state_dict``, CPU-RAM-efficient loading) requires to hold sharded parameters only."""

    adapter_layer_names = ("offprincipal_A", "offprincipal_B")
    other_param_names = (
        "r", "alpha", "scaling", "sides", "offprincipal_dropout", "offprincipal_U", "offprincipal_V",
        "offprincipal_settings",
    )
    _basis_names = ("offprincipal_U", "offprincipal_V")
    _buffer_names = _basis_names + ("offprincipal_settings",)  # the non-persistent state, kept real beside meta weights
    _keep_in_fp32_modules_strict = _basis_names

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.sides: dict[str, str] = {}
        self.offprincipal_dropout = nn.ModuleDict({})
        self.offprincipal_A = nn.ModuleDict({})
        self.offprincipal_B = nn.ModuleDict({})
        self.offprincipal_U = BufferDict({}, persistent=False)
        self.offprincipal_V = BufferDict({}, persistent=False)
        self.offprincipal_settings = BufferDict({}, persistent=False)  # saved by OffPrincipalModel
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self._factor_cache: dict[str, tuple] = {}  # scratch, not state: a plain dict is never saved
        self._merge_records: list[MergeRecord] = []  # scratch: one exact correction per merge call (see .merge)
        self._merge_key: Optional[tuple] = None  # scratch: storage_key of the weight right after the last merge
        ensure_step_hook()  # the factor cache must be dropped after every optimizer step

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = full_shape(base.weight)  # ZeRO-3 leaves shape (0,)
        else:
            raise TypeError(f"OffPrincipal supports nn.Linear and GPT-2 Conv1D layers, got {type(base).__name__}")
        self.fan_in_fan_out = resolve_fan_in_fan_out(base, kwargs.get("fan_in_fan_out", False))

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float,
        sides: str,
        init: str,
        subspace: Subspace,
        inference_mode: bool = False,
        basis: str = "top",
        basis_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        """Add adapter ``adapter_name``: factors A (r×n), B (m×r) with B = 0, and the frozen bases ``subspace`` (of
        kind ``basis``, drawn from ``basis_seed`` when random; both recorded in ``offprincipal_settings``)."""
        if subspace.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"subspace shape {subspace.shape} does not match the layer's (out, in) = "
                f"({self.out_features}, {self.in_features})"
            )
        self._factor_cache.pop(adapter_name, None)
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.sides[adapter_name] = sides
        self.offprincipal_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.offprincipal_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.offprincipal_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        self._init_factors(adapter_name, init, subspace.k)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        device = local_device(self.get_base_layer().weight)  # a meta weight's bases stay real (see local_device)
        if uses_left(sides):
            self.offprincipal_U[adapter_name] = subspace.U.to(device=device, dtype=torch.float32)
        if uses_right(sides):
            self.offprincipal_V[adapter_name] = subspace.V.to(device=device, dtype=torch.float32)
        self.offprincipal_settings[adapter_name] = torch.tensor(
            encode_settings(subspace.k, sides, basis, basis_seed), device=device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def _init_factors(self, adapter_name: str, init: str, k: int) -> None:
        A = self.offprincipal_A[adapter_name].weight
        nn.init.zeros_(self.offprincipal_B[adapter_name].weight)
        if init == "random":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "minor":
            base = self.get_base_layer()
            if base.weight.device.type != "meta":  # no values: A follows the base onto meta (FSDP loads rank 0's A)
                with gathered([base.weight]):  # ZeRO-3: whole on every rank while read
                    W = full_weight(self.base_weight_matrix())  # FSDP2: all-gathered
                    A.copy_(minor_right_directions(W, k, self.r[adapter_name]).to(A))
        else:
            raise ValueError(f"unknown init {init!r}; use 'random' or 'minor'")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """PEFT's move, except that the bases keep fp32 (PEFT would cast them to the base weight's dtype) and stay
        real next to a base weight on the meta device (:func:`~offprincipal.distributed.local_device`)."""
        bases = {n: getattr(self, n)[adapter_name] for n in self._basis_names if adapter_name in getattr(self, n)}
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        target = device if device is not None else local_device(self.get_base_layer().weight)
        for n, basis in bases.items():
            getattr(self, n)[adapter_name] = basis.to(device=target)

    def effective_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ã, B̃): the factors after projection, in the factors' dtype; ΔW = scaling · B̃ Ã.

        Outside autograd (generation, evaluation, merging) the projected factors are cached: generation would
        otherwise re-project them for every token. The cache is dropped by every grad-enabled forward and after
        every ``torch.optim`` step (a global step hook, :func:`ensure_step_hook`, registered by the first layer and
        not on import: fused optimizers do not bump version counters), and keyed
        on the tensors' version counters and storage (reloads, moves, in-place edits) and on whether inference
        mode is on (factors cached under ``torch.inference_mode()`` are never reused outside it). A write through
        ``.data`` outside an optimizer step needs :meth:`clear_factor_cache`. ZeRO-3 partitioned factors are never
        cached (their storage is gathered anew for every use); outside a forward they must be gathered first.
        """
        modules = (self.offprincipal_A[adapter_name], self.offprincipal_B[adapter_name])
        check_factor_modules(modules, self.in_features, self.out_features)
        A, B = (m.weight for m in modules)
        U = self.offprincipal_U[adapter_name] if adapter_name in self.offprincipal_U else None
        V = self.offprincipal_V[adapter_name] if adapter_name in self.offprincipal_V else None
        if is_partitioned(A) or is_partitioned(B):
            require_whole(A, f"offprincipal_A[{adapter_name!r}]")
            require_whole(B, f"offprincipal_B[{adapter_name!r}]")
            return self._project_factors(A, B, U, V)
        if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
            self._factor_cache.pop(adapter_name, None)  # training: the parameters are about to change
            return self._project_factors(A, B, U, V)
        key = tuple((storage_key(t), t.device) if t is not None else None for t in (A, B, U, V))
        # Factors projected under torch.inference_mode() are inference tensors: a later grad-enabled forward (e.g.
        # gradients w.r.t. the inputs through a frozen adapter) cannot save them for backward, so outside
        # inference mode they are projected again.
        key += (torch.is_inference_mode_enabled(),)
        cached = self._factor_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._factor_cache[adapter_name] = (key, self._project_factors(A, B, U, V))
            ensure_step_hook()  # a layer built without __init__ (unpickled in a fresh process) registers it here
            _CACHING_LAYERS.add(self)
        return cached[1]

    @staticmethod
    def _project_factors(A, B, U, V) -> tuple[torch.Tensor, torch.Tensor]:
        # Two passes: fp32 bases are orthonormal only to rounding, so one pass leaves a leak of that order and a
        # second removes most of it (figures: benchmarks/results/design_figures.md); the backward keeps only U, V.
        # FSDP2-sharded factors (DTensors, outside forward) take the plain U, V as replicated.
        with replicated_bases(A, B):
            if V is not None:
                A = project_repeated(A, None, V, "right", passes=2)
            if U is not None:
                B = project_repeated(B, U, None, "left", passes=2)
        return A, B

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._factor_cache.pop(adapter_name, None)

    def unmerged_base_weight(self) -> torch.Tensor:
        """The base weight as it is when no adapter is merged: the live weight when unmerged; while merged, a copy
        rebuilt bit for bit from the merged weight and the merge corrections (one extra weight, transient)."""
        weight = self.get_base_layer().weight
        if not (self.merged and self._merge_records):
            return weight
        restored = local_shard(weight).detach().clone()  # FSDP2: the corrections are of the local shard
        for record in reversed(self._merge_records):
            unmerge_exact(restored, record)
        return sharded_like(restored, weight)

    def merge_correction_bytes(self) -> int:
        """Bytes held by the exact merge corrections while merged (0 when unmerged); see :mod:`.merge`."""
        return sum(r.nbytes for r in self._merge_records)

    def merge_factors(self, adapter_name: str) -> Factors:
        """ΔW of ``adapter_name`` as scaling · L R in the orientation of the stored base weight: (B̃, Ã) for (out, in),
        (Ãᵀ, B̃ᵀ) for GPT-2's (in, out); the projected factors are the cached ones (no copy). Under FSDP2 they are
        laid out for the weight's local shard: the rows of L this rank holds and the whole R (r×cols, gathered)."""
        A, B = self.effective_factors(adapter_name)
        A, B = A.detach(), B.detach()
        L, R = (A.T, B.T) if self._transposed else (B, A)
        weight = self.get_base_layer().weight
        return Factors(local_rows(L, weight), full_weight(R), self.scaling[adapter_name])

    def base_weight_matrix(self) -> torch.Tensor:
        """The unmerged base weight in (out, in) orientation: what the bases of a new adapter are computed from, so
        an adapter added while another is merged gets the same bases as on the bare base. ``ValueError`` when the
        layer is merged without the corrections that restore its base (e.g. unpickled while merged): unmerge first."""
        if self.merged and not self._merge_records:
            raise ValueError(
                f"{type(self).__name__}: the layer is merged and the corrections that restore its unmerged base weight "
                "are not kept, so the bases of a new adapter cannot be computed from the base; call unmerge_adapter() "
                "first"
            )
        weight = self.unmerged_base_weight()
        return weight.T if self._transposed else weight

    def settings(self, adapter_name: str) -> tuple[int, str, str, int]:
        """(k, sides, basis, basis_seed) of ``adapter_name``: the settings besides the factors that ΔW depends on."""
        return decode_settings(self.offprincipal_settings[adapter_name].tolist())

    def clear_factor_cache(self) -> None:
        """Forget the projected factors cached for no-grad forwards (see :meth:`effective_factors`)."""
        self._factor_cache.clear()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the orientation of the base layer's weight ((out, in); (in, out) for Conv1D), fp32 math; a
        ``Shard(0)`` DTensor when the factors are FSDP2-sharded."""
        A, B = self.effective_factors(adapter_name)
        delta = (B.float() @ A.float()) * self.scaling[adapter_name]
        return delta.T if self._transposed else delta

    def principal_leak(self, adapter_name: str) -> tuple[float, float]:
        """(‖UᵀΔW‖/‖ΔW‖, ‖ΔW V‖/‖ΔW‖) in fp64 with ΔW in (out, in) orientation; 0.0 for an unprotected side.
        A sharded ΔW is gathered (a collective under FSDP2: every rank calls it)."""
        delta = full_weight(self.get_delta_weight(adapter_name))
        U = self.offprincipal_U[adapter_name] if adapter_name in self.offprincipal_U else None
        V = self.offprincipal_V[adapter_name] if adapter_name in self.offprincipal_V else None
        return principal_leak(delta.T if self._transposed else delta, U, V)

    @property
    def _transposed(self) -> bool:
        return self.fan_in_fan_out


class Linear(nn.Module, OffPrincipalLayer):
    """OffPrincipal adapter around ``nn.Linear`` or GPT-2 ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int,
        alpha: float,
        dropout: float,
        sides: str,
        init: str,
        subspace: Subspace,
        fan_in_fan_out: bool = False,
        basis: str = "top",
        basis_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__()
        OffPrincipalLayer.__init__(self, base_layer, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha, dropout, sides, init, subspace, basis=basis, basis_seed=basis_seed)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active adapters' ΔW to the base weight: W ← fl(W0 + Σ ΔW) in the weight's dtype (fp32 math).

        Unmerging restores W0 bit for bit in every dtype (TRL's vLLM weight sync merges and unmerges at every step;
        subtracting ΔW again would drift a bf16/fp16 base by one rounding per cycle). For that, each merge keeps an
        exact compact correction (:func:`offprincipal.tuner.merge.merge_exact`): the flat indices and W0 values of
        the entries where fl(W − ΔW) misses W0, a fraction of a percent of the entries for fine-tuning-sized ΔW and
        never more than a copy of the weight (chunks where exceptions would cost more keep their rows instead).
        Memory while merged: :meth:`merge_correction_bytes` per layer; transient: a few 2²⁰-entry fp32 buffers.

        ``safe_merge``: the merged weight is computed first and checked for NaN/inf; a broken adapter raises
        ``ValueError`` (PEFT's wording) and the base weight is left untouched.

        Under FSDP2 (a ``Shard(0)`` DTensor base weight) each rank merges its own rows: the weight's local shard,
        the rows of L it holds and the whole R (:meth:`merge_factors`); the correction is of the local shard.
        """
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.offprincipal_A]
        if not adapter_names:
            return
        weight = self.get_base_layer().weight
        require_whole(weight, "the base weight")  # ZeRO-3: merging needs the gathered weight (TRL gathers)
        with torch.no_grad():
            factors = [self.merge_factors(name) for name in adapter_names]
            record = merge_exact(local_shard(weight), factors, safe=safe_merge, labels=adapter_names)
        self._merge_records.append(record)
        self._merge_key = storage_key(weight)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Undo every merge, last first, with the corrections kept by :meth:`merge`: W0 bit for bit.

        If the weight was changed in place or replaced while merged (its version counter or storage moved), the
        corrections no longer apply: ΔW is subtracted instead (fp32 math, one rounding), with a warning.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        local = local_shard(weight)  # FSDP2: this rank's rows, which the merge wrote
        records, self._merge_records = self._merge_records, []
        key, self._merge_key = self._merge_key, None
        with torch.no_grad():
            if records and storage_key(weight) == key:
                exact = all([unmerge_exact(local, record) for record in reversed(records)])
                if not exact:
                    warnings.warn(
                        f"offprincipal: unmerging {type(self.get_base_layer()).__name__} did not restore the base "
                        "bit for bit (its checksum differs): ΔW was not recomputed identically (nondeterministic "
                        "matmul?). Set torch.use_deterministic_algorithms(True)."
                    )
            else:
                warnings.warn(
                    f"offprincipal: the base weight of {type(self.get_base_layer()).__name__} was modified while "
                    "merged; unmerge subtracts ΔW instead of restoring the saved base (not bit-exact in bf16/fp16)"
                )
                if records:
                    subtract(local, [f for record in records for f in record.factors])
                else:
                    subtract(local, [self.merge_factors(n) for n in self.merged_adapters if n in self.offprincipal_A])
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.offprincipal_A:
                continue
            fetch_for_forward(self, (self.offprincipal_A[name].weight, self.offprincipal_B[name].weight))
            A, B = self.effective_factors(name)
            h = self._cast_input_dtype(self.offprincipal_dropout[name](x), A.dtype)
            result = result + nn.functional.linear(nn.functional.linear(h, A), B) * self.scaling[name]
        return result.to(result_dtype)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """What replaces this layer on ``merge_and_unload``/``unload`` (PEFT's hook): the layer it wraps, after
        merging ΔW into the innermost weight. That is ``base_layer``, not ``get_base_layer()``: a tuner layer of
        another method injected before this one (e.g. a LoRA) stays in place with its own update, instead of being
        dropped with this layer."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.base_layer

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "offprincipal." + super().__repr__()
