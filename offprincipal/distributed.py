"""Distributed plumbing of the off-principal optimizers.

- Bases are computed where the real weights are: with several ranks, rank 0 computes them (from the full
  weight, gathered from DTensor shards) and broadcasts U and V; other ranks may hold placeholder weights
  (memory-efficient loading leaves zeros there).
- FSDP2 (DTensor ``Shard(0)``) steps shard-locally: see :func:`offprincipal.projection.row_shard`.
- DeepSpeed ZeRO flattens parameters into 1-D partitions, which an update-projecting optimizer cannot see as
  matrices: :func:`offprincipal.integrations.deepspeed.check_not_flattened` refuses it and says what to use.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .subspace import Subspace


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
    compute: Callable[[str], Optional[tuple[torch.Tensor, torch.Tensor]]],
    device_of: Callable[[str], torch.device],
    src: int = 0,
    progress: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """U (m, k) and V (n, k) for every name, computed on rank ``src`` and broadcast to all ranks.

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
            U, V = (t.to(device=device, dtype=torch.float32).contiguous() for t in result)
        else:
            U = torch.empty(m, k, device=device, dtype=torch.float32)
            V = torch.empty(n, k, device=device, dtype=torch.float32)
        dist.broadcast(U, src)
        dist.broadcast(V, src)
        out[name] = (U.to(device_of(name)), V.to(device_of(name)))
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled through the default group)."""
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def subspace_bases(subs: Mapping[str, Subspace]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (s.U, s.V) for name, s in subs.items()}
