"""`RunCheckpointer`: saves and restores a training run's state, setting aside a newest
checkpoint that is unreadable or corrupt (see the package docstring).

A save that fails for a reason outside matlm (disk full, write permission lost, read-only
file system: an operating-system error) raises `CheckpointSaveError`, an OSError naming
the step, the path and what failed, once: asynchronous saves are polled (`poll`) so the
failure surfaces at the next step, not at the next save. Its partial
`<step>.orbax-checkpoint-tmp*` dir is removed so it holds no space; the checkpoints
already saved are untouched. Orbax's own logs of that failure (tracebacks from its
threads, and TensorStore's "Event loop is closed" callbacks after the aborted write) are
kept off the terminal: the one line says it all.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from typing import Optional

import jax
import orbax.checkpoint as ocp

from matlm.messages import causes, error_summary, first_line
from matlm.model_dir import integrity, storage
from matlm.model_dir.errors import CheckpointError
from matlm.model_dir.layout import as_model_dir
from matlm.model_dir.restore import UnreadableCheckpoint, quiet_io_noise, restore_and_verify


# What to do about each environment fault, by errno (others: "check {where}").
_REMEDIES = {errno.ENOSPC: "free space on {where}", errno.EDQUOT: "free quota on {where}",
             errno.EACCES: "make {where} writable", errno.EPERM: "make {where} writable",
             errno.EROFS: "mount {where} read-write"}

# On a bucket (storage.bucket_fault_of's errnos).
_BUCKET_REMEDIES = {errno.ENOENT: "check that the bucket {bucket} exists",
                    errno.EACCES: "grant this job write access to {bucket} "
                                  "(storage.objects.create and .delete)",
                    errno.ENOSPC: "raise the project's storage quota",
                    errno.EIO: "check Cloud Storage's status"}


class CheckpointSaveError(OSError):
    """A checkpoint could not be written because of the environment (errno set: ENOSPC,
    EACCES, EROFS …; on a bucket also ENOENT, EIO). `step` is the step whose save failed;
    str() is the one line."""
    environment = True  # matlm.cli.main: exit 74, whatever the errno.

    def __init__(self, step: int, code: int, filename: Optional[str], message: str):
        super().__init__(code, os.strerror(code), filename)
        self.step, self.message = step, message

    def __str__(self) -> str:
        return self.message


# TensorStore (under Orbax) reports OS errors as a status message, e.g. `... Failed writing:
# "/run/checkpoints/6.orbax-checkpoint-tmp/…": … No space left on device [os_error_code='28']`.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def os_error_of(error: Optional[BaseException]) -> Optional[tuple[int, Optional[str]]]:
    """(errno, path or None) of the operating-system error behind `error` (an OSError, or
    TensorStore's `[os_error_code=N]` message), looked for in its causes too; None when
    there is none (a bug, not the environment)."""
    for cause in causes(error):
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno, cause.filename
        match = _TENSORSTORE_ERRNO.search(str(cause))
        if match:
            paths = _QUOTED_PATH.findall(str(cause))
            return int(match.group(1)), (paths[-1] if paths else None)
    return None


class _QuietSaveFaults(logging.Filter):
    """Drops Orbax's logged tracebacks of an OS-level save failure (the same failure is
    logged from four threads); `CheckpointSaveError` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and os_error_of(record.exc_info[1]) is not None)


def _quiet_save_fault_noise() -> None:
    absl = logging.getLogger("absl")  # Orbax logs through absl.
    if not any(isinstance(f, _QuietSaveFaults) for f in absl.filters):
        absl.addFilter(_QuietSaveFaults())
    quiet_io_noise()  # TensorStore's late writes into Orbax's closed event loop.


class RunCheckpointer:
    """Saves and restores a training run's state (see the package docstring)."""

    def __init__(self, model_dir, keep: int = 3, async_save: bool = True):
        self.model_dir = as_model_dir(model_dir)
        self.directory = self.model_dir.checkpoints
        # cleanup_tmp_directories: the partial dir of a save a killed job left is removed
        # (this job holds the writer lock: no other job's save is in flight).
        self.manager = self.model_dir.checkpoint_manager(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        # The step `restore_latest` restored in this job (None: none, or a fresh start), so
        # that a failure right after a resume can point at the checkpoint it came from.
        self.restored_step: Optional[int] = None
        self._in_flight: Optional[int] = None  # The step whose save may still be running.
        _quiet_save_fault_noise()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Starts saving `step` (asynchronously). Raises CheckpointSaveError for the save in
        flight (it is waited for first) or for this one, when the environment fails it."""
        self._wait_in_flight()  # Orbax waits for it anyway; a failure names its step.
        if step in self.manager.all_steps():
            return  # Already saved (e.g. a final save right after a periodic one).
        # Checksums of the live state, dispatched now: after `save` returns the state is
        # donated to the next step. They go into `meta`, written in the same atomic save.
        meta = integrity.record(meta, {"params": state.params, "opt_state": state.opt_state},
                                data_state)
        self._check_writable(step)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._in_flight = step

    def _check_writable(self, step: int) -> None:
        """Creates and removes a dir (on a bucket: an object) where the save will: a
        read-only file system, a lost permission or a deleted bucket then fails here,
        before Orbax starts its threads (when its own writes fail, its other threads wait
        minutes for them and hold the exit)."""
        if self.model_dir.is_url:  # No directories: one object written and deleted.
            try:
                storage.probe_write(self.directory)
            except Exception as e:  # A bucket gone or refused: one line, exit 74.
                raise self._save_failed(step, e) from e
            return
        probe = self.directory / f".write-check.{jax.process_index()}"
        try:
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        except OSError as e:  # Named as the checkpoint's dir: the probe is ours.
            error = OSError(e.errno, e.strerror, str(self.directory / str(step)))
            raise self._save_failed(step, error) from e

    def poll(self) -> None:
        """Without blocking: raises CheckpointSaveError once the save in flight has failed.
        On several processes the failure is left to the next `save`/`wait` (which all
        processes reach together) so that no process stops alone."""
        if self._in_flight is None or jax.process_count() > 1:
            return
        if not self.manager.is_saving_in_progress():
            self._wait_in_flight()  # Finished: returns at once, or raises its failure.

    def wait(self) -> None:
        """Waits for the save in flight; raises CheckpointSaveError when it failed."""
        self._wait_in_flight()

    def _wait_in_flight(self) -> None:
        step, self._in_flight = self._in_flight, None
        if step is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e

    def _save_failed(self, step: int, error: Exception) -> Exception:
        """The error to raise for a failed save of `step`: CheckpointSaveError when the
        environment failed it (after removing its partial dir), else `error` itself."""
        fault = os_error_of(error)
        if fault is None and self.model_dir.is_url:  # The bucket refused or is gone.
            code = storage.bucket_fault_of(error)
            fault = None if code is None else (code, str(self.directory / str(step)))
        if fault is None:
            return error
        code, failed_path = fault
        removed = self._remove_partial(step)
        self.manager.reload()
        kept = self.steps()
        what = f"writing {failed_path}" if failed_path else first_line(error, 160)
        remedies = _BUCKET_REMEDIES if self.model_dir.is_url else _REMEDIES
        bucket = "gs://" + storage.bucket_and_prefix(self.directory)[0] \
            if self.model_dir.is_url else ""
        remedy = remedies.get(code, "check {where}").format(where=self.directory, bucket=bucket)
        resume = f"resume from checkpoint {kept[-1]}" if kept else "start again"
        message = (f"could not save checkpoint {step}: {os.strerror(code)} "
                   f"[{errno.errorcode.get(code, code)}] {what}; {removed}; "
                   f"checkpoints intact: {', '.join(map(str, kept)) or 'none'}. "
                   f"{remedy[0].upper()}{remedy[1:]}, then run the same command to {resume}")
        return CheckpointSaveError(step, code, failed_path, message)

    def _remove_partial(self, step: int) -> str:
        """Removes `step`'s partial Orbax dir(s) so they hold no space; says what it did."""
        if self.model_dir.is_url:
            return self._remove_partial_objects(step)
        partial = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))
        if not partial:
            return "nothing partial was left"
        if jax.process_index() == 0:
            for _ in range(3):  # TensorStore may still be finishing writes into it.
                for path in partial:
                    shutil.rmtree(path, ignore_errors=True)
                if not any(p.exists() for p in partial):
                    break
                time.sleep(0.2)
        left = [p.name for p in partial if p.exists()]
        if left:
            return f"could not remove the partial {', '.join(left)}"
        return f"removed the partial {', '.join(p.name for p in partial)}"

    def _remove_partial_objects(self, step: int) -> str:
        """On a bucket a save writes into `<step>/` itself and is complete with its commit
        marker: the objects of a step without one are removed (process 0)."""
        path = self.directory / str(step)
        try:
            if (path / storage.COMMIT_MARKER).exists() or not path.exists():
                return "nothing partial was left"
            if jax.process_index() == 0:
                storage.remove_tree(path)
            return f"removed the partial {step}/"
        except Exception as e:  # The bucket itself may be gone or refused.
            return f"could not remove the partial {step}/ ({storage.why_refused(e, 80)})"

    def restore_latest(self, abstract_state):
        """(params, opt_state, data_state, meta, step) of the newest checkpoint that
        restores and matches its checksums, or None when there is none. Unreadable or
        corrupt ones are moved aside."""
        for step in reversed(self.steps()):
            path = self.directory / str(step)
            if not any((path / item).is_dir() for item in ("opt_state", "data")):
                # A params-only checkpoint (`save_for_inference`, `matlm extract`): not a
                # broken run but a model to fine-tune; never moved aside. (A run's
                # checkpoint missing one of them is still restored below and set aside.)
                return self._restore_params_only(step, abstract_state.params)
            try:
                restored = restore_and_verify(
                    self.manager, path, step,
                    {"params": abstract_state.params, "opt_state": abstract_state.opt_state},
                    json_items=("data", "meta"))
            except Exception as e:  # Unreadable, or arrays the checksums cannot read.
                cause = e.error if isinstance(e, UnreadableCheckpoint) else e
                self._set_aside(step, error_summary(cause, 300))
                continue
            if restored.problem is not None:
                self._set_aside(step, error_summary(restored.problem, 300))
                continue
            self.restored_step = step
            items = restored.items
            return items["params"], items["opt_state"], items["data"], items["meta"], step
        return None

    def _restore_params_only(self, step: int, params_target):
        """(params, None, None, meta, step) of a params-only checkpoint: the trainer starts
        a fresh optimizer and data pipeline from these parameters (fine-tuning)."""
        path = self.directory / str(step)
        try:
            restored = restore_and_verify(self.manager, path, step, {"params": params_target},
                                          optional=("meta",))
        except UnreadableCheckpoint as e:
            raise CheckpointError(f"params-only checkpoint {path} could not be read "
                                  f"({e.summary}); does the model config match the one it "
                                  "was saved with?") from e.error
        if restored.problem is not None:
            raise CheckpointError(f"params-only checkpoint {path} is corrupt "
                                  f"({restored.problem})")
        self.restored_step = step
        return restored.items["params"], None, None, restored.items.get("meta"), step

    def _set_aside(self, step: int, detail: str) -> None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.corrupt")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{step}.corrupt{n}"), n + 1
        if jax.process_index() == 0:
            if self.model_dir.is_url:
                storage.move_dir(path, target)  # Copy + delete: a bucket has no rename.
            else:
                os.rename(path, target)
        # One line for the user (a logging call as well printed it twice under absl).
        print(f"WARNING: checkpoint {path} is incomplete or corrupt ({detail}); "
              f"moved aside to {target.name}, trying the previous one")
        self.manager.reload()
