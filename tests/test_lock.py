"""The model dir's writer lock: one writer, stale locks taken over, a lost lock noticed."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from matlm.model_dir.lock import (LOCK_FILE_NAME, LockError, LockHeldError,
                                  LockRefreshError, WriterLock)


def _holder(path):
    return json.loads((path / LOCK_FILE_NAME).read_text())


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with WriterLock(tmp_path / "run") as first:
        with pytest.raises(LockHeldError) as e:
            WriterLock(tmp_path / "run").acquire()
        message = str(e.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "\n" not in message
        assert _holder(tmp_path / "run")["token"] == first.token  # Untouched.
    assert not (tmp_path / "run" / LOCK_FILE_NAME).exists()  # Released.
    WriterLock(tmp_path / "run").acquire().release()  # Free again.


def test_a_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, capsys, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # Its pid is now free (and not reused this quickly).
    (tmp_path / LOCK_FILE_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "token": "old"}))
    lock = WriterLock(tmp_path).acquire()
    try:
        assert _holder(tmp_path)["token"] == lock.token
        captured = capsys.readouterr()
        assert f"pid {dead.pid} is not running" in captured.out
        # Said once: not also as a log record (which a CLI shows on stderr as well).
        assert (captured.out + captured.err + caplog.text).count("took over the stale") == 1
        assert not list(tmp_path.glob(f"{LOCK_FILE_NAME}.stale-*"))  # Cleaned up.
    finally:
        lock.release()


def test_a_lock_that_cannot_be_removed_is_left_with_a_warning_then_taken_over(
        tmp_path, caplog, capsys, monkeypatch):
    first = WriterLock(tmp_path).acquire()
    original = type(tmp_path).unlink

    def refused(path, *args, **kwargs):  # The dir's write access taken away under the job.
        if path.name == LOCK_FILE_NAME:
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(type(tmp_path), "unlink", refused)
        first.release()  # No exception: a failing job's own error must not be replaced.
    assert caplog.messages == [f"could not remove the writer lock {tmp_path / LOCK_FILE_NAME} "
                               "(Permission denied); the next job takes it over as stale"]
    assert _holder(tmp_path)["token"] == first.token  # Left behind, this process's pid in it.
    # The next job of this same process (a notebook) takes it over: no lock here holds it.
    second = WriterLock(tmp_path).acquire()
    assert "left by an earlier job of this process" in capsys.readouterr().out
    # ... while a lock this process does hold is never taken over.
    with pytest.raises(LockHeldError):
        WriterLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / LOCK_FILE_NAME).exists()


def test_another_hosts_lock_is_stale_only_after_its_lease(tmp_path):
    path = tmp_path / LOCK_FILE_NAME
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "started": time.time(),
                                "token": "remote"}))
    with pytest.raises(LockHeldError, match="pid 1 on host other-host"):
        WriterLock(tmp_path, lease_s=60).acquire()  # Fresh heartbeat: alive for all we know.
    old = time.time() - 61
    os.utime(path, (old, old))
    lock = WriterLock(tmp_path, lease_s=60).acquire()
    assert _holder(tmp_path)["token"] == lock.token
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh_and_notices_a_takeover(tmp_path):
    lock = WriterLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        path = tmp_path / LOCK_FILE_NAME
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5  # Touched again.
        lock.ensure_held()
        # Another job takes the file over (e.g. after judging this one dead).
        path.write_text(json.dumps({"host": "other", "pid": 1, "token": "new"}))
        with pytest.raises(LockError, match="lost the writer lock"):
            lock.ensure_held()
    finally:
        lock.release()
    assert _holder(tmp_path)["token"] == "new"  # Release never deletes another's lock.


def test_a_heartbeat_the_disk_refuses_stops_the_job_as_an_environment_fault(tmp_path,
                                                                            monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    lock = WriterLock(tmp_path, heartbeat_s=0.05).acquire()
    monkeypatch.setattr(os, "utime", refused)
    deadline = time.time() + 10
    while lock.lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(LockRefreshError, match=r"could not refresh the writer lock .* \("
                       r"Permission denied\): stopping without saving") as e:
        lock.ensure_held()
    assert e.value.errno == 13 and e.value.environment  # The CLI: exit 74, not 2.
    lock.release()
    assert not (tmp_path / LOCK_FILE_NAME).exists()  # Still its own: removed.


def test_a_model_dir_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LockError, match="exists and is not a directory"):
        WriterLock(tmp_path / "file").acquire()
    with pytest.raises(LockError, match="cannot create --model_dir"):
        WriterLock(tmp_path / "file" / "run").acquire()
    with pytest.raises(LockError, match="cannot create --model_dir"):
        WriterLock("/proc/matlm_run").acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_model_dir_is_one_clear_error(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(LockError, match="cannot create --model_dir"):
            WriterLock(tmp_path / "run").acquire()
        with pytest.raises(LockError, match="is not writable"):
            WriterLock(tmp_path).acquire()
    finally:
        os.chmod(tmp_path, 0o700)
