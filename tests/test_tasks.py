"""Verifiable-reward tasks: answer parser, rewards, splits, batched greedy evaluation, real-model calibration."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch

from conftest import make_tiny_model
from offprincipal.experiment import tasks as T


# --- parser and rewards ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 + 5 = 12.", 12),
        ("12", 12),
        ("The answer is 1,234.", 1234),
        ("5 - 7 = -2", -2),
        ("5 - 7 = \u22122", -2),
        ("10-3", 3),
        ("f(3)-4", 4),
        ("x = 2.50", Fraction(5, 2)),
        ("first 3, then 5, finally 122", 122),
        ("12,34", 34),
        ("\\boxed{408}", 408),
        ("59 * 7 = 395\n\nThis is a classic example", 395),
    ],
)
def test_parse_final_number(text, expected):
    assert T.parse_final_number(text) == expected


@pytest.mark.parametrize("text", ["", "no number here", "twelve", "-", "\u0663"])  # U+0663: Arabic-Indic 3
def test_unparseable_is_none_and_scores_zero(text):
    assert T.parse_final_number(text) is None
    assert T.correctness_reward([text], ["3"]) == [0.0]


def test_correctness_reward_accepts_strings_and_messages():
    completions = [
        "59 * 7 = 413",
        [{"role": "assistant", "content": "It is 122."}],
        [{"role": "assistant", "content": "122 or maybe 121"}],
        {"role": "assistant", "content": "-4"},
    ]
    assert T.correctness_reward(completions, ["413", "122", "122", "-4"], trainer_state=None) == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        T.correctness_reward(["1", "2"], ["1"])


def test_format_reward():
    assert T.format_reward(["395", " 395.\n", "395 apples", "= 395", [{"role": "assistant", "content": "12"}]]) == [
        1.0, 1.0, 0.0, 0.0, 1.0,
    ]


# --- task, splits, registry --------------------------------------------------------------------------------------


def test_rows_are_conversational_and_correct():
    task = T.get_task("arithmetic", n_train=30, n_test=12)
    rows = task.rows("test")
    assert len(rows) == 12 and len(task.rows("train")) == 30
    for row in rows:
        (message,) = row["prompt"]
        assert message["role"] == "user"
        a, op, b = re.fullmatch(r"Compute (\d+) ([-+*]) (\d+)\. Give only the final answer\.", message["content"]).groups()
        assert int(row["answer"]) == T.OPERATIONS[op](int(a), int(b)) >= 0
    assert [r["prompt"][0]["content"].split()[2] for r in rows[:3]] == ["+", "-", "*"]  # ops cycle


def test_splits_disjoint_deterministic_and_seeded():
    task = T.ArithmeticTask(n_train=500, n_test=100)
    train, test = task.problems("train"), task.problems("test")
    assert not set(train) & set(test) and len(set(train)) == 500
    assert task.problems("test") == test
    assert T.ArithmeticTask(n_train=10, n_test=100).problems("test") == test  # held-out set independent of n_train
    assert T.ArithmeticTask(n_train=500, n_test=100, seed=1).problems("test") != test
    digits = {p.op: (len(str(p.a)), len(str(p.b))) for p in test if p.op != "-"}
    assert digits == {"+": (2, 2), "*": (2, 1)}


def test_reward_funcs_and_weights():
    assert T.get_task("arithmetic").reward_funcs == [T.correctness_reward]
    task = T.get_task("arithmetic", format_weight=0.2)
    assert task.reward_funcs == [T.correctness_reward, T.format_reward] and task.reward_weights == [1.0, 0.2]


def test_dataset_for_trl():
    ds = T.get_task("arithmetic", n_train=8, n_test=4).dataset("train")
    assert len(ds) == 8 and set(ds.column_names) == {"prompt", "answer"}
    assert ds[0]["prompt"][0]["role"] == "user"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ops=("/",)), "ops must be"),
        (dict(ops=("+",), operand_digits={"-": (2, 2)}), "no entry for op"),
        (dict(operand_digits={"+": (1, 1), "-": (1, 1), "*": (1, 1)}, n_train=1000), "cannot draw"),
    ],
)
def test_bad_configuration_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.ArithmeticTask(**kwargs).problems("train")


def test_unknown_task_and_split():
    with pytest.raises(KeyError, match="unknown task 'chess'.*arithmetic"):
        T.get_task("chess")
    with pytest.raises(ValueError, match="split must be one of"):
        T.get_task("arithmetic").rows("validation")


# --- batched greedy evaluation -----------------------------------------------------------------------------------


class OracleModel(torch.nn.Module):
    """Stands in for a causal LM: "generates" the right answer of each prompt, checking left padding."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and not self.training
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded"
        self.calls.append(input_ids.shape[0])
        new = []
        for ids, mask in zip(input_ids, attention_mask):
            question = self.tokenizer.decode(ids[mask.bool()])
            a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", question).groups()
            answer = f"{T.OPERATIONS[op](int(a), int(b))}."
            new.append(self.tokenizer(answer, add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(map(len, new))
        new = torch.tensor([row + [pad_token_id] * (width - len(row)) for row in new])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_accuracy_batches_left_padded(tokenizer):
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.Fuse()  # decode the char tokens without separating spaces
    task = T.get_task("arithmetic", n_train=0, n_test=10)
    model = OracleModel(tokenizer).train()
    tokenizer.padding_side = "right"
    assert T.evaluate_accuracy(model, tokenizer, task, n=7, batch_size=3) == 1.0
    assert model.calls == [3, 3, 1]
    assert tokenizer.padding_side == "right" and model.training  # restored


@pytest.mark.parametrize("text, answer, lenient, strict", [
    ("122", "122", True, True),
    ("122.", "122", True, True),
    (" 100 + 22 = 122. ", "122", True, True),  # the form the model uses
    ("5 - 7 = -2", "-2", True, True),
    ("12 × 3 = 36!", "36", True, True),
    ("122 122 122", "122", True, False),  # a repeated number
    ("121 122", "122", True, False),  # a list
    ("Compute 38 - 19. Give only the final answer.", "19", True, False),  # an echo of the prompt
    ("Compute 45 * 0. Give only the final answer.", "0", True, False),
    ("The answer is 122.", "122", True, False),
    ("100 + 22 = 122 because", "122", True, False),  # words after the result
    ("To add 59 + 63, we combine them: 59 + 63 = 122.", "122", True, True),  # working, then the one equation
    ("59 + 63 = 122. So 59 + 63 = 122.", "122", True, False),  # the result stated twice
    ("61 + 48 = 22. So, 61 + 48 = 109.", "109", True, False),  # two different results
    ("45 * 1 = 45", "45", True, True),
    ("123", "122", False, False),
    ("Paris.", "Paris", True, True),
    ("The capital of France is Paris.", "Paris", True, False),
])
def test_strict_scorer_counts_one_statement_of_the_result(text, answer, lenient, strict):
    assert T.answer_matches(text, answer) is lenient
    assert T.strict_answer_matches(text, answer) is strict


def test_held_out_outcomes_score_each_completion_both_ways(tokenizer):
    from tokenizers import decoders

    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    task = T.get_task("arithmetic", n_train=0, n_test=5)
    result = T.held_out_outcomes(OracleModel(tokenizer), tokenizer, task, n=5, batch_size=2)
    assert result.correct == result.strict == (True,) * 5  # the oracle answers "c." alone
    rows = result.rows()
    assert [r["answer"] for r in rows] == [a for _, a in task.examples("test")]
    assert rows[0]["question"] == task.examples("test")[0][0] and rows[0]["completion"].endswith(".")
    assert T.held_out_correct(OracleModel(tokenizer), tokenizer, task, n=5) == [True] * 5


def test_evaluate_accuracy_tiny_model_runs(tokenizer):
    task = T.get_task("arithmetic", n_train=0, n_test=4)
    model = make_tiny_model()
    completions = T.generate_completions(model, tokenizer, [r["prompt"] for r in task.rows("test")], 2, 5)
    assert len(completions) == 4 and all(isinstance(c, str) for c in completions)
    assert completions == T.generate_completions(model, tokenizer, [r["prompt"] for r in task.rows("test")], 4, 5)
    assert 0.0 <= T.evaluate_accuracy(model, tokenizer, task, batch_size=2, max_new_tokens=5) <= 1.0


# --- real-model calibration (slow: ~1–3 min on 2 CPU cores, depending on load) -----------------------------------


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("task, n, low, high", [
    ("arithmetic", 40, 0.05, 0.6),  # a hard task with room to learn
    ("capitals", 50, 0.3, 0.75),  # the retention task: decent already, room both ways
])
def test_task_difficulty_calibrated_for_smollm2(smollm2_dir, task, n, low, high):
    """The base model's greedy accuracy on the first n held-out prompts lies in the range the task is meant for
    (figures on all held-out prompts: benchmarks/results/design_figures.md, retention_task_calibration.md)."""
    from offprincipal.experiment.models import load_model

    model, tok = load_model(smollm2_dir)
    accuracy = T.evaluate_accuracy(model, tok, T.get_task(task), n=n, batch_size=25, max_new_tokens=48)
    assert low <= accuracy <= high, accuracy


def test_rewards_plug_into_trl_grpo(tokenizer, tmp_path):
    """TRL calls the rewards with conversational completions and the dataset's ``answer`` column."""
    trl = pytest.importorskip("trl")
    task = T.get_task("arithmetic", n_train=8, n_test=4, format_weight=0.5)
    seen = {}

    def spy(completions, answer, **kwargs):
        seen.update(completion=completions[0], answer=answer[0], kwargs=set(kwargs))
        return T.correctness_reward(completions, answer, **kwargs)

    config = trl.GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
        per_device_train_batch_size=4, num_generations=4, max_completion_length=4, max_steps=1, save_strategy="no",
        reward_weights=task.reward_weights,
    )
    trainer = trl.GRPOTrainer(
        model=make_tiny_model(), reward_funcs=[spy, *task.reward_funcs[1:]], args=config,
        train_dataset=task.dataset("train"), processing_class=tokenizer,
    )
    trainer.train()
    assert seen["completion"][0]["role"] == "assistant" and seen["answer"] in {r["answer"] for r in task.rows("train")}
    assert "prompts" in seen["kwargs"]


# --- string answers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, answer, expected",
    [
        ("The capital of France is Paris.", "Paris", True),
        ("  **paris** ", "Paris", True),
        ("The capital of Colombia is Bogotá.", "Bogota", True),
        ("Bogota", "Bogotá", True),
        ("Paris, France", "Paris", False),  # the answer must end the completion
        ("Comparis", "Paris", False),  # ... as a whole word
        ("Kuwait", "Kuwait City", False),
        ("", "Paris", False),
        ("The answer is 12.", "12", True),  # numeric answers keep the final-number rule
        ("12 apples, not 13", "12", False),
        ("It is 1234", "1,234", True),
        ("x = 0.5", "0.50", True),
    ],
)
def test_answer_matches(text, answer, expected):
    assert T.answer_matches(text, answer) is expected
    assert T.correctness_reward([text], [answer]) == [float(expected)]


def test_format_reward_for_string_answers():
    completions = ["Paris.", "The capital is Paris.", "New Delhi", "Delhi\nindia", "12"]
    answers = ["Paris", "Paris", "New Delhi", "New Delhi", "Paris"]
    assert T.format_reward(completions, answers) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert T.format_reward(["12", "12 apples"], answer=["3", "3"]) == [1.0, 0.0]  # numeric: only a number
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        T.format_reward(["a", "b"], ["a"])


# --- capitals (the built-in retention task) ----------------------------------------------------------------------


def test_capitals_task_rows_and_split():
    task = T.get_task("capitals")
    test, train = task.rows("test"), task.rows("train")
    assert len(test) == 100 and len(train) == len(T.CAPITALS) - 100
    assert not {r["prompt"][0]["content"] for r in test} & {r["prompt"][0]["content"] for r in train}
    assert len({country for country, _ in T.CAPITALS}) == len(T.CAPITALS)
    by_question = {T.CAPITALS_TEMPLATE.format(country=c): a for c, a in T.CAPITALS}
    assert all(by_question[r["prompt"][0]["content"]] == r["answer"] for r in test + train)
    assert task.rows("test") == test and T.get_task("capitals", seed=1).rows("test") != test
    assert T.correctness_reward([f"The capital of France is {a}." for a in ["Paris"]], ["Paris"]) == [1.0]


# --- tasks from the user's JSONL files ---------------------------------------------------------------------------


def _write_jsonl(path, rows):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _user_rows(n=20):
    rows = [{"prompt": f"What is {i} plus one?", "answer": i + 1, "id": f"p{i}"} for i in range(n - 4)]
    rows += [
        {"prompt": "Name the colour of a clear daytime sky.", "answer": "blue"},
        {"prompt": "Half of one?", "answer": 0.5},
        {"prompt": "A big number?", "answer": 1e21},
        {"prompt": "Opposite of hot?", "answer": "Cold.", "extra": "ignored"},
    ]
    return rows


def test_jsonl_task_end_to_end(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "mine.jsonl", _user_rows() + [""])  # a blank line is skipped
    task = T.get_task(str(path), n_test=5)
    assert isinstance(task, T.ExampleTask) and task.name == "mine"
    test, train = task.rows("test"), task.rows("train")
    assert len(test) == 5 and len(train) == 15
    assert {r["prompt"][0]["content"] for r in test}.isdisjoint(r["prompt"][0]["content"] for r in train)
    answers = {r["prompt"][0]["content"]: r["answer"] for r in test + train}
    assert answers["Half of one?"] == "0.5" and answers["A big number?"] == "1000000000000000000000"
    assert answers["What is 3 plus one?"] == "4" and answers["Opposite of hot?"] == "Cold."
    # deterministic, and a different seed gives a different split
    assert T.get_task(path, n_test=5).rows("test") == test
    assert T.get_task(path, n_test=5, seed=3).rows("test") != test
    assert len(T.get_task(path).rows("test")) == 4  # default test_fraction 0.2 of 20
    # rewards: numbers by final number, strings by normalised end match; format reward per kind of answer
    task = T.get_task(path, n_test=5, format_weight=0.5)
    assert task.reward_funcs == [T.correctness_reward, T.format_reward] and task.reward_weights == [1.0, 0.5]
    assert T.correctness_reward(["It is 4.", "cold", "warm"], ["4", "Cold.", "Cold."]) == [1.0, 1.0, 0.0]
    ds = task.dataset("train")
    assert len(ds) == 15 and set(ds.column_names) == {"prompt", "answer"}
    model = make_tiny_model()
    accuracy = T.evaluate_accuracy(model, tokenizer, task, batch_size=3, max_new_tokens=4)
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"prompt": "a?", "answer": 1', None], r"bad\.jsonl:1: invalid JSON"),
        ([None, '["a?", 1]'], r"bad\.jsonl:2: expected a JSON object"),
        ([None, {"prompt": "b?"}], r"bad\.jsonl:2: missing field\(s\) \['answer'\]"),
        ([None, {"answer": 3}], r"bad\.jsonl:2: missing field\(s\) \['prompt'\]"),
        ([None, {"prompt": "  ", "answer": 3}], r"bad\.jsonl:2: 'prompt' is empty"),
        ([None, {"prompt": 5, "answer": 3}], r"bad\.jsonl:2: 'prompt' must be a string, got int"),
        ([None, {"prompt": "b?", "answer": [3]}], r"bad\.jsonl:2: 'answer' must be a number or a string, got list"),
        ([None, {"prompt": "b?", "answer": True}], r"bad\.jsonl:2: 'answer' must be a number or a string, got bool"),
        ([None, {"prompt": "b?", "answer": " . "}], r"bad\.jsonl:2: 'answer' is empty"),
        ([None, '{"prompt": "b?", "answer": NaN}'], r"bad\.jsonl:2: invalid JSON \(NaN is not allowed"),
        ([None, {"prompt": "b?", "answer": 1, "id": [1]}], r"bad\.jsonl:2: 'id' must be a string or an integer"),
        ([None, {"prompt": "a?", "answer": 2}], r"bad\.jsonl:2: duplicate prompt \(first on line 1\)"),
        ([None, {"prompt": "b?", "answer": 2, "id": "x"}], r"bad\.jsonl:2: duplicate id 'x' \(first on line 1\)"),
    ],
)
def test_jsonl_task_bad_line_is_named(tmp_path, lines, match):
    first = {"prompt": "a?", "answer": 1, "id": "x"}
    rows = [first if line is None else line for line in lines] + [{"prompt": f"q{i}?", "answer": i} for i in range(5)]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(T.JsonlTaskError, match=match):
        T.get_task(str(path))


def test_jsonl_task_reports_every_bad_line_and_file_errors(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a?"}, {"prompt": "b?", "answer": 1}, "{oops"])
    with pytest.raises(T.JsonlTaskError, match=r"2 bad line\(s\)") as info:
        T.load_jsonl_task(path)
    assert "bad.jsonl:1:" in str(info.value) and "bad.jsonl:3:" in str(info.value)
    with pytest.raises(T.JsonlTaskError, match=r"missing\.jsonl does not exist"):
        T.get_task(str(tmp_path / "missing.jsonl"))
    few = _write_jsonl(tmp_path / "few.jsonl", [{"prompt": "a?", "answer": 1}])
    with pytest.raises(T.JsonlTaskError, match=r"few\.jsonl: 1 examples are too few"):
        T.get_task(str(few))
    two = _write_jsonl(tmp_path / "two.jsonl", [{"prompt": "a?", "answer": 1}, {"prompt": "b?", "answer": 2}])
    assert len(T.get_task(two).rows("train")) == 1
    with pytest.raises(T.JsonlTaskError, match="too few"):
        T.get_task(two, n_test=2)


# --- issue 17, findings 6 and 11-13: the JSONL loader keeps what the user wrote, or names the line --------------


def _raw_jsonl(path, lines: list[str]) -> "Path":
    """``lines`` joined by "\\n" and written as UTF-8 bytes (no json.dumps: the test controls every character)."""
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return path


_FILLER = [f'{{"prompt": "q{i}?", "answer": {i}}}' for i in range(5)]


def test_jsonl_numbers_keep_the_value_written(tmp_path):
    """Finding 6: floats went through binary64 (1e-400 became "0.0", 20 digits were rounded) so the written
    answer scored 0. Numbers are now read exactly (plain decimal text of the literal)."""
    written = {
        "Tiny?": ("1e-400", "0." + "0" * 399 + "1"),
        "Twenty digits?": ("12345678901234567.891", "12345678901234567.891"),
        "Precise?": ("0.10000000000000000001", "0.10000000000000000001"),
        "Exponent?": ("2.5E3", "2500"),
        "Trailing zero?": ("1.50", "1.50"),
        "Big int?": ("123456789012345678901234567890", "123456789012345678901234567890"),
    }
    lines = [f'{{"prompt": "{q}", "answer": {literal}}}' for q, (literal, _) in written.items()]
    task = T.get_task(_raw_jsonl(tmp_path / "exact.jsonl", lines + _FILLER), n_test=2)
    answers = {r["prompt"][0]["content"]: r["answer"] for r in task.rows("test") + task.rows("train")}
    for question, (_, text) in written.items():
        assert answers[question] == text
        assert T.correctness_reward([f"The answer is {text}"], [answers[question]]) == [1.0]
    assert T.correctness_reward(["0.0", "12345678901234568"], [answers["Tiny?"], answers["Twenty digits?"]]) == [0.0, 0.0]


@pytest.mark.parametrize(
    "line, match",
    [
        # finding 6: numbers a binary64 reader turns into infinity; duplicate keys (anywhere) kept only the last
        ('{"prompt": "b?", "answer": 1e400}', r"bad\.jsonl:2: invalid JSON \(the number 1e400 is beyond"),
        ('{"prompt": "b?", "answer": -2e308}', r"bad\.jsonl:2: invalid JSON \(the number -2e308 is beyond"),
        ('{"prompt": "b?", "answer": ' + "9" * 400 + "}", r"bad\.jsonl:2: invalid JSON \(the number 9{10}"),
        ('{"prompt": "b?", "answer": 1, "answer": 2}', r"bad\.jsonl:2: invalid JSON \(duplicate key 'answer'"),
        ('{"prompt": "b?", "answer": 1, "meta": {"x": 1, "x": 1}}', r"bad\.jsonl:2: invalid JSON \(duplicate key 'x'"),
        # finding 11: a lone surrogate (half of a UTF-16 pair) is not text, in a value or in a key
        (r'{"prompt": "b\ud800?", "answer": 1}', r"bad\.jsonl:2: .*lone surrogate \\ud800 in 'prompt'"),
        (r'{"prompt": "b?", "answer": "x", "\udfff": 1}', r"bad\.jsonl:2: .*lone surrogate \\udfff in a key"),
        (r'{"prompt": "b?", "answer": 1, "tags": ["ok", "\udc80"]}', r"bad\.jsonl:2: .*lone surrogate \\udc80 in 'tags'"),
    ],
)
def test_jsonl_refuses_what_it_cannot_keep(tmp_path, line, match):
    path = _raw_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a?", "answer": 1}', line] + _FILLER)
    with pytest.raises(T.JsonlTaskError, match=match):
        T.get_task(str(path))


def test_jsonl_surrogate_pair_escape_is_text(tmp_path):
    """A \\u escape pair that forms one character (U+1F600) is text, not a lone surrogate."""
    path = _raw_jsonl(tmp_path / "ok.jsonl", [r'{"prompt": "smile \ud83d\ude00?", "answer": 1}'] + _FILLER)
    prompts = [r["prompt"][0]["content"] for r in T.get_task(path, n_test=1).rows("train") + T.get_task(path, n_test=1).rows("test")]
    assert "smile \U0001F600?" in prompts


def test_jsonl_lines_are_split_on_newline_only(tmp_path):
    """Finding 12: raw U+2028, U+2029, U+0085 inside a JSON string are characters of that string, not line breaks;
    only "\\n" ends a line (a "\\r" before it is JSON whitespace)."""
    odd = "\u2028\u2029\u0085"
    lines = [f'{{"prompt": "one{ch}two?", "answer": {i}}}' for i, ch in enumerate(odd)]
    lines.append('{"prompt": "windows line?", "answer": 9}\r')
    path = _raw_jsonl(tmp_path / "odd.jsonl", lines)
    task = T.get_task(path, n_test=2)
    prompts = {r["prompt"][0]["content"] for r in task.rows("test") + task.rows("train")}
    assert prompts == {f"one{ch}two?" for ch in odd} | {"windows line?"}
    bad = _raw_jsonl(tmp_path / "bad.jsonl", lines[:3] + ["{oops"])
    with pytest.raises(T.JsonlTaskError, match=r"bad\.jsonl has 1 bad line\(s\):\n.*bad\.jsonl:4: invalid JSON"):
        T.get_task(bad)


def test_jsonl_non_utf8_byte_names_its_line(tmp_path):
    """Finding 13: a byte that is not UTF-8 is reported with its line (and column), with every other bad line."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a?", "answer": 1}\n{"prompt": "caf\xe9?", "answer": 2}\n{oops\n'
                     + "\n".join(_FILLER).encode() + b"\n")
    with pytest.raises(T.JsonlTaskError, match=r"2 bad line\(s\)") as info:
        T.get_task(path)
    message = str(info.value)
    assert re.search(r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)", message), message
    assert "latin1.jsonl:3: invalid JSON" in message
