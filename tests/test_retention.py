"""Retention (a): the packaged prompt set, cached base answers, answer NLL, NLL drift and the KL to the base (tiny
models, no downloads)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_tiny_model
from offprincipal.experiment import retention as R
from offprincipal.experiment.tasks import JsonlTaskError

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
    with pytest.raises(ValueError, match="pass it as base_stats"):
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


# --- KL to the base ----------------------------------------------------------------------------------------------


def _reference_kl(base_model, tuned_model, tokenizer, answers, top_m=None) -> tuple[float, float]:
    """One sequence at a time, no padding, full vocabulary, float64: the exact per-token KL(base ‖ tuned) and, for
    ``top_m``, the KL of both distributions coarsened to {the base's top-m tokens} ∪ {the rest as one bucket}."""
    exact = coarse = 0.0
    count = 0
    with torch.no_grad():
        for prompt, answer in zip(answers.prompts, answers.answer_ids):
            p = R._prompt_ids(tokenizer, prompt)
            ids = torch.tensor([p + list(answer)])
            sl = slice(len(p) - 1, ids.shape[1] - 1)
            lp = torch.log_softmax(base_model(ids).logits[0, sl].double(), dim=-1)
            lq = torch.log_softmax(tuned_model(ids).logits[0, sl].double(), dim=-1)
            exact += float((lp.exp() * (lp - lq)).sum())
            if top_m is not None:
                top = lp.topk(top_m, dim=-1).indices
                rest = torch.ones_like(lp, dtype=torch.bool).scatter(-1, top, False)
                pb, qb = lp.exp(), lq.exp()
                p_s, q_s = pb.gather(-1, top), qb.gather(-1, top)
                p_r, q_r = (pb * rest).sum(-1), (qb * rest).sum(-1)
                coarse += float((p_s * (p_s.log() - q_s.log())).sum() + (p_r * (p_r.log() - q_r.log())).sum())
            count += len(answer)
    return exact / count, coarse / count


def _perturbed_copy(model, scale=0.05):
    import copy

    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if name.endswith("proj.weight"):
                param += scale * torch.randn(param.shape, generator=gen)
    return tuned


def test_kl_to_base_zero_for_unchanged_then_positive(tokenizer):
    model = make_tiny_model()
    answers = _answers(model, tokenizer)
    stats = R.base_statistics(model, tokenizer, answers)
    assert stats.nll == R.answer_nll(model, tokenizer, answers)  # the same forward figures
    assert stats.top_m == R.TOP_M < model.config.vocab_size
    assert [tuple(t.shape) for t in stats.top_ids] == [(len(a), R.TOP_M) for a in answers.answer_ids]
    unchanged = R.nll_drift(model, answers, tokenizer, base_stats=stats)
    assert unchanged.kl_to_base == pytest.approx(0.0, abs=1e-6) and unchanged.drift_nll == 0.0
    assert unchanged.top_m == R.TOP_M and unchanged.base_nll == stats.nll
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 0] += 1.0
    moved = R.nll_drift(model, answers, tokenizer, base_stats=stats)
    assert moved.kl_to_base > 1e-5 and moved.base_nll == stats.nll  # near-uniform tiny model: small but far from 0
    record = moved.as_record()
    assert record["retention_kl_to_base_nats_per_token"] == moved.kl_to_base and record["retention_kl_top_m"] == R.TOP_M
    assert R.nll_drift(model, answers, tokenizer, base_nll=stats.nll).kl_to_base is None  # no base statistics
    with pytest.raises(ValueError, match="not both"):
        R.nll_drift(model, answers, tokenizer, base_nll=stats.nll, base_stats=stats)


def test_kl_to_base_matches_full_vocabulary_reference(tokenizer):
    """m ≥ vocabulary: the coarsening is exact and the figure is the full KL; small m: the KL of the coarsened
    distributions, ≤ the exact KL (data-processing inequality)."""
    base_model = make_tiny_model()
    answers = _answers(base_model, tokenizer, cache_dir=False)
    tuned = _perturbed_copy(base_model)
    vocab = base_model.config.vocab_size
    exact, _ = _reference_kl(base_model, tuned, tokenizer, answers)
    assert exact > 1e-3
    for batch_size in (1, 4):
        stats = R.base_statistics(base_model, tokenizer, answers, batch_size=batch_size, top_m=vocab + 100)
        assert stats.top_m == vocab and all(torch.isneginf(r).all() for r in stats.rest_logprob)
        drift = R.nll_drift(tuned, answers, tokenizer, batch_size=batch_size, base_stats=stats)
        assert drift.kl_to_base == pytest.approx(exact, rel=1e-4, abs=1e-6)
    for m in (1, 4, 16):
        _, coarse = _reference_kl(base_model, tuned, tokenizer, answers, top_m=m)
        stats = R.base_statistics(base_model, tokenizer, answers, batch_size=4, top_m=m)
        kl = R.nll_drift(tuned, answers, tokenizer, batch_size=4, base_stats=stats).kl_to_base
        assert kl == pytest.approx(coarse, rel=1e-4, abs=1e-6)
        assert 0.0 < kl <= exact + 1e-6


def test_base_statistics_must_match_their_answers(tokenizer):
    model = make_tiny_model()
    answers = _answers(model, tokenizer)
    stats = R.base_statistics(model, tokenizer, answers)
    other = R.base_answers(model, tokenizer, PROMPTS[:-1], max_new_tokens=6, batch_size=4)
    with pytest.raises(ValueError, match="do not belong"):
        R.nll_drift(model, other, tokenizer, base_stats=stats)
    import dataclasses

    bad = dataclasses.replace(stats, top_logprobs=(stats.top_logprobs[0][:, :3],) + stats.top_logprobs[1:])
    with pytest.raises(ValueError, match="do not belong"):
        R.nll_drift(model, answers, tokenizer, base_stats=bad)


def test_adapter_kl_uses_the_disabled_adapter(tokenizer):
    from peft import LoraConfig, get_peft_model

    base_model = make_tiny_model()
    answers = _answers(base_model, tokenizer)
    model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert R.nll_drift(model, answers, tokenizer).kl_to_base == pytest.approx(0.0, abs=1e-6)  # B = 0
    _train_towards_other_text(model, tokenizer)
    drift = R.nll_drift(model, answers, tokenizer)
    assert drift.kl_to_base > 1e-3 and drift.top_m == R.TOP_M


@pytest.mark.real_model
def test_smollm2_base_answers_and_zero_drift(smollm2_dir):
    from offprincipal.experiment.models import load_model

    model, tok = load_model(smollm2_dir)
    prompts = R.load_retention_prompts()[::36]  # an instruction and a code prompt
    answers = R.base_answers(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert all(len(ids) >= 1 for ids in answers.answer_ids) and all(text.strip() for text in answers.answers)
    base = R.answer_nll(model, tok, answers)
    assert 0.0 < base < 1.5  # its own greedy answers: likely under its own weights
    assert R.nll_drift(model, answers, tok, base_nll=base).drift_nll == 0.0
    stats = R.base_statistics(model, tok, answers)
    assert stats.nll == base and stats.top_m == R.TOP_M
    assert R.nll_drift(model, answers, tok, base_stats=stats).kl_to_base == 0.0
    assert R.base_answers(model, tok, prompts, max_new_tokens=8, batch_size=2).from_cache
