"""Models, adapters and run folders as the command line names them: loading them, and checking that an adapter
meets the base it was trained on.

A model is named by a folder, a ``.gguf`` file, a hub id, or :data:`EMBEDDED` (the embedded SmolLM2-135M-Instruct).
A run folder of ``offprincipal train`` records its base (``base_model``, ``base_fingerprint`` in ``summary.json``);
an adapter is loaded onto that base, and a base given instead is checked against the fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .errors import UsageError

EMBEDDED = "embedded"


def model_source(value: Optional[str]) -> Optional[str]:
    """``None``/``"embedded"`` → None (the embedded SmolLM2-135M-Instruct), else the path or hub id."""
    return None if value in (None, EMBEDDED) else value


def describe_model(value: Optional[str]) -> str:
    return "embedded SmolLM2-135M-Instruct" if model_source(value) is None else str(value)


def base_spec(value: Optional[str]) -> str:
    """How a run records its base so that ``evaluate`` can load it again: ``embedded``, an absolute path, or the
    hub id as given."""
    source = model_source(value)
    if source is None:
        return EMBEDDED
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def base_fingerprint(model) -> str:
    """One BLAKE2b digest over the fingerprints of the model's linear weights (names, dtypes, shapes, bytes; the
    same digest an OffPrincipal adapter records for its targets, :func:`offprincipal.tuner.fingerprint.base_fingerprint`):
    equal only for the same weights in the same dtype."""
    from transformers.pytorch_utils import Conv1D

    from ..tuner.fingerprint import base_fingerprint as digest

    return digest({name: module for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D))})


def load(value: Optional[str], device: str = "cpu", option: str = "--model", dtype=None):
    """(model, tokenizer) via :func:`offprincipal.experiment.models.load_model` (fp32 unless ``dtype``); load failures become a
    UsageError naming ``option``."""
    from .models import load_model

    source = model_source(value)
    try:
        return load_model(source, dtype=dtype or torch.float32, device=device)
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        if source is None:
            raise UsageError(f"{option}: {' '.join(str(exc).split())}") from exc
        raise UsageError(
            f"{option} {value}: cannot load a model from it ({type(exc).__name__}); pass an existing model folder, "
            f"a .gguf file, a hub id cached locally, or '{EMBEDDED}' for the embedded SmolLM2-135M-Instruct"
        ) from exc


def check_top_k(model, top_k: int, option: str = "--top-k") -> None:
    """Every linear weight (the output head aside) must allow 1 ≤ k < min(m, n)."""
    from ..metrics import linear_weights
    from ..subspace import resolve_top_k

    for name, weight in linear_weights(model).items():
        try:
            resolve_top_k(top_k, tuple(weight.shape), name)
        except ValueError as exc:
            limit = min(weight.shape)
            raise UsageError(f"{option} {top_k}: too large for {name} ({weight.shape[0]}×{weight.shape[1]}); "
                           f"pass {option} < {limit}") from exc


def tuned_checkpoint(value: str) -> Path:
    """TUNED as given: a model folder, an adapter folder, or a ``train`` run folder (its adapter/ or model/)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise UsageError(f"TUNED {value}: not found; pass a model folder, an adapter folder or a run folder of `train`")
    for sub in ("adapter", "model"):
        if (path / sub).is_dir() and not (path / "config.json").exists():
            return path / sub
    return path


def recorded_base(tuned: Path) -> tuple[Optional[str], Optional[str]]:
    """(base, base fingerprint) recorded by ``train`` in the run folder holding ``tuned`` (``run/adapter``), else
    (None, None). Runs recorded before the base was stored name it only in their ``model`` field."""
    summary = tuned.parent / "summary.json"
    if tuned.name not in ("adapter", "model") or not summary.is_file():
        return None, None
    try:
        run = json.loads(summary.read_text())["run"]
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{summary}: unreadable run summary ({exc}); pass the adapter folder and --base") from exc
    if "base_model" in run:
        return run["base_model"], run.get("base_fingerprint")
    described = run.get("model")
    return (EMBEDDED if described == describe_model(None) else described), None


def load_tuned(base: Optional[str], tuned: Path, option: str = "BASE"):
    """(tuned model, tokenizer); an adapter folder (adapter_config.json) is loaded onto its base and merged.

    The base is ``base`` when given, else the one the run folder records; a given base is checked against the
    recorded fingerprint, so an adapter is never evaluated on weights it was not trained on."""
    if not (tuned / "adapter_config.json").exists():
        return load(str(tuned), option="TUNED")
    from peft import PeftModel

    import offprincipal  # noqa: F401 - registers the OffPrincipal PEFT method for adapters saved by it

    recorded, recorded_fp = recorded_base(tuned)
    model, tokenizer = load(base if base is not None else recorded, option=option)
    if recorded_fp is not None and base_fingerprint(model) != recorded_fp:
        given = f"{option} {base}" if base is not None else f"the recorded base {recorded}"
        raise UsageError(f"{given}: its weights differ from the base the run {tuned.parent} was trained on "
                       f"({recorded}); pass that base (an adapter only makes sense on its own base)")
    return PeftModel.from_pretrained(model, str(tuned)).merge_and_unload(), tokenizer
