"""Retention (a): the packaged prompt set, cached base answers, answer NLL and NLL drift (tiny models, no downloads)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_tiny_model
from offprincipal import retention as R
from offprincipal.tasks import JsonlTaskError

PROMPTS = ["hi there", "name a colour", "write code", "tell a joke", "why is the sky blue", "say yes"]


def _answers(model, tokenizer, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("batch_size", 4)
    return R.base_answers(model, tokenizer, PROMPTS, **kwargs)


def _reference_nll(model, tokenizer, answers) -> float:
    """One sequence at a time, no padding, every logit: the definition the batched version must match."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(answers.prompts, answers.answer_ids):
            p = R._prompt_ids(tokenizer, prompt)
            logits = model(torch.tensor([p + list(answer)])).logits[0].double()
            logp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
            total -= float(logp.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())
            count += len(answer)
    return total / count


# --- the packaged prompt set -------------------------------------------------------------------------------------


def test_packaged_prompts_are_general_and_not_arithmetic():
    prompts = R.load_retention_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    rows = [json.loads(line) for line in R.default_prompts_path().read_text().splitlines()]
    assert {row["category"] for row in rows} == set(R.CATEGORIES)
    arithmetic = re.compile(r"\d\s*[-+*/×÷x]\s*\d|\b(compute|calculate|sum of|plus|minus|times|divided)\b", re.I)
    assert not [p for p in prompts if arithmetic.search(p)]


def test_bad_prompt_file_names_each_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = {"id": "a", "category": "chat", "prompt": "hello"}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "id": "b", "category": "maths"}),
             json.dumps({**good, "id": "c", "prompt": " "}), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JsonlTaskError) as info:
        R.load_retention_prompts(path)
    message = str(info.value)
    assert "4 bad line(s)" in message
    for fragment in [":2: invalid JSON", ":3: category 'maths'", ":4: 'prompt' is empty", ":5: duplicate"]:
        assert f"{path}{fragment}" in message


# --- base answers and their cache --------------------------------------------------------------------------------


def test_base_answers_are_greedy_and_cached(tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model()
    first = _answers(model, tokenizer)
    assert not first.from_cache and first.path.parent == R.retention_cache_dir() and first.path.exists()
    assert str(R.retention_cache_dir()).startswith(str(tmp_path.parent.parent))  # the per-test cache of conftest
    assert len(first.answer_ids) == len(PROMPTS) and all(1 <= len(ids) <= 6 for ids in first.answer_ids)
    assert first.answers == tuple(tokenizer.batch_decode([list(i) for i in first.answer_ids], skip_special_tokens=True))

    calls = []
    real = R.generate_token_ids
    monkeypatch.setattr(R, "generate_token_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = _answers(model, tokenizer)
    assert second.from_cache and not calls
    assert (second.answer_ids, second.answers, second.key) == (first.answer_ids, first.answers, first.key)

    # the key follows the weights, the prompts and the settings
    assert _answers(model, tokenizer, max_new_tokens=5).key != first.key
    assert R.base_answers(model, tokenizer, PROMPTS[:-1], max_new_tokens=6, batch_size=4).key != first.key
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert _answers(model, tokenizer).key != first.key
    assert len(calls) == 3
    assert _answers(model, tokenizer, cache_dir=False).path is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: r.update(key="0" * 32),
        lambda r: r.update(prompts=r["prompts"][:-1]),
        lambda r: r["answer_ids"].pop(),
        lambda r: r["answer_ids"][0].__setitem__(0, 10**9),  # out of the vocabulary
        lambda r: r["answer_ids"].__setitem__(1, []),
        lambda r: r.update(format=99),
        lambda r: r.pop("answers"),
    ],
)
def test_tampered_cache_is_regenerated(tokenizer, tamper):
    model = make_tiny_model()
    first = _answers(model, tokenizer)
    record = json.loads(first.path.read_text())
    tamper(record)
    first.path.write_text(json.dumps(record))
    again = _answers(model, tokenizer)
    assert not again.from_cache and again.answer_ids == first.answer_ids
    assert _answers(model, tokenizer).from_cache  # the regenerated file was written back and passes


def test_truncated_cache_is_regenerated(tokenizer):
    model = make_tiny_model()
    first = _answers(model, tokenizer)
    first.path.write_text(first.path.read_text()[:50])
    assert not _answers(model, tokenizer).from_cache


# --- answer NLL and drift ----------------------------------------------------------------------------------------


def test_answer_nll_matches_unbatched_reference(tokenizer):
    model = make_tiny_model()
    answers = _answers(model, tokenizer, cache_dir=False)
    assert len({len(ids) for ids in answers.answer_ids} | {len(p) for p in PROMPTS}) > 1  # padding is exercised
    reference = _reference_nll(model, tokenizer, answers)
    for batch_size in (1, 4, 8):
        assert R.answer_nll(model, tokenizer, answers, batch_size=batch_size) == pytest.approx(reference, abs=1e-5)
    gpt2 = make_tiny_model("gpt2")  # absolute positions: the position ids must undo the left padding
    gpt2_answers = _answers(gpt2, tokenizer, cache_dir=False)
    assert R.answer_nll(gpt2, tokenizer, gpt2_answers, batch_size=4) == pytest.approx(
        _reference_nll(gpt2, tokenizer, gpt2_answers), abs=1e-5
    )


def _train_towards_other_text(model, tokenizer, steps: int = 15):
    ids = tokenizer(["zzzz qqqq zzzz qqqq", "xyxyxyxy xyxyxy"], return_tensors="pt", padding=True)["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_full_model_drift_zero_then_positive(tokenizer):
    model = make_tiny_model()
    answers = _answers(model, tokenizer)
    base = R.answer_nll(model, tokenizer, answers)
    unchanged = R.nll_drift(model, answers, tokenizer, base_nll=base)
    assert unchanged.drift_nll == 0.0 and unchanged.tuned_nll == unchanged.base_nll == base
    assert (unchanged.n_prompts, unchanged.n_tokens) == (len(PROMPTS), answers.n_tokens)
    with pytest.raises(ValueError, match="pass it as base_nll"):
        R.nll_drift(model, answers, tokenizer)
    _train_towards_other_text(model, tokenizer)
    drift = R.nll_drift(model, answers, tokenizer, base_nll=base)
    assert drift.drift_nll > 0.1 and drift.base_nll == base
    record = drift.as_record()
    assert record["retention_nll_drift_nats_per_token"] == drift.drift_nll and record["retention_prompts"] == 6


def test_adapter_drift_uses_the_disabled_adapter(tokenizer):
    from peft import LoraConfig, get_peft_model

    base_model = make_tiny_model()
    answers = _answers(base_model, tokenizer)
    base = R.answer_nll(base_model, tokenizer, answers)
    model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert R.nll_drift(model, answers, tokenizer).drift_nll == pytest.approx(0.0, abs=1e-6)  # B = 0
    _train_towards_other_text(model, tokenizer)
    drift = R.nll_drift(model, answers, tokenizer)
    assert drift.base_nll == pytest.approx(base, abs=1e-6) and drift.drift_nll > 0.05


@pytest.mark.real_model
def test_smollm2_base_answers_and_zero_drift(smollm2_dir):
    from offprincipal.models import load_model

    model, tok = load_model(smollm2_dir)
    prompts = R.load_retention_prompts()[::36]  # an instruction and a code prompt
    answers = R.base_answers(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert all(len(ids) >= 1 for ids in answers.answer_ids) and all(text.strip() for text in answers.answers)
    base = R.answer_nll(model, tok, answers)
    assert 0.0 < base < 1.5  # its own greedy answers: likely under its own weights
    assert R.nll_drift(model, answers, tok, base_nll=base).drift_nll == 0.0
    assert R.base_answers(model, tok, prompts, max_new_tokens=8, batch_size=2).from_cache
