"""The ``offprincipal`` command line.

    offprincipal train      GRPO (TRL) on a verifiable-reward task, by default on the embedded SmolLM2-135M-Instruct,
                            with the OffPrincipal adapter or one of the baselines; evaluates held-out accuracy
                            before and after and writes a run folder (weights, metrics.jsonl, report.md + PNGs)
    offprincipal analyze    the paper's parameter-level report (NSS, principal angles, bf16 sparsity, mask
                            overlaps) between a base checkpoint and a tuned one (model folder, adapter or run folder)
    offprincipal evaluate   greedy held-out accuracy of a model, adapter or run folder (what train reports before/after)
    offprincipal demo       attach an OffPrincipal adapter to the embedded model, take a few AdamW steps and print
                            loss, step time and the principal leak of every update

User errors (bad option values, missing paths, an unwritable or existing output folder, a GPU that is not there)
end with one line ``offprincipal <command>: error: ...`` and exit status 2. Output folders are built under a
temporary name next to the target and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from .experiment import runner
from .experiment.checkpoints import EMBEDDED
from .experiment.errors import UsageError
from .experiment.evaluation import RETENTION_N
from .experiment.methods import METHODS
from .options import DEFAULT_TOP_K

CLIError = UsageError  # the command line's name for it
MAIN_JOB_RETENTION_N = 50  # `make train` must fit 15 minutes on a 2-core AVX2 CPU


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a :class:`CLIError` (one line) instead of usage + exit."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", self.prog)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# --------------------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------------------
# the parser


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="GRPO on a verifiable-reward task (default: OffPrincipal adapter on the embedded model)",
        description="GRPO (TRL) with an OffPrincipal adapter or a baseline; held-out accuracy before/after; a run "
                    "folder with the weights, metrics.jsonl and report.md (+ PNG plots).",
    )
    p.add_argument("--method", choices=[*METHODS, *(a for m in METHODS.values() for a in m.aliases)],
                   default="offprincipal", metavar="METHOD",
                   help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()).replace("%", "%%")
                        + " (default: offprincipal)")
    from .experiment.tasks import TASKS

    p.add_argument("--task", default="arithmetic", metavar="TASK",
                   help=f"verifiable-reward task: {', '.join(sorted(TASKS))}, or a JSONL file of your own with one "
                        '{"prompt": ..., "answer": ...} per line (see the README) (default: arithmetic)')
    p.add_argument("--model", default=None,
                   help=f"model folder, .gguf file or hub id (default: '{EMBEDDED}', SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=_positive_int, default=32,
                   help="optimizer steps (default: 32)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: " + ", ".join(f"{m.name} {m.default_lr:g}" for m in METHODS.values())
                        + ")")
    p.add_argument("--rank", type=_positive_int, default=16, help="adapter rank r, alpha = r (default: 16)")
    p.add_argument("--top-k", type=_positive_int, default=DEFAULT_TOP_K,
                   help="protected principal subspace per weight, also the k of the report's angles "
                        f"(default: {DEFAULT_TOP_K})")
    p.add_argument("--metrics-k", type=_positive_int, default=None,
                   help="k of the report's principal angles, drift and masks (default: --top-k; a benchmark fixes it "
                        "so that runs with different --top-k compare)")
    p.add_argument("--num-generations", type=_positive_int, default=8, help="completions per prompt (default: 8)")
    p.add_argument("--prompts-per-step", type=_positive_int, default=1,
                   help="prompts per optimizer step (default: 1); sft trains on num-generations × prompts-per-step "
                        "examples per step, the same number of sequences as GRPO")
    p.add_argument("--max-completion-length", type=_positive_int, default=48,
                   help="completion budget in tokens, for training and evaluation (default: 48)")
    p.add_argument("--temperature", type=_positive_float, default=0.7,
                   help="sampling temperature of the GRPO completions (default: 0.7; at 1.0 the embedded model's "
                        "samples are rarely right, so rewards rarely vary within a group)")
    p.add_argument("--eval-n", type=_non_negative_int, default=200,
                   help="held-out prompts for the greedy accuracy before/after, with 95%% intervals (0: skip; "
                        "default: 200, the RLVR benchmark's set)")
    p.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate held-out accuracy before training (default: on; a benchmark measures the base "
                        "model once and passes --no-eval-before)")
    p.add_argument("--retention", action=argparse.BooleanOptionalAction, default=True,
                   help="measure forgetting: the NLL drift of the base model's own answers to 72 general prompts and "
                        "the KL divergence from the base to the tuned model on them, and greedy accuracy on the "
                        "capitals task before/after (default: on)")
    p.add_argument("--retention-n", type=_positive_int, default=MAIN_JOB_RETENTION_N,
                   help=f"held-out prompts of the second (retention) task (default: {MAIN_JOB_RETENTION_N}; the "
                        f"benchmark uses {RETENTION_N})")
    p.add_argument("--eval-every", type=_non_negative_int, default=0,
                   help="also evaluate held-out accuracy every N steps (default: 0, only before and after)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training and evaluation; weights stay fp32 (default: where the hardware "
                        "multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512_BF16/AMX that a quick "
                        "matmul benchmark confirms; else fp32)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="(default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="run folder to create (default: runs/<method>-<task>-<time>)")
    p.set_defaults(func=runner.train)


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze", help="the paper's parameter-level report between two checkpoints",
        description="NSS, principal angles, bf16 update sparsity and mask overlaps of every linear weight, "
                    "BASE vs TUNED, as report.md + PNG plots + layers.jsonl + summary.json.",
    )
    p.add_argument("base", metavar="BASE", help=f"base model folder, .gguf file or hub id ('{EMBEDDED}': SmolLM2-135M)")
    p.add_argument("tuned", metavar="TUNED",
                   help="tuned model folder, adapter folder (merged onto BASE) or run folder of `offprincipal train`")
    p.add_argument("--top-k", type=_positive_int, default=64, help="k of the principal subspaces (default: 64)")
    p.add_argument("--alpha", type=_fraction, default=0.5,
                   help="density of the principal-weight and low-magnitude masks, in (0, 1) (default: 0.5)")
    p.add_argument("--output", default=None, help="report folder to create (default: runs/analyze-<time>)")
    p.set_defaults(func=runner.analyze)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="greedy held-out accuracy of a model, adapter or run folder on a task",
        description="Greedy held-out accuracy on the first --eval-n test prompts of a task (what `train` reports "
                    "before and after training).",
    )
    from .experiment.tasks import TASKS

    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help=f"model folder, adapter folder (merged onto --base), run folder of `train`, or '{EMBEDDED}' "
                        "(default)")
    p.add_argument("--base", default=None,
                   help=f"base model of an adapter (default: the base a run folder records, else '{EMBEDDED}'); "
                        "checked against the base the run was trained on")
    p.add_argument("--task", default="arithmetic", metavar="TASK",
                   help=f"verifiable-reward task: {', '.join(sorted(TASKS))}, or a JSONL file of your own with one "
                        '{"prompt": ..., "answer": ...} per line (see the README) (default: arithmetic)')
    p.add_argument("--eval-n", type=_positive_int, default=200, help="held-out prompts (default: 200)")
    p.add_argument("--max-completion-length", type=_positive_int, default=48, help="token budget (default: 48)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the hardware has native bf16, as for train)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="(default: auto)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(func=runner.evaluate)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="attach the adapter to the embedded model and take a few steps")
    demo.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2-135M)")
    demo.add_argument("--steps", type=_positive_int, default=5)
    demo.add_argument("--batch", type=_positive_int, default=8)
    demo.add_argument("--rank", type=_positive_int, default=16)
    demo.add_argument("--top-k", type=_positive_int, default=DEFAULT_TOP_K)
    demo.add_argument("--lr", type=_positive_float, default=1e-3)
    demo.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=runner.demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offprincipal", description="Off-principal RLVR fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_analyze(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks (temporary run folders) clean up."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (only from the main thread, where handlers live)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 success, 2 user error, 130 Ctrl-C, 143 SIGTERM). An interruption
    prints one line; the command's temporary output folder is removed before it returns."""
    args = None
    prog = "offprincipal"
    try:
        with _sigterm_raises():
            args = build_parser().parse_args(argv)
            prog = f"offprincipal {args.command}"
            args.func(args)
    except CLIError as exc:
        prog = exc.args[1] if len(exc.args) > 1 else prog
        print(f"{prog}: error: {exc.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
