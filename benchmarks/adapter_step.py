"""Adapter training step (forward + backward + AdamW) on SmolLM2-135M-Instruct: OffPrincipal vs PEFT LoRA and OSF.

Every arm runs in its own fresh subprocess (so peak memory is its own), and the arms are interleaved over
``--rounds`` rounds (A B C A B C …) so that a change of machine load hits them alike; the table reports
medians and ratios to LoRA side by side. Memory is the peak resident set size of the worker during the
training steps (``VmHWM``, reset after the adapter is attached) minus its RSS before the first step: the
step's own memory (activations, gradients, optimizer state). Also times the principal-subspace precompute for the whole model (cache off).

    .venv/bin/python benchmarks/adapter_step.py --out benchmarks/results/adapter_step_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("lora", "offprincipal", "osf")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since start or the last reset) in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peft_config(arm: str, rank: int, top_k: int):
    from peft import LoraConfig, OSFConfig

    from offprincipal import OffPrincipalConfig

    if arm == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear")
    if arm == "offprincipal":
        return OffPrincipalConfig(r=rank, alpha=rank, top_k=top_k, target_modules="all-linear")
    if arm == "osf":  # OSF trains min(m, n) − effective_rank directions per weight; PEFT's default keeps 50%
        return OSFConfig(target_modules="all-linear")
    raise ValueError(arm)


def worker(args) -> dict:
    import torch
    from peft import get_peft_model

    from offprincipal.experiment.models import load_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    model, _ = load_model(dtype=dtype)
    t0 = time.perf_counter()
    model = get_peft_model(model, peft_config(args.arm, args.rank, args.top_k))
    setup_s = time.perf_counter() - t0
    reset_peak_rss()  # the step's memory only (not the one-off SVDs of get_peft_model)
    rss_ready = status_mb("VmRSS")
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": times, "step_mem_mb": status_mb("VmHWM") - rss_ready, "setup_s": setup_s, "trainable": trainable}


def precompute_worker(args) -> dict:
    import torch

    from offprincipal.experiment.models import load_model
    from offprincipal.subspace import compute_subspaces, weight_matrix

    model, _ = load_model()
    weights = {
        n: weight_matrix(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }
    out = {"n_weights": len(weights)}
    for method in ("exact", "randomized"):
        t = time.perf_counter()
        compute_subspaces(weights, args.top_k, method=method, cache_dir=False, progress=False)
        out[f"{method}_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as cache:
        compute_subspaces(weights, args.top_k, cache_dir=cache, progress=False)
        t = time.perf_counter()
        compute_subspaces(weights, args.top_k, cache_dir=cache, progress=False)
        out["cache_hit_s"] = time.perf_counter() - t
    return out


def run_worker(argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    import torch

    from offprincipal.experiment.hardware import cpu_name

    return f"{os.cpu_count()}-core CPU ({cpu_name()}), torch {torch.__version__}, {threads} torch thread(s) per worker, load average at the end {os.getloadavg()[0]:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=[*ARMS, "precompute"], help=argparse.SUPPRESS)
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: robust on a shared CPU)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here (atomically)")
    args = p.parse_args()

    if args.worker == "precompute":
        print(json.dumps(precompute_worker(args)))
        return
    if args.worker:
        args.arm = args.worker
        print(json.dumps(worker(args)))
        return

    common = ["--rank", str(args.rank), "--top-k", str(args.top_k), "--batch", str(args.batch), "--seq", str(args.seq),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    run_worker(["--worker", "offprincipal", "--steps", "0", "--warmup", "0"])  # fill the model + subspace caches
    results: dict = {}
    for rnd in range(args.rounds):
        for dtype in args.dtypes:
            for arm in ARMS:
                r = run_worker(["--worker", arm, "--dtype", dtype, *common])
                slot = results.setdefault((dtype, arm), {"step_s": [], "mem": [], "trainable": r["trainable"]})
                slot["step_s"] += r["step_s"]
                slot["mem"].append(r["step_mem_mb"])
                print(f"round {rnd} {dtype} {arm}: {statistics.median(r['step_s']):.3f} s/step, "
                      f"{r['step_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
    pre = run_worker(["--worker", "precompute", "--top-k", str(args.top_k)])

    lines = [
        "# Adapter training step: OffPrincipal vs LoRA vs OSF (SmolLM2-135M-Instruct, all-linear)",
        "",
        f"Machine: {machine(args.threads)}. Command: `{' '.join(['benchmarks/adapter_step.py', *sys.argv[1:]])}`.",
        f"Batch {args.batch}×{args.seq} tokens, rank {args.rank} (OffPrincipal top_k {args.top_k}; OSF with PEFT's "
        f"default effective_rank = 50% of min(m, n)), AdamW; median over {args.rounds} interleaved rounds × "
        f"{args.steps} steps (after {args.warmup} warm-up). Memory = peak RSS during the steps − RSS before them.",
        "",
        "| dtype | method | trainable params | step (s) | step / LoRA | step memory (MB) | memory / LoRA |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in args.dtypes:
        base = results[(dtype, "lora")]
        t_lora, m_lora = statistics.median(base["step_s"]), statistics.median(base["mem"])
        for arm in ARMS:
            r = results[(dtype, arm)]
            t, m = statistics.median(r["step_s"]), statistics.median(r["mem"])
            lines.append(f"| {dtype} | {arm} | {r['trainable']:,} | {t:.3f} | {t / t_lora:.3f}× | {m:.0f} | {m / m_lora:.3f}× |")
    lines += [
        "",
        f"Principal subspaces of all {pre['n_weights']} linear weights (k = {args.top_k}, fp32, cache off): "
        f"exact {pre['exact_s']:.1f} s, randomized {pre['randomized_s']:.1f} s; from the cache: {pre['cache_hit_s']:.2f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from offprincipal.files import write_text_atomic

        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
