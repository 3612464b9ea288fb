"""Cost of the live diagnostics relative to a training step, on SmolLM2-135M-Instruct (CPU).

For both forms it times one diagnostics call and one training step (forward + backward + optimizer step on a
batch of 8×96 tokens, about one GRPO policy update of the CLI's defaults) and reports the overhead
per step at ``log_every`` = 1 and 10:  overhead = t_diag / (log_every · t_step).

    .venv/bin/python benchmarks/diagnostics_overhead.py --out benchmarks/results/diagnostics_overhead_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


import torch


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from peft import get_peft_model

    from offprincipal import OffPrincipalAdamW, OffPrincipalConfig
    from offprincipal.experiment.models import load_model
    from offprincipal.diagnostics import AdapterDiagnostics, PrincipalBlocks
    from offprincipal.files import write_text_atomic

    ids = torch.randint(100, 40000, (8, 96), generator=torch.Generator().manual_seed(0))

    def step_fn(model, opt):
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    rows = []
    model = get_peft_model(load_model()[0], OffPrincipalConfig(r=16, top_k=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    step = step_fn(model, opt)
    step()
    diag = AdapterDiagnostics()
    diag(model)
    rows.append(("adapter (r=16, k=32, 210 layers)", median_time(lambda: diag(model), args.repeats),
                 median_time(step, args.repeats)))

    model = load_model()[0]
    opt = OffPrincipalAdamW(model.named_parameters(), lr=1e-6, top_k=32, progress=False)
    blocks = PrincipalBlocks(opt, dict(model.named_parameters()))
    step = step_fn(model, opt)
    step()
    named = dict(model.named_parameters())
    rows.append(("full FT, OffPrincipalAdamW (k=32)", median_time(lambda: blocks.shift(named), args.repeats),
                 median_time(step, args.repeats)))

    lines = [
        "# Live diagnostics overhead (SmolLM2-135M-Instruct, fp32, CPU)",
        "",
        f"Machine: {os.cpu_count()}-core CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end. Step = forward + backward + optimizer step on 8×96 tokens; "
        f"medians of {args.repeats}.",
        "",
        "| form | diagnostics call (s) | training step (s) | overhead, log_every=1 | overhead, log_every=10 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t_diag, t_step in rows:
        lines.append(f"| {name} | {t_diag:.3f} | {t_step:.2f} | {t_diag / t_step:.1%} | {t_diag / (10 * t_step):.2%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
