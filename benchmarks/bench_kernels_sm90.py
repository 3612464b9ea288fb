"""Compile every launch the library makes of its fused kernels for NVIDIA GPUs, on a machine without one.

Where the variants come from (so the list cannot drift from the code): the library's own entry points run on small
CPU tensors with every kernel launch *recorded* instead of executed —

- ``OffPrincipalAdamW.step()`` (its real step: device step counts as tensors, the non-finite flag, weight decay
  from the cached (UᵀW, WV) or none) for fp32, bf16 and fp16 weights and bf16 with ``master_weights``, every
  ``sides`` and ``precision``, weight decay 0 and 0.1, ``lr`` a number and a tensor;
- ``OffPrincipalOptimizer`` (projection of the fp32 update of a wrapped SGD);
- the public functions ``offprincipal.projection.project_`` (fp32/bf16/fp16 D) and
  ``offprincipal.optim.adamw_update_`` with a number ``step`` (host scalars; W read for weight decay, or no weight
  decay; a bf16 gradient on fp32 weights as well);

each on weights whose k covers every pass-1 class (k = 1, 24, 40, 64, 100, 256: multiples of 16 and not) and
whose column count n is a multiple of 16 and not. Only two checks are bypassed while recording: the kernels' and
``resolve_backend``'s "CUDA tensor" checks. Each recorded launch goes through Triton's own binder (the code
``JITFunction.run`` uses), which gives the specialization a launch on a GPU would compile — argument types,
constexprs, divisibility and value-1 attributes — for the target; the distinct ones are compiled for sm_90
(H100/H200) and sm_80 (A100) with the ptxas bundled in the triton wheel. What differs from a GPU launch: the data
pointers come from CPU allocations (aligned to ≥ 64 B, like CUDA's), and pass 1's grid (its size is not
specialized, see ``kernels._tiles.NOT_SPECIALIZED``).

The bundled ``cuobjdump --dump-resource-usage`` reads registers and the stack frame (local memory: every stack byte
of these kernels is a spill, they have no local arrays) of each cubin, and the metadata the shared memory. Each
row must have no stack frame, shared memory within the target's per-block limit (232,448 B on sm_90, 166,912 B
on sm_80) and at most 255 registers per thread. The report (``benchmarks/results/kernels_sm90.md``) carries a
fingerprint of the kernel sources and of this script, and is rewritten as results come in (the optimizer's
launches first), so an interrupted run leaves the part that finished, marked as partial.
``tests/test_kernels_sm90.py`` checks that it is current, complete and that every row passes.

    python benchmarks/bench_kernels_sm90.py                 # everything → benchmarks/results/kernels_sm90.md
    python benchmarks/bench_kernels_sm90.py --entry OffPrincipalAdamW,OffPrincipalOptimizer   # the library's own
    python benchmarks/bench_kernels_sm90.py --list          # the distinct launches, no compile
    python benchmarks/bench_kernels_sm90.py --limit 1 --out /tmp/one.md   # time one variant first
"""

from __future__ import annotations

import argparse
import contextlib
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
SOURCES = ("kernels/_tiles.py", "kernels/project.py", "kernels/adamw.py")
K_VALUES = (1, 24, 40, 64, 100, 256)  # pass-1 classes 16/32/64/128/256; stored k 16, 32, 48, 64, 112, 256
SHAPES = ((288, 272), (269, 263))  # n a multiple of 16, and not; min(m, n) > 256 so that every k fits
KERNELS = ("project_reduce", "project_apply", "adamw_reduce", "adamw_apply")


def fingerprint() -> str:
    """Hash of the kernel sources (the config tables live in ``_tiles.py``) and this script: what a compile result
    depends on. A change in the launching code shows as a variant without a row (the test re-records them)."""
    h = hashlib.sha256()
    for rel in SOURCES + ("benchmarks/bench_kernels_sm90.py",):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:16]


def _kernel(name: str):
    from offprincipal.kernels import adamw, project

    return {"project_reduce": project._project_reduce_kernel, "project_apply": project._project_apply_kernel,
            "adamw_reduce": adamw._adamw_reduce_kernel, "adamw_apply": adamw._adamw_apply_kernel}[name]


# ---------------------------------------------------------------------------------------------------------------
# recording the library's launches


@contextlib.contextmanager
def recording():
    """Within: every launch of the four kernels is appended to the yielded list as (kernel name, args, kwargs)
    instead of running, and CPU tensors pass the two "CUDA tensor" checks. Everything else runs as on a GPU."""
    from offprincipal import projection
    from offprincipal.kernels import adamw, project
    from offprincipal.optim import adamw as optim_adamw, update

    launches: list = []
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, value)

    for name in KERNELS:
        fn = _kernel(name)
        patch(fn, "run", lambda *args, grid, warmup, _name=name, **kwargs: launches.append((_name, args, kwargs)))
    for module in (adamw, project):
        patch(module, "check_device", lambda what, t: None)
    for module in (projection, update, optim_adamw):  # the situations ask for backend="triton"
        patch(module, "resolve_backend", lambda backend, D, what="D": "torch" if backend == "torch" else "triton")
    try:
        yield launches
    finally:
        for obj, name, value in reversed(saved):
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


_MISSING = object()


def _weights(dtype):
    """{name: (weight, k, (U, V))}: every k of K_VALUES on every shape of SHAPES, the same values at every call;
    U, V the top-k singular bases of the weight as stored in ``dtype``."""
    import torch

    from offprincipal.subspace import top_k_subspace

    if dtype not in _WEIGHTS:
        gen = torch.Generator().manual_seed(0)
        out = _WEIGHTS[dtype] = {}
        for m, n in SHAPES:
            W = (0.02 * torch.randn(m, n, generator=gen)).to(dtype)
            for k in K_VALUES:
                sub = top_k_subspace(W.float(), k)
                out[f"w{m}x{n}_k{k}"] = (W, k, (sub.U, sub.V))
    return {name: (W.clone(), k, bases) for name, (W, k, bases) in _WEIGHTS[dtype].items()}


_WEIGHTS: dict = {}


def _optimizer_situations():
    """(label, callable) running the library's entry points once each; the callables launch the kernels."""
    import torch

    from offprincipal._sides import PRECISIONS, SIDES
    from offprincipal.optim import OffPrincipalAdamW, OffPrincipalOptimizer, adamw_update_
    from offprincipal.projection import project_

    gen = torch.Generator().manual_seed(1)

    def adamw_optimizer(dtype, master, sides, precision):
        def run():
            weights = _weights(dtype)
            params = {name: torch.nn.Parameter(W) for name, (W, _, _) in weights.items()}
            subspaces = {name: bases for name, (_, _, bases) in weights.items()}
            opt = OffPrincipalAdamW(list(params.items()), lr=1e-3, weight_decay=0.1, sides=sides, precision=precision,
                                    backend="triton", cache_dir=False, progress=False, master_weights=master,
                                    subspaces=subspaces)
            for weight_decay, lr in ((0.1, 1e-3), (0.0, 1e-3), (0.1, torch.tensor(1e-3)), (0.0, torch.tensor(1e-3))):
                for group in opt.param_groups:
                    group["weight_decay"], group["lr"] = weight_decay, lr
                for p in params.values():
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                opt.step()
        return run

    def wrapper(sides, precision):
        def run():
            weights = _weights(torch.float32)
            params = {name: torch.nn.Parameter(W) for name, (W, _, _) in weights.items()}
            opt = OffPrincipalOptimizer(torch.optim.SGD(list(params.values()), lr=1e-2), list(params.items()),
                                        sides=sides, precision=precision, backend="triton", cache_dir=False,
                                        progress=False, subspaces={n: bases for n, (_, _, bases) in weights.items()})
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return run

    def public_project(dtype, sides, precision):
        def run():
            for W, _, (U, V) in _weights(dtype).values():
                project_(W, U, V, sides, backend="triton", precision=precision)
        return run

    def public_adamw(dtype, grad_dtype, sides, precision):
        def run():
            for W, _, (U, V) in _weights(dtype).values():
                grad = torch.randn(W.shape, generator=gen).to(grad_dtype)
                for weight_decay in (0.1, 0.0):
                    adamw_update_(W, grad, torch.zeros_like(W), torch.zeros_like(W), 3, U, V, sides, lr=1e-3,
                                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, backend="triton",
                                  precision=precision)
        return run

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out = []
    for sides in SIDES:
        for precision in PRECISIONS:
            for label, dtype in dtypes.items():
                out.append(("OffPrincipalAdamW", adamw_optimizer(dtype, False, sides, precision)))
            out.append(("OffPrincipalAdamW", adamw_optimizer(torch.bfloat16, True, sides, precision)))
            out.append(("OffPrincipalOptimizer", wrapper(sides, precision)))
    for sides in SIDES:
        for precision in PRECISIONS:
            for dtype in dtypes.values():
                out.append(("project_", public_project(dtype, sides, precision)))
                out.append(("adamw_update_", public_adamw(dtype, dtype, sides, precision)))
            out.append(("adamw_update_", public_adamw(torch.float32, torch.bfloat16, sides, precision)))
    return out


def _specialize(name: str, args: tuple, kwargs: dict, arch: int):
    """What ``JITFunction.run`` would compile for this launch on ``arch``: (options, signature, constexprs, attrs)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(name)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


ENTRY_POINTS = ("OffPrincipalAdamW", "OffPrincipalOptimizer", "project_", "adamw_update_")
LIBRARY_ENTRY_POINTS = ENTRY_POINTS[:2]  # the library's own launch sites; the other two are public functions


def variants(entries=ENTRY_POINTS) -> list[dict]:
    """The distinct compiled variants of every recorded launch of the given entry points, the optimizer's first;
    each a dict with the kernel name, an ``id`` (hash of the specialization), per target the (options, signature,
    constexprs, attrs) to compile, readable ``cells`` and its ``sources`` (entry points)."""
    import torch

    torch.set_num_threads(1)
    found: dict = {}
    for source, run in _optimizer_situations():
        if source not in entries:
            continue
        with recording() as launches:
            run()
        for name, args, kwargs in launches:
            packed = {arch: _specialize(name, args, kwargs, arch) for arch in TARGETS}
            options, signature, constexprs, attrs = packed[90]
            key = (name, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), options.num_warps, options.num_stages, options.maxnreg)
            ident = hashlib.sha256(repr(key).encode()).hexdigest()[:10]
            row = found.setdefault(key, dict(kernel=name, id=ident, packed={a: (p[0].__dict__, p[1], p[2], p[3])
                                                                            for a, p in packed.items()},
                                             cells=_cells(name, packed[90]), sources=[]))
            if source not in row["sources"]:
                row["sources"].append(source)
    return list(found.values())


def _cells(name: str, packed) -> tuple:
    """Readable columns of one variant: k class, tile, precision, dtypes, sides, flags, n class."""
    options, signature, constexprs, attrs = packed
    fn = _kernel(name)
    value = {fn.arg_names[path[0]]: v for path, v in constexprs.items()}
    divisible = {fn.arg_names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr}
    k_class = value["KP"] if "KP" in value else value["BK"]
    tile = f"{value['BM']}×{value['BN']}, {options.num_warps}, {options.num_stages}"
    main = "D" if name.startswith("project") else "W"
    dtype = signature[main].lstrip("*")
    if "G" in signature and signature["G"] != signature[main]:
        dtype += f"+{signature['G'].lstrip('*')} grad"
    sides = {(True, True): "both", (True, False): "left", (False, True): "right"}[(value["LEFT"], value["RIGHT"])]
    flags = ""
    if name.startswith("adamw"):
        wd = value.get("READ_W", value.get("HAS_WD"))
        flags = ("W" if wd else "-") + ("S" if value["HYPER_ON_DEVICE"] else "-") + ("F" if value["HAS_OK"] else "-")
    n_class = "1" if "N" in value else "16" if "N" in divisible else "any"
    return (name, str(k_class), tile, value["PRECISION"], dtype, sides, flags, n_class)


# ---------------------------------------------------------------------------------------------------------------
# compiling


def compile_one(job) -> dict:
    """Compile one variant for every target; registers, stack bytes, shared bytes and seconds per target."""
    name, packed = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(name)
    out = {}
    for arch, (options, signature, constexprs, attrs) in packed.items():
        t0 = time.perf_counter()
        ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(options))
        seconds = time.perf_counter() - t0
        regs, stack = _resource_usage(ck.asm["cubin"])
        out[arch] = dict(regs=regs, stack=stack, shared=ck.metadata.shared, seconds=seconds)
    return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    import re

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return int(re.search(r"REG:(\d+)", text).group(1)), int(re.search(r"STACK:(\d+)", text).group(1))


def passes(targets: dict) -> bool:
    return all(t["stack"] == 0 and t["regs"] <= MAX_REGISTERS and t["shared"] <= TARGETS[arch]
               for arch, t in targets.items())


HEADER = ("| id | kernel | k class | BM×BN, warps, stages | precision | dtype | sides | flags | n | launched by | "
          "sm_90 regs / stack B / smem B / s | sm_80 regs / stack B / smem B / s | ok |")


def table(rows: list[dict]) -> list[str]:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        cells = [f"{t['regs']} / {t['stack']} / {t['shared']} / {t['seconds']:.1f}" for t in r["targets"].values()]
        lines.append(f"| {r['id']} | " + " | ".join(r["cells"]) + f" | {', '.join(r['sources'])} | {cells[0]} | {cells[1]} | "
                     f"{'yes' if passes(r['targets']) else '**NO**'} |")
    return lines


def write_report(path: Path, rows: list[dict], total: int, wall: float, jobs: int, entries) -> None:
    import triton

    failed = [r for r in rows if not passes(r["targets"])]
    status = (f"**{len(rows) - len(failed)} of {len(rows)} variants pass.**" if len(rows) == total else
              f"**PARTIAL: {len(rows)} of {total} variants compiled so far ({len(rows) - len(failed)} pass); the run "
              "did not finish.**")
    report = [
        "# Fused kernels compiled for sm_90 and sm_80 on a CPU", "",
        f"fingerprint: {fingerprint()}", "",
        f"Triton {triton.__version__} (its bundled ptxas and cuobjdump), {total} distinct variants × {len(TARGETS)} "
        f"targets, {wall:.0f} s wall with {jobs} processes on a {os.cpu_count()}-core AMD EPYC VM (CPU only, shared). "
        "Written by `benchmarks/bench_kernels_sm90.py`, which records the launches of the library's own entry points "
        "(see its docstring) and compiles each distinct specialization; regenerate after any change to the kernels, "
        "their configs or the launching code (`tests/test_kernels_sm90.py` fails while this file is stale).", "",
        "Each row: registers per thread / stack frame bytes (local memory: spills) / shared memory bytes / compile "
        "seconds (0.0–0.1 s: the cubin came from Triton's cache, filled by an earlier run of this script on the same "
        "kernel sources). Limits: 255 registers, 0 stack bytes, shared memory ≤ 232,448 B (sm_90) and 166,912 B (sm_80). "
        "Every config passes ptxas a register cap of 255 (`maxnreg`). k class: padded k of pass 1 (KP), K chunk of "
        "pass 2 (BK); k is stored padded to a multiple of 16 with zero columns (`kernels._tiles.stored_k`), so "
        "k = 24, 40, 100 launch the same code as 32, 48, 112. flags (AdamW): W = weight decay from W (pass 1 reads W; "
        "pass 2 adds lr·wd·W), else none or from UᵀW and WV; S = step scalars read from device memory (the "
        "optimizer's device step counts), else by value; F = the non-finite skip flag. n: 16 = the column count "
        "(and row stride) is a multiple of 16, any = it is not. launched by: the entry points whose launches "
        "compile to this variant. id: a hash of the whole specialization (every argument type, constexpr and "
        "divisibility attribute) that the test matches against the launches it records.", "",
        f"entry points: {', '.join(entries)}", "",
        *([f"Not compiled in this report: the launches of {', '.join(e for e in ENTRY_POINTS if e not in entries)} "
           "(`--entry all`; about 0.6 s per variant on an idle 2-core machine, far more when it is shared)."]
          if set(entries) != set(ENTRY_POINTS) else []), "",
        status, "",
    ] + table(rows)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(report) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N variants")
    parser.add_argument("--list", action="store_true", help="print the distinct launches and stop")
    parser.add_argument("--entry", default="all", help=f"comma-separated entry points of {ENTRY_POINTS}, or all")
    parser.add_argument("--out", default=str(REPORT))
    args = parser.parse_args(argv)
    entries = ENTRY_POINTS if args.entry == "all" else tuple(e for e in ENTRY_POINTS if e in args.entry.split(","))

    t0 = time.perf_counter()
    todo = variants(entries)
    print(f"{len(todo)} distinct variants recorded in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.list:
        for v in todo:
            print(v["id"], "|", " | ".join(v["cells"]), "|", ", ".join(v["sources"]))
        return 0
    if args.limit:
        todo = todo[: args.limit]
    rows, done, t0 = [], 0, time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        for v, targets in zip(todo, pool.map(compile_one, [(v["kernel"], v["packed"]) for v in todo])):
            rows.append(dict(v, targets=targets))
            done += 1
            if done % 25 == 0 or done == len(todo):
                write_report(Path(args.out), rows, len(todo), time.perf_counter() - t0, args.jobs, entries)
                print(f"{done}/{len(todo)} compiled, {time.perf_counter() - t0:.0f} s", flush=True)
    failed = [r for r in rows if not passes(r["targets"])]
    for r in failed:
        print("FAIL", " | ".join(r["cells"]), r["targets"])
    print(f"wrote {args.out}; {len(failed)} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
