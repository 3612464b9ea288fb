"""FSDP: how OffPrincipal reads and writes weights that ``torch.distributed.fsdp`` shards.

FSDP2 (``fully_shard``). Outside forward and backward every parameter of a sharded module is a DTensor sharded by
rows (``Shard(0)``; HSDP adds ``Replicate()`` on a second mesh dimension): the base weight W0 (m×n) by its m rows,
the adapter's A (r×n) by its r rows and B (m×r) by its m rows. Buffers are not sharded: U (m×k) and V (n×k) are
plain fp32 tensors, equal on every rank (the bases are computed on rank 0 and broadcast, see
:func:`offprincipal.distributed.bases_on_rank0`). Inside forward and backward FSDP2 swaps in the unsharded
parameters as plain tensors, so the adapter's forward needs nothing from here. What does:

- projecting the factors outside forward (merge, export, leak checks): ``Ã = A − (AV)Vᵀ`` is row-local, and
  ``B̃ = B − U(UᵀB)`` needs UᵀB (k×r) summed over the row shards. :func:`replicated_bases` lets the plain U, V
  enter DTensor arithmetic as ``Replicate()`` (``implicit_replication``), and DTensor's sharding rules then do
  exactly that: UᵀB becomes ``Partial(sum)`` and is reduced once; Ã and B̃ stay ``Shard(0)``.
- merging: W0 + s·L R (L = B̃, R = Ã; GPT-2's ``Conv1D`` stores Wᵀ: L = Ãᵀ, R = B̃ᵀ) is row-local: each rank
  runs the exact merge (:mod:`offprincipal.tuner.merge`) on its local shard (:func:`local_shard`) with the rows of L
  it holds (:func:`local_rows`, which redistributes L to W0's placements where they differ, e.g. Ãᵀ is
  ``Shard(1)``) and the whole R (r×cols, gathered). The merge writes into the sharded parameter in place, and its
  correction is of the local shard, never of the full weight.
- exporting (``to_lora``, ``save_as_lora``) and the leak figure need whole matrices:
  :func:`offprincipal.distributed.full_weight` gathers them (a collective: every rank must make the same calls in
  the same order).

FSDP1 (``FullyShardedDataParallel``) flattens the parameters of each wrapped unit and materialises them only while
that unit runs. Wrapped at decoder-layer level (``TRANSFORMER_BASED_WRAP``, ``use_orig_params=True``) the
adapter's factors are inside the layer's unit and the forward works. Wrapping the factors' own ``nn.Linear``
leaves (a policy on ``nn.Linear``, or PEFT's ``fsdp_auto_wrap_policy``, which wraps every trainable leaf) breaks
it: the forward reads A's and B's weights to project them, and FSDP1 gathers them only inside their own forward.
:func:`check_factor_modules` refuses that with one line.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist

from ..distributed import full_weight

if dist.is_available():
    from torch.distributed.fsdp import FullyShardedDataParallel as _FSDP1
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication
else:  # builds without torch.distributed: nothing is ever sharded
    _FSDP1 = DTensor = ()
    implicit_replication = None

FSDP1_LEAF_MESSAGE = (
    "offprincipal: FSDP1 (FullyShardedDataParallel) wraps the adapter factors offprincipal_A/B of an adapted "
    "{n}→{m} linear layer on their own (per-leaf wrapping: an nn.Linear policy or PEFT's fsdp_auto_wrap_policy), but "
    "the layer's forward reads their weights, which FSDP1 gathers only inside their own forward. Use FSDP2 "
    "(fully_shard; accelerate fsdp_version: 2), or wrap at decoder-layer level (fsdp_auto_wrap_policy: "
    "TRANSFORMER_BASED_WRAP, use_orig_params: true)."
)


def replicated_bases(*factors: torch.Tensor):
    """Context for arithmetic between the factors and the bases: when a factor is a DTensor, plain tensors (U, V,
    equal on every rank) join it as ``Replicate()`` (``implicit_replication``); otherwise a no-op."""
    if any(isinstance(t, DTensor) for t in factors):
        return implicit_replication()
    return contextlib.nullcontext()


def like(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``delta`` (as many rows as ``weight``: ΔW, or the left factor L of ΔW = s·L R) laid out as ``weight`` is:
    redistributed to its mesh placements when ``weight`` is a DTensor (``delta`` plain counts as replicated: each
    rank keeps its own rows), else plain (gathered if ``delta`` is a DTensor)."""
    if not isinstance(weight, DTensor):
        return full_weight(delta) if isinstance(delta, DTensor) else delta
    if not isinstance(delta, DTensor):
        from torch.distributed.tensor import Replicate

        delta = DTensor.from_local(delta, weight.device_mesh, [Replicate()] * weight.device_mesh.ndim, run_check=False)
    if delta.placements != weight.placements:
        delta = delta.redistribute(weight.device_mesh, weight.placements)
    return delta


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds, as a plain tensor sharing its storage (writes land in ``t``): a DTensor's
    local shard, else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_rows(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` (as many rows as ``weight``) that match ``weight``'s local shard, as a plain tensor."""
    return local_shard(like(t, weight))


def sharded_like(local: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A local shard laid out as ``weight`` (a DTensor of the same global shape and placements), or ``local``
    itself when ``weight`` is plain."""
    if not isinstance(weight, DTensor):
        return local
    return DTensor.from_local(
        local, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )


def storage_key(t: torch.Tensor) -> tuple:
    """What identifies ``t``'s values between a merge and an unmerge: its version counter and where its data lies.
    For a DTensor, the wrapper's counter (in-place ops through the DTensor, e.g. an optimizer step) and the local
    shard's counter and pointer (writes to the shard itself) — a DTensor's own ``data_ptr()`` is always 0."""
    if isinstance(t, DTensor):
        local = t.to_local()
        return (t._version, local._version, local.data_ptr())
    return (t._version, t.data_ptr())


def check_factor_modules(modules: Iterable[torch.nn.Module], in_features: int, out_features: int) -> None:
    """Raise ``RuntimeError`` with :data:`FSDP1_LEAF_MESSAGE` when one of ``modules`` (the A/B factor modules of an
    adapted ``in_features``→``out_features`` layer) is itself an FSDP1 unit. One ``isinstance`` per module: it runs
    every forward."""
    if any(isinstance(m, _FSDP1) for m in modules):
        raise RuntimeError(FSDP1_LEAF_MESSAGE.format(n=in_features, m=out_features))
