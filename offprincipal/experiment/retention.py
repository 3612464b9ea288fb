"""Retention: how far a tuned model has drifted from the base model's own behaviour on general prompts.

Retention (a), a KL-style forgetting figure. A fixed set of general prompts (instructions, facts, short code,
chat; no arithmetic) ships as ``offprincipal/experiment/data/retention_prompts.jsonl``. The base model answers each greedily
once (:func:`base_answers`; cached on disk). For any model θ,

    NLL(θ) = − Σ_i Σ_t log p_θ(y_{i,t} | x_i, y_{i,<t}) / Σ_i |y_i|

over the base answers y_i (answer tokens only, the final end-of-sequence token included when the base model
produced one) given the chat-formatted prompts x_i: a token-weighted mean (:func:`answer_nll`). The drift of a
tuned model is NLL(tuned) − NLL(base) (:func:`nll_drift`). Since y_i is the base model's greedy answer, NLL(base)
is small and the drift estimates how much less likely the tuned model finds the base behaviour: 0 for an
unchanged model, > 0 when the tuned model has moved away. It is < 0 when tuning sharpens the base answers (GRPO
does: the base's greedy answers become more likely), so a drift near 0 does not mean "unchanged".

The KL to the base, measured in the same forward passes, is the figure that reads "0 = unchanged, more = moved
further": with p = p_base(·|x_i, y_{i,<t}) and q = p_tuned(·|x_i, y_{i,<t}) at each answer position,

    KL(θ) = Σ_i Σ_t KL_m(p ‖ q) / Σ_i |y_i|        (nats per answer token, ≥ 0)

    KL_m(p ‖ q) = Σ_{j∈S} p_j log(p_j / q_j) + p_R log(p_R / q_R),   S = the base's top-m tokens (m = TOP_M),
                  p_R = Σ_{j∉S} p_j = 1 − Σ_{j∈S} p_j,  q_R = Σ_{j∉S} q_j  (the rest as one bucket; 0·log 0 = 0)

The base distributions are too big to keep whole (vocabulary × answer positions), so :func:`base_statistics`
keeps, per answer position, the base's top-m token ids, their log-probabilities and log p_R, from the forward pass
that also gives NLL(base). KL_m is the KL of the two distributions coarsened to the m + 1 outcomes S ∪ {rest};
by the data-processing inequality KL_m(p ‖ q) ≤ KL(p ‖ q): the figure is a lower bound on the exact KL. It is
exact up to the mass outside the top m — by the chain rule KL(p ‖ q) = KL_m(p ‖ q) + p_R · KL(p(·|R) ‖ q(·|R)),
R the tokens outside S — and equal to it when the rest bucket is empty (m ≥ vocabulary size). KL_m = 0 when the
tuned model gives the same distributions as the base on those positions (exactly 0 when computed the same way:
same batching, precision and device), and > 0 when it changes the probability of any top-m token or of the rest.

Retention (b), accuracy on a second verifiable task the run does not train on, is the built-in task
:data:`RETENTION_TASK` of :mod:`offprincipal.experiment.tasks`, measured with :func:`offprincipal.experiment.tasks.evaluate_accuracy`.

The cache is ``cache_root()/retention/<key>.json`` (``$OFFPRINCIPAL_CACHE_DIR`` or ``~/.cache/offprincipal``);
the key is a BLAKE2b digest of the model's weights (names, dtypes, shapes, bytes), the tokenizer (its serialized
form, chat template and special tokens), the prompts and the generation settings. Files are written atomically
and checked before use (format, key, prompts, token ids); a file that fails a check is regenerated. Only the
answers are cached: the base's top-m statistics come from the forward pass that measures NLL(base), which a run
does anyway, so they always match the precision and device the tuned model is measured with (a cached copy would
not: the key does not cover autocast, and a bf16 copy against an fp32 measurement would show a KL for an
unchanged model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .models import cache_root
from ..files import cache_unwritable, write_text_atomic
from .tasks import JsonlTaskError, generate_token_ids, raise_bad_lines, read_jsonl

logger = logging.getLogger(__name__)

RETENTION_TASK = "capitals"
CATEGORIES = ("instruction", "fact", "code", "chat")
CACHE_FORMAT = 1
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_BATCH_SIZE = 16
TOP_M = 64  # base tokens kept per answer position for the KL to the base (the rest is one bucket)

PathLike = Union[str, os.PathLike]


# --- the prompt set ----------------------------------------------------------------------------------------------


def default_prompts_path() -> Path:
    """The packaged prompt set, ``offprincipal/experiment/data/retention_prompts.jsonl``."""
    return Path(str(resources.files("offprincipal.experiment") / "data" / "retention_prompts.jsonl"))


def load_retention_prompts(path: Optional[PathLike] = None) -> list[str]:
    """The prompts of a retention prompt file (default: the packaged set), in file order.

    Each line is ``{"id": str, "category": one of CATEGORIES, "prompt": str}``; ids and prompts are distinct and
    prompts non-empty. Every bad line is reported at once with the file name and line number.
    """
    path = Path(path) if path is not None else default_prompts_path()
    prompts, seen_ids, seen_prompts = [], set(), set()
    rows, errors = read_jsonl(path, what="retention prompt file")
    for lineno, row in rows:
        where = f"{path}:{lineno}:"
        if not isinstance(row, dict) or not all(isinstance(row.get(key), str) for key in ("id", "category", "prompt")):
            errors.append(f"{where} expected an object with string fields 'id', 'category' and 'prompt'")
        elif row["category"] not in CATEGORIES:
            errors.append(f"{where} category {row['category']!r} is not one of {CATEGORIES}")
        elif not row["prompt"].strip():
            errors.append(f"{where} 'prompt' is empty")
        elif row["id"] in seen_ids or row["prompt"] in seen_prompts:
            errors.append(f"{where} duplicate id or prompt")
        else:
            seen_ids.add(row["id"])
            seen_prompts.add(row["prompt"])
            prompts.append(row["prompt"])
    raise_bad_lines(errors, path, "retention prompt file")
    if not prompts:
        raise JsonlTaskError(f"retention prompt file {path} has no prompts")
    return prompts


# --- the base model's answers, cached ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseAnswers:
    """The base model's greedy answers to ``prompts``: ``answer_ids[i]`` are the new tokens after the chat-formatted
    ``prompts[i]`` (``answers[i]`` their text, for reading). ``key`` identifies model, tokenizer, prompts and
    settings; ``path`` is the cache file (None when not cached); ``from_cache`` says whether it was read back."""

    prompts: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    answers: tuple[str, ...]
    key: str
    max_new_tokens: int
    path: Optional[Path] = None
    from_cache: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.answer_ids)


def retention_cache_dir() -> Path:
    """``cache_root()/retention``: next to the subspace and model caches."""
    return cache_root() / "retention"


def _hash_model(h, model) -> None:
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _hash_tokenizer(h, tokenizer) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # padding/truncation settings are call state (set by every padded call), not identity
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
    }
    h.update(json.dumps(extras, sort_keys=True).encode())


def answers_key(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> str:
    """The cache key of :func:`base_answers` (BLAKE2b, 32 hex characters). The batch size and device are part of
    it because batched greedy decoding is only reproducible for the same padding and kernels."""
    h = hashlib.blake2b(digest_size=16)
    settings = {"format": CACHE_FORMAT, "greedy": True, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "device": model.device.type, "prompts": list(prompts)}
    h.update(json.dumps(settings, sort_keys=True).encode())
    _hash_tokenizer(h, tokenizer)
    _hash_model(h, model)
    return h.hexdigest()


def _read_cache(path: Path, key: str, prompts: Sequence[str], vocab_size: int) -> Optional[dict]:
    """The cached record at ``path`` if it exists and passes every check, else None (with a warning if present)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        ids = record["answer_ids"]
        ok = (
            record.get("format") == CACHE_FORMAT
            and record.get("key") == key
            and record.get("prompts") == list(prompts)
            and isinstance(ids, list) and len(ids) == len(prompts)
            and isinstance(record.get("answers"), list) and len(record["answers"]) == len(prompts)
            and all(isinstance(row, list) and row and all(isinstance(t, int) and 0 <= t < vocab_size for t in row)
                    for row in ids)
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("retention cache file %s is unreadable (%s); regenerating the base answers", path, exc)
        return None
    if not ok:
        logger.warning("retention cache file %s does not match (key, prompts or token ids); regenerating", path)
        return None
    return record


def base_answers(
    model,
    tokenizer,
    prompts: Optional[Sequence[str]] = None,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Union[PathLike, None, bool] = None,
) -> BaseAnswers:
    """The greedy answers of ``model`` (the BASE model, before any training) to ``prompts`` (default: the
    packaged set), each a one-turn chat, batched with left padding, at most ``max_new_tokens`` new tokens.

    Read from the cache when a file with this key passes its checks, else generated and written atomically (a
    cache that cannot be written gives one warning; the answers are used all the same).
    ``cache_dir``: None → :func:`retention_cache_dir`, a path → there, False → no cache.
    """
    prompts = list(prompts) if prompts is not None else load_retention_prompts()
    if not prompts:
        raise ValueError("base_answers needs at least one prompt")
    key = answers_key(model, tokenizer, prompts, max_new_tokens, batch_size)
    path = None
    if cache_dir is not False:
        path = Path(cache_dir if cache_dir is not None else retention_cache_dir()) / f"{key}.json"
        vocab = model.get_input_embeddings().num_embeddings
        record = _read_cache(path, key, prompts, vocab)
        if record is not None:
            return BaseAnswers(tuple(prompts), tuple(map(tuple, record["answer_ids"])), tuple(record["answers"]), key,
                               max_new_tokens, path, from_cache=True)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    ids = generate_token_ids(model, tokenizer, chats, batch_size=batch_size, max_new_tokens=max_new_tokens)
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"base_answers: the model produced no token for prompt(s) {empty}; raise max_new_tokens")
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if path is not None:
        record = {"format": CACHE_FORMAT, "key": key, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                  "prompts": prompts, "answers": texts, "answer_ids": ids}
        try:
            write_text_atomic(path, json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as exc:  # a full disk, no permission: the answers are used, not kept
            cache_unwritable("retention cache", path.parent, exc, "Set $OFFPRINCIPAL_CACHE_DIR to a writable folder "
                             "with free space to keep the base answers between runs.")
            path = None
    return BaseAnswers(tuple(prompts), tuple(map(tuple, ids)), tuple(texts), key, max_new_tokens, path)


# --- NLL of the base answers and drift ---------------------------------------------------------------------------


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_logprobs(model, tokenizer, answers: BaseAnswers, batch_size: int):
    """Yield ``(rows, logp)`` per batch of prompts: ``rows`` the prompt indices of the batch, ``logp`` (N, vocab)
    float32 the model's next-token log-probabilities at every answer position of those prompts, in order (row by
    row, position by position; N = their answer tokens), each answer conditioned on its chat-formatted prompt.
    Sequences are left-padded with explicit position ids; only the last ``max answer length + 1`` logits of a batch
    are computed. The model's train/eval mode is restored; no gradient is kept."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [(_prompt_ids(tokenizer, p), list(a)) for p, a in zip(answers.prompts, answers.answer_ids)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            tail = max(len(a) for _, a in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            keep = torch.zeros((len(chunk), tail), dtype=torch.bool)
            for row, (p, a) in enumerate(chunk):
                seq = p + a
                input_ids[row, width - len(seq) :] = torch.tensor(seq)
                mask[row, width - len(seq) :] = 1
                keep[row, tail - len(a) :] = True
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            device = model.device
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                               position_ids=position_ids.to(device), logits_to_keep=tail + 1).logits
                # logits[:, j] predicts the token after position width - tail - 1 + j; the answer fills the last
                # `tail`, so logits[:, :-1][keep] are the answer positions, row by row.
                logp = torch.log_softmax(logits[:, :-1][keep.to(logits.device)].float(), dim=-1)
            yield range(start, start + len(chunk)), logp
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class BaseStatistics:
    """What the KL to the base needs of the base model, from one forward pass over its ``answers`` (the module
    docstring gives the math). Per prompt i, with L_i = |y_i| answer positions and m = ``top_m`` (TOP_M, or the
    vocabulary size when smaller): ``top_ids[i]`` (L_i, m) int64 the base's m most likely next tokens,
    ``top_logprobs[i]`` (L_i, m) float32 their log-probabilities, ``rest_logprob[i]`` (L_i,) float32 the log of the
    base's probability of every other token (−inf when there is none, m = vocabulary size). ``nll`` is
    NLL(base) from the same pass; ``key`` and ``lengths`` tie the statistics to their :class:`BaseAnswers`."""

    nll: float
    top_m: int
    top_ids: tuple[torch.Tensor, ...]
    top_logprobs: tuple[torch.Tensor, ...]
    rest_logprob: tuple[torch.Tensor, ...]
    key: str
    lengths: tuple[int, ...]

    def check(self, answers: BaseAnswers) -> None:
        """ValueError unless these statistics were measured on ``answers`` (same key, same answer lengths, arrays of
        the right shapes)."""
        lengths = tuple(len(ids) for ids in answers.answer_ids)
        shapes_ok = len(self.top_ids) == len(self.top_logprobs) == len(self.rest_logprob) == len(lengths) and all(
            tuple(i.shape) == tuple(lp.shape) == (n, self.top_m) and tuple(r.shape) == (n,)
            for i, lp, r, n in zip(self.top_ids, self.top_logprobs, self.rest_logprob, lengths)
        )
        if self.key != answers.key or self.lengths != lengths or not shapes_ok:
            raise ValueError("base statistics do not belong to these base answers (key, lengths or array shapes); "
                             "measure base_statistics(base_model, tokenizer, answers) on the same answers")


def _rest_logprob(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{j∉ids} exp(logp_j) per row, summed directly over the other tokens (no 1 − Σ cancellation)."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p·log(p/q) elementwise from log-probabilities, with 0·log 0 = 0: a bucket the base gives no mass (an empty
    rest, a −inf logit) adds nothing."""
    return torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p.exp() * (log_p - log_q))


def _measure(model, tokenizer, answers: BaseAnswers, batch_size: int, *, top_m: Optional[int] = None,
             base: Optional[BaseStatistics] = None):
    """One pass of ``model`` over ``answers``: ``(nll, kl, stats)`` with ``nll`` the token-weighted NLL, ``kl`` the
    token-weighted KL_m from ``base`` (None without ``base``), ``stats`` the per-prompt top-``top_m`` triples of
    :class:`BaseStatistics` (None without ``top_m``). Sums are accumulated in float64."""
    if base is not None:
        base.check(answers)
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for rows, logp in _answer_logprobs(model, tokenizer, answers, batch_size):
        lengths = [len(answers.answer_ids[i]) for i in rows]
        target = torch.tensor([t for i in rows for t in answers.answer_ids[i]], device=logp.device)
        nll_sum -= float(logp.gather(-1, target.unsqueeze(-1)).double().sum())
        count += len(target)
        if top_m is not None:
            top_lp, top_ids = logp.topk(min(top_m, logp.shape[-1]), dim=-1)
            rest = _rest_logprob(logp, top_ids)
            stats += zip(top_ids.cpu().split(lengths), top_lp.cpu().split(lengths), rest.cpu().split(lengths))
        if base is not None:
            ids = torch.cat([base.top_ids[i] for i in rows]).to(logp.device)
            a = torch.cat([base.top_logprobs[i] for i in rows]).to(logp.device).double()
            a_rest = torch.cat([base.rest_logprob[i] for i in rows]).to(logp.device).double()
            b = logp.gather(-1, ids).double()
            b_rest = _rest_logprob(logp, ids).double()
            kl_sum += float(_kl_terms(a, b).sum() + _kl_terms(a_rest, b_rest).sum())
    # KL_m ≥ 0; max() only removes float64 rounding of a sum that is 0 up to it
    return nll_sum / count, (None if base is None else max(kl_sum / count, 0.0)), (stats if top_m else None)


def answer_nll(model, tokenizer, answers: BaseAnswers, batch_size: int = 8) -> float:
    """Token-weighted mean NLL (nats per answer token) of ``answers`` under ``model``, each answer conditioned on
    its chat-formatted prompt (the module docstring gives the formula). Sequences are left-padded with explicit
    position ids; only the last ``max answer length + 1`` logits of a batch are computed. The model's train/eval
    mode is restored; no gradient is kept."""
    return _measure(model, tokenizer, answers, batch_size)[0]


def base_statistics(model, tokenizer, answers: BaseAnswers, batch_size: int = 8, top_m: int = TOP_M) -> BaseStatistics:
    """NLL(base) and the base's top-``top_m`` next-token distribution at every answer position, in one forward pass
    of ``model`` (the BASE model, before training) over ``answers``: what :func:`nll_drift` needs for the NLL drift
    and the KL to the base of a tuned model. Measure the tuned model with the same ``batch_size``, precision and
    device, so that an unchanged model gives exactly 0."""
    if top_m < 1:
        raise ValueError(f"top_m must be ≥ 1, got {top_m}")
    nll, _, stats = _measure(model, tokenizer, answers, batch_size, top_m=top_m)
    ids, logprobs, rest = zip(*stats)
    return BaseStatistics(nll, ids[0].shape[-1], ids, logprobs, rest, answers.key,
                          tuple(len(a) for a in answers.answer_ids))


@dataclass(frozen=True)
class Drift:
    """``drift_nll = tuned_nll − base_nll`` (nats per answer token) over ``n_prompts`` prompts / ``n_tokens``, and
    ``kl_to_base`` = KL_m(base ‖ tuned) per answer token with m = ``top_m`` (the module docstring; None when the
    base statistics were not available, i.e. only ``base_nll`` was given)."""

    drift_nll: float
    tuned_nll: float
    base_nll: float
    n_prompts: int
    n_tokens: int
    kl_to_base: Optional[float] = None
    top_m: Optional[int] = None

    def as_record(self, prefix: str = "retention_") -> dict:
        """Snake-case fields for a run record, units in the names."""
        return {f"{prefix}nll_drift_nats_per_token": self.drift_nll,
                f"{prefix}kl_to_base_nats_per_token": self.kl_to_base, f"{prefix}kl_top_m": self.top_m,
                f"{prefix}tuned_nll_nats_per_token": self.tuned_nll, f"{prefix}base_nll_nats_per_token": self.base_nll,
                f"{prefix}prompts": self.n_prompts, f"{prefix}answer_tokens": self.n_tokens}


def nll_drift(tuned_model, answers: BaseAnswers, tokenizer, base_nll: Optional[float] = None,
              batch_size: int = 8, *, base_stats: Optional[BaseStatistics] = None) -> Drift:
    """NLL drift of ``tuned_model`` on the base ``answers`` (:func:`answer_nll` tuned minus base) and, in the same
    forward pass, its KL to the base (KL_m of the module docstring, a lower bound on the exact KL).

    The base figures come from one of:
    ``base_stats``: :func:`base_statistics` of the base model, measured before training (what full fine-tuning must
    pass; it gives both the base NLL and the KL);
    ``base_nll``: the base model's :func:`answer_nll` alone (then ``kl_to_base`` is None);
    neither: ``tuned_model`` must be a PEFT model, and the base statistics are measured with its adapter disabled
    (``disable_adapter()``, which is exactly the base model for OffPrincipal, LoRA, DoRA, … but not for methods that
    modify the base weights, such as PiSSA's init; pass ``base_stats`` for those).
    """
    if base_stats is not None and base_nll is not None:
        raise ValueError("nll_drift: pass base_stats or base_nll, not both (base_stats carries the base NLL)")
    if base_stats is None and base_nll is None:
        disable = getattr(tuned_model, "disable_adapter", None)
        if disable is None:
            raise ValueError(
                "nll_drift: tuned_model has no adapter to disable, so the base figures are unknown; measure "
                "base_statistics(model, tokenizer, answers) before training and pass it as base_stats"
            )
        with disable():
            base_stats = base_statistics(tuned_model, tokenizer, answers, batch_size)
    tuned, kl, _ = _measure(tuned_model, tokenizer, answers, batch_size, base=base_stats)
    if base_stats is not None:
        base_nll = base_stats.nll
    return Drift(tuned - base_nll, tuned, base_nll, len(answers.prompts), answers.n_tokens, kl,
                 None if base_stats is None else base_stats.top_m)
