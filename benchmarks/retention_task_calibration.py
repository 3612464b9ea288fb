"""Calibrate the built-in retention task (capital cities) on the embedded SmolLM2-135M-Instruct.

Retention (b) needs a verifiable task that a run does not train on and that the base model already does decently
(≥ 40 % greedy accuracy, with room to move both ways). This script measures the base model's greedy accuracy on
the task's held-out split (what ``evaluate_accuracy`` reports) and on its train split, with a Wilson 95 % interval,
the format-reward rate, the time taken and every wrong completion, and writes them as Markdown. With
``--drift-cost`` it also times retention (a) on the packaged prompts: generating the base answers (no cache) and
one :func:`~offprincipal.experiment.retention.answer_nll` pass, with the base model's NLL of its own answers.

    .venv/bin/python benchmarks/retention_task_calibration.py --out benchmarks/results/retention_task_calibration.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path


import torch


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def drift_cost(model, tokenizer) -> list[str]:
    """Markdown lines: the cost of retention (a) on the packaged prompt set with the default settings."""
    from offprincipal.experiment import retention as R

    start = time.perf_counter()
    answers = R.base_answers(model, tokenizer, cache_dir=False)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    nll = R.answer_nll(model, tokenizer, answers)
    nll_s = time.perf_counter() - start
    print(f"base answers {generate_s:.0f} s, answer NLL {nll_s:.0f} s, base NLL {nll:.3f}", file=sys.stderr)
    n = len(answers.prompts)
    return [
        "## Retention (a) cost on the packaged prompts (default settings)",
        "",
        "| prompts | answer tokens (mean) | answers hitting max_new_tokens | base answers, s | one answer_nll pass, s "
        "| base NLL of its own answers, nats/token |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {n} | {answers.n_tokens / n:.1f} | {sum(len(a) == answers.max_new_tokens for a in answers.answer_ids)} "
        f"| {generate_s:.0f} | {nll_s:.0f} | {nll:.3f} |",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="capitals")
    p.add_argument("--splits", nargs="+", default=["test", "train"])
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--drift-cost", action="store_true", help="also time retention (a) on the packaged prompts")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from offprincipal.experiment.models import load_model
    from offprincipal.files import write_text_atomic
    from offprincipal.experiment.hardware import cpu_name
    from offprincipal.experiment.tasks import correctness_reward, format_reward, generate_completions, get_task

    load_start = os.getloadavg()[0]
    model, tokenizer = load_model()
    task = get_task(args.task)
    results, wrong = [], []
    for split in args.splits:
        rows = task.rows(split)
        start = time.perf_counter()
        completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], args.batch_size,
                                           args.max_new_tokens)
        seconds = time.perf_counter() - start
        answers = [r["answer"] for r in rows]
        correct = correctness_reward(completions, answers)
        bare = format_reward(completions, answers)
        k, n = int(sum(correct)), len(rows)
        low, high = wilson(k, n)
        results.append((split, n, k, low, high, sum(bare) / n, seconds))
        wrong += [(split, r["prompt"][0]["content"], r["answer"], c) for r, c, ok in zip(rows, completions, correct)
                  if not ok]
        print(f"{split}: {k}/{n} = {k / n:.1%} (95% CI {low:.1%}–{high:.1%}) in {seconds:.0f} s", file=sys.stderr)

    lines = [
        f"# Retention task calibration: `{args.task}` on SmolLM2-135M-Instruct (greedy, fp32)",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, no GPU; load average "
        f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at the end (the machine is shared). torch "
        f"{torch.__version__}. Model: `offprincipal.experiment.models.load_model()` (the embedded GGUF, de-quantized to fp32). "
        f"Greedy, max_new_tokens={args.max_new_tokens}, batches of {args.batch_size}, left padding.",
        "",
        f"Command: `.venv/bin/python benchmarks/retention_task_calibration.py --task {args.task} "
        f"--splits {' '.join(args.splits)}{' --drift-cost' if args.drift_cost else ''}`",
        "",
        "| split | prompts | correct | accuracy | Wilson 95% interval | format reward (bare answer) | seconds |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for split, n, k, low, high, bare, seconds in results:
        lines.append(f"| {split} | {n} | {k} | {k / n:.1%} | {low:.1%} – {high:.1%} | {bare:.1%} | {seconds:.0f} |")
    if args.drift_cost:
        lines += ["", *drift_cost(model, tokenizer)]
    lines += ["", f"## Wrong completions ({len(wrong)})", "", "| split | question | answer | completion |",
              "|---|---|---|---|"]
    for split, question, answer, completion in wrong:
        cell = " ".join(completion.split()).replace("|", "\\|")
        lines.append(f"| {split} | {question} | {answer} | {cell} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
