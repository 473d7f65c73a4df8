"""Run directories: check that one can be written before any work starts, and lock it to one process.

* :func:`prepare_run_dir` creates the directory (and missing parents), writes and deletes a
  probe file, and returns the directories it created, so a run that fails before writing
  anything can remove them again (:func:`remove_empty_dirs`). A path that is a file, a
  parent that is a file, a read-only file system or a permission problem is a
  :class:`RunDirError` with a one-line message naming the fix.
* :class:`RunLock` is the file ``DIR/.lock`` holding the holder's pid, host name and start
  time (JSON). It is created atomically (a complete temporary file hard-linked into place,
  or ``O_CREAT | O_EXCL`` where links are not supported), so two processes can never both
  hold it. A lock whose process no longer exists on this host (or whose pid now belongs to
  a process started later, or that was written before the machine rebooted) is stale: it is
  taken over, with one line on stderr. A live holder makes :meth:`RunLock.acquire` raise
  :class:`RunDirLocked` naming the pid. The lock is released (the file removed, only if it
  is still ours) by :meth:`RunLock.release`, by the context manager and at interpreter exit.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from typing import Any, Callable

from ..errors import RunDirError, RunDirLocked

__all__ = ["LOCK_NAME", "RunDirError", "RunDirLocked", "RunLock", "prepare_run_dir", "remove_empty_dirs", "read_lock", "pid_alive"]

LOCK_NAME = ".lock"

#: A lock file that cannot be parsed and is older than this many seconds is stale (junk).
UNREADABLE_STALE_S = 10.0




# ----------------------------------------------------------------------------- writable directory
def _reason(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return err.strerror or type(err).__name__


def prepare_run_dir(path: str | os.PathLike[str], what: str = "run directory", flag: str = "--out") -> list[Path]:
    """Create ``path`` if needed and check that a file can be written and deleted in it.

    Returns the directories this call created, outermost first (empty when ``path`` existed).
    Raises :class:`RunDirError` (nothing left behind) when ``path`` is a file, a parent is a
    file, or the directory cannot be created or written.
    """
    path = Path(path).expanduser()
    fix = f"choose another {flag}" if flag else "choose another directory"
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{flag + ' ' if flag else ''}{path} is an existing file, not a directory; {fix} (a new or existing directory)")
    missing: list[Path] = []
    node = path
    while not node.exists():
        if node.is_symlink():  # a dangling link
            raise RunDirError(f"cannot create the {what} {path}: {node} is a broken symbolic link; {fix}")
        missing.append(node)
        if node.parent == node:
            break
        node = node.parent
    if node.exists() and not node.is_dir():
        raise RunDirError(f"cannot create the {what} {path}: {node} is a file, not a directory; {fix}")
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # created concurrently
                if not d.is_dir():
                    raise RunDirError(f"cannot create the {what} {path}: {d} is a file, not a directory; {fix}") from None
                continue
            except OSError as err:
                raise RunDirError(f"cannot create the {what} {path}: {_reason(err)} creating {d}; {fix} or fix the permissions") from None
            created.append(d)
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        except OSError as err:
            raise RunDirError(f"the {what} {path} is not writable ({_reason(err)}); {fix} or fix its permissions") from None
        try:
            try:
                os.write(fd, b"resetnet write probe\n")
            finally:
                os.close(fd)
        except OSError as err:
            raise RunDirError(f"cannot write in the {what} {path} ({_reason(err)}); {fix} or free space") from None
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass
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


# ----------------------------------------------------------------------------- lock
def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True  # cannot tell: assume it is alive (never steal a live lock)
    return True


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _hostname() -> str:
    return socket.gethostname()


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record of a lock file (``pid``, ``host``, ``started``, ...), ``{}`` when unreadable, None when absent."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            return data
    except ValueError:
        pass
    # A hand-written lock: "PID [HOST [START...]]" on the first line(s).
    parts = text.split()
    if parts and parts[0].isdigit():
        out: dict[str, Any] = {"pid": int(parts[0])}
        if len(parts) > 1:
            out["host"] = parts[1]
        if len(parts) > 2:
            out["started"] = " ".join(parts[2:])
        return out
    return {}


_HELD: dict[str, "RunLock"] = {}


def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(_release_all)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


class RunLock:
    """The lock of one run directory (``DIR/.lock``); see the module docstring.

    ``with RunLock(run_dir):`` or ``lock = RunLock(run_dir).acquire(); ...; lock.release()``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], warn: Callable[[str], None] = _warn) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.warn = warn
        self.token = uuid.uuid4().hex
        self.held = False

    # ------------------------------------------------------------- record
    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": _hostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_unix": time.time(),
            "proc_start": _proc_start(pid),
            "boot_id": _boot_id(),
            "argv": " ".join(sys.argv)[:300],
            "token": self.token,
        }

    def _create(self) -> bool:
        """Create the lock file with our complete record; False if it exists."""
        data = (json.dumps(self._record(), indent=1) + "\n").encode("utf-8")
        tmp = self.run_dir / f"{LOCK_NAME}.{os.getpid()}-{self.token[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # atomic, fails if the lock exists; the file is complete when it appears
                return True
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                    raise
            try:  # no hard links on this file system
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError as err:
            raise RunDirError(f"cannot create the lock {self.path} ({_reason(err)}); choose another --out or fix its permissions") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _stale_reason(self, info: dict[str, Any]) -> str | None:
        """Why the lock ``info`` is stale, or None when its holder may be alive."""
        if not info:
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return None
            return f"the lock file is unreadable and {age:.0f} s old" if age > UNREADABLE_STALE_S else None
        host = info.get("host")
        if host and host != _hostname():
            return None  # another machine's process: cannot tell
        boot = info.get("boot_id")
        if boot and _boot_id() and boot != _boot_id():
            return "the machine has rebooted since it was taken"
        pid = int(info["pid"])
        if not pid_alive(pid):
            return f"process {pid} no longer exists"
        started = info.get("proc_start")
        now = _proc_start(pid)
        if started is not None and now is not None and int(started) != now:
            return f"pid {pid} now belongs to another process"
        return None

    def _locked_error(self, info: dict[str, Any]) -> RunDirLocked:
        if not info:
            return RunDirLocked(
                f"{self.run_dir} is locked ({self.path} is being written or unreadable); try again in a few seconds, "
                f"or delete {self.path} if no process is training into {self.run_dir}", info)
        pid, host = info.get("pid"), info.get("host") or "this machine"
        since = f" since {info['started']}" if info.get("started") else ""
        here = not info.get("host") or info.get("host") == _hostname()
        if here:
            how = (f"wait for it to finish, stop it (kill {pid}: it saves a checkpoint, then continue with --resume), "
                   f"or choose another --out; if pid {pid} is not a resetnet process, delete {self.path}")
        else:
            how = (f"wait for it to finish or stop it there, or choose another --out; if no such process runs on {host}, "
                   f"delete {self.path}")
        return RunDirLocked(f"{self.run_dir} is in use by process {pid} on {host}{since} (lock {self.path}); {how}", info)

    # ------------------------------------------------------------- API
    def acquire(self) -> "RunLock":
        """Take the lock (taking over a stale one, with a line on stderr); raise :class:`RunDirLocked` if held."""
        if self.held:
            return self
        key = str(self.path.resolve())
        if key in _HELD:
            raise self._locked_error(read_lock(self.path) or {"pid": os.getpid(), "host": _hostname()})
        for _ in range(10):
            if self._create():
                self.held = True
                _HELD[key] = self
                return self
            info = read_lock(self.path)
            if info is None:
                continue  # released meanwhile: try again
            reason = self._stale_reason(info)
            if reason is None:
                raise self._locked_error(info)
            if self._take_over(info):
                who = f"process {info['pid']} on {info.get('host') or 'this machine'}" if info else "an unknown process"
                started = f", started {info['started']}" if info.get("started") else ""
                self.warn(f"resetnet: taking over the stale lock {self.path} of {who}{started}: {reason}")
        raise RunDirLocked(f"{self.run_dir}: could not take the lock {self.path} (other processes keep taking it); choose another --out")

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Move the stale lock aside (atomically); put it back if it was replaced meanwhile by a live one."""
        aside = self.run_dir / f"{LOCK_NAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise RunDirError(f"cannot remove the stale lock {self.path} ({_reason(err)}); delete it by hand") from None
        moved = read_lock(aside)
        same = moved == stale if stale else not moved
        if not same:  # another process replaced the stale lock with its own in between: give it back
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            try:
                os.unlink(aside)
            except OSError:
                pass
            raise self._locked_error(moved or {})
        try:
            os.unlink(aside)
        except OSError:
            pass
        return True

    def release(self) -> None:
        """Remove the lock file if it is still ours (a no-op when not held)."""
        if not self.held:
            return
        self.held = False
        _HELD.pop(str(self.path.resolve()), None)
        info = read_lock(self.path)
        if info and info.get("token") == self.token:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
