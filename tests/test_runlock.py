"""The run-directory lock (resetnet.train.runlock): one process per run directory, stale locks taken over."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resetnet.train import runlock
from resetnet.train.runlock import LOCK_NAME, RunDirError, RunDirLocked, RunLock, prepare_run_dir, read_lock, remove_empty_dirs

RUNLOCK_FILE = Path(runlock.__file__)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not runlock.pid_alive(proc.pid)
    return proc.pid


def write_lock(run_dir: Path, **record) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def holder(tmp_path):
    """A real second process holding the lock of tmp_path/'run'."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = textwrap.dedent(f"""
        import time
        from resetnet.train.runlock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run_dir, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def test_acquire_writes_pid_host_and_start_time_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path).acquire()
    info = read_lock(tmp_path / LOCK_NAME)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # no temporary file left behind
    with pytest.raises(RunDirLocked, match=rf"in use by process {os.getpid()}"):
        RunLock(tmp_path).acquire()  # a second holder in the same process
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    lock.release()  # idempotent


def test_released_on_exceptions(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLock(tmp_path):
            assert (tmp_path / LOCK_NAME).exists()
            1 / 0
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_live_second_process_holds_the_lock(holder, capsys):
    run_dir, proc = holder
    with pytest.raises(RunDirLocked) as info:
        RunLock(run_dir).acquire()
    message = str(info.value)
    assert f"in use by process {proc.pid} on {socket.gethostname()}" in message and "choose another --out" in message
    assert "\n" not in message and info.value.holder["pid"] == proc.pid
    assert read_lock(run_dir / LOCK_NAME)["pid"] == proc.pid  # untouched

    # Killed without cleaning up (SIGKILL): the lock is stale now and taken over, with a line on stderr.
    proc.kill()
    proc.wait()
    warnings = []
    lock = RunLock(run_dir, warn=warnings.append).acquire()
    assert len(warnings) == 1 and f"stale lock {run_dir / LOCK_NAME} of process {proc.pid}" in warnings[0]
    assert "no longer exists" in warnings[0]
    assert read_lock(run_dir / LOCK_NAME)["pid"] == os.getpid()
    lock.release()


def test_a_lock_with_a_live_pid_is_held(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), started="2026-01-01T00:00:00")
    with pytest.raises(RunDirLocked, match=rf"in use by process {os.getpid()} on .* since 2026-01-01T00:00:00"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_and_said_so_on_stderr(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, host=socket.gethostname(), started="2026-01-01T00:00:00")
    lock = RunLock(tmp_path).acquire()
    err = capsys.readouterr().err
    assert f"taking over the stale lock {tmp_path / LOCK_NAME} of process {pid}" in err and f"process {pid} no longer exists" in err
    assert err.count("\n") == 1
    assert read_lock(tmp_path / LOCK_NAME)["token"] == lock.token
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_stale(tmp_path):
    # Our own pid, but recorded with another process start time: the pid was reused (e.g. a restarted container).
    write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), proc_start=1)
    if runlock._proc_start(os.getpid()) is None:
        pytest.skip("no /proc on this platform")
    warnings = []
    RunLock(tmp_path, warn=warnings.append).acquire().release()
    assert "now belongs to another process" in warnings[0]


def test_another_hosts_lock_is_never_stolen(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), host="some-other-host")
    with pytest.raises(RunDirLocked, match=r"on some-other-host .*if no such process runs on some-other-host, delete"):
        RunLock(tmp_path).acquire()


def test_a_hand_written_and_an_unreadable_lock(tmp_path, monkeypatch):
    (tmp_path / LOCK_NAME).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    with pytest.raises(RunDirLocked, match=rf"process {os.getpid()}"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text("")  # being written by someone (or junk): held while fresh, stale when old
    with pytest.raises(RunDirLocked, match="being written or unreadable"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    warnings = []
    RunLock(tmp_path, warn=warnings.append).acquire().release()
    assert "unreadable" in warnings[0]


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    write_lock(tmp_path, pid=12345, host="elsewhere", token="theirs")  # taken over meanwhile (we looked stale)
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME)["token"] == "theirs"


def test_prepare_run_dir(tmp_path, monkeypatch):
    created = prepare_run_dir(tmp_path / "a" / "b")
    assert created == [tmp_path / "a", tmp_path / "a" / "b"] and list((tmp_path / "a" / "b").iterdir()) == []
    remove_empty_dirs(created)
    assert not (tmp_path / "a").exists()
    assert prepare_run_dir(tmp_path) == []

    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match=r"--out .*afile is an existing file, not a directory; choose another --out"):
        prepare_run_dir(tmp_path / "afile")
    with pytest.raises(RunDirError, match=r"cannot create the run directory .*afile/run: .*afile is a file"):
        prepare_run_dir(tmp_path / "afile" / "run")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(runlock.tempfile, "mkstemp", denied)  # as a read-only directory does for a non-root user
    with pytest.raises(RunDirError, match=r"the run directory .*new/run is not writable \(permission denied\)"):
        prepare_run_dir(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # what it created is removed again
