"""Compile every fused kernel for NVIDIA GPUs on a machine without one, and read what the compiler made of it.

For each kernel × shipped launch config × fp32 precision × storage dtype, Triton's own pipeline compiles the
kernel for sm_90 (H100/H200) and sm_80 (A100) with the ptxas bundled in the triton wheel
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``); the bundled ``cuobjdump
--dump-resource-usage`` reads registers and the stack frame (local memory: every stack byte of these kernels is a
spill, they have no local arrays) of the cubin, and the metadata the shared memory. Each row must have

- no stack frame (no local-memory spills),
- shared memory within the target's per-block limit (232,448 B on sm_90, 166,912 B on sm_80),
- at most 255 registers per thread.

Variants: every sides setting; for AdamW the usual flags (no read of W in pass 1, host step scalars) and the
other extreme (W read, scalars from device memory), and the mixed dtypes of master weights. The report
(``benchmarks/results/kernels_sm90.md``) carries a fingerprint of the kernel sources and config tables;
``tests/test_kernels_sm90.py`` checks that it is current and that every row passes.

    python benchmarks/bench_kernels_sm90.py                  # the shipped configs → benchmarks/results/kernels_sm90.md
    python benchmarks/bench_kernels_sm90.py --candidates reduce:64  # try other tiles for pass 1 at padded k 64
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real; this needs no GPU
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if "TRITON_CACHE_DIR" not in os.environ:  # cold compiles: honest compile times, no stale cache
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-sm90-")

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "results" / "kernels_sm90.md"
TARGETS = {90: 232_448, 80: 166_912}  # arch → shared memory per block (opt-in maximum), bytes
MAX_REGISTERS = 255
DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
MIXED = "fp32+bf16 grad"  # OffPrincipalAdamW(master_weights=True): fp32 weight and moments, bf16 gradient
SIDES = {"both": (True, True), "left": (True, False), "right": (False, True)}
# AdamW flags compiled: (pass-1 READ_W / pass-2 HAS_WD, HYPER_ON_DEVICE) — the usual path (weight decay from
# UᵀW and WV, or none; host step scalars) and the other extreme (W read, scalars from device memory)
ADAMW_FLAGS = ((False, False), (True, True))
SOURCES = ("kernels/_tiles.py", "kernels/project.py", "kernels/adamw.py")


def fingerprint() -> str:
    """Hash of the kernel sources (the config tables live in ``_tiles.py``) and this script."""
    h = hashlib.sha256()
    for rel in SOURCES + ("benchmarks/bench_kernels_sm90.py",):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def _kernel(name: str):
    from offprincipal.kernels import adamw, project

    return {"project_reduce": project._project_reduce_kernel, "project_apply": project._project_apply_kernel,
            "adamw_reduce": adamw._adamw_reduce_kernel, "adamw_apply": adamw._adamw_apply_kernel}[name]


def variants(candidates_kp=None):
    """(kernel, k-class, config, precision, dtype) for every shipped config (or pass-1 candidates at one k)."""
    from offprincipal.kernels._tiles import APPLY_CONFIGS, PRECISIONS, REDUCE_CONFIGS, TileConfig  # noqa: F401

    rows = []
    if candidates_kp:  # "reduce:64" or "reduce:64:tf32x3,ieee": other tiles, every dtype, both kernels of the pass
        kind, kp, *only = candidates_kp.split(":")
        tiles = ([(32, 32, 8, 1), (32, 32, 4, 1), (16, 64, 8, 1), (32, 64, 4, 1), (16, 32, 4, 1)]
                 if kind == "reduce" else [(32, 64, 8, 1), (32, 32, 4, 1), (64, 32, 8, 1)])
        for bm, bn, w, s in tiles:
            for precision in (only[0].split(",") if only else PRECISIONS):
                for kernel in (f"project_{kind}", f"adamw_{kind}"):
                    for dtype in DTYPES:
                        rows.append((kernel, int(kp), TileConfig(bm, bn, w, s), precision, dtype, "both", (True, True)))
        return rows
    for kernel in ("project_reduce", "adamw_reduce", "project_apply", "adamw_apply"):
        table = REDUCE_CONFIGS if kernel.endswith("reduce") else APPLY_CONFIGS
        adamw = kernel.startswith("adamw")
        for (kp, precision), cfg in table.items():
            for dtype in list(DTYPES) + ([MIXED] if adamw else []):
                for sides in SIDES:
                    for flags in (ADAMW_FLAGS if adamw else (None,)):
                        rows.append((kernel, kp, cfg, precision, dtype, sides, flags))
    return rows


def compile_one(args) -> dict:
    """Compile one variant for every target; registers, stack bytes, shared bytes and seconds per target."""
    kernel_name, kp, cfg, precision, dtype, sides, flags = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(kernel_name)
    reduce = kernel_name.endswith("reduce")
    left, right = SIDES[sides]
    const = dict(LEFT=left, RIGHT=right, PRECISION=precision, BM=cfg.BM, BN=cfg.BN)
    const.update(KP=kp, BK=min(kp, 64)) if reduce else const.update(BK=kp)
    if kernel_name.startswith("adamw"):
        wd, on_device = flags
        # HAS_OK: OffPrincipalAdamW always passes its device flag of finite gradients (the non-finite skip)
        const.update(HYPER_ON_DEVICE=on_device, HAS_OK=True, **({"READ_W": wd} if reduce else {"HAS_WD": True}))
    storage = {"D", "W", "G", "EXP_AVG", "EXP_AVG_SQ"}
    fp32_ptrs = {"U", "V", "CP", "DVP", "C", "DV", "HYPER"}
    floats = {"one_minus_beta1", "beta2", "one_minus_beta2", "grad_sign", "step_size", "bc2_sqrt", "eps", "lr_wd"}
    # as a launch on contiguous tensors of LLM shapes specializes it: unit strides are the constant 1; pointers,
    # sizes and leading strides divisible by 16
    unit = {"s1", "sw1", "sg1", "sm1", "sv1"}
    const.update({name: 1 for name in fn.arg_names if name in unit})
    aligned = storage | fp32_ptrs | {"M", "N", "K", "s0", "sw0", "sg0", "sm0", "sv0"}
    signature, attrs = {}, {}
    storage_type = {name: DTYPES["fp32" if dtype == MIXED else dtype] for name in storage}
    if dtype == MIXED:
        storage_type["G"] = DTYPES["bf16"]
    for index, name in enumerate(fn.arg_names):
        signature[name] = ("constexpr" if name in const else storage_type[name] if name in storage else
                           "*fp32" if name in fp32_ptrs else "*i32" if name == "OK" else "fp32" if name in floats
                           else "i32")
        if name in aligned and name not in const:
            attrs[(index,)] = [["tt.divisibility", 16]]
    out = {}
    for arch in TARGETS:
        t0 = time.perf_counter()
        src = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()}, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg))
        seconds = time.perf_counter() - t0
        regs, stack = _resource_usage(ck.asm["cubin"])
        out[arch] = dict(regs=regs, stack=stack, shared=ck.metadata.shared, seconds=seconds)
    return dict(kernel=kernel_name, kp=kp, cfg=cfg, precision=precision, dtype=dtype, sides=sides,
                flags=flag_text(flags), targets=out)


def flag_text(flags) -> str:
    """The report's flags cell: W (pass 1 reads W), S (scalars from device memory), '-' for each flag off."""
    return "" if flags is None else f"{'W' if flags[0] else '-'}{'S' if flags[1] else '-'}"


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    import re

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    return regs, stack


def passes(row: dict) -> bool:
    return all(t["stack"] == 0 and t["regs"] <= MAX_REGISTERS and t["shared"] <= TARGETS[arch]
               for arch, t in row["targets"].items())


def table(rows: list[dict]) -> list[str]:
    lines = ["| kernel | k class | BM×BN, warps, stages | precision | dtype | sides | flags | "
             "sm_90 regs / stack B / smem B / s | sm_80 regs / stack B / smem B / s | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cfg"]
        cells = [f"{t['regs']} / {t['stack']} / {t['shared']} / {t['seconds']:.1f}" for t in r["targets"].values()]
        lines.append(f"| {r['kernel']} | {r['kp']} | {c.BM}×{c.BN}, {c.num_warps}, {c.num_stages} | {r['precision']} | "
                     f"{r['dtype']} | {r['sides']} | {r['flags']} | {cells[0]} | {cells[1]} | "
                     f"{'yes' if passes(r) else '**NO**'} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--candidates", default=None, help="reduce:KP[:PRECISIONS] or apply:BK[:PRECISIONS] — try other tiles (prints, no report)")
    parser.add_argument("--out", default=str(REPORT))
    args = parser.parse_args(argv)
    import triton

    todo = variants(args.candidates)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, todo))
    wall = time.perf_counter() - t0
    lines = table(rows)
    print("\n".join(lines))
    if args.candidates:
        return 0
    failed = [r for r in rows if not passes(r)]
    report = [
        "# Fused kernels compiled for sm_90 and sm_80 on a CPU", "",
        f"fingerprint: {fingerprint()}", "",
        f"Triton {triton.__version__} (its bundled ptxas and cuobjdump), {len(rows)} variants × {len(TARGETS)} targets, "
        f"{wall:.0f} s wall with {args.jobs} processes on {os.cpu_count()} CPUs. Written by "
        "`benchmarks/bench_kernels_sm90.py`; regenerate after any change to the kernels or their configs "
        "(`tests/test_kernels_sm90.py` fails while this file is stale).", "",
        "Each row: registers per thread / stack frame bytes (local memory: spills) / shared memory bytes / compile "
        "seconds. Limits: 255 registers, 0 stack bytes, shared memory ≤ 232,448 B (sm_90) and 166,912 B (sm_80). "
        "Every config passes ptxas a register cap of 255 (`maxnreg`; without it ptxas chose 32–128 registers and "
        "spilled 8–24 B in 31 one-sided variants). "
        "k class: padded k of pass 1, K chunk of pass 2. flags (AdamW): W = pass 1 reads W (else weight decay from "
        "UᵀW and WV, or none), S = step scalars from device memory (else by value).", "",
        f"**{len(rows) - len(failed)} of {len(rows)} variants pass.**", "",
    ] + lines
    Path(args.out).write_text("\n".join(report) + "\n")
    print(f"wrote {args.out} in {wall:.0f} s; {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
