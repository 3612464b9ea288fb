"""DeepSpeed ZeRO: where the adapter meets partitioned parameters, and why the optimizer form refuses ZeRO.

ZeRO-3 replaces each parameter's data by a 1-D partition: ``p.shape`` is ``(0,)``, ``p.ds_shape`` holds the real
shape and ``p.ds_numel`` the real size; the whole tensor exists only while it is gathered
(``deepspeed.zero.GatheredParameters``, or the engine's hooks around a module's forward and backward). ZeRO-1/2
keep whole parameters in the model but flatten the optimizer's view into 1-D fp32 partitions. So:

- **Bases** (:func:`offprincipal.distributed.bases_on_rank0`, shared with FSDP2 and the optimizers): each
  targeted weight W (m×n) is gathered in turn (:func:`gathered`), one at a time (so peak memory is one weight, not
  the model), rank 0 fingerprints it and computes its top-k bases (through the subspace cache) and broadcasts them,
  so every rank holds the same U (m×k), S (k,), V (n×k) and base fingerprint. PEFT's own ``gather_params_ctx`` (used for PiSSA) is a no-op unless a ``HfDeepSpeedConfig`` is
  alive; :func:`gathered` decides from the parameters themselves, so weights partitioned by ``deepspeed.zero.Init``
  alone are gathered too.
- **Forward** (:func:`fetch_for_forward`): the adapter layer reads its factors A (r×n) and B (m×r) to project them
  (Ã = A − (AV)Vᵀ, B̃ = B − U(UᵀB): O(r·k·(m+n)) per forward, independent of the tokens). ZeRO-3 gathers a
  module's parameters only when that module runs, and A, B sit in child modules that the layer does not call. The
  engine discovers such reads only inside ``engine(...)``; TRL computes log-probs on the unwrapped model. So the
  layer registers A and B as external parameters of itself (``deepspeed.zero.register_external_parameter``, what the
  engine's own discovery does) and gathers them the first time; from then on ZeRO gathers and releases them with
  the layer, in forward and backward, inside and outside the engine.
- **Precision**: U and V are fp32 buffers. DeepSpeed ≥ 0.19.2 casts parameters only under bf16/fp16; with
  ``data_types.buffer_dtype`` set it casts buffers too, except those named by a module's
  ``_keep_in_fp32_modules_strict`` (``keep_in_fp32_modules="auto"``), which the adapter layer declares for U and V.
- **Optimizer form**: :data:`ZERO_REFUSAL` (see :func:`flattened_error`).

``deepspeed`` is imported only where a parameter already carries ZeRO attributes (so it is loaded): importing
``offprincipal`` never imports it.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

ZERO_REFUSAL = (
    "{owner} cannot run under DeepSpeed ZeRO: ZeRO flattens {what} into 1-D partitions, where the off-principal "
    "projection cannot see the (out, in) matrix. Under ZeRO train the adapter instead "
    "(peft_config=offprincipal.OffPrincipalConfig(...)); for full-parameter off-principal training use FSDP2 "
    "(fully_shard) or DDP."
)
"""The one line that refuses an off-principal optimizer under ZeRO and says what to use instead."""


def flattened_error(owner: str, name: Optional[str] = None) -> RuntimeError:
    """The error for parameters that DeepSpeed ZeRO (or anything else) flattened: :data:`ZERO_REFUSAL`, naming the
    parameter when it is known."""
    what = f"the parameter {name!r}" if name else "the parameters"
    return RuntimeError(ZERO_REFUSAL.format(owner=owner, what=what))


def check_not_flattened(owner: str, name: str, p: torch.Tensor, expected_shape: Optional[tuple] = None) -> None:
    """Raise :func:`flattened_error` when ``p`` is a ZeRO parameter or no longer has its matrix shape."""
    if is_partitioned(p) or (expected_shape is not None and tuple(p.shape) != expected_shape):
        raise flattened_error(owner, name)


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (``deepspeed.zero.Init`` or the ZeRO-3 engine attached ``ds_id`` to it)."""
    return hasattr(p, "ds_id") or hasattr(p, "ds_numel")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor: ``ds_shape`` for a ZeRO-3 parameter (whose own shape is ``(0,)``)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _not_available(p: torch.Tensor) -> bool:
    return is_partitioned(p) and getattr(p, "ds_status", None) is not None and p.ds_status.name == "NOT_AVAILABLE"


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None) -> Iterator[None]:
    """Inside the block every ZeRO-3 parameter of ``params`` holds its whole tensor (a collective: every rank of the
    data-parallel group must enter it, in the same order); a no-op for ordinary tensors. With ``modifier_rank=None``
    changes made inside are discarded on exit; with a rank, that rank's values are partitioned back."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def fetch_for_forward(module: nn.Module, params: Iterable[torch.Tensor]) -> None:
    """Make ``params`` (read by ``module``'s forward, owned by its children) whole for this forward and every later
    one: register each partitioned one as an external parameter of ``module`` and gather it now. ZeRO-3's hooks on
    ``module`` then gather and release it with ``module``'s own parameters, in forward and backward. No-op for
    ordinary tensors and for parameters already gathered (the second forward on: the hooks did it)."""
    for p in params:
        if _not_available(p):
            import deepspeed

            deepspeed.zero.register_external_parameter(module, p)
            p.all_gather()


def require_whole(p: torch.Tensor, what: str) -> None:
    """Refuse to use a ZeRO-3 parameter that is not gathered (its data is an empty placeholder)."""
    if _not_available(p):
        raise RuntimeError(
            f"{what} is partitioned by DeepSpeed ZeRO-3 and not gathered: wrap the call in "
            "deepspeed.zero.GatheredParameters(model.parameters()) (modifier_rank=0 to keep changes), on every rank"
        )
