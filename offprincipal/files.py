"""Writing files and folders without ever leaving them half-written, and without touching what is not ours.

- :func:`atomic_file`: the one home of atomic file writes: a temporary file in the same folder, moved into place
  with ``os.replace`` (readers see the old file or the new one, never a part) only when its writer succeeded.
  :func:`write_bytes_atomic` / :func:`write_text_atomic` / :func:`write_json` write through it; :func:`to_json` is the
  strict JSON of every record the project writes (NaN/inf → null).
- :func:`atomic_dir`: build a folder under a hidden temporary name next to the target and rename it into place
  only when complete. The temporary folder holds an owner file (:data:`OWNER_FILE`: host, process id, target)
  that its writer keeps locked (``flock``) for its whole life. A lock, unlike a pid, cannot be mistaken: the
  kernel releases it when the writer dies (SIGKILL, OOM), whatever PID namespace the writer ran in. So a later
  call in the same parent folder removes the temporary folders whose lock is free (:func:`remove_abandoned_temps`),
  and a second writer to the same target is refused before it starts (:class:`FolderBusyError`). Folders without
  a valid owner file of ours are never removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from safetensors import SafetensorError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock can prove a writer gone, so nothing is swept
    fcntl = None

logger = logging.getLogger(__name__)


def _libc_renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc >= 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


_renameat2 = _libc_renameat2()

PathLike = Union[str, os.PathLike]
OWNER_FILE = ".offprincipal-owner.json"
TMP_INFIX = ".tmp-"


WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, SafetensorError)
"""What a failed write raises: safetensors' writer reports the system's errors (ENOSPC on a full disk, EDQUOT,
EFBIG, EIO) as ``SafetensorError``, which is not an ``OSError``."""

_unwritable_warned: set[str] = set()


def cache_unwritable(what: str, location: PathLike, exc: BaseException, hint: str) -> None:
    """Log that the cache ``what`` at ``location`` cannot be written (``exc``) and the run goes on without it: one
    warning per cache location and process, ``hint`` saying how to keep the cache."""
    key = f"{what}\x00{location}"
    if key not in _unwritable_warned:
        _unwritable_warned.add(key)
        logger.warning("%s %s cannot be written (%s: %s); going on without the cache. %s", what, location,
                       type(exc).__name__, exc, hint)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextmanager
def atomic_file(path: PathLike, prefix: Optional[str] = None) -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write (by any writer: ``save_file``, ``savefig``, …); when the block
    ends without an exception it is moved onto ``path`` with ``os.replace`` (readers see the old file or the new one,
    never a part), else removed. Creates the parent folder. ``prefix``: the temporary file's name prefix (default
    ``.<name>.tmp-``), for callers that must tell their own temporary files from others'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}{TMP_INFIX}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        try:
            Path(tmp).unlink(missing_ok=True)  # only when the replace did not happen: the file this call created
        except OSError:
            pass


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`). Creates the parent folder; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


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


# --- temporary folders claimed with a lock --------------------------------------------------------------------

OWNER_FORMAT = 2  # owner records carry {"by": "offprincipal", "format": 2, "host", "pid", "target"} and a lock
_CLAIM_FILE = ".offprincipal-owner.claim"
_MAX_PID = 2**31 - 1  # pid_t


class FolderBusyError(FileExistsError):
    """Another live process is writing the same target folder (its temporary folder's owner file is locked).
    ``str()`` is "<target> <detail>"; ``detail`` says who writes it and what to do."""

    def __init__(self, target: Path, detail: str):
        super().__init__(f"{target} {detail}")
        self.target, self.detail = target, detail


def _lock(fd: int) -> Optional[bool]:
    """Try an exclusive ``flock`` on ``fd`` without waiting: True when taken, False when another open file holds
    it, None when this filesystem or platform has no such locks (then nothing can be proved)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, EBADF on filesystems without flock
        return None


def _owner_record(text: str) -> Optional[dict]:
    """The owner record in ``text`` when it is one this version writes (see :data:`OWNER_FORMAT`), else None."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    ok = (
        isinstance(record, dict) and record.get("by") == "offprincipal" and record.get("format") == OWNER_FORMAT
        and isinstance(record.get("host"), str) and type(record.get("pid")) is int and 0 < record["pid"] <= _MAX_PID
    )
    return record if ok else None


def _describe_owner(folder: Path) -> str:
    """"pid P on host H" from ``folder``'s owner file, as far as it can be read (for messages only)."""
    probe = _Probe(folder, lock=False)
    try:
        record = probe.record() if probe.fd is not None else None
    finally:
        probe.close()
    return f"pid {record['pid']} on host {record['host']}" if record else "owner file unreadable"


class _Probe:
    """The owner file of a temporary folder, opened (never through a symlink) to probe its writer's lock.

    ``state``: "missing" (no regular owner file: not ours, or a writer that is finishing), "live" (its lock is
    held by an open file, in any process or PID namespace of this kernel, or through a filesystem that shares
    locks), "unknown" (no locks here, or ``lock=False``: only opened, to read the record), or "free" (this probe
    now holds the lock, so no writer can hold it).
    """

    def __init__(self, folder: Path, lock: bool = True):
        self.folder, self.fd, self.state = folder, None, "missing"
        path = folder / OWNER_FILE
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            info = os.fstat(self.fd)
        except OSError:
            self.close()
            return
        if not stat.S_ISREG(info.st_mode):
            self.close()
            return
        if not lock:
            self.state = "unknown"
            return
        taken = _lock(self.fd)
        self.state = {True: "free", False: "live", None: "unknown"}[taken]
        if taken:  # the file may have been renamed away (its writer finished) since we opened it
            try:
                now = os.stat(path, follow_symlinks=False)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                self.close()
                self.state = "missing"

    def record(self) -> Optional[dict]:
        """The owner record (:func:`_owner_record`) in the first 4 KiB of the open owner file."""
        return _owner_record(os.pread(self.fd, 4096, 0).decode("utf-8", errors="replace"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _temps(parent: Path, name: str = "*") -> list[Path]:
    """Folders in ``parent`` named like a temporary folder of :func:`atomic_dir` (for target ``name``)."""
    return [p for p in Path(parent).glob(f".{name}{TMP_INFIX}*") if p.is_dir() and not p.is_symlink()]


def remove_abandoned_temps(parent: PathLike) -> list[Path]:
    """Remove the temporary folders in ``parent`` (of any target) whose writer is gone; returns them.

    A folder is removed only when all of these hold: it is a real folder (not a symlink) named like ours, it holds
    a regular owner file with a record of this format naming this host, and the lock on that owner file is free —
    so no process holds it open, whatever its PID namespace. Its writer holds that lock for its whole life and the
    kernel drops it when the writer dies (SIGKILL, OOM, power loss), so a free lock is proof, not a pid guess.
    The host is checked too because a network filesystem may not carry locks between machines. A folder whose
    owner file is malformed or of an older format (no lock) is left in place with a warning naming it.
    """
    removed = []
    for folder in _temps(Path(parent)):
        probe = _Probe(folder)
        try:
            if probe.state != "free":
                continue
            record = probe.record()
            if record is None:
                logger.warning(
                    "%s: its owner file %s is not one this version writes (malformed, or from an older version "
                    "without a lock), so it is left in place; delete it yourself if no process is writing it",
                    folder, OWNER_FILE,
                )
            elif record["host"] == socket.gethostname():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            probe.close()
    return removed


def _claim(tmp: Path, target: Path) -> int:
    """Write ``tmp``'s owner file and lock it; returns the locked descriptor (keep it open while writing).

    The record is written and locked under a claim name first and then renamed into place, so an owner file is
    never seen unlocked while its writer lives."""
    record = {"by": "offprincipal", "format": OWNER_FORMAT, "host": socket.gethostname(), "pid": os.getpid(),
              "target": target.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    fd = os.open(tmp / _CLAIM_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _lock(fd)
        os.write(fd, json.dumps(record).encode())
        os.rename(tmp / _CLAIM_FILE, tmp / OWNER_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _rival(tmp: Path, target: Path) -> Optional[Path]:
    """Another temporary folder for ``target`` whose writer is alive, if any."""
    for folder in _temps(target.parent, target.name):
        if folder != tmp:
            probe = _Probe(folder)
            probe.close()
            if probe.state == "live":
                return folder
    return None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` when ``dst`` exists, even as an empty folder (which
    ``os.rename`` would silently replace). Linux ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem
    have it, else a check just before ``os.rename``."""
    if _renameat2 is not None:
        if _renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


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

    On entry, the abandoned temporary folders of any earlier call in the same parent are removed
    (:func:`remove_abandoned_temps`), and the new folder is claimed: its owner file names this process and stays
    locked until the call ends. Raises ``FileExistsError`` when ``target`` exists (nothing is overwritten),
    :class:`FolderBusyError` — before the block runs — when another live process is writing ``target``, and
    ``OSError`` when the folder cannot be created. When the block fails (an exception, KeyboardInterrupt, or
    SIGTERM turned into an exception), the temporary folder is removed, and so are the parent folders this call
    created if they are left empty. When something else created ``target`` while the block ran, nothing is
    replaced and the complete output is not deleted: ``FileExistsError`` names the folder it is kept in.
    """
    target = Path(target).expanduser()
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} already exists")
    created = _missing_parents(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd, done = None, None, False
    try:
        remove_abandoned_temps(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_INFIX}", dir=target.parent))
        fd = _claim(tmp, target)
        rival = _rival(tmp, target)  # both claims precede both checks, so of two racing writers one sees the other
        if rival is not None:
            raise FolderBusyError(target, f"is being written by another process ({_describe_owner(rival)}, "
                                          f"temporary folder {rival.name}); wait for it to finish, or choose another folder")
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} already exists")
        yield tmp
        try:
            _rename_noreplace(tmp, target)
        except FileExistsError:
            (tmp / OWNER_FILE).unlink()  # unclaimed: no later call removes it
            done = True
            raise FileExistsError(
                f"{target} appeared while it was being written; the complete output is kept in {tmp}; move it "
                "where you want it"
            ) from None
        (target / OWNER_FILE).unlink()
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
        if fd is not None:
            os.close(fd)  # releases the lock, after the folder is renamed, kept or removed
