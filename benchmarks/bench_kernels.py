"""Kernel benchmark: correctness, then timings, of the fused projection and the projected-AdamW step.

On a CUDA GPU (the default when one is present): one Llama-7B decoder block — q, k, v, o 4096×4096, gate and up
11008×4096, down 4096×11008 (202 M fp32 params) — for k ∈ {16, 64, 256}:

- projected-AdamW step: Triton (``OffPrincipalAdamW``, backend "triton") vs ``torch.optim.AdamW(fused=True)``
  and vs plain torch AdamW + projection (``OffPrincipalAdamW`` backend "torch");
- in-place projection of the 7 matrices: Triton vs plain torch (``offprincipal.projection.project``);
- achieved bandwidth of both vs a measured device copy (``dst.copy_(src)``);
- a roofline model (:func:`roofline`): bytes and FLOPs per element of each kernel and the time they predict on an
  H100 / H200 (and on the GPU at hand, from its measured copy bandwidth), printed beside the measured times.
Targets on an H100/H200: projected step ≤ 1.3× fused AdamW at k = 64; projection ≥ 80% of copy bandwidth.

On CPU the block is scaled down by ``--scale`` (default 8: 512×512, 1376×512, 512×1376) and only the torch
reference path runs (the Triton interpreter is a correctness tool, far too slow to time); the report then also
measures how much bf16/fp16 storage rounding leaks into the principal subspace (the optimizer's numerics).

    python benchmarks/bench_kernels.py                      # cuda if available, else cpu; writes benchmarks/results/
    python benchmarks/bench_kernels.py --device cpu --ks 16,64 --out /tmp/k.md
    python benchmarks/bench_kernels.py --roofline           # the model only (no device needed)
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu --smoke   # every code path, tiny shapes

(Named ``bench_kernels.py``, not ``kernels.py``: run as a script its folder goes first on sys.path, and a
``kernels`` module there would pass for Hugging Face's ``kernels`` package, which transformers probes.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from offprincipal._sides import DEFAULT_PRECISION
from offprincipal.optim import OffPrincipalAdamW
from offprincipal.projection import principal_leak, project, project_
from offprincipal.files import write_text_atomic
from offprincipal.experiment.hardware import describe_device

LLAMA7B_BLOCK = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
                 ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]
ADAMW_BYTES = {"fused AdamW": 28, "projected, wd=0": 36, "projected, wd>0": 36}  # fp32 bytes per param and step
# (wd > 0 reads no more: pass 1 takes UᵀW and WV, fixed under off-principal updates, instead of reading W)
TARGET_STEP_RATIO = 1.3
TARGET_PROJECTION_FRACTION = 0.80
HYPER = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8)
STEP = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01)  # one step of the correctness check


def block_shapes(scale: int) -> list[tuple[str, int, int]]:
    return [(name, m // scale, n // scale) for name, m, n in LLAMA7B_BLOCK]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], device: str, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def orthonormal(rows: int, k: int, device: str, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, k, generator=gen)).Q.to(device)


def make_block(shapes, k: int, device: str, seed: int = 0):
    """fp32 params with gradients whose top-k singular triplets are known without an SVD:
    W = U diag(S) Vᵀ + P(0.02·R) with random orthonormal U, V and S above the spectrum of the off-principal rest
    (the optimizer certifies given bases against the weights)."""
    from offprincipal.subspace import Subspace

    gen = torch.Generator().manual_seed(seed)
    params, bases = {}, {}
    for name, m, n in shapes:
        U, V = orthonormal(m, k, device, gen), orthonormal(n, k, device, gen)
        rest = 0.02 * torch.randn(m, n, generator=gen).to(device)
        top = 0.02 * (m**0.5 + n**0.5) * torch.linspace(4.0, 2.0, k, device=device)
        W = project(rest, U, V) + (U * top) @ V.T
        p = torch.nn.Parameter(W)
        p.grad = torch.randn(m, n, generator=gen).to(device)
        params[name] = p
        bases[name] = Subspace(U, top, V)
    return params, bases


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


# --- roofline ---------------------------------------------------------------------------------------------------

# Datasheet leads (SXM parts): HBM bandwidth, dense TF32 tensor-core and plain fp32 FMA rates, multiprocessors.
GPUS = {"H100": dict(bandwidth=3.35e12, tf32=495e12, fp32=67e12, sms=132),
        "H200": dict(bandwidth=4.8e12, tf32=495e12, fp32=67e12, sms=132)}
TF32_PRODUCTS = {"tf32": 1, "tf32x3": 3}  # tensor-core products per fp32 product; "ieee" runs on the FMA units


def partial_bytes(m: int, n: int, k: int, sms: int) -> float:
    """Pass 1's partials of one (m, n) matrix: written once, read once by the sum (``kernels._tiles``)."""
    from offprincipal.kernels._tiles import REDUCE_CONFIGS, padded_k, rectangles

    R, Q, _, _ = rectangles(m, n, REDUCE_CONFIGS[padded_k(k), DEFAULT_PRECISION], 2 * sms)
    return 2 * 4 * k * (R * n + Q * m)


def roofline(shapes, k: int, gpu: dict, precision: str = DEFAULT_PRECISION) -> dict:
    """Predicted seconds over the block (fp32 storage) of: fused AdamW, the projected step, the projection.

    Per element: fused AdamW moves 28 B; the projected step 36 B (pass 1 reads g, m, v and writes m, v; pass 2
    reads W, m, v and writes W) plus the partials; the projection 12 B (D read twice, written once) plus the
    partials. Both kernels do 8k FLOPs per element (UᵀD, DV, U·C′, DV·Vᵀ): on tensor cores ×3 for tf32x3.
    Each kernel takes max(bytes / bandwidth, FLOPs / rate) (memory and math overlap)."""
    numel = sum(m * n for _, m, n in shapes)
    partials = sum(partial_bytes(m, n, k, gpu["sms"]) for _, m, n in shapes)
    flops = 8 * k * numel
    math = flops * TF32_PRODUCTS[precision] / gpu["tf32"] if precision in TF32_PRODUCTS else flops / gpu["fp32"]
    bw = gpu["bandwidth"]
    return {
        "fused AdamW": 28 * numel / bw,
        "projected step": max((36 * numel + partials) / bw, math),
        "projection": max((12 * numel + partials) / bw, math),
        "bytes/elem step": 36 + partials / numel, "bytes/elem projection": 12 + partials / numel,
        "flops/elem": 8 * k, "math s": math,
    }


ROOFLINE_HEADER = [
    "# Roofline model of the fused kernels (one Llama-7B block, fp32, Σmn = 202.4 M)", "",
    "Written by `python benchmarks/bench_kernels.py --roofline --out benchmarks/results/kernels_roofline.md` from "
    "datasheet figures (H100 SXM 3.35 TB/s, H200 4.8 TB/s; dense TF32 495 TFLOP/s, fp32 FMA 67 TFLOP/s; 132 SMs). "
    "Per element: fused AdamW 28 B; projected step 36 B (weight decay from UᵀW and WV: no read of W in pass 1) "
    "plus pass 1's partials (written once, summed once: 8·k·(R·n + Q·m) B per matrix, R×Q ≈ 2 programs per SM); "
    "projection 12 B plus the partials; 8k FLOP (×3 tensor-core products for tf32x3). Time = max(bytes/bandwidth, "
    "FLOPs/rate). On a GPU, `bench_kernels.py` prints the same model with the measured copy bandwidth beside the "
    "measured times.", "",
]
LAUNCHES = [
    "## Launches: one per matrix and pass, not grouped", "",
    "A Llama-7B block has 3 shape classes (4096² for q, k, v, o; 11008×4096; 4096×11008), 4 with grouped-query "
    "attention's narrower k, v. Grouping the matrices "
    "of a class into one launch per pass would save launch latency, not bytes. Per matrix the fused step issues "
    "2 kernels plus ~5 small torch ops (partial sums, C′ = C − (CV)Vᵀ, weight-decay terms), ≈ 7 launches × ~4 µs "
    "of CPU time ≈ 0.2 ms per block against a predicted 2.3 ms of memory traffic (k = 64, H100); the GPU-side gaps "
    "between dependent kernels are ~1–2 µs each. Pass 1 already fills the GPU with ≈ 2 programs per SM for one "
    "4096² matrix, pass 2 with thousands of tiles, so grouping does not add parallelism. "
    "`OffPrincipalAdamW(capturable=True)` makes the whole optimizer step capturable in a CUDA graph, which removes "
    "the CPU launch cost without grouping: every step count on the device, torch's capturable AdamW for the "
    "unprojected parameters, no host read or host allocation in `step()`, the non-finite warnings deferred to "
    "`report_nonfinite()` (tests/test_capturable.py: on CPU with every host-read method made to raise; capture and "
    "replay against eager steps on a CUDA GPU, run by `benchmarks/gpu.sh`, not yet run on one). Not capturable: "
    "the default `capturable=False` step (its non-finite report copies the flags to pinned host memory behind a "
    "CUDA event, and unprojected parameters use torch's non-capturable AdamW with host step counts), and "
    "`OffPrincipalOptimizer` (it reads a finite flag per weight to restore a non-finite update). "
    "`benchmarks/gpu.sh` measures the eager step against this model; grouping is worth its "
    "complexity only if the measured gap exceeds the launch estimate.", "",
]


def roofline_lines(shapes, ks, gpus=GPUS) -> list[str]:
    rows = ["| GPU | k | precision | B/elem step (proj.) | FLOP/elem | fused AdamW ms | projected step ms | × fused | "
            "projection ms | math-bound ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, gpu in gpus.items():
        for k in ks:
            for precision in ("tf32x3", "ieee"):
                r = roofline(shapes, k, gpu, precision)
                rows.append(f"| {name} | {k} | {precision} | {r['bytes/elem step']:.1f} ({r['bytes/elem projection']:.1f}) | "
                            f"{r['flops/elem']} | {r['fused AdamW'] * 1e3:.2f} | {r['projected step'] * 1e3:.2f} | "
                            f"{r['projected step'] / r['fused AdamW']:.2f} | {r['projection'] * 1e3:.2f} | {r['math s'] * 1e3:.2f} |")
    return rows


# --- correctness ------------------------------------------------------------------------------------------------


def check_correctness(shapes, ks, device: str, precisions) -> list[str]:
    """Triton vs torch on one matrix of each distinct shape: max error relative to max |reference|, and leak."""
    from offprincipal import kernels
    from offprincipal.optim import adam_scalars, adamw_update_

    rows = ["| shape | k | precision | projection: max rel. error | leak ‖UᵀP(D)‖/‖D‖ | AdamW step: max rel. error of ΔW |",
            "|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(1)
    for m, n in sorted({(m, n) for _, m, n in shapes}):
        for k in ks:
            U, V = orthonormal(m, k, device, gen), orthonormal(n, k, device, gen)
            D = torch.randn(m, n, generator=gen).to(device)
            expected = project(D.double(), U.double(), V.double())
            W = (0.02 * torch.randn(m, n, generator=gen)).to(device)
            grad = torch.randn(m, n, generator=gen).to(device)
            for precision in precisions:
                out = D.clone()
                kernels.project_(out, U, V, "both", precision=precision)
                err = ((out.double() - expected).abs().max() / expected.abs().max()).item()
                leak = max(principal_leak(out, U, V))
                deltas = {}
                for backend in ("torch", "triton"):
                    p, mom, var = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
                    if backend == "triton":
                        step_size, bc2_sqrt, lr_wd = adam_scalars(1, **STEP)
                        kernels.projected_adamw_step_(p, grad, mom, var, U, V, "both", beta1=STEP["beta1"],
                                                      beta2=STEP["beta2"], eps=1e-8, step_size=step_size,
                                                      bc2_sqrt=bc2_sqrt, lr_wd=lr_wd, precision=precision)
                    else:
                        adamw_update_(p, grad, mom, var, 1, U, V, "both", eps=1e-8, backend="torch", **STEP)
                    deltas[backend] = p.double() - W.double()
                step_err = ((deltas["triton"] - deltas["torch"]).abs().max() / deltas["torch"].abs().max()).item()
                rows.append(f"| {m}×{n} | {k} | {precision} | {err:.1e} | {leak:.1e} | {step_err:.1e} |")
    return rows


# --- timings ----------------------------------------------------------------------------------------------------


def time_copy(numel: int, device: str, reps: int) -> float:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, reps)
    return gbps(8 * numel, t)


def time_step(make_opt, params, device: str, reps: int) -> float:
    """Median step time of a fresh optimizer; the weights are restored afterwards (a plain AdamW step moves them
    into the principal subspace, and the next OffPrincipalAdamW certifies its bases against them)."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    opt = make_opt(params)
    t = bench(opt.step, device, reps)
    del opt
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return t


def run_timings(shapes, ks, device: str, reps: int, precisions, triton_ok: bool) -> tuple[list[str], dict]:
    numel = sum(m * n for _, m, n in shapes)
    copy_bw = time_copy(numel, device, reps)
    here = None
    if device == "cuda":  # the model with this GPU's measured copy bandwidth
        props = torch.cuda.get_device_properties(0)
        here = dict(GPUS["H100"], bandwidth=copy_bw * 1e9, sms=props.multi_processor_count)
    lines = [f"Device copy bandwidth: **{copy_bw:.1f} GB/s** (read+write of {numel / 1e6:.1f} M fp32)", ""]
    step_rows = ["| k | wd | step | median ms | × fused AdamW | effective GB/s (bytes model) |", "|---|---|---|---|---|---|"]
    proj_rows = ["| k | projection | median ms | × torch | GB/s (3 passes of D) | fraction of copy |", "|---|---|---|---|---|---|"]
    summary = {"copy_GBps": copy_bw}
    for k in ks:
        params, bases = make_block(shapes, k, device)
        named = list(params.items())
        for wd in (0.0, 0.01):
            fused = time_step(lambda ps: torch.optim.AdamW(ps.values(), weight_decay=wd, fused=True, **HYPER), params, device, reps)
            rows = [("torch AdamW fused=True", fused, ADAMW_BYTES["fused AdamW"])]
            foreach = time_step(lambda ps: torch.optim.AdamW(ps.values(), weight_decay=wd, foreach=True, **HYPER), params, device, reps)
            rows.append(("torch AdamW foreach", foreach, ADAMW_BYTES["fused AdamW"]))
            backends = ["torch"] + (["triton"] if triton_ok else [])
            for backend in backends:
                t = time_step(lambda ps: OffPrincipalAdamW(named, weight_decay=wd, subspaces=bases, backend=backend,
                                                           progress=False, **HYPER), params, device, reps)
                label = "OffPrincipalAdamW, Triton fused" if backend == "triton" else "OffPrincipalAdamW, torch AdamW math + torch projection"
                if backend == "triton" and here is not None:
                    label += f" (roofline {roofline(shapes, k, here)['projected step'] * 1e3:.2f} ms)"
                rows.append((label, t, ADAMW_BYTES["projected, wd>0" if wd else "projected, wd=0"]))
                summary[f"step_ratio_k{k}_wd{wd}_{backend}"] = t / fused
            for label, t, nbytes in rows:
                step_rows.append(f"| {k} | {wd} | {label} | {t * 1e3:.2f} | {t / fused:.2f} | {gbps(nbytes * numel, t):.0f} |")

        scratch = {name: p.detach().clone() for name, p in params.items()}
        uv = {name: (b.U, b.V) for name, b in bases.items()}
        t_torch = bench(lambda: [project(scratch[n], *uv[n]) for n in scratch], device, reps)
        t_inplace = bench(lambda: [project_(scratch[n], *uv[n], backend="torch") for n in scratch], device, reps)
        proj = [("plain torch project()", t_torch), ("torch project_() in place", t_inplace)]
        if triton_ok:
            from offprincipal import kernels

            for precision in precisions:
                t = bench(lambda: [kernels.project_(scratch[n], *uv[n], precision=precision) for n in scratch], device, reps)
                label = f"Triton fused, {precision}"
                if here is not None:
                    label += f" (roofline {roofline(shapes, k, here, precision)['projection'] * 1e3:.2f} ms)"
                proj.append((label, t))
                summary[f"projection_fraction_k{k}_{precision}"] = gbps(12 * numel, t) / copy_bw
        for label, t in proj:
            bw = gbps(12 * numel, t)
            proj_rows.append(f"| {k} | {label} | {t * 1e3:.2f} | {t / t_torch:.2f} | {bw:.0f} | {bw / copy_bw:.0%} |")
        del params, bases, scratch
        if device == "cuda":
            torch.cuda.empty_cache()
    lines += ["### Optimizer step over the block", ""] + step_rows + ["", "### Projection of the 7 matrices", ""] + proj_rows
    return lines, summary


# --- numerics of the stored weight ------------------------------------------------------------------------------


def storage_leak(shape=(576, 1536), k=32, steps=200) -> list[str]:
    """Leak ‖UᵀΔW‖/‖ΔW‖ (left) of the *stored* weight after ``steps`` random-gradient steps, by storage dtype,
    with and without fp32 master weights (whose own leak is also shown)."""
    rows = ["| lr | storage | master weights | leak of stored ΔW | leak of fp32 master ΔW | coords changed |",
            "|---|---|---|---|---|---|"]
    gen0 = torch.Generator().manual_seed(0)
    W0 = 0.02 * torch.randn(*shape, generator=gen0)  # weight-like scale
    for lr in (1e-5, 1e-3):
        for dtype, master in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                              (torch.float16, True)):
            p = torch.nn.Parameter(W0.to(dtype))
            start = p.detach().clone()
            opt = OffPrincipalAdamW([("w", p)], lr=lr, weight_decay=0.0, top_k=k, cache_dir=False, progress=False,
                                    master_weights=master)
            U = opt.bases.entries["w"].U
            gen = torch.Generator().manual_seed(1)
            for _ in range(steps):
                p.grad = torch.randn(*shape, generator=gen).to(dtype)
                opt.step()
            delta = p.detach().double() - start.double()
            stored = principal_leak(delta, U, None)[0]
            master_leak = "—"
            if master:
                master_leak = f"{principal_leak(opt.state[p]['master_param'].double() - start.double(), U, None)[0]:.1e}"
            changed = (delta != 0).double().mean().item()
            rows.append(f"| {lr:g} | {str(dtype).removeprefix('torch.')} | {'yes' if master else 'no'} | {stored:.1e} | "
                        f"{master_leak} | {changed:.0%} |")
    return rows


# --- main -------------------------------------------------------------------------------------------------------




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ks", default="16,64,256")
    parser.add_argument("--scale", type=int, default=None, help="divide the block's dimensions (default: 1 on cuda, 8 on cpu)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--precisions", default="tf32x3,ieee", help="tl.dot input precisions to time on the GPU")
    parser.add_argument("--roofline", action="store_true", help="print the roofline model of the full block and exit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared CPU, OpenMP spin-waits make 2 threads far slower)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 1 repetition: checks that every path runs")
    parser.add_argument("--out", default=None, help="markdown report (default benchmarks/results/kernels_<device>.md)")
    args = parser.parse_args(argv)

    if args.roofline:
        text = "\n".join(ROOFLINE_HEADER + roofline_lines(block_shapes(1), [int(k) for k in args.ks.split(",")])
                         + [""] + LAUNCHES)
        print(text)
        if args.out:
            write_text_atomic(Path(args.out), text + "\n")
        return 0
    device = args.device
    if device == "cpu":
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    precisions = args.precisions.split(",")
    scale = args.scale or (1 if device == "cuda" else 8)
    reps = args.reps or (20 if device == "cuda" else 3)
    if args.smoke:
        scale, reps, ks = 128, 1, [k for k in ks if k < 32] or [16]
    shapes = block_shapes(scale)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    triton_ok = device == "cuda" or (interpreted and args.smoke)
    name = describe_device(device)
    print(f"device: {name}; shapes: {[(m, n) for _, m, n in shapes]}; k: {ks}", flush=True)

    out = [f"# Kernel benchmark on {name}", "",
           f"torch {torch.__version__}, Python {sys.version.split()[0]}"
           + (f", triton {__import__('triton').__version__}" if triton_ok else "") + ".",
           f"Block: {', '.join(f'{n} {m}×{c}' for n, m, c in shapes)} (Llama-7B block / {scale}), fp32 params, "
           f"median of {reps} runs" + (f", {torch.get_num_threads()} torch thread(s)." if device == "cpu" else "."), ""]
    if not triton_ok:
        out += ["No GPU here: the Triton kernels were not timed; rows are the torch reference path. Kernel correctness "
                "on CPU is covered by tests/test_kernels.py under TRITON_INTERPRET=1.", ""]
    else:
        out += ["## Correctness (Triton vs torch reference)", ""]
        out += check_correctness(shapes[:1] + shapes[4:5], ks, device, precisions if device == "cuda" else ["ieee"])
        out += [""]
    out += ["## Roofline model (full Llama-7B block, fp32, datasheet bandwidth and rates)", ""]
    out += roofline_lines(block_shapes(1), ks) + [""]
    out += ["## Timings", ""]
    lines, summary = run_timings(shapes, ks, device, reps, precisions if device == "cuda" else ["ieee"], triton_ok)
    out += lines + [""]
    if device == "cuda" and 64 in ks:
        ratio = summary["step_ratio_k64_wd0.01_triton"]
        best = max(v for key, v in summary.items() if key.startswith("projection_fraction_k64"))
        out += ["## Targets (H100/H200)", "",
                f"- projected step ≤ {TARGET_STEP_RATIO}× fused AdamW at k=64 (wd=0.01): {ratio:.2f}× — "
                f"{'met' if ratio <= TARGET_STEP_RATIO else 'NOT met'}",
                f"- projection ≥ {TARGET_PROJECTION_FRACTION:.0%} of copy bandwidth at k=64 (best precision): {best:.0%} — "
                f"{'met' if best >= TARGET_PROJECTION_FRACTION else 'NOT met'}", ""]
    if device == "cpu" and not args.smoke:
        out += ["## Storage rounding leak (optimizer numerics, torch path)", "",
                "One 576×1536 weight (SmolLM2 MLP shape), weights ~N(0, 0.02²), k=32, 200 AdamW steps on random "
                "gradients, wd=0. Leak = ‖UᵀΔW‖_F/‖ΔW‖_F (left side; an unconstrained random update leaks "
                f"≈ √(k/m) = {(32 / 576) ** 0.5:.2f}).", ""]
        out += storage_leak() + [""]
    report = "\n".join(out)
    print(report)
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"kernels_{'smoke' if args.smoke else device}.md"
    if not args.smoke or args.out:
        write_text_atomic(path, report + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
