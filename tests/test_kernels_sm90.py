"""The committed sm_90/sm_80 compile report of the fused kernels is current, covers every launch the library makes,
and is clean.

``benchmarks/bench_kernels_sm90.py`` records the kernel launches of the library's entry points (OffPrincipalAdamW's
real step, OffPrincipalOptimizer, and the public functions), compiles each distinct specialization for sm_90 and
sm_80 on a CPU (tens of minutes: too slow for CI) and writes ``benchmarks/results/kernels_sm90.md`` with a
fingerprint of the kernel sources. Here: the fingerprint matches the sources (else: re-run the script); the launches
of every entry point the report names are recorded again from the current code and each has a row (so a change in
how the optimizer builds its launches shows as a missing row); the library's own launch sites are among the covered
entry points; no row spills or exceeds the limits; and one variant is compiled for real to show that the toolchain
works on this machine.
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
    """{id: (cells, targets, ok)} of the report's table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 13 and cells[1].endswith(("reduce", "apply")):
            rows[cells[0]] = (cells[1:9], cells[10:12], cells[12])
    return rows


@pytest.fixture(scope="module")
def report():
    bench = _bench()
    text = bench.REPORT.read_text()
    found = re.search(r"fingerprint: (\w+)", text)
    assert found and found.group(1) == bench.fingerprint(), (
        "benchmarks/results/kernels_sm90.md is stale: the kernels, their configs or the script changed since it was "
        "written; run `python benchmarks/bench_kernels_sm90.py`"
    )
    entries = re.search(r"^entry points: (.+)$", text, re.M)
    assert entries, "the report names the entry points whose launches it compiled"
    return bench, text, tuple(e.strip() for e in entries.group(1).split(","))


def test_every_row_of_the_report_passes(report):
    bench, text, _ = report
    rows = _rows(text)
    assert rows, "the report has no rows"
    for ident, (cells, targets, ok) in rows.items():
        assert ok == "yes", f"{ident} {cells} fails: {targets}"
        for arch, cell in zip(bench.TARGETS, targets):
            regs, stack, smem, _ = (float(x) for x in cell.split(" / "))
            assert stack == 0 and regs <= bench.MAX_REGISTERS and smem <= bench.TARGETS[arch], (ident, arch, cell)
    assert "PARTIAL" not in text, "the report is partial: its run did not finish"


def test_every_launch_of_the_covered_entry_points_has_a_row(report):
    """Re-records the launches of the entry points the report covers (tens of seconds): each variant has a row.
    The library's own launch sites — OffPrincipalAdamW's step and OffPrincipalOptimizer — must be covered."""
    bench, text, entries = report
    assert set(bench.LIBRARY_ENTRY_POINTS) <= set(entries), entries
    rows = _rows(text)
    missing = [(v["id"], v["cells"], v["sources"]) for v in bench.variants(entries) if v["id"] not in rows]
    assert not missing, f"{len(missing)} launches have no compile result, e.g. {missing[:3]}"


def test_one_variant_compiles_for_sm90_here():
    """The toolchain (Triton's binder on a recorded launch, its pipeline, bundled ptxas and cuobjdump) runs on this
    CPU-only machine, for a k that is not a multiple of 16 on a shape whose n is not one either."""
    import torch

    bench = _bench()
    from offprincipal.projection import project_

    D = torch.randn(40, 50)
    U = torch.linalg.qr(torch.randn(40, 5)).Q
    V = torch.linalg.qr(torch.randn(50, 5)).Q
    with bench.recording() as launches:
        project_(D, U, V, "left", backend="triton")
    name, args, kwargs = next(launch for launch in launches if launch[0] == "project_apply")
    packed = {arch: bench._specialize(name, args, kwargs, arch) for arch in bench.TARGETS}
    assert bench._cells(name, packed[90])[7] == "any", "n = 50 is not a multiple of 16"
    targets = bench.compile_one((name, {a: (p[0].__dict__, p[1], p[2], p[3]) for a, p in packed.items()}))
    assert bench.passes(targets), targets
    assert set(targets) == set(bench.TARGETS)


def test_optimizer_without_weight_decay_never_reads_the_weight_in_pass_one():
    """weight_decay = 0 with lr a tensor (an LR schedule on the device): lr·wd is the number 0, so neither pass adds
    weight decay and pass 1 does not read W (before, a tensor lr made it read W to add 0·W). k = 40 is launched with
    the bases stored at 48 columns."""
    import torch

    bench = _bench()
    from offprincipal.optim import OffPrincipalAdamW

    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(0.02 * torch.randn(96, 72, generator=gen))
    opt = OffPrincipalAdamW([("w", p)], lr=torch.tensor(1e-3), weight_decay=0.0, top_k=40, cache_dir=False,
                            progress=False, backend="triton")
    p.grad = torch.randn(p.shape, generator=gen)
    with bench.recording() as launches:
        opt.step()
    assert [name for name, *_ in launches] == ["adamw_reduce", "adamw_apply"]
    for name, args, kwargs in launches:
        flag = kwargs["READ_W"] if name == "adamw_reduce" else kwargs["HAS_WD"]
        assert flag is False, (name, flag)
        assert kwargs["HYPER_ON_DEVICE"] and kwargs["HAS_OK"], "the optimizer's step scalars and skip flag"
        assert args[bench._kernel(name).arg_names.index("K")] == 48
