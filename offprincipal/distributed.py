"""Distributed plumbing shared by the off-principal optimizers and the adapter.

- Bases are computed where the real weights are (:func:`bases_on_rank0`, used by the optimizers and the adapter):
  with several ranks, rank 0 computes them (from the whole weight: DTensor shards or ZeRO-3 partitions gathered)
  and broadcasts U, S and V; other ranks may hold placeholder weights (memory-efficient loading leaves zeros or
  the ``meta`` device there). Engine-specific code: :mod:`offprincipal.integrations`.
- FSDP2 (DTensor ``Shard(0)``) steps shard-locally: see :func:`offprincipal.projection.row_shard`.
- DeepSpeed ZeRO flattens parameters into 1-D partitions, which an update-projecting optimizer cannot see as
  matrices: :func:`offprincipal.integrations.deepspeed.check_not_flattened` refuses it and says what to use.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .integrations.deepspeed import gathered
from .subspace import Subspace, fingerprint


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_weight(p: torch.Tensor) -> torch.Tensor:
    """The whole matrix of ``p``: gathered from its shards for a DTensor (a collective), else ``p`` detached."""
    from torch.distributed.tensor import DTensor

    return p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()


def local_device(p: torch.Tensor) -> torch.device:
    """Where ``p``'s local data lives (a DTensor's local shard); bases for a ``meta`` param are kept on the
    communication device until the first step moves them next to the real shard."""
    from torch.distributed.tensor import DTensor

    device = p.to_local().device if isinstance(p, DTensor) else p.device
    return comm_device() if device.type == "meta" else device


def comm_device() -> torch.device:
    """The device collectives of the default group need: the current CUDA device for NCCL, else CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_bases(
    names_shapes_ks: Mapping[str, tuple[tuple[int, int], int]],
    compute: Callable[[str], Optional[Subspace]],
    device_of: Callable[[str], torch.device],
    src: int = 0,
    progress: bool = True,
) -> dict[str, Subspace]:
    """The :class:`Subspace` (U (m, k), S (k,), V (n, k), fp32) of every name, computed on rank ``src`` and
    broadcast to all ranks.

    ``compute(name)`` runs on every rank, in the same order (it may contain collectives such as gathering a
    DTensor); only rank ``src``'s result is used, other ranks may return ``None``.
    """
    rank = dist.get_rank()
    out = {}
    for name, ((m, n), k) in tqdm(
        names_shapes_ks.items(), desc="principal subspaces (rank 0)", unit="weight", disable=not progress or rank != src
    ):
        result = compute(name)
        device = comm_device()
        if rank == src:
            U, S, V = (t.to(device=device, dtype=torch.float32).contiguous() for t in (result.U, result.S, result.V))
        else:
            U, S, V = (torch.empty(shape, device=device, dtype=torch.float32) for shape in ((m, k), (k,), (n, k)))
        for t in (U, S, V):
            dist.broadcast(t, src)
        out[name] = Subspace(U, S, V).to(device_of(name))
    return out


def bases_on_rank0(
    weights: Mapping[str, torch.Tensor],
    names_shapes_ks: Mapping[str, tuple[tuple[int, int], int]],
    compute: Callable[[str, torch.Tensor], Subspace],
    progress: bool = True,
    src: int = 0,
) -> tuple[dict[str, Subspace], dict[str, str]]:
    """Bases computed where the real weights are, for every rank: (``{name: Subspace}``, ``{name: fingerprint}``).

    ``weights``: each weight as stored. A DTensor (FSDP2) is all-gathered and a ZeRO-3 partition gathered, one
    weight at a time (collectives: every rank calls this with the same names in the same order; peak extra memory
    one whole weight); plain weights are read on rank ``src`` only, so other ranks may hold placeholders or weights
    on the ``meta`` device (FSDP's CPU-RAM-efficient loading). ``compute(name, W)`` gets the whole stored weight and
    runs on rank ``src`` only: that is where a subspace cache is read and written. The fingerprints
    (:func:`offprincipal.subspace.fingerprint`) are rank ``src``'s, broadcast. The bases are fp32 and lie on each
    weight's local device (:func:`local_device`).
    """
    fingerprints: dict[str, str] = {}

    def on_src(name):
        with gathered([weights[name]]):  # ZeRO-3: whole on every rank while read
            W = full_weight(weights[name])  # collective for DTensors: every rank calls it
            if dist.get_rank() != src:
                return None
            fingerprints[name] = fingerprint(W)
            return compute(name, W)

    subs = broadcast_bases(names_shapes_ks, on_src, lambda name: local_device(weights[name]), src=src, progress=progress)
    return subs, broadcast_object(fingerprints, src)


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled through the default group)."""
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def subspace_bases(subs: Mapping[str, Subspace]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (s.U, s.V) for name, s in subs.items()}
