"""The ``offprincipal`` command line.

    offprincipal demo     load the embedded SmolLM2-135M-Instruct, attach an OffPrincipal adapter, take a few
                          AdamW steps, and print loss, step time and the principal leak of every update
"""

from __future__ import annotations

import argparse
import sys
import time


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _demo_batch(tokenizer, n: int):
    """n chat examples "What is a + b?" → "a + b = c." (supervised; the GRPO job is `offprincipal train`)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(10, 99, (2,), generator=gen))
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def cmd_demo(args) -> None:
    import torch
    from peft import get_peft_model

    from .models import load_model
    from .tuner import OffPrincipalConfig, max_principal_leak

    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_model(args.model, dtype=dtype)
    t = time.perf_counter()
    config = OffPrincipalConfig(r=args.rank, alpha=args.rank, top_k=args.top_k, target_modules="all-linear")
    model = get_peft_model(model, config)
    print(f"adapter attached in {time.perf_counter() - t:.1f} s (principal bases of every linear weight, cached)")
    model.print_trainable_parameters()
    batch = _demo_batch(tokenizer, args.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    model.train()
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        leak = max_principal_leak(model)
        print(f"step {step}/{args.steps}  loss {loss.item():.4f}  step time {elapsed:.2f} s  principal leak {leak:.1e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offprincipal", description="Off-principal RLVR fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="attach the adapter to the embedded model and take a few steps")
    demo.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2-135M)")
    demo.add_argument("--steps", type=int, default=5)
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--rank", type=int, default=16)
    demo.add_argument("--top-k", type=int, default=32)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"offprincipal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
