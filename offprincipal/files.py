"""Writing files and folders without ever leaving them half-written, and without touching what is not ours.

- :func:`write_text_atomic` / :func:`write_json`: write to a temporary file in the same folder, then
  ``os.replace`` it into place (readers see the old file or the new one, never a part); :func:`to_json` is the
  strict JSON of every record the project writes (NaN/inf → null).
- :func:`atomic_dir`: build a folder under a hidden temporary name next to the target and rename it into place
  only when complete. The temporary folder holds an owner file (:data:`OWNER_FILE`: host and process id), so a
  later call can tell a folder left by a killed process (SIGKILL, power loss) from one still being written, and
  removes only the former. Folders without that owner file are never removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
OWNER_FILE = ".offprincipal-owner.json"
TMP_INFIX = ".tmp-"


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then ``os.replace``): readers
    see the old file or the new one, never a part. Creates the parent folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_json(data, indent: Optional[int] = None) -> str:
    """Strict JSON text of ``data``: NaN and ±inf floats (anywhere in nested dicts/lists) become null."""
    return json.dumps(_finite_or_none(data), indent=indent, allow_nan=False)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: PathLike, data, indent: Optional[int] = 2) -> Path:
    """``data`` as strict JSON (:func:`to_json`), written atomically."""
    return write_text_atomic(path, to_json(data, indent=indent) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _abandoned(folder: Path) -> bool:
    """True when ``folder`` carries our owner file naming a process of this host that no longer runs."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        return owner["host"] == socket.gethostname() and not _pid_alive(int(owner["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_abandoned_temps(parent: Path, name: str) -> list[Path]:
    """Remove the temporary folders of ``atomic_dir(parent / name)`` whose writer died; returns them."""
    removed = []
    for folder in Path(parent).glob(f".{name}{TMP_INFIX}*"):
        if folder.is_dir() and not folder.is_symlink() and _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _missing_parents(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, innermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextmanager
def atomic_dir(target: PathLike) -> Iterator[Path]:
    """A fresh temporary folder next to ``target``, renamed to ``target`` when the block succeeds.

    When the block fails (an exception, KeyboardInterrupt, or SIGTERM turned into an exception), the temporary
    folder is removed, and so are the parent folders this call created if they are left empty. Temporary folders
    of earlier calls for the same target whose process died are removed first. Raises ``FileExistsError`` when
    ``target`` exists (nothing is overwritten) and ``OSError`` when the folder cannot be created.
    """
    target = Path(target).expanduser()
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists")
    created = _missing_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, done = None, False
    try:
        remove_abandoned_temps(target.parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_INFIX}", dir=target.parent))
        (tmp / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        yield tmp
        (tmp / OWNER_FILE).unlink()
        os.rename(tmp, target)
        done = True
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # innermost first; stop at the first one that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
