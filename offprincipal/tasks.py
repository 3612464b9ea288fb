"""Verifiable-reward tasks for RLVR, in TRL GRPO's conversational format.

A task yields dataset rows ``{"prompt": [{"role": "user", "content": question}], "answer": "123"}`` for a
``"train"`` and a disjoint held-out ``"test"`` split, deterministic given its seed, and reward functions with
TRL's signature ``reward(completions, answer, **kwargs) -> list[float]`` (``completions`` are strings or lists of
message dicts; TRL passes the dataset's ``answer`` column as a keyword).

Arithmetic (``get_task("arithmetic")``): ``a op b`` with op cycling through ``+``, ``-``, ``*``; by default
2-digit + 2-digit, 2-digit − 2-digit (a ≥ b, so answers are ≥ 0) and 2-digit × 1-digit, phrased
"Compute a op b. Give only the final answer." The answer parser takes the final number of the completion
(``-``, thousands separators and decimals understood); a completion without one scores 0. An optional format
reward pays 1 when the completion is just that number.

Calibration (default task, greedy, ``max_new_tokens=48``, fp32, batches of 25, SmolLM2-135M-Instruct loaded by
``offprincipal.models.load_model()``), measured on a shared 2-core CPU: held-out accuracy **19.5 %** (39 of the
200 test prompts; + 20.9 %, − 10.4 %, × 27.3 %), format reward 0 %, 323 s for the 200 prompts. The model
mostly answers verbosely ("To compute 59 + 63, we add the numbers 59 and 63, which results in 122.") and is
often wrong; easier-looking variants (1-digit + 2-digit) scored no better in probes, so difficulty depends on
the phrasing as much as on digit counts. Re-measure after changing the template or the digits.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

SPLITS = ("train", "test")
OPERATIONS: Mapping[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}

# A number: optional minus sign (ASCII or U+2212) unless it follows a word character or a closing bracket
# (so "10-3" yields 3, "5-7=-2" yields -2), digits with optional thousands separators, optional decimals.
# ASCII digits only (re.ASCII), so every match converts with Fraction.
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", re.ASCII)
_ONLY_NUMBER = re.compile(r"\s*" + _NUMBER.pattern + r"\.?\s*", re.ASCII)


# --- parsing and rewards -----------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, a message dict, or a list of message dicts (contents joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content", "")
        return content if isinstance(content, str) else ""
    if isinstance(completion, Sequence):
        return "".join(completion_text(message) for message in completion)
    raise TypeError(f"a completion must be a string or chat messages, got {type(completion).__name__}")


def parse_final_number(text: str) -> Optional[Fraction]:
    """The last number in ``text`` as an exact Fraction ("1,234" → 1234, "−5" → −5, "12.50" → 25/2), or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return Fraction(matches[-1].replace(",", "").replace("\u2212", "-"))


def correctness_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs) -> list[float]:
    """1.0 where the final number of the completion equals the answer, else 0.0 (TRL reward signature)."""
    if len(completions) != len(answer):
        raise ValueError(f"correctness_reward got {len(completions)} completions but {len(answer)} answers")
    return [
        1.0 if parse_final_number(completion_text(c)) == Fraction(str(a)) else 0.0 for c, a in zip(completions, answer)
    ]


def format_reward(completions: Sequence[Any], **kwargs) -> list[float]:
    """1.0 where the completion is only a number (optionally with a final period), else 0.0."""
    return [1.0 if _ONLY_NUMBER.fullmatch(completion_text(c)) else 0.0 for c in completions]


# --- the arithmetic task -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return OPERATIONS[self.op](self.a, self.b)


def _random_operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


@dataclass(frozen=True)
class ArithmeticTask:
    """Integer arithmetic with exact answers; see the module docstring for the defaults and calibration.

    ``operand_digits`` maps each op to the digit counts of its two operands; ``n_test`` problems are drawn first
    (so the held-out split does not depend on ``n_train``), then ``n_train`` further distinct ones.
    ``format_weight`` > 0 adds :func:`format_reward` with that weight.
    """

    ops: tuple[str, ...] = ("+", "-", "*")
    operand_digits: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: {"+": (2, 2), "-": (2, 2), "*": (2, 1)}
    )
    n_train: int = 2000
    n_test: int = 200
    seed: int = 0
    template: str = "Compute {a} {op} {b}. Give only the final answer."
    format_weight: float = 0.0
    name: str = "arithmetic"

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in OPERATIONS]
        if unknown or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {tuple(OPERATIONS)}, got {self.ops!r}")
        missing = [op for op in self.ops if op not in self.operand_digits]
        if missing:
            raise ValueError(f"operand_digits has no entry for op(s) {missing}; give (digits_a, digits_b) for each")
        if min(self.n_train, self.n_test) < 0 or self.format_weight < 0:
            raise ValueError("n_train, n_test and format_weight must be ≥ 0")

    def _draw(self, rng: random.Random, op: str) -> Problem:
        da, db = self.operand_digits[op]
        a, b = _random_operand(rng, da), _random_operand(rng, db)
        if op == "-" and a < b:
            a, b = b, a
        return Problem(a, op, b)

    def problems(self, split: str) -> list[Problem]:
        """The problems of ``split`` ("train" or "test"); ops cycle in order, all problems are distinct."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(self.seed)
        seen: set[Problem] = set()
        drawn: list[Problem] = []
        total = self.n_test + self.n_train
        attempts = 0
        while len(drawn) < total:
            attempts += 1
            if attempts > 50 * total + 1000:
                raise ValueError(
                    f"cannot draw {total} distinct problems with operand_digits={dict(self.operand_digits)}; "
                    "lower n_train/n_test or use more digits"
                )
            problem = self._draw(rng, self.ops[len(drawn) % len(self.ops)])
            if problem not in seen:
                seen.add(problem)
                drawn.append(problem)
        return drawn[: self.n_test] if split == "test" else drawn[self.n_test :]

    def question(self, problem: Problem) -> str:
        return self.template.format(a=problem.a, op=problem.op, b=problem.b)

    def rows(self, split: str) -> list[dict]:
        """Conversational rows ``{"prompt": [{"role": "user", "content": q}], "answer": "<int>"}``."""
        return [
            {"prompt": [{"role": "user", "content": self.question(p)}], "answer": str(p.answer)}
            for p in self.problems(split)
        ]

    def dataset(self, split: str):
        """:meth:`rows` as a ``datasets.Dataset`` (what TRL's GRPOTrainer takes)."""
        try:
            from datasets import Dataset
        except ImportError as exc:
            raise ImportError("ArithmeticTask.dataset needs `pip install datasets`; rows() works without it") from exc
        return Dataset.from_list(self.rows(split))

    @property
    def reward_funcs(self) -> list[Callable[..., list[float]]]:
        """Reward functions for ``GRPOTrainer(reward_funcs=...)``."""
        return [correctness_reward] + ([format_reward] if self.format_weight else [])

    @property
    def reward_weights(self) -> list[float]:
        """Matching weights for ``GRPOConfig(reward_weights=...)``."""
        return [1.0] + ([self.format_weight] if self.format_weight else [])


TASKS: dict[str, Callable[..., Any]] = {"arithmetic": ArithmeticTask}


def get_task(name: str, **kwargs):
    """Build the task registered as ``name`` with keyword overrides (e.g. ``get_task("arithmetic", seed=1)``)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


# --- greedy evaluation -------------------------------------------------------------------------------------------


def generate_completions(
    model, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], batch_size: int = 16, max_new_tokens: int = 48
) -> list[str]:
    """Greedy completions (special tokens stripped) of chat ``prompts``, batched with left padding.

    The tokenizer's padding side and the model's train/eval mode are restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {key: value.to(model.device) for key, value in enc.items()}
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def evaluate_accuracy(
    model, tokenizer, task, n: Optional[int] = None, batch_size: int = 16, max_new_tokens: int = 48, split: str = "test"
) -> float:
    """Greedy accuracy (:func:`correctness_reward` mean) on the first ``n`` (default all) rows of ``split``."""
    rows = task.rows(split)[:n]
    if not rows:
        raise ValueError(f"evaluate_accuracy: no rows to evaluate (split={split!r}, n={n})")
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens)
    return sum(correctness_reward(completions, [r["answer"] for r in rows])) / len(rows)
