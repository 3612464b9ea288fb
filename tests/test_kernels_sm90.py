"""The committed sm_90/sm_80 compile report of the fused kernels is current and clean.

``benchmarks/bench_kernels_sm90.py`` compiles every kernel × shipped config × precision × dtype for sm_90 and sm_80
on a CPU (minutes: too slow for CI) and writes ``benchmarks/results/kernels_sm90.md`` with a fingerprint of the
kernel sources and config tables. Here: the fingerprint matches the sources (else: re-run the script), every
shipped config has a row for each target, no row spills or exceeds the limits, and one variant is compiled
for real to show the toolchain works on this machine.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels_sm90", ROOT / "benchmarks" / "bench_kernels_sm90.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0].endswith(("reduce", "apply")):
            rows[tuple(cells[:7])] = cells[7:]
    return rows


def test_committed_report_is_current_and_every_shipped_config_passes():
    bench = _bench()
    text = bench.REPORT.read_text()
    found = re.search(r"fingerprint: (\w+)", text)
    assert found and found.group(1) == bench.fingerprint(), (
        "benchmarks/results/kernels_sm90.md is stale: the kernels or their configs changed since it was written; "
        "run `python benchmarks/bench_kernels_sm90.py`"
    )
    rows = _rows(text)
    for kernel, kp, cfg, precision, dtype, sides, flags in bench.variants():
        key = (kernel, str(kp), f"{cfg.BM}×{cfg.BN}, {cfg.num_warps}, {cfg.num_stages}", precision, dtype, sides,
               bench.flag_text(flags))
        assert key in rows, f"no compile result for {key}"
        *targets, ok = rows[key]
        assert ok == "yes", f"{key} fails: {targets}"
        for arch, cell in zip(bench.TARGETS, targets):
            regs, stack, smem, _ = (float(x) for x in cell.split(" / "))
            assert stack == 0 and regs <= bench.MAX_REGISTERS and smem <= bench.TARGETS[arch], (key, arch, cell)


def test_one_variant_compiles_for_sm90_here():
    """The toolchain (Triton's pipeline, bundled ptxas and cuobjdump) runs on this CPU-only machine."""
    bench = _bench()
    from offprincipal.kernels._tiles import APPLY_CONFIGS

    row = bench.compile_one(("project_apply", 16, APPLY_CONFIGS[16, "tf32x3"], "tf32x3", "fp32", "both", None))
    assert bench.passes(row), row
    assert set(row["targets"]) == set(bench.TARGETS)
