"""Runs a sweep's trials: each one a `matlm train` subprocess in its own model dir (then,
if asked, `matlm eval`), one after another or K at a time.

Isolation: a trial's failure (non-zero exit) is recorded in its `trial.json` with the last
lines of its stderr, and the other trials go on. Resume: `trial.json` says what happened
to each trial; a rerun skips `done` trials (and `failed` ones unless retry_failed), and
reruns every other one in the same model dir, where `matlm train` resumes from its newest
checkpoint by itself. A trial counts as done only when its dir holds a checkpoint at its
final step (a train stopped by SIGTERM exits 0 but is not done).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

from matlm.fileio import write_atomically
from matlm.launch.launcher import TrainJob
from matlm.sweep.spec import SweepSpecError, Trial

TRIAL_FILE = "trial.json"
SWEEP_FILE = "sweep.json"
ERROR_LINES = 12  # Lines of a failed trial's stderr kept in trial.json.
# Statuses written to trial.json. `running` left behind means the sweep itself was killed.
DONE, FAILED, RUNNING, INTERRUPTED, PENDING = "done", "failed", "running", "interrupted", "pending"


@dataclasses.dataclass
class SweepOptions:
    gin_files: list
    bindings: list        # --gin.X=V of the sweep command: bound in every trial
    base_dir: Path
    parallel: int = 1
    eval: bool = False
    eval_flags: list = dataclasses.field(default_factory=list)
    retry_failed: bool = False
    env: Optional[dict] = None  # Environment of the trial processes (default: this one's).


def train_job(trial: Trial, options: SweepOptions) -> TrainJob:
    """The trial as a train job: the sweep's gin files and bindings, then the trial's."""
    return TrainJob(gin_files=tuple(options.gin_files), model_dir=str(options.base_dir / trial.name),
                    bindings=(*options.bindings, *trial.bindings))


def train_command(trial: Trial, options: SweepOptions) -> list[str]:
    return [sys.executable, "-m", "matlm.cli.main", *train_job(trial, options).train_args(())]


def eval_command(trial: Trial, options: SweepOptions) -> list[str]:
    return [sys.executable, "-m", "matlm.cli.main", "eval",
            f"--model_dir={options.base_dir / trial.name}", "--no_progress",
            *options.eval_flags]


def read_trial(model_dir: Path) -> dict:
    from matlm.model_dir import storage  # A local path, or gs:// (pathlib would fold it).
    path = storage.model_dir_path(model_dir) / TRIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json(path: Path, value: dict) -> None:
    # Atomic: a killed sweep never leaves half a trial.json.
    write_atomically(path, json.dumps(value, indent=2) + "\n")


def final_checkpoint_step(model_dir: Path) -> Optional[int]:
    from matlm.model_dir import ModelDir
    steps = ModelDir(model_dir).checkpoint_steps()
    return steps[-1] if steps else None


def check_base_dir(trials: Sequence[Trial], options: SweepOptions) -> None:
    """A rerun must be the same sweep: a trial dir written with other bindings is refused
    (resuming it with the new ones would mix two runs in one model dir). A base dir that is
    a file (or under one) is refused before any trial dir is made in it."""
    from matlm.model_dir import storage
    if storage.is_url(options.base_dir):  # No dirs on a bucket: its access is checked.
        storage.check_access(options.base_dir, write=True)
        existing = None
    else:
        existing = next(p for p in (options.base_dir, *options.base_dir.parents)
                        if p.exists())
    if existing is not None and not existing.is_dir():
        raise SweepSpecError(
            f"--base_dir={str(options.base_dir)!r}: {str(existing)!r} is a file, not a "
            "directory; give a new or existing directory for the trials' model dirs")
    for trial in trials:
        recorded = read_trial(options.base_dir / trial.name)
        expected = _identity(trial, options)
        if recorded and recorded.get("identity") != expected:
            raise SweepSpecError(
                f"--base_dir={str(options.base_dir)!r}: trial {trial.name!r} there was run with "
                f"other gin files/bindings ({recorded.get('identity')}); give another "
                "--base_dir or remove that trial's dir")


def _identity(trial: Trial, options: SweepOptions) -> dict:
    return {"gin_files": list(options.gin_files),
            "bindings": [*options.bindings, *trial.bindings]}


class Progress:
    """Counts and an ETA (mean wall time of the trials run so far x those left / K)."""

    def __init__(self, total: int, parallel: int, skipped: dict, out=print):
        self.total, self.parallel, self.out = total, parallel, out
        self.counts = {DONE: skipped.get(DONE, 0), FAILED: skipped.get(FAILED, 0), RUNNING: 0}
        self.durations: list[float] = []
        self.lock = threading.Lock()

    def event(self, message: str, status: Optional[str] = None, seconds: float = 0.0,
              started: bool = False) -> None:
        with self.lock:
            if started:
                self.counts[RUNNING] += 1
            if status is not None:
                self.counts[RUNNING] -= 1
                if status in (DONE, FAILED):
                    self.counts[status] += 1
                self.durations.append(seconds)
            done, failed, running = self.counts[DONE], self.counts[FAILED], self.counts[RUNNING]
            left = self.total - done - failed
            eta = ""
            if self.durations and left:
                mean = sum(self.durations) / len(self.durations)
                eta = f", ETA {_clock(mean * left / self.parallel)}"
            self.out(f"[sweep {done + failed}/{self.total}: {done} done, {failed} failed, "
                     f"{running} running{eta}] {message}", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _tail(path: Path, n: int = ERROR_LINES) -> list[str]:
    if not path.is_file():
        return []
    lines = [l.rstrip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    return lines[-n:]


def _run_logged(command: list[str], model_dir: Path, stem: str, env) -> tuple[int, list[str]]:
    """Runs one subprocess with its stdout/stderr appended to MODEL_DIR/STEM.{log,err}
    (appended: a resumed trial keeps the earlier attempts' logs). A bucket has no append:
    there the logs are written in a local temporary dir and each object rewritten whole
    (earlier attempts' text, then this one's) when the process ends."""
    from matlm.model_dir import storage
    if not storage.is_url(model_dir):
        return _run_logged_in(command, Path(model_dir), stem, env)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="matlm-sweep-log-") as local:
        local = Path(local)
        try:
            return _run_logged_in(command, local, stem, env)
        finally:
            for suffix in (".log", ".err"):
                target = model_dir / f"{stem}{suffix}"
                before = target.read_bytes() if target.exists() else b""
                write_atomically(target, before + (local / f"{stem}{suffix}").read_bytes())


def _run_logged_in(command: list[str], log_dir: Path, stem: str, env) -> tuple[int, list[str]]:
    with open(log_dir / f"{stem}.log", "a") as out, open(log_dir / f"{stem}.err", "a") as err:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=err, env=env).returncode
    return code, _tail(log_dir / f"{stem}.err")


def run_trial(trial: Trial, steps: int, options: SweepOptions, progress: Progress) -> dict:
    """Trains (resuming) and evaluates one trial; returns and writes its trial.json."""
    from matlm.model_dir import ModelDir
    model_dir = options.base_dir / trial.name
    ModelDir(model_dir).make_dir()  # Locally a dir; on a bucket none is needed (checked).
    record = read_trial(model_dir)
    record.update(name=trial.name, values=trial.values, identity=_identity(trial, options),
                  status=RUNNING, attempts=record.get("attempts", 0) + 1, error=None)
    previous_wall = record.get("wall_s", 0.0)
    _write_json(model_dir / TRIAL_FILE, record)
    progress.event(f"{trial.name}: started (attempt {record['attempts']})", started=True)
    start = time.time()
    if record.get("train_status") != DONE:
        code, tail = _run_logged(train_command(trial, options), model_dir, "train", options.env)
        final = final_checkpoint_step(model_dir)
        if code != 0:
            record.update(status=FAILED, train_status=FAILED, returncode=code,
                          error="\n".join(tail) or f"matlm train exited with {code}")
        elif final is None or final < steps:
            record.update(status=INTERRUPTED, train_status=INTERRUPTED, returncode=code,
                          error=f"stopped at step {final} of {steps}; rerun to resume")
        else:
            record.update(train_status=DONE, returncode=0)
    if record.get("train_status") == DONE:
        record["status"] = DONE
        if options.eval and record.get("eval_status") != DONE:
            code, tail = _run_logged(eval_command(trial, options), model_dir, "eval", options.env)
            if code == 0:
                record.update(eval_status=DONE)
            else:
                record.update(status=FAILED, eval_status=FAILED, returncode=code,
                              error="matlm eval: " + ("\n".join(tail) or f"exit {code}"))
    seconds = time.time() - start
    record["wall_s"] = previous_wall + seconds
    _write_json(model_dir / TRIAL_FILE, record)
    last = (record.get("error") or "").splitlines()[-1:] or [""]
    progress.event(f"{trial.name}: {record['status']} in {_clock(seconds)}"
                   + (f" ({last[0][:160]})" if record["status"] != DONE else ""),
                   status=record["status"], seconds=seconds)
    return record


def plan(trials: Sequence[Trial], options: SweepOptions, wanted_eval: bool = False
         ) -> tuple[list[Trial], dict]:
    """(trials to run now, {status: count} of those skipped as finished)."""
    to_run, skipped = [], {}
    for trial in trials:
        record = read_trial(options.base_dir / trial.name)
        status = record.get("status")
        finished = (status == DONE and (not wanted_eval or record.get("eval_status") == DONE)) \
            or (status == FAILED and not options.retry_failed)
        if finished:
            skipped[status] = skipped.get(status, 0) + 1
        else:
            to_run.append(trial)
    return to_run, skipped


def run_sweep(trials: Sequence[Trial], steps_of: dict, options: SweepOptions,
              out: Callable = print) -> dict[str, dict]:
    """Runs the trials that are not finished, K at a time; returns every trial's record."""
    from matlm.model_dir import ModelDir
    check_base_dir(trials, options)
    ModelDir(options.base_dir).make_dir()
    _write_json(options.base_dir / SWEEP_FILE,
                {"gin_files": list(options.gin_files), "bindings": list(options.bindings),
                 "trials": {t.name: t.bindings for t in trials}})
    to_run, skipped = plan(trials, options, wanted_eval=options.eval)
    progress = Progress(len(trials), options.parallel, skipped, out=out)
    if skipped:
        out(f"[sweep] skipping {sum(skipped.values())} finished trial(s) "
            f"({', '.join(f'{n} {s}' for s, n in skipped.items())}); "
            f"running {len(to_run)} in {options.base_dir}", flush=True)
    # Threads only wait on subprocesses: the trials run in parallel in their own processes.
    with ThreadPoolExecutor(max_workers=max(1, options.parallel)) as pool:
        futures = [pool.submit(run_trial, t, steps_of[t.name], options, progress) for t in to_run]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            # Ctrl-C reached the running trials too (same process group): they save and
            # stop (`interrupted`); trials not started yet must not start now.
            for future in futures:
                future.cancel()
            raise
    return {t.name: read_trial(options.base_dir / t.name) for t in trials}
