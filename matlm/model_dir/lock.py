"""One writer per model dir: an exclusive lock file naming its owner, kept alive by a
heartbeat, taken before anything is written and released at the end of the job.

    MODEL_DIR/writer.lock   {"host": ..., "pid": ..., "started": ..., "token": ...}

Taking it: the file is created with O_CREAT|O_EXCL, which exactly one process can win on
a local or NFSv3+ disk. A second writer fails at once with a one-line `LockHeldError`
naming the holder (host, pid, start time, last heartbeat). A lock left by a job that
died is *stale* and is taken over with a warning:

- same host: its pid is gone (or now belongs to a process that started later: pid reuse),
  or it is this very process and no lock of this process holds it (an earlier in-process
  job, e.g. in a notebook, could not remove it: its access to the model dir was revoked);
- another host: its heartbeat (the file's mtime, touched every `HEARTBEAT_S` seconds by a
  daemon thread) is older than `LEASE_S`. A job on another host cannot see whether the
  owner is alive, so a live owner whose heartbeat stalled for that long loses its lock.

Takeover renames the stale file to a unique name first (atomic) and checks that what it
renamed is the stale lock it read — if another process took over in between, the fresh
lock is put back and this one is refused. The heartbeat thread notices when its lock
file is gone or owned by someone else, and `ensure_held()` (called before every
checkpoint save) then stops the job instead of writing beside the new owner.

On a bucket (`gs://` model dir, `BucketWriterLock`): the lock is the object
`writer.lock`, written through the GCS JSON API with generation preconditions, which GCS
applies atomically (unlike a file on a gcsfuse mount, whose exclusivity matlm does not
test):

- taking it: create only if absent (`ifGenerationMatch=0`); exactly one creator wins;
- heartbeat: the same bytes rewritten with `ifGenerationMatch=<the generation last
  written>`; the object's `updated` time is the heartbeat. A precondition failure means
  someone else replaced it: the lock is lost;
- takeover of a stale lock: rewritten with `ifGenerationMatch=<the stale generation
  read>`, so of two takers exactly one wins and the other is refused or retries;
- release: deleted with a precondition on our generation (never someone else's lock).

A lock that cannot be removed at release (the job's write access was revoked, the
service failed) is left with a warning, never in place of the job's own error: it is
stale once the job has ended. A heartbeat that cannot be written stops the job at its
next save as an environment fault (`LockRefreshError`, an OSError: exit 74), unlike a
lock another job took over (`LockError`: exit 2).

The messages and exit codes are those of the file lock.

Readers (`matlm eval`, `matlm verify`, `matlm info`) take no lock: they only read files
that are written atomically (run_config.json, vocab.model by rename; checkpoints by
Orbax's temporary-dir-then-rename; on a bucket by whole-object writes and Orbax's commit
marker).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_FILE_NAME = "writer.lock"
HEARTBEAT_S = 10.0
LEASE_S = 120.0

_HELD_HERE: set = set()  # Tokens of the locks this process holds now.


class LockError(ValueError):
    """The model dir cannot be locked for writing (not creatable, not writable)."""


class LockHeldError(LockError):
    """Another job holds the model dir's writer lock."""


class LockRefreshError(OSError):
    """The lock's heartbeat could not be written (the job's write access was revoked, the
    disk or service failed): the environment's fault, not another job's (exit 74)."""
    environment = True

    def __init__(self, code: int, message: str):
        super().__init__(code, os.strerror(code))
        self.message = message

    def __str__(self) -> str:
        return self.message


def _process_start_ticks(pid: int) -> Optional[int]:
    """When `pid` started (clock ticks since boot), to tell a reused pid from the owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may contain spaces: split after its closing ')'.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Exists, owned by another user.
    return True


def _describe(holder: dict, age_s: Optional[float]) -> str:
    started = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    beat = f", heartbeat {age_s:.0f} s ago" if age_s is not None else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}{beat}"


class WriterLock:
    """The writer lock of one model dir (see the module docstring). Use as a context
    manager, or `acquire()` / `release()`."""

    def __init__(self, directory, heartbeat_s: float = HEARTBEAT_S, lease_s: float = LEASE_S):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE_NAME
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self.token = uuid.uuid4().hex
        self.lost: Optional[str] = None  # Why the lock is no longer ours, once it is not.
        self.lost_errno: Optional[int] = None  # Set when the environment made us lose it.
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- Taking and giving back. -----------------------------------------------------------
    def acquire(self) -> "WriterLock":
        self._make_directory()
        for _ in range(3):  # A takeover race is retried, then refused.
            if self._create():
                break
            holder, age_s = self._read()
            why = self._stale_reason(holder, age_s)
            if why is None:
                raise LockHeldError(
                    f"{self.directory} is being written by another job ({_describe(holder, age_s)}; "
                    f"lock {self.path}). Wait for it to finish, stop it, or use another --model_dir")
            if self._take_over(holder):
                # One line, printed (a log record as well would show it twice on stderr).
                print(f"WARNING: took over the stale writer lock of {self.directory} "
                      f"({why}: {_describe(holder, age_s)})")
                break
        else:
            raise LockHeldError(f"{self.directory}: another job took the writer lock "
                                f"{self.path} at the same time; use another --model_dir")
        _HELD_HERE.add(self.token)
        self._thread = threading.Thread(target=self._heartbeat, name="matlm-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop_heartbeat()
        try:
            if self._owned():
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:  # The dir's write access was taken away under the job.
            self._left_behind(e.strerror or e)

    def _stop_heartbeat(self) -> None:
        _HELD_HERE.discard(self.token)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _left_behind(self, why) -> None:
        # A warning, not an exception: release runs while the job's own error (the real
        # news, e.g. a failed save) propagates, and must not replace it.
        log.warning("could not remove the writer lock %s (%s); the next job takes it "
                    "over as stale", self.path, str(why).splitlines()[0][:160])

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def ensure_held(self) -> None:
        """Raises LockError when the lock was lost (taken over, deleted): the job must not
        write beside another owner."""
        if self.lost is None and not self._owned():
            self.lost = "the lock file is gone or names another owner"
        if self.lost is not None and self.lost_errno is not None:
            raise LockRefreshError(self.lost_errno, (
                f"could not refresh the writer lock {self.path} ({self.lost}): stopping "
                f"without saving, as another job may take a lock without heartbeats over. "
                f"Restore write access to {self.directory}, then run the same command"))
        if self.lost is not None:
            raise LockError(f"lost the writer lock {self.path} ({self.lost}); another job may be "
                            f"writing {self.directory}: stopping without saving")

    # --- Internals. ----------------------------------------------------------------------------
    def _make_directory(self) -> None:
        # The first write of a job: a model dir that cannot be created or written fails
        # here, before run_config.json, checkpoints or metrics.
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise LockError(f"--model_dir {self.directory} exists and is not a directory; "
                            "give a directory path") from None
        except OSError as e:
            raise LockError(f"cannot create --model_dir {self.directory} ({e.strerror}); "
                            "give a writable directory path") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise LockError(f"--model_dir {self.directory} is not writable; "
                            "give a writable directory path")

    def _contents(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "pid_started": _process_start_ticks(os.getpid()),
                           "started": time.time(), "token": self.token}).encode()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise LockError(f"cannot write in --model_dir {self.directory} ({e.strerror}); "
                            "give a writable directory path") from None
        try:
            os.write(fd, self._contents())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read(self, path: Optional[Path] = None) -> tuple[dict, Optional[float]]:
        """(holder, seconds since its heartbeat); an unreadable file reads as {}."""
        path = path or self.path
        try:
            age_s = time.time() - path.stat().st_mtime
            return json.loads(path.read_text() or "{}"), age_s
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError):
            # Half-written by a process killed while creating it: judged by its age only.
            try:
                return {}, time.time() - path.stat().st_mtime
            except OSError:
                return {}, None

    def _stale_reason(self, holder: dict, age_s: Optional[float]) -> Optional[str]:
        if age_s is None:
            return "the lock disappeared"
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid() and holder.get("token") not in _HELD_HERE:
                return "left by an earlier job of this process"
            if not _pid_alive(pid):
                return f"pid {pid} is not running"
            started = holder.get("pid_started")
            if started is not None and _process_start_ticks(pid) not in (None, started):
                return f"pid {pid} now belongs to another process"
            return None
        if age_s > self.lease_s:
            return f"no heartbeat for {age_s:.0f} s (lease {self.lease_s:.0f} s)"
        return None

    def _take_over(self, stale: dict) -> bool:
        aside = self.path.with_name(f"{LOCK_FILE_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()  # Gone meanwhile: an ordinary exclusive create.
        renamed, _ = self._read(aside)
        if renamed.get("token") != stale.get("token"):
            # Someone else took it over first and we renamed *their* fresh lock: put it
            # back (link fails if yet another one appeared) and let the caller retry.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def _owned(self) -> bool:
        holder, _ = self._read()
        return holder.get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._owned():
                self.lost = "the lock file is gone or names another owner"
                log.error("lost the writer lock %s", self.path)
                return
            try:
                os.utime(self.path)
            except OSError as e:
                self.lost, self.lost_errno = e.strerror or str(e), e.errno or errno.EIO
                return


class BucketWriterLock(WriterLock):
    """The writer lock of a model dir on GCS (see the module docstring): same interface,
    messages and staleness rules as `WriterLock`, generation preconditions instead of
    O_EXCL and rename."""

    def __init__(self, directory, heartbeat_s: float = HEARTBEAT_S, lease_s: float = LEASE_S):
        from matlm.model_dir import storage
        super().__init__(directory, heartbeat_s, lease_s)
        self.directory = storage.model_dir_path(directory)
        self.path = self.directory / LOCK_FILE_NAME
        bucket_name, prefix = storage.bucket_and_prefix(self.directory)
        self._bucket = storage.gcs_client().bucket(bucket_name)
        self._name = f"{prefix}/{LOCK_FILE_NAME}".lstrip("/")
        self._generation: Optional[int] = None  # Of the lock object we last wrote.
        self._seen_generation: Optional[int] = None  # Of the lock object `_read` read.
        self._bytes = b""  # Written once at creation; heartbeats rewrite the same bytes.

    def release(self) -> None:
        from google.api_core import exceptions as api
        from matlm.model_dir import storage
        self._stop_heartbeat()
        # Not when another job replaced it; when our heartbeat failed, the lock is still ours.
        if self._generation is not None and (self.lost is None or self.lost_errno):
            try:  # Only the object we wrote: a lock taken over meanwhile stays.
                self._bucket.blob(self._name).delete(if_generation_match=self._generation)
            except (api.NotFound, api.PreconditionFailed):
                pass
            except api.GoogleAPICallError as e:  # Write access revoked; the service failed.
                self._left_behind(storage.why_refused(e))
            self._generation = None

    def _make_directory(self) -> None:
        from matlm.model_dir import storage
        # The first write of a job: a missing bucket or permission fails here.
        storage.check_access(self.directory, write=True)

    def _write(self, generation: int) -> bool:
        """Writes the lock's bytes if the object's generation is `generation` (0: absent);
        False when it is not (someone else wrote or deleted it)."""
        from google.api_core import exceptions as api
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(self._bytes, content_type="application/json",
                                    if_generation_match=generation)
        except api.PreconditionFailed:
            return False
        except api.Forbidden:
            raise LockError(f"cannot write in --model_dir {self.directory} (no permission "
                            "to write); grant storage.objects.create") from None
        self._generation = blob.generation
        return True

    def _create(self) -> bool:
        self._bytes = self._contents()
        return self._write(0)

    def _read(self, path=None) -> tuple[dict, Optional[float]]:
        """(holder, seconds since its heartbeat: the object's update time); sets
        `_seen_generation`. An absent object reads as ({}, None)."""
        from google.api_core import exceptions as api
        blob = self._bucket.get_blob(self._name)
        if blob is None:
            self._seen_generation = None
            return {}, None
        self._seen_generation = blob.generation
        age_s = time.time() - blob.updated.timestamp()
        try:  # The bytes of the generation whose metadata we read, not a newer one.
            data = self._bucket.blob(self._name, generation=blob.generation).download_as_bytes()
            return json.loads(data or b"{}"), age_s
        except api.NotFound:  # Replaced or deleted in between: judged again by the caller.
            return {}, age_s
        except ValueError:  # Not JSON: judged by its age only.
            return {}, age_s

    def _take_over(self, stale: dict) -> bool:
        if self._seen_generation is None:
            return self._create()  # Gone meanwhile: an ordinary create-if-absent.
        # Wins only if the object is still the stale one we judged: of two takers (or a
        # taker and a late heartbeat of the owner), exactly one write succeeds.
        self._bytes = self._contents()
        return self._write(self._seen_generation)

    def _owned(self) -> bool:
        holder, _ = self._read()
        # The token alone: a takeover writes another token (comparing generations would
        # race with this lock's own heartbeat thread).
        return holder.get("token") == self.token

    def _heartbeat(self) -> None:
        from google.api_core import exceptions as api
        from matlm.model_dir import storage
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._write(self._generation):
                    self.lost = "the lock object was replaced or deleted by another job"
                    log.error("lost the writer lock %s", self.path)
                    return
            except LockError:  # `_write` was refused: no permission to write.
                self.lost, self.lost_errno = "this job may no longer write it", errno.EACCES
                return
            except api.GoogleAPICallError as e:  # The service failed (after its retries).
                self.lost = storage.why_refused(e)
                self.lost_errno = storage.bucket_fault_of(e) or errno.EIO
                return


def writer_lock(directory, **options) -> WriterLock:
    """The writer lock of a model dir: `BucketWriterLock` for gs://, else `WriterLock`."""
    from matlm.model_dir import storage
    if storage.is_url(directory):
        return BucketWriterLock(directory, **options)
    return WriterLock(directory, **options)


def acquire_for_job(directory) -> Optional[WriterLock]:
    """Process 0 takes the lock; every process learns whether it did (multi-host jobs
    write one model dir together). Returns the lock on process 0, None elsewhere."""
    import jax
    import numpy as np
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = writer_lock(directory).acquire()
        except LockError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(ok) and error is None:
            raise LockError(f"process 0 could not take the writer lock of {directory}")
    if error is not None:
        raise error
    return lock
