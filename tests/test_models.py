"""Model loading: cache locations, atomic one-off GGUF conversion, and the real embedded SmolLM2 (real_model)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from offprincipal.experiment import models
from offprincipal.files import OWNER_FILE
from conftest import make_tiny_model, make_tokenizer


# --- cache locations ---------------------------------------------------------------------------------------------


def test_model_cache_dir_prefers_model_dir_then_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("OFFPRINCIPAL_MODEL_DIR", raising=False)
    monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path / "root"))
    assert models.model_cache_dir() == tmp_path / "root" / "models"
    assert models.default_model_dir() == tmp_path / "root" / "models" / models.DEFAULT_MODEL_NAME
    monkeypatch.setenv("OFFPRINCIPAL_MODEL_DIR", str(tmp_path / "mdl"))
    assert models.model_cache_dir() == tmp_path / "mdl"


def test_model_cache_dir_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv("OFFPRINCIPAL_MODEL_DIR", raising=False)
    monkeypatch.delenv("OFFPRINCIPAL_CACHE_DIR", raising=False)
    assert models.model_cache_dir() == Path.home() / ".cache" / "offprincipal" / "models"


def test_load_model_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        models.load_model(missing)
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        models.load_model("./nowhere.gguf")


def test_load_model_local_directory_roundtrip(tmp_path):
    make_tiny_model().save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    model, tok = models.load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.chat_template is not None


# --- atomic conversion (GGUF loading faked by a tiny model) --------------------------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file and a counting fake of ``load_gguf`` (the real one takes ~20 s)."""
    gguf = tmp_path / "src" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def fake_load(path, dtype=torch.float32):
        calls.append(Path(path))
        return make_tiny_model(), make_tokenizer()

    monkeypatch.setattr(models, "load_gguf", fake_load)
    return gguf, calls


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(models._TMP_PREFIX)]


def test_convert_is_complete_and_idempotent(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    target = tmp_path / "models" / "M"
    assert models.convert_gguf(gguf, target) == target
    assert json.loads((target / models.MARKER).read_text())["source_size"] == gguf.stat().st_size
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    models.convert_gguf(gguf, target)
    assert len(calls) == 1
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("crash_at", ["save", "rename"])
def test_interrupted_conversion_leaves_nothing_loadable(fake_gguf, tmp_path, monkeypatch, crash_at):
    gguf, _ = fake_gguf
    target = tmp_path / "models" / "M"
    if crash_at == "save":  # dies while writing the directory
        monkeypatch.setattr(models, "load_gguf", lambda path, dtype=None: (make_tiny_model(), None))
    else:  # dies after the marker was written, just before the directory is renamed into place
        real_replace = models.os.replace

        def replace(src, dst):
            if Path(dst) == target:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(models.os, "replace", replace)
    with pytest.raises((KeyboardInterrupt, AttributeError)):
        models.convert_gguf(gguf, target)
    assert not target.exists()
    assert _leftovers(target.parent) == []
    monkeypatch.undo()
    monkeypatch.setattr(models, "load_gguf", lambda path, dtype=None: (make_tiny_model(), make_tokenizer()))
    models.convert_gguf(gguf, target)
    assert (target / models.MARKER).is_file()


def test_older_conversion_and_stale_temps_are_replaced(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    target = tmp_path / "models" / "M"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{stale")
    (target / models.MARKER).write_text(json.dumps({"format": 0, "source": "old.gguf", "source_size": 1}))
    stale = target.parent / f"{models._TMP_PREFIX}M-crashed"
    stale.mkdir()
    (stale / OWNER_FILE).touch()
    models.convert_gguf(gguf, target)
    assert len(calls) == 1 and (target / models.MARKER).is_file()
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert _leftovers(target.parent) == []


def test_changed_source_triggers_reconversion(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    target = tmp_path / "models" / "M"
    models.convert_gguf(gguf, target)
    gguf.write_bytes(b"GGUF" + bytes(100))
    models.convert_gguf(gguf, target)
    assert len(calls) == 2


def test_concurrent_conversions_convert_once(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    target = tmp_path / "models" / "M"
    errors = []

    def work():
        try:
            models.convert_gguf(gguf, target)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1
    assert (target / models.MARKER).is_file() and _leftovers(target.parent) == []


def test_ensure_default_model_uses_model_dir(fake_gguf, tmp_path, monkeypatch):
    gguf, calls = fake_gguf
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setenv("OFFPRINCIPAL_MODEL_DIR", str(tmp_path / "stable"))
    path = models.ensure_default_model()
    assert path == tmp_path / "stable" / models.DEFAULT_MODEL_NAME
    assert models.ensure_default_model() == path and len(calls) == 1


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_model_store_on_a_full_disk_loads_the_gguf_with_one_warning(fake_gguf, tmp_path, monkeypatch, caplog, error):
    """Issue 17, finding 9 (the model store is a cache too): a conversion whose write fails as on a full disk
    (safetensors raises SafetensorError, not OSError; other writes ENOSPC) used to end the run. Now: one warning,
    the model is loaded from its GGUF file, nothing is left in the store."""
    import errno
    import logging

    from safetensors import SafetensorError

    gguf, calls = fake_gguf
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setenv("OFFPRINCIPAL_MODEL_DIR", str(tmp_path / "store"))
    failure = (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                               'left on device" })') if error == "safetensors"
               else OSError(errno.ENOSPC, "No space left on device"))

    def full_disk(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(type(make_tiny_model()), "save_pretrained", full_disk)
    with caplog.at_level(logging.WARNING):
        model, tokenizer = models.load_model()
        models.load_model()
    assert model is not None and tokenizer is not None and len(calls) == 4  # two failed conversions, two GGUF loads
    warned = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warned) == 1 and "model cache" in warned[0] and "No space left" in warned[0], caplog.text
    assert not (tmp_path / "store" / models.DEFAULT_MODEL_NAME).exists()
    assert [p for p in (tmp_path / "store").iterdir() if not p.name.endswith(".lock")] == []


# --- the real embedded model --------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_embedded_model_loads_clean_and_answers(smollm2_dir):
    assert smollm2_dir == models.ensure_default_model()
    model, tok = models.load_model()
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    assert "<|im_start|>" in tok.chat_template

    msgs = [{"role": "user", "content": "What is 7+5?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "12" in answer, answer


def test_unknown_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="load_model: could not load 'no-such-org/no-such-model'"):
        models.load_model("no-such-org/no-such-model")
