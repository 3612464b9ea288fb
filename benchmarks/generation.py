"""Greedy generation with an adapter attached: OffPrincipal vs PEFT LoRA on SmolLM2-135M-Instruct (CPU).

GRPO spends most of a step generating; an adapter's no-grad forward must cost what LoRA's does. Arms are
interleaved (A B A B …) in one process; each generates 8 × 48 new tokens greedily. Reports medians and the ratio.

    .venv/bin/python benchmarks/generation.py --out benchmarks/results/generation_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from peft import LoraConfig, get_peft_model

    from offprincipal import OffPrincipalConfig
    from offprincipal.experiment.models import load_model
    from offprincipal.files import write_text_atomic

    configs = {
        "lora": lambda: LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"),
        "offprincipal": lambda: OffPrincipalConfig(r=16, alpha=16, top_k=32, target_modules="all-linear"),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            model, tokenizer = load_model()
            model = get_peft_model(model, config()).eval()
            ids = tokenizer(["What is 12 + 30?"] * 8, return_tensors="pt")
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
            times[name].append(time.perf_counter() - t)
    lora = statistics.median(times["lora"])
    lines = [
        "# Greedy generation with an adapter (SmolLM2-135M-Instruct, fp32, r=16, all-linear)",
        "",
        f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f} at the end. 8 prompts × {args.tokens} new tokens, greedy; median of {args.rounds} "
        "interleaved rounds.",
        "",
        "| adapter | seconds | / LoRA |",
        "|---|---:|---:|",
    ]
    for name, values in times.items():
        t = statistics.median(values)
        lines.append(f"| {name} | {t:.2f} | {t / lora:.3f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
