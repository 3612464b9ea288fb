"""What a run is judged by: greedy held-out accuracy with intervals, and retention (what it forgot).

The accuracy figures come with 95% intervals (:mod:`offprincipal.experiment.stats`): a Wilson interval for an accuracy, and
the paired interval of the gain when the same prompts were evaluated before and after training. Retention
(definitions in :mod:`offprincipal.experiment.retention`): the NLL drift of the base model's own greedy answers to general
prompts and the KL divergence from the base to the tuned model on those answer positions (over the base's top-m
tokens and the rest as one bucket: a lower bound on the exact KL), and the accuracy on a second verifiable task the
run does not train on.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Optional

from .errors import UsageError
from .spec import EvalSpec, TrainSpec

RETENTION_N = 100  # held-out prompts of the retention task


def autocast(spec: EvalSpec):
    """bf16 autocast for evaluation when training runs in bf16 (what the Trainer does for training steps)."""
    import torch

    return torch.autocast(spec.device, dtype=torch.bfloat16) if spec.bf16 else nullcontext()


def held_out_outcomes(model, tokenizer, task, spec: EvalSpec, n: Optional[int] = None):
    """The greedy completions of the first ``n`` (default ``spec.eval_n``) held-out prompts, with the training
    completion budget, and their lenient and strict scores (:class:`~offprincipal.experiment.tasks.HeldOut`; None when
    n is 0)."""
    from .tasks import held_out_outcomes as outcomes

    n = spec.eval_n if n is None else n
    if not n:
        return None
    with autocast(spec):
        return outcomes(model, tokenizer, task, n=n, max_new_tokens=spec.max_completion_length)


def held_out_correct(model, tokenizer, task, spec: EvalSpec, n: Optional[int] = None) -> Optional[list[bool]]:
    """Per-prompt greedy (lenient) correctness of :func:`held_out_outcomes` (None when n is 0)."""
    result = held_out_outcomes(model, tokenizer, task, spec, n)
    return None if result is None else list(result.correct)


def held_out_accuracy(model, tokenizer, task, spec: EvalSpec) -> Optional[float]:
    """Greedy accuracy on the first ``spec.eval_n`` held-out prompts (None if 0)."""
    correct = held_out_correct(model, tokenizer, task, spec)
    return None if correct is None else sum(correct) / len(correct)


def accuracy_record(before: Optional[list[bool]], after: Optional[list[bool]]) -> dict:
    """before/after accuracy, the after figure's Wilson interval, and the paired gain with its interval."""
    from .stats import paired_gain, wilson_interval

    record = {"before": None if before is None else sum(before) / len(before),
              "after": None if after is None else sum(after) / len(after)}
    if after is not None:
        record.update(wilson_interval(sum(after), len(after)).as_record("after"))
    if before is not None and after is not None:
        record.update(paired_gain(before, after).as_record("gain"))
    return record


def outcome_record(before, after) -> dict:
    """:func:`accuracy_record` of two :class:`~offprincipal.experiment.tasks.HeldOut` evaluations of the same prompts
    (either may be None), plus the per-prompt outcomes as 0/1 lists in prompt order (``before_correct``,
    ``after_correct``, and the strict ones ``before_strict_correct``, ``after_strict_correct``), the strict accuracies
    (``strict_before``, ``strict_after``) and the fraction of prompts where the lenient and strict scores of the final
    evaluation disagree (``after_lenient_strict_disagree``)."""
    record = accuracy_record(None if before is None else list(before.correct), None if after is None else list(after.correct))
    for when, result in (("before", before), ("after", after)):
        record[f"strict_{when}"] = None if result is None else sum(result.strict) / len(result.strict)
        record[f"{when}_correct"] = None if result is None else [int(x) for x in result.correct]
        record[f"{when}_strict_correct"] = None if result is None else [int(x) for x in result.strict]
    record["after_lenient_strict_disagree"] = None if after is None else (
        sum(a != b for a, b in zip(after.correct, after.strict)) / len(after.correct))
    return record


def pct(value: Optional[float], missing: str = "skipped (--eval-n 0)") -> str:
    """A percentage, or ``missing`` (why there is no value) for None."""
    return missing if value is None else f"{100 * value:.1f}%"


def interval_text(accuracy: dict, key: str = "after") -> str:
    return (f"{100 * accuracy[key]:.1f}% (95% CI {100 * accuracy[f'{key}_ci95_low']:.1f}–"
            f"{100 * accuracy[f'{key}_ci95_high']:.1f}%)")


class Retention:
    """What a run forgets (issue-level definitions in :mod:`offprincipal.experiment.retention`): the NLL drift of the base
    model's own greedy answers to general prompts and the per-token KL(base ‖ tuned) on those answer positions
    (KL_m over the base's top-m tokens plus one bucket for the rest, m = TOP_M; ≥ 0, 0 iff unchanged there, a lower
    bound on the exact KL), and greedy accuracy on a second task it does not train on. ``measure_base`` runs on the
    untouched model before training (one forward over the answers gives NLL(base) and the base's top-m statistics,
    kept in memory), ``measure_tuned`` after (one forward gives NLL(tuned) and the KL)."""

    def __init__(self, spec: TrainSpec, tokenizer):
        from .retention import RETENTION_TASK
        from .tasks import get_task

        self.spec, self.tokenizer = spec, tokenizer
        self.task_name = RETENTION_TASK if spec.task != RETENTION_TASK else None
        self.task = get_task(self.task_name) if self.task_name else None
        self.answers = self.base = self.before = None

    def measure_base(self, model) -> None:
        from .retention import base_answers, base_statistics

        print("retention: the base model's answers to the general prompts (cached), their NLL and the base's top-m "
              "next-token probabilities ...", file=sys.stderr)
        with autocast(self.spec):
            self.answers = base_answers(model, self.tokenizer)
            self.base = base_statistics(model, self.tokenizer, self.answers)
        if self.task is not None and self.spec.eval_before:
            self.before = held_out_correct(model, self.tokenizer, self.task, self.spec, self.spec.retention_n)

    def measure_tuned(self, model) -> dict:
        from .retention import nll_drift

        with autocast(self.spec):
            drift = nll_drift(model, self.answers, self.tokenizer, base_stats=self.base)
        record = {"nll_drift_nats_per_token": drift.drift_nll, "kl_to_base_nats_per_token": drift.kl_to_base,
                  "kl_top_m": drift.top_m, "tuned_nll_nats_per_token": drift.tuned_nll,
                  "base_nll_nats_per_token": drift.base_nll, "prompts": drift.n_prompts,
                  "answer_tokens": drift.n_tokens, "task": self.task_name}
        if self.task is not None:
            after = held_out_correct(model, self.tokenizer, self.task, self.spec, self.spec.retention_n)
            record["task_accuracy"] = accuracy_record(self.before, after)
        print(f"retention: NLL drift {drift.drift_nll:+.4f} nats/token, KL to base {drift.kl_to_base:.4f} nats/token"
              + (f"; {self.task_name} accuracy {pct(record['task_accuracy']['before'], 'not measured (--no-eval-before)')} → "
                 f"{pct(record['task_accuracy']['after'])}" if self.task is not None else ""), file=sys.stderr)
        return record


def resolve_task(name: str):
    """The task ``--task`` names (a built-in one or a JSONL file); bad names and bad files become UsageErrors."""
    from .tasks import get_task

    try:
        return get_task(name)
    except KeyError as exc:
        raise UsageError(f"--task {name}: {exc.args[0]}") from exc
    except (OSError, ValueError) as exc:  # JsonlTaskError is a ValueError naming the file and every bad line
        raise UsageError(f"--task {name}: {' '.join(str(exc).split()) if isinstance(exc, OSError) else exc}") from exc
