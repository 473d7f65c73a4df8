"""Run directories: check that one can be written before any work starts, and lock it to one process.

* :func:`prepare_run_dir` creates the directory (and missing parents), writes and deletes a probe
  file, and returns the directories it created, so a run that fails before writing anything can
  remove them again (:func:`remove_empty_dirs`). A path that is a file, a read-only file system
  or a permission problem is a :class:`RunDirError` naming the fix.
* :class:`RunLock` holds an exclusive ``flock`` on ``DIR/.lock``, a file that records the holder's
  pid, host and start time. The operating system releases the lock when its process ends, however
  it ends, so a lock left by a crashed or killed run is free again (stale) without any guesswork;
  taking over such a file logs one line naming its last holder (a released lock leaves the file empty). A live holder makes
  :meth:`RunLock.acquire` raise :class:`RunDirLocked` naming its pid.
"""

from __future__ import annotations

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
    """Create ``path`` if needed and check that a file can be written and deleted in it.

    Returns the directories this call created, outermost first (empty when ``path`` existed).
    Raises :class:`RunDirError` (nothing left behind) when ``path`` or a parent is a file, or the
    directory cannot be created or written.
    """
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

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock; raise :class:`RunDirLocked` naming the holder when another live process has it."""
        if self.held or fcntl is None:
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
            since = f" since {info['started']}" if info.get("started") else ""
            raise RunDirLocked(
                f"{self.run_dir} is in use by process {pid} on {host}{since} (lock {self.path}); wait for it to finish, "
                f"stop it (kill {pid}: it saves a checkpoint, then continue with --resume), or choose another --out",
                info,
            ) from None
        previous = read_lock(self.path)
        if previous and previous.get("pid") not in (None, os.getpid()):
            log.warning(
                "resetnet: taking over the stale lock %s of process %s on %s (started %s): it no longer runs",
                self.path,
                previous.get("pid"),
                previous.get("host"),
                previous.get("started"),
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Release the lock (a no-op when not held). The file stays, emptied (a record left in it means
        that its process ended without releasing: a crash, which the next holder reports), unless
        ``remove`` (a run that wrote nothing removes what it created)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path) if remove else os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
