"""What the machine can do: the training precision that fits it, and a description of it for run records.

bf16 autocast halves the cost of a matmul only where the hardware multiplies bf16 natively: CUDA GPUs with bf16
support, and CPUs with AVX512_BF16 or AMX. Elsewhere (e.g. an AVX2-only x86 CPU) torch emulates bf16 matmuls and they
are far *slower* than fp32, so the default is decided per machine:

- an explicit request (``--bf16`` / ``--no-bf16``) wins;
- CUDA: bf16 when ``torch.cuda.is_bf16_supported()``;
- CPU: fp32 unless the CPU reports AVX512_BF16 or AMX; where it does, a one-shot micro-benchmark (a bf16 and an
  fp32 matmul of the same shape, best of a few repeats) must confirm bf16 is faster. The benchmark also catches
  an ISA capped below what the CPU reports (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, virtual machines).

The decision is returned with its reason, which run records and reports carry.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

# bf16 must beat fp32 by this factor in the micro-benchmark (a tie is not worth bf16's rounding)
BF16_SPEEDUP_REQUIRED = 1.25
_BENCH_SHAPE = (256, 576, 576)  # (tokens, in, out): a small slice of a 135M-class model's projection


@dataclass(frozen=True)
class Precision:
    """The compute precision of a run: ``bf16`` autocast or not, and why (one sentence, for records)."""

    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def cpu_capability() -> str:
    """torch's CPU kernel capability (``"AVX2"``, ``"AVX512"``, ...), or ``"unknown"``."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old or exotic builds
        return "unknown"


def cpu_native_bf16() -> bool:
    """True when the CPU reports native bf16 arithmetic (AVX512_BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _best_matmul_seconds(dtype: torch.dtype, repeats: int = 3) -> float:
    m, k, n = _BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    a @ b  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@lru_cache(maxsize=1)
def cpu_bf16_benchmark() -> tuple[float, float]:
    """(bf16, fp32) seconds of one matmul of shape :data:`_BENCH_SHAPE` on this CPU (measured once per process)."""
    return _best_matmul_seconds(torch.bfloat16), _best_matmul_seconds(torch.float32)


def choose_precision(device: str, requested: Optional[bool] = None) -> Precision:
    """The precision for training/evaluation on ``device`` (``"cpu"`` or ``"cuda"``); ``requested`` is the user's
    explicit choice (``True``/``False``) or ``None`` for the machine's best."""
    if requested is not None:
        flag = "--bf16" if requested else "--no-bf16"
        return Precision(bool(requested), f"{flag} given")
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return Precision(True, f"CUDA GPU with bf16 support ({name})")
        return Precision(False, f"CUDA GPU without bf16 support ({name})")
    capability = cpu_capability()
    if not cpu_native_bf16():
        return Precision(False, f"CPU without native bf16 (torch capability {capability}; no AVX512_BF16/AMX): "
                                "bf16 matmuls would be emulated and slower than fp32")
    bf16_s, fp32_s = cpu_bf16_benchmark()
    measured = f"bf16 matmul {bf16_s * 1e3:.2f} ms vs fp32 {fp32_s * 1e3:.2f} ms"
    if bf16_s * BF16_SPEEDUP_REQUIRED <= fp32_s:
        return Precision(True, f"CPU with native bf16 (torch capability {capability}); {measured}")
    return Precision(False, f"CPU reports native bf16 (torch capability {capability}) but {measured}: fp32 is faster")


def describe_machine() -> dict:
    """What a run ran on (timings depend on it): platform, processor, cores, torch threads and CPU capability,
    and the GPU where there is one. Values are JSON scalars."""
    info = {
        "platform": platform.platform(), "processor": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_native_bf16(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_name() -> str:
    """The CPU's model name: the ``model name`` line of ``/proc/cpuinfo``, else ``platform.processor()``, else the
    architecture (``platform.machine()``), else ``"unknown"``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_device(device: str) -> str:
    """One line naming the machine a timing was measured on, for benchmark reports: the GPU's name when ``device``
    is ``"cuda"``; else ``"<cpu_name()> CPU, <n> cores (load average <1-min load> at start), no GPU"`` (the load is
    read at the call, so call it before the measurement). :func:`describe_machine` is the structured record."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_name()} CPU, {os.cpu_count()} cores (load average {load:.1f} at start), no GPU"
