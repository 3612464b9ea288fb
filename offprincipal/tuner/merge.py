"""Exact merge and unmerge of low-rank updates without a copy of the base weight.

A merge writes W ← fl(W0 + ΔW) into the base weight (W0, W: the stored (rows, cols) tensor in its dtype; ΔW = Σ_a
s_a · L_a R_a with L_a: rows×r_a and R_a: r_a×cols in the weight's own orientation; fp32 math, one rounding to the
weight's dtype). Subtracting ΔW again does not give W0 back in general: fl(fl(W0 + ΔW) − ΔW) differs from W0 where
the merge's rounding error reaches half a unit in the last place of W0 (a binade crossed, |W0| ≲ |ΔW|, a tie). So a
merge keeps a **correction**: the entries where the recomputed approximation

    W̃0 = fl_dtype(fl32(W − ΔW))                                    (ΔW recomputed from the same factors)

differs from W0, as flat indices (int32, or int64 past 2³¹ entries) and W0's values there. Unmerge recomputes W̃0
and writes the stored values back: W0 bit for bit, in every dtype and for any ΔW (NaN and inf included, since
entries are compared as bit patterns). Both sides compute ΔW with the same function on the same factor tensors
(held by reference, not copied) over the same row chunks, so W̃0 is the same both times.

The weight is processed in chunks of rows of at most :data:`CHUNK_ELEMENTS` entries, so the transient memory of a
merge or an unmerge is about 4 fp32 chunk buffers (16 MiB), whatever the layer's size. A chunk whose exceptions
would cost more than a copy of its rows (``exceptions · (index + element size) ≥ rows · cols · element size``;
large ΔW, e.g. ΔW ~ W) keeps a copy of its rows instead, so the correction never exceeds a copy of the weight:

    memory held while merged = Σ_sparse chunks  n_exceptions · (4 + element size)  +  Σ_dense chunks  chunk bytes

(+ the projected factors the layer already caches). Measured (benchmarks/results/sync_memory_cpu.md): with ΔW of
RMS 10⁻³ × RMS(W0) per entry the corrections hold 0.7% (fp32) / 0.6% (bf16) of the weights' bytes, at 10⁻² 5% / 4%.

Assumption: ΔW recomputed from the same tensors by the same torch ops on the same device gives the same bits (what
torch's matmuls do for identical inputs, shapes and thread settings; ``torch.use_deterministic_algorithms(True)``
makes it a guarantee on CUDA).
A restore that does not reproduce W0 is detected (an int64 checksum of W0's bit patterns) and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

CHUNK_ELEMENTS = 1 << 20  # entries per chunk of rows: bounds the transient memory of merge and unmerge

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Factors:
    """One adapter's ΔW = scaling · L R in the stored weight's orientation (L: rows×r, R: r×cols)."""

    L: torch.Tensor
    R: torch.Tensor
    scaling: float


@dataclass
class MergeRecord:
    """What one merge added and how to take it back (see the module docstring)."""

    factors: list[Factors]
    rows_per_chunk: int
    index: torch.Tensor  # flat indices of the exceptions (int32/int64)
    values: torch.Tensor  # W0 at those indices, in the weight's dtype
    dense: dict[int, torch.Tensor] = field(default_factory=dict)  # first row of a chunk -> copy of its W0 rows
    checksum: int = 0  # Σ of W0's bit patterns (an exact integer), to detect a restore that went wrong
    version: Optional[int] = None  # the weight's version counter and storage right after the merge
    pointer: Optional[int] = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the correction (factors excluded: they are the layer's cached projections)."""
        dense = sum(t.numel() * t.element_size() for t in self.dense.values())
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size() + dense

    @property
    def exceptions(self) -> int:
        return self.index.numel()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers of the same width (exact comparison: -0 ≠ +0, NaN = NaN of the same bits)."""
    return t.view(_BITS[t.element_size()])


def checksum(weight: torch.Tensor) -> int:
    """Σ of the bit patterns of ``weight`` as int64 (exact; summed by chunks of rows, so the int64 widening needs one
    chunk's worth of memory, not the weight's)."""
    _, chunks = _chunks(weight)
    bits = _bits(weight.detach())
    return sum(int(bits[start:stop].sum(dtype=torch.int64)) for start, stop in chunks)


def delta_rows(factors: Sequence[Factors], start: int, stop: int) -> torch.Tensor:
    """Σ_a s_a · L_a[start:stop] R_a in fp32: rows ``start:stop`` of ΔW, (stop−start)×cols."""
    total = None
    for f in factors:
        d = (f.L[start:stop].float() @ f.R.float()) * f.scaling
        total = d if total is None else total + d
    return total


def _chunks(weight: torch.Tensor):
    rows, cols = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return step, [(s, min(s + step, rows)) for s in range(0, rows, step)]


@torch.no_grad()
def merge_exact(
    weight: torch.Tensor, factors: Sequence[Factors], safe: bool = False, labels: Optional[Sequence[str]] = None
) -> MergeRecord:
    """W ← fl(W0 + Σ ΔW) in place, chunk by chunk, returning the :class:`MergeRecord` that :func:`unmerge_exact`
    needs to restore W0 bit for bit.

    ``safe``: every chunk is computed once before anything is written; if W0 + ΔW_1 + … + ΔW_a is not finite
    somewhere, ``ValueError`` names the first adapter (``labels[a]``) that made it so and W is left untouched.
    """
    if weight.dim() != 2:
        raise ValueError(f"merge_exact: a 2-D weight is needed, got shape {tuple(weight.shape)}")
    factors = list(factors)
    step, chunks = _chunks(weight)
    if safe:
        for start, stop in chunks:
            acc = weight[start:stop].float()
            for a, f in enumerate(factors):
                acc = acc + delta_rows([f], start, stop)
                if not torch.isfinite(acc).all():
                    name = labels[a] if labels else str(a)
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    total = checksum(weight)
    contiguous = weight.is_contiguous()
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    index_bytes = 4 if index_dtype == torch.int32 else 8
    cols, size = weight.shape[1], weight.element_size()
    indices, values, dense = [], [], {}
    for start, stop in chunks:
        w = weight[start:stop]
        d = delta_rows(factors, start, stop)
        merged = (w.float() + d).to(weight.dtype)
        miss = _bits((merged.float() - d).to(weight.dtype)) != _bits(w)
        del d
        n_miss = int(miss.sum())
        if n_miss and (not contiguous or n_miss * (index_bytes + size) >= miss.numel() * size):
            dense[start] = w.clone()
        elif n_miss:
            pos = miss.view(-1).nonzero().squeeze(1)
            values.append(w.reshape(-1)[pos])  # advanced indexing: a copy of just these entries
            indices.append((pos + start * cols).to(index_dtype))
        del miss
        w.copy_(merged)  # a copy_ bumps the version counter (a write through .data would not)
        del merged
    empty = weight.new_empty(0)
    record = MergeRecord(
        factors=factors,
        rows_per_chunk=step,
        index=torch.cat(indices) if indices else torch.empty(0, dtype=index_dtype, device=weight.device),
        values=torch.cat(values) if values else empty,
        dense=dense,
        checksum=total,
        version=weight._version,
        pointer=weight.data_ptr(),
    )
    return record


@torch.no_grad()
def unmerge_exact(weight: torch.Tensor, record: MergeRecord) -> bool:
    """Undo the merge ``record`` describes on ``weight`` (the merged weight, or a contiguous copy of it): W0 bit for
    bit. Returns whether the checksum of the result equals W0's (False only if ΔW was not recomputed identically)."""
    _, chunks = _chunks(weight)
    for start, stop in chunks:
        w = weight[start:stop]
        if start in record.dense:
            w.copy_(record.dense[start])
            continue
        d = delta_rows(record.factors, start, stop)
        w.copy_((w.float() - d).to(weight.dtype))
        del d
    if record.index.numel():
        weight.view(-1)[record.index.long()] = record.values
    return checksum(weight) == record.checksum


@torch.no_grad()
def subtract(weight: torch.Tensor, factors: Sequence[Factors]) -> None:
    """W ← fl(W − Σ ΔW), chunk by chunk (not exact: the fallback when the merged weight was changed in place)."""
    _, chunks = _chunks(weight)
    for start, stop in chunks:
        w = weight[start:stop]
        w.copy_((w.float() - delta_rows(factors, start, stop)).to(weight.dtype))
