"""Run directories: :func:`prepare_run_dir` checks that one can be written before any work starts; :class:`RunLock` locks it to one
process with an exclusive ``flock`` on ``DIR/.lock`` (a file recording the holder's pid, host and start time), which the OS releases
when the process ends, however it ends: a crashed run's lock is free again."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import RunDirError, RunDirLocked

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked
    fcntl = None

__all__ = ["LOCK_NAME", "RunDirError", "RunDirLocked", "RunLock", "prepare_run_dir", "remove_empty_dirs", "read_lock"]

LOCK_NAME = ".lock"
log = logging.getLogger("resetnet")


def _reason(err: OSError) -> str:
    return {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "read-only file system",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
    }.get(err.errno, err.strerror or type(err).__name__)


def prepare_run_dir(path: str | os.PathLike[str], what: str = "run directory", flag: str = "--out") -> list[Path]:
    """Create ``path`` if needed and check that a file can be written and deleted in it; returns the directories this call created,
    outermost first, for :func:`remove_empty_dirs`. Raises :class:`RunDirError` (nothing left behind) when ``path`` or a parent
    is a file, or the directory cannot be created or written."""
    path = Path(path).expanduser()
    fix = f"choose another {flag}" if flag else "choose another directory"
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{flag} {path} is an existing file, not a directory; {fix} (a new or existing directory)")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise RunDirError(f"cannot create the {what} {path}: {blocker} is a file, not a directory; {fix}")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir(exist_ok=True)
            except OSError as err:
                raise RunDirError(f"cannot create the {what} {path}: {_reason(err)} creating {d}; {fix} or fix the permissions") from None
            created.append(d)
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
            try:
                os.write(fd, b"resetnet write probe\n")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise RunDirError(f"the {what} {path} is not writable ({_reason(err)}); {fix}, fix its permissions or free space") from None
    except BaseException:
        remove_empty_dirs(created)
        raise
    return created


def remove_empty_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`prepare_run_dir` created, innermost first, as long as they are empty."""
    for d in reversed(list(created)):
        try:
            os.rmdir(d)
        except OSError:
            return


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record in a lock file (``pid``, ``host``, ``started``), ``{}`` when unreadable, None when absent."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The lock of one run directory: ``with RunLock(run_dir):`` or ``acquire()`` ... ``release()``."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (logging the last holder of a crashed run's lock); raise :class:`RunDirLocked` naming a live holder."""
        if self._fd is not None or fcntl is None:  # already held, or no flock (Windows)
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"cannot create the lock {self.path} ({_reason(err)}); choose another --out or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            info = read_lock(self.path) or {}
            pid, host = info.get("pid", "unknown"), info.get("host") or "this machine"
            where = f"{self.run_dir} is in use by process {pid} on {host}" + (f" since {info['started']}" if info.get("started") else "")
            raise RunDirLocked(
                f"{where} (lock {self.path}); wait for it to finish, "
                f"stop it (kill {pid}: it saves a checkpoint, then continue with --resume), or choose another --out",
                info,
                where,
            ) from None
        previous = read_lock(self.path)
        if previous and previous.get("pid") not in (None, os.getpid()):
            holder = (previous.get(k) for k in ("pid", "host", "started"))
            log.warning("resetnet: taking over the stale lock %s of process %s on %s (started %s): it no longer runs", self.path, *holder)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Release the lock (a no-op when not held). The file stays, emptied (a record left in it marks a crash,
        which the next holder reports), unless ``remove`` (a run that wrote nothing removes what it created)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path) if remove else os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
