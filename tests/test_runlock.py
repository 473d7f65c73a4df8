"""The run-directory lock (resetnet.train.runlock): one process per run directory, stale locks taken over."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resetnet.train import runlock
from resetnet.train.runlock import LOCK_NAME, RunDirError, RunDirLocked, RunLock, prepare_run_dir, read_lock, remove_empty_dirs

RUNLOCK_FILE = Path(runlock.__file__)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
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


def test_acquire_writes_pid_host_and_start_time_and_release_frees_it(tmp_path):
    lock = RunLock(tmp_path).acquire()
    info = read_lock(tmp_path / LOCK_NAME)
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]  # no temporary file left behind
    with pytest.raises(RunDirLocked, match=rf"in use by process {os.getpid()}"):
        RunLock(tmp_path).acquire()  # a second holder, even in the same process
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME) == {}  # released: the file is left empty
    lock.release()  # idempotent
    RunLock(tmp_path).acquire().release()  # free again


def test_released_on_exceptions(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLock(tmp_path):
            assert read_lock(tmp_path / LOCK_NAME)["pid"] == os.getpid()
            1 / 0
    with RunLock(tmp_path):  # free again
        pass


def test_a_live_second_process_holds_the_lock_until_it_dies(holder, caplog):
    run_dir, proc = holder
    with pytest.raises(RunDirLocked) as info:
        RunLock(run_dir).acquire()
    message = str(info.value)
    assert f"in use by process {proc.pid} on {socket.gethostname()}" in message and "choose another --out" in message
    assert "\n" not in message and info.value.holder["pid"] == proc.pid
    assert read_lock(run_dir / LOCK_NAME)["pid"] == proc.pid  # untouched

    # Killed without cleaning up (SIGKILL): the operating system released its lock; taken over, with a line in the log.
    proc.kill()
    proc.wait()
    with caplog.at_level("WARNING", logger="resetnet"):
        lock = RunLock(run_dir).acquire()
    assert f"stale lock {run_dir / LOCK_NAME} of process {proc.pid}" in caplog.text and "no longer runs" in caplog.text
    assert read_lock(run_dir / LOCK_NAME)["pid"] == os.getpid()
    lock.release()


def test_a_lock_file_nobody_holds_is_free(tmp_path, caplog):
    write_lock(tmp_path, pid=dead_pid(), host=socket.gethostname(), started="yesterday")
    with caplog.at_level("WARNING", logger="resetnet"):
        RunLock(tmp_path).acquire().release()
    assert "taking over the stale lock" in caplog.text
    (tmp_path / LOCK_NAME).write_text("garbage")  # an unreadable file is no lock either
    RunLock(tmp_path).acquire().release()


def test_train_refuses_a_locked_run_directory(holder, capsys):
    from resetnet.cli import main

    run_dir, proc = holder
    code = main(["train", "--config", "smoke", "--out", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"in use by process {proc.pid}" in err


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
