"""Verifiable-reward tasks for RLVR, in TRL GRPO's conversational format.

A task yields dataset rows ``{"prompt": [{"role": "user", "content": question}], "answer": "123"}`` for a
``"train"`` and a disjoint held-out ``"test"`` split, deterministic given its seed, and reward functions with
TRL's signature ``reward(completions, answer, **kwargs) -> list[float]`` (``completions`` are strings or lists of
message dicts; TRL passes the dataset's ``answer`` column as a keyword).

Arithmetic (``get_task("arithmetic")``): ``a op b`` with op cycling through ``+``, ``-``, ``*``; by default
2-digit + 2-digit, 2-digit − 2-digit (a ≥ b, so answers are ≥ 0) and 2-digit × 1-digit, phrased
"Compute a op b. Give only the final answer." The answer parser takes the final number of the completion
(``-``, thousands separators and decimals understood); a completion without one scores 0. That *lenient* score counts
"122 122 122", "121 122" and an echo of the prompt whose last operand happens to be the result as right; the
*strict* score (:func:`strict_answer_matches`, reported beside it, never a reward) counts a completion only when it
states the result once, as ``c`` alone or as a final (and only) equation ``a op b = c``, with nothing after it but
punctuation. An optional format
reward pays 1 when the completion is just that number.

The default digits are calibrated so that SmolLM2-135M-Instruct, greedy, is right on a minority of the held-out
prompts (room to learn, a reward signal from the start); the calibration is in
benchmarks/results/design_figures.md. Re-measure after changing the template or the digits.

Capital cities (``get_task("capitals")``), the built-in retention task (a run trains on another task and reports
this one before and after): "What is the capital of {country}? Answer with just the city name." for the
countries of :data:`CAPITALS`, 100 of them held out. Answers are strings: a completion is right when, normalised
(casefold, accents and edge punctuation removed), it is the city or ends with it ("The capital of Peru is
Lima."). Calibration: ``benchmarks/results/retention_task_calibration.md``.

The user's own tasks (``get_task("path/to/file.jsonl")``, :func:`load_jsonl_task`): one JSON object per line with
``prompt`` (string) and ``answer`` (number or string, numbers kept exactly as written), optional ``id``. A
numeric answer is matched by the final number of the completion, a string answer as for the capitals; the format
reward is the built-in one. The held-out split is chosen by a seeded hash of each prompt (:class:`ExampleTask`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

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
_EDGE_JUNK = re.compile(r"^[\s\"'`*.,;:!?]+|[\s\"'`*.,;:!?]+$")


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


def numeric_answer(answer: Any) -> Optional[Fraction]:
    """The reference ``answer`` as a Fraction when it reads as one number (``_ONLY_NUMBER``), else None."""
    text = str(answer)
    return parse_final_number(text) if _ONLY_NUMBER.fullmatch(text) else None


def normalize_answer(text: str) -> str:
    """Casefolded ``text`` without accents (NFKD, combining marks dropped), runs of whitespace made single spaces,
    and leading/trailing whitespace, quotes, asterisks and punctuation (``.,;:!?``) removed: the form string
    answers are compared in ("  **Bogotá.** " → "bogota")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _EDGE_JUNK.sub("", " ".join(plain.split()))


def answer_matches(text: str, answer: Any) -> bool:
    """Whether completion ``text`` gives the reference ``answer``.

    Numeric answers (see :func:`numeric_answer`): the final number of ``text`` (:func:`parse_final_number`) equals
    it exactly. Other answers: after :func:`normalize_answer` on both, ``text`` equals the answer or ends with it
    right after a non-word character ("The capital of France is Paris." gives "Paris"; "Paris, France" does not).
    """
    number = numeric_answer(answer)
    if number is not None:
        return parse_final_number(text) == number
    want, got = normalize_answer(str(answer)), normalize_answer(text)
    return bool(want) and (got == want or (got.endswith(want) and not got[-len(want) - 1].isalnum()))


_STRICT_TAIL = r"[\s.,;:!?]*\Z"
_STRICT_ALONE = re.compile(r"\s*(?P<c>" + _NUMBER.pattern + ")" + _STRICT_TAIL, re.ASCII)
_STRICT_EQUATION = re.compile(
    r"(?<![\w.,])" + _NUMBER.pattern + r"\s*[-+*/x×÷\u2212]\s*" + _NUMBER.pattern + r"\s*=\s*(?P<c>"
    + _NUMBER.pattern + ")" + _STRICT_TAIL, re.ASCII)


def strict_answer_matches(text: str, answer: Any) -> bool:
    """Whether completion ``text`` states the reference ``answer`` once, in one of two forms, and nothing after it.

    Numeric answers: ``text`` is ``c`` alone, or it ends with the equation ``a op b = c`` (op one of
    ``+ - * / x × ÷ −``; the form the model uses, "7 + 5 = 12.", after any words of working) and that equation is its
    only one (no other ``=``: a result stated twice, or two different results, scores 0); after c nothing but
    whitespace and punctuation; c equals the answer exactly. So "122", "100 + 22 = 122." and "To add them: 100 + 22
    = 122." score 1; "122 122 122" (a repeated number), "121 122" (a list), "The answer is 122", "100 + 22 = 122. So
    100 + 22 = 122." and an echo of the prompt ("Compute 38 - 19. …", whose last number is the result 19) score 0.
    String answers: ``text`` normalised (:func:`normalize_answer`) equals the answer normalised ("Paris." yes, "The
    capital is Paris" no).
    """
    number = numeric_answer(answer)
    if number is None:
        return bool(normalize_answer(str(answer))) and normalize_answer(text) == normalize_answer(str(answer))
    match = _STRICT_ALONE.match(text)
    if match is None:
        match = _STRICT_EQUATION.search(text)
        if match is None or "=" in text[: match.start()]:
            return False
    return parse_final_number(match.group("c")) == number


def correctness_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs) -> list[float]:
    """1.0 where the completion gives the answer (:func:`answer_matches`), else 0.0 (TRL reward signature)."""
    if len(completions) != len(answer):
        raise ValueError(f"correctness_reward got {len(completions)} completions but {len(answer)} answers")
    return [1.0 if answer_matches(completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]


def _is_bare_answer(text: str, answer: Any) -> bool:
    if answer is None or numeric_answer(answer) is not None:
        return bool(_ONLY_NUMBER.fullmatch(text))
    words = normalize_answer(text).split()
    return "\n" not in text.strip() and 0 < len(words) <= len(normalize_answer(str(answer)).split())


def format_reward(completions: Sequence[Any], answer: Optional[Sequence[Any]] = None, **kwargs) -> list[float]:
    """1.0 where the completion is only an answer, right or wrong, else 0.0.

    For a numeric reference answer (or when ``answer`` is not given) that means only a number, optionally with a
    final period; for a string answer, one line of at most as many words as the answer (after
    :func:`normalize_answer`).
    """
    answers = [None] * len(completions) if answer is None else list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"format_reward got {len(completions)} completions but {len(answers)} answers")
    return [1.0 if _is_bare_answer(completion_text(c), a) else 0.0 for c, a in zip(completions, answers)]


# --- what every task shares --------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class _QuestionAnswerTask:
    """Rows, dataset and rewards of a task that lists (question, answer) pairs per split via ``examples``.

    Subclasses are dataclasses with a ``format_weight`` field and an ``examples(split)`` method.
    """

    format_weight: float

    def examples(self, split: str) -> list[tuple[str, str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def rows(self, split: str) -> list[dict]:
        """Conversational rows ``{"prompt": [{"role": "user", "content": q}], "answer": "<answer>"}``."""
        return [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in self.examples(split)]

    def dataset(self, split: str):
        """:meth:`rows` as a ``datasets.Dataset`` (what TRL's GRPOTrainer takes)."""
        try:
            from datasets import Dataset
        except ImportError as exc:
            raise ImportError(f"{type(self).__name__}.dataset needs `pip install datasets`; rows() works without it") from exc
        return Dataset.from_list(self.rows(split))

    @property
    def reward_funcs(self) -> list[Callable[..., list[float]]]:
        """Reward functions for ``GRPOTrainer(reward_funcs=...)``."""
        return [correctness_reward] + ([format_reward] if self.format_weight else [])

    @property
    def reward_weights(self) -> list[float]:
        """Matching weights for ``GRPOConfig(reward_weights=...)``."""
        return [1.0] + ([self.format_weight] if self.format_weight else [])


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
class ArithmeticTask(_QuestionAnswerTask):
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
        _check_split(split)
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

    def examples(self, split: str) -> list[tuple[str, str]]:
        """(question, answer) pairs of ``split``; the answer is the integer result as a string."""
        return [(self.question(p), str(p.answer)) for p in self.problems(split)]


# --- tasks given as a list of examples (built-in tables, the user's JSONL files) ---------------------------------


def _split_key(seed: int, question: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{question}".encode(), digest_size=16).digest()


@dataclass(frozen=True)
class ExampleTask(_QuestionAnswerTask):
    """A fixed list of distinct (question, answer) pairs with a deterministic train/held-out split.

    The held-out split is the ``n_test`` questions (default ``round(test_fraction · N)``) with the smallest
    BLAKE2b hash of ``(seed, question)``; the rest is the train split. Both keep the order of ``pairs``. A question's
    split depends only on its own text, the seed and where the count cuts, so adding examples moves few others.
    """

    pairs: tuple[tuple[str, str], ...]
    n_test: Optional[int] = None
    test_fraction: float = 0.2
    seed: int = 0
    format_weight: float = 0.0
    name: str = "examples"
    source: str = "the example list"

    def __post_init__(self):
        if self.format_weight < 0:
            raise ValueError(f"format_weight must be ≥ 0, got {self.format_weight}")
        if self.n_test is None and not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        questions = [q for q, _ in self.pairs]
        if len(set(questions)) != len(questions):
            raise ValueError(f"{self.source}: questions must be distinct")
        n, n_test = len(self.pairs), self.held_out_count
        if not 1 <= n_test < n:
            raise ValueError(
                f"{self.source}: {n} examples are too few for a split with {n_test} held-out and {n - n_test} train "
                "examples; each split needs at least one (add rows, or set n_test / test_fraction)"
            )

    @property
    def held_out_count(self) -> int:
        if self.n_test is not None:
            return self.n_test
        return max(1, round(self.test_fraction * len(self.pairs)))

    def examples(self, split: str) -> list[tuple[str, str]]:
        """(question, answer) pairs of ``split``, in the order given."""
        _check_split(split)
        ranked = sorted(range(len(self.pairs)), key=lambda i: _split_key(self.seed, self.pairs[i][0]))
        held_out = set(ranked[: self.held_out_count])
        return [pair for i, pair in enumerate(self.pairs) if (i in held_out) == (split == "test")]


class JsonlTaskError(ValueError):
    """A task file that cannot be used; the message names the file and every bad line."""


def _number_text(value: Union[int, Decimal]) -> str:
    """A JSON number as plain decimal text (no exponent), exactly as written in the file ("2.5E3" → "2500",
    "1.50" → "1.50", "1e-400" → "0.00…01")."""
    return str(value) if isinstance(value, int) else format(value, "f")


def _type_name(value: Any) -> str:
    """The name of a parsed JSON value's type as the error messages give it (an exact float is a float)."""
    return "float" if isinstance(value, Decimal) else type(value).__name__


def _finite_number(text: str) -> str:
    """``text`` (a JSON number literal) unless a binary64 reader would make it ±inf (|x| ≥ ~1.8e308)."""
    if math.isinf(float(text)):
        shown = text if len(text) <= 24 else f"{text[:20]}…({len(text)} characters)"
        raise ValueError(
            f"the number {shown} is beyond the range of a 64-bit float (±1.8e308), where JSON readers make it "
            "infinite; write a number in that range, or the answer as a string"
        )
    return text


def _exact_float(text: str) -> Decimal:
    return Decimal(_finite_number(text))


def _exact_int(text: str) -> int:
    return int(_finite_number(text))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}; each key may appear once per object")
        obj[key] = value
    return obj


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any, field: Optional[str] = None) -> Optional[str]:
    """Where a string of ``value`` (keys included, at any depth) holds a lone surrogate: "\\ud800 in 'prompt'"
    (the top-level field) or "\\udfff in a key"; None when every string is text. A surrogate PAIR escape is
    decoded by ``json`` into its one character, so only unpaired halves remain."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        where = f"'{field}'" if field is not None else "a string"
        return f"\\u{ord(found.group()):04x} in {where}" if found else None
    children: list[tuple[Optional[str], Any]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            found = _SURROGATE.search(key)
            if found:
                return f"\\u{ord(found.group()):04x} in a key"
            children.append((key if field is None else field, item))
    elif isinstance(value, list):
        children = [(field, item) for item in value]
    for child_field, item in children:
        found = _lone_surrogate(item, child_field)
        if found:
            return found
    return None


def parse_json_line(line: str) -> Any:
    """One JSON value, read strictly: numbers exactly (floats as ``Decimal``, ints as ``int``; numbers a binary64
    reader would make infinite are refused), NaN/Infinity and duplicate keys refused (``ValueError``)."""
    return json.loads(
        line, parse_float=_exact_float, parse_int=_exact_int, parse_constant=_reject_constant,
        object_pairs_hook=_object_without_duplicates,
    )


def read_jsonl(path: Union[str, os.PathLike], what: str = "task file") -> tuple[list[tuple[int, Any]], list[str]]:
    """(line number, parsed value) of every non-blank line of ``path`` that is a valid JSON value
    (:func:`parse_json_line`) of text, and an error message ("<path>:<line>: ...") for every line that is not;
    raises :class:`JsonlTaskError` when the file cannot be read. Callers add their own checks of the values and
    report all errors together.

    Lines end at "\\n" only (JSON Lines): U+2028, U+2029 and U+0085 inside a string are characters of it, and a
    "\\r" before the "\\n" is JSON whitespace. Each line must be UTF-8 (a bad byte is reported with its line and
    byte column) and its strings text: a lone surrogate escape such as ``"\\ud800"`` (half of a UTF-16 pair,
    which no UTF-8 text can hold) is refused here rather than when a tokenizer meets it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JsonlTaskError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise JsonlTaskError(f"{what} {path} cannot be read: {exc}") from None
    values, errors = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                          "save the file as UTF-8")
            continue
        if not line.strip(" \t\r"):
            continue
        try:
            value = parse_json_line(line)
        except ValueError as exc:
            errors.append(f"{path}:{lineno}: invalid JSON ({exc})")
            continue
        surrogate = _lone_surrogate(value)
        if surrogate is not None:
            errors.append(f"{path}:{lineno}: a lone surrogate {surrogate} (half of a UTF-16 pair, not a character); "
                          "write the character itself, or both halves of its \\u pair")
            continue
        values.append((lineno, value))
    return values, errors


def raise_bad_lines(errors: list[str], path, what: str = "task file", limit: int = 20) -> None:
    """Raise one :class:`JsonlTaskError` listing ``errors`` (sorted by line; the first ``limit``), if any."""
    if errors:
        prefix = f"{path}:"
        errors = sorted(errors, key=lambda e: int(e[len(prefix):].split(":", 1)[0]) if e.startswith(prefix) else 0)
        shown = errors[:limit] + ([f"... and {len(errors) - limit} more"] if len(errors) > limit else [])
        raise JsonlTaskError(f"{what} {path} has {len(errors)} bad line(s):\n" + "\n".join(shown))


def _jsonl_row(path, lineno: int, row: Any) -> tuple[Optional[str], Optional[tuple[str, str]]]:
    """(error, None) or (None, (prompt, answer text)) for one parsed line of a task file."""
    where = f"{path}:{lineno}:"
    if not isinstance(row, dict):
        return f"{where} expected a JSON object with 'prompt' and 'answer', got {type(row).__name__}", None
    missing = [key for key in ("prompt", "answer") if key not in row]
    if missing:
        return f"{where} missing field(s) {missing} (each line needs 'prompt' and 'answer')", None
    prompt, answer, row_id = row["prompt"], row["answer"], row.get("id")
    if not isinstance(prompt, str):
        return f"{where} 'prompt' must be a string, got {type(prompt).__name__}", None
    if not prompt.strip():
        return f"{where} 'prompt' is empty", None
    if isinstance(answer, bool) or not isinstance(answer, (int, Decimal, str)):
        return f"{where} 'answer' must be a number or a string, got {_type_name(answer)}", None
    if isinstance(answer, str) and not normalize_answer(answer):
        return f"{where} 'answer' is empty (or only punctuation)", None
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (int, str))):
        return f"{where} 'id' must be a string or an integer, got {_type_name(row_id)}", None
    return None, (prompt, answer if isinstance(answer, str) else _number_text(answer))


def load_jsonl_task(
    path: Union[str, os.PathLike],
    n_test: Optional[int] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    format_weight: float = 0.0,
) -> ExampleTask:
    """A task read from a JSONL file: one object per line, ``{"prompt": str, "answer": number | str, "id": ...}``.

    ``prompt`` (non-empty, distinct across lines) is the user message; ``answer`` the reference, scored by
    :func:`answer_matches`; ``id`` (optional, string or integer, distinct) is for the user's bookkeeping; other
    fields are ignored; blank lines are skipped. A numeric answer keeps the exact value written (its plain
    decimal text: "2.5E3" → "2500", 20 digits stay 20 digits); lines are read by :func:`read_jsonl`, which refuses
    numbers beyond a 64-bit float's range, duplicate keys, lone surrogates and bytes that are not UTF-8. Every bad
    line is reported with the file name and line number in one :class:`JsonlTaskError`. The split is :class:`ExampleTask`'s; the task's name is the file's stem.
    """
    pairs = []
    first_line_of: dict[str, int] = {}
    id_line: dict[Any, int] = {}
    rows, errors = read_jsonl(path)
    for lineno, row in rows:
        error, pair = _jsonl_row(path, lineno, row)
        if error is None and pair[0] in first_line_of:
            error = f"{path}:{lineno}: duplicate prompt (first on line {first_line_of[pair[0]]})"
        if error is None and row.get("id") is not None and row["id"] in id_line:
            error = f"{path}:{lineno}: duplicate id {row['id']!r} (first on line {id_line[row['id']]})"
        if error is not None:
            errors.append(error)
            continue
        first_line_of[pair[0]] = lineno
        if row.get("id") is not None:
            id_line[row["id"]] = lineno
        pairs.append(pair)
    raise_bad_lines(errors, path)
    try:
        return ExampleTask(
            tuple(pairs), n_test=n_test, test_fraction=test_fraction, seed=seed, format_weight=format_weight,
            name=Path(path).stem, source=f"task file {path}",
        )
    except ValueError as exc:
        raise JsonlTaskError(str(exc)) from None


# --- capital cities: the built-in retention task ---------------------------------------------------------------

# (country as it reads after "the capital of", capital). Only countries whose capital has one accepted name in
# common English use (no seat-of-government splits, renamings or disputed status).
CAPITALS: tuple[tuple[str, str], ...] = (
    # Europe
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Switzerland", "Bern"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavík"), ("Russia", "Moscow"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
    ("Albania", "Tirana"), ("Belarus", "Minsk"), ("Malta", "Valletta"), ("Cyprus", "Nicosia"),
    ("North Macedonia", "Skopje"), ("Montenegro", "Podgorica"), ("Bosnia and Herzegovina", "Sarajevo"),
    ("Moldova", "Chișinău"), ("Turkey", "Ankara"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"),
    # Asia
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("South Korea", "Seoul"),
    ("North Korea", "Pyongyang"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("Afghanistan", "Kabul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
    ("Syria", "Damascus"), ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Qatar", "Doha"), ("Kuwait", "Kuwait City"),
    ("Oman", "Muscat"), ("the United Arab Emirates", "Abu Dhabi"), ("Uzbekistan", "Tashkent"),
    ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Bhutan", "Thimphu"), ("Turkmenistan", "Ashgabat"),
    ("Kyrgyzstan", "Bishkek"), ("Tajikistan", "Dushanbe"), ("Bahrain", "Manama"), ("Indonesia", "Jakarta"),
    # Africa
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"),
    ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("Uganda", "Kampala"),
    ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"), ("Angola", "Luanda"), ("Sudan", "Khartoum"), ("Libya", "Tripoli"),
    ("Mali", "Bamako"), ("Madagascar", "Antananarivo"), ("Rwanda", "Kigali"), ("Somalia", "Mogadishu"),
    ("Botswana", "Gaborone"), ("Namibia", "Windhoek"), ("Mozambique", "Maputo"), ("Malawi", "Lilongwe"),
    ("Niger", "Niamey"), ("Liberia", "Monrovia"), ("Sierra Leone", "Freetown"), ("Guinea", "Conakry"),
    ("Burkina Faso", "Ouagadougou"), ("Gabon", "Libreville"), ("Eritrea", "Asmara"), ("Cameroon", "Yaoundé"),
    ("the Democratic Republic of the Congo", "Kinshasa"), ("Mauritania", "Nouakchott"), ("Togo", "Lomé"),
    # Americas
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Jamaica", "Kingston"),
    ("Haiti", "Port-au-Prince"), ("Guatemala", "Guatemala City"), ("Honduras", "Tegucigalpa"),
    ("Nicaragua", "Managua"), ("Costa Rica", "San José"), ("Panama", "Panama City"), ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"),
    ("Uruguay", "Montevideo"), ("Paraguay", "Asunción"), ("Ecuador", "Quito"), ("Brazil", "Brasília"),
    ("the Bahamas", "Nassau"), ("Barbados", "Bridgetown"), ("Trinidad and Tobago", "Port of Spain"),
    ("the Dominican Republic", "Santo Domingo"), ("El Salvador", "San Salvador"), ("Belize", "Belmopan"),
    ("Guyana", "Georgetown"), ("Suriname", "Paramaribo"),
    # Oceania
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Fiji", "Suva"), ("Papua New Guinea", "Port Moresby"),
    ("Samoa", "Apia"),
)
CAPITALS_TEMPLATE = "What is the capital of {country}? Answer with just the city name."


def capitals_task(
    n_test: int = 100, seed: int = 0, format_weight: float = 0.0, template: str = CAPITALS_TEMPLATE
) -> ExampleTask:
    """Capital cities of :data:`CAPITALS`, one question per country (``template`` with ``{country}``); answers are
    strings scored by :func:`answer_matches`. Held-out split: ``n_test`` countries chosen by :class:`ExampleTask`'s
    hash. See the module docstring for its calibration."""
    pairs = tuple((template.format(country=country), capital) for country, capital in CAPITALS)
    return ExampleTask(pairs, n_test=n_test, seed=seed, format_weight=format_weight, name="capitals",
                       source="the capitals table")


TASKS: dict[str, Callable[..., Any]] = {"arithmetic": ArithmeticTask, "capitals": capitals_task}


def is_task_file(name: Union[str, os.PathLike]) -> bool:
    """Whether ``name`` designates a JSONL task file (ends in ``.jsonl`` or is an existing file)."""
    return str(name).endswith(".jsonl") or Path(name).is_file()


def get_task(name: Union[str, os.PathLike], **kwargs):
    """The task registered as ``name``, or the JSONL task file at path ``name`` (:func:`load_jsonl_task`), built
    with keyword overrides (e.g. ``get_task("arithmetic", seed=1)``, ``get_task("mine.jsonl", n_test=50)``)."""
    if str(name) in TASKS:
        return TASKS[str(name)](**kwargs)
    if is_task_file(name):
        return load_jsonl_task(name, **kwargs)
    raise KeyError(f"unknown task {str(name)!r}; available tasks: {sorted(TASKS)}, or a path to a .jsonl task file")


# --- greedy evaluation -------------------------------------------------------------------------------------------


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def generate_token_ids(
    model, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], batch_size: int = 16, max_new_tokens: int = 48
) -> list[list[int]]:
    """Greedy new-token ids of each chat ``prompt`` (through the first end-of-sequence token, which is kept; no
    padding), batched with left padding. The tokenizer's padding side and the model's train/eval mode are
    restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    outputs: list[list[int]] = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {key: value.to(model.device) for key, value in enc.items()}
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
                outputs.append(row[:end])
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def generate_completions(
    model, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], batch_size: int = 16, max_new_tokens: int = 48
) -> list[str]:
    """Greedy completions (special tokens stripped) of chat ``prompts``: :func:`generate_token_ids`, decoded."""
    ids = generate_token_ids(model, tokenizer, prompts, batch_size, max_new_tokens)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@dataclass(frozen=True)
class HeldOut:
    """One greedy evaluation of the first n rows of a split, in row order: each row's question, reference answer,
    completion, and its lenient (:func:`answer_matches`, the reward's) and strict (:func:`strict_answer_matches`)
    correctness."""

    questions: tuple[str, ...]
    answers: tuple[str, ...]
    completions: tuple[str, ...]
    correct: tuple[bool, ...]
    strict: tuple[bool, ...]

    def rows(self) -> list[dict]:
        """One dict per prompt: ``{"question", "answer", "completion", "correct", "strict"}`` (0/1 ints)."""
        return [{"question": q, "answer": a, "completion": c, "correct": int(ok), "strict": int(st)}
                for q, a, c, ok, st in zip(self.questions, self.answers, self.completions, self.correct, self.strict)]


def held_out_outcomes(
    model, tokenizer, task, n: Optional[int] = None, batch_size: int = 16, max_new_tokens: int = 48, split: str = "test"
) -> HeldOut:
    """Greedy completions of the first ``n`` (default all) rows of ``split`` and their lenient and strict scores."""
    rows = task.rows(split)[:n]
    if not rows:
        raise ValueError(f"evaluate_accuracy: no rows to evaluate (split={split!r}, n={n})")
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens)
    answers = [r["answer"] for r in rows]
    return HeldOut(
        questions=tuple(completion_text(r["prompt"][-1]) for r in rows), answers=tuple(map(str, answers)),
        completions=tuple(completions),
        correct=tuple(reward == 1.0 for reward in correctness_reward(completions, answers)),
        strict=tuple(strict_answer_matches(c, a) for c, a in zip(completions, answers)),
    )


def held_out_correct(
    model, tokenizer, task, n: Optional[int] = None, batch_size: int = 16, max_new_tokens: int = 48, split: str = "test"
) -> list[bool]:
    """Greedy correctness (:func:`correctness_reward` == 1) of each of the first ``n`` (default all) rows of
    ``split``, in row order (what paired before/after comparisons need): :func:`held_out_outcomes`' ``correct``."""
    return list(held_out_outcomes(model, tokenizer, task, n, batch_size, max_new_tokens, split).correct)


def evaluate_accuracy(
    model, tokenizer, task, n: Optional[int] = None, batch_size: int = 16, max_new_tokens: int = 48, split: str = "test"
) -> float:
    """Greedy accuracy: the mean of :func:`held_out_correct`."""
    correct = held_out_correct(model, tokenizer, task, n, batch_size, max_new_tokens, split)
    return sum(correct) / len(correct)
