"""Metric sinks (TensorBoard event files and metrics.jsonl, process 0 only) and MFU."""
from __future__ import annotations

import json
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from matlm.fileio import write_atomically

# Dense bf16 peak FLOP/s per chip, from vendor data sheets.
KNOWN_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def measured_matmul_flops(n: int = 1024, warmup_s: float = 0.1,
                          budget_s: float = 0.4, min_reps: int = 5) -> tuple[float, int]:
    """(FLOP/s, repeats): this device's fp32 matmul rate, the CPU's 'peak' for MFU.

    The best of as many timed repeats as fit in `budget_s` (at least `min_reps`), after
    `warmup_s` of untimed ones (thread pool and clock ramp-up). Five repeats (50 ms) varied
    2x between identical runs on a shared machine (134-285 GFLOP/s, issue 28): the best of
    a longer window is more likely to see the CPU free. Still an estimate: other processes
    can hold the cores for the whole window (TrainConfig.peak_flops_per_device pins it)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()  # Compiles.
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        f(a).block_until_ready()
    best, reps, start = math.inf, 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        f(a).block_until_ready()
        best, reps = min(best, time.perf_counter() - t), reps + 1
    return 2 * n ** 3 / best, reps


def peak_flops_per_device(configured: float | None) -> tuple[float, str]:
    """(FLOP/s, where the number comes from) for MFU."""
    if configured:
        return float(configured), "configured"
    kind = jax.devices()[0].device_kind
    for name, flops in KNOWN_PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops, f"{kind} bf16 data sheet"
    flops, reps = measured_matmul_flops()
    return flops, (f"an estimate: the best of {reps} fp32 matmuls on {kind}; "
                   "TrainConfig.peak_flops_per_device sets it")


def _process_0s(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process (only process 0 reads metrics.jsonl, and every
    process must take the same decisions about collective evals)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


class MetricsWriter:
    """Writes scalars to TensorBoard and one JSON object per call to metrics.jsonl.

    The files are opened on the first write, so creating a writer touches nothing (the
    trainer builds it while it is still validating its inputs).

    Each step is held once: `resume_at(step)` (called when a job starts from `step`)
    drops the rows a killed job wrote past it — the resumed job writes them again — and
    tells TensorBoard to hide its events past it (`purge_step`). `recorded` / `has` say
    what the file already holds at a step, so that evals are not written twice."""

    def __init__(self, model_dir, enabled: bool = True):
        from matlm.model_dir import as_model_dir
        self.enabled = enabled
        self._model_dir = as_model_dir(model_dir)
        self._tb = self._jsonl = None
        self._purge_step = None
        self._rows: dict = {}  # step -> scalars metrics.jsonl held when the job started

    def resume_at(self, step: int, why: Optional[str] = None) -> int:
        """Keeps metrics.jsonl's rows up to `step` (and drops unreadable lines, e.g. one
        cut short by a kill); returns how many rows were dropped. `why`: why the file holds
        rows past `step`, for the message (default: a job stopped before saving them)."""
        if not self.enabled:
            return 0
        self._purge_step = step + 1
        path = self._model_dir.metrics_file
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                row_step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if row_step > step:
                dropped += 1
                continue
            kept.append(line)
            self._rows.setdefault(row_step, {}).update(row)
        if dropped:
            # Rewritten beside and renamed over: a reader never sees a half-written file.
            write_atomically(path, "".join(line + "\n" for line in kept))
            why = why or "written by a job that stopped before saving them"
            print(f"metrics.jsonl: dropped {dropped} rows past step {step} "
                  f"({why}; they are recomputed)")
        return dropped

    def recorded(self, step: int, keys) -> Optional[list]:
        """The values of `keys` at `step` when metrics.jsonl holds all of them, else None
        (the same answer on every process: process 0's)."""
        row = self._rows.get(step, {})
        values = [float(row[k]) for k in keys] if all(k in row for k in keys) else None
        found = _process_0s(np.asarray([values is not None] + (values or [0.0] * len(keys)),
                                       np.float32))
        return [float(v) for v in found[1:]] if found[0] else None

    def earlier_evals(self, names, before: int, extras=()) -> list:
        """[(step, {name: validation loss, extra: its value})] of the evals metrics.jsonl
        held below step `before` when this job started (a resumed run's earlier jobs'),
        oldest first; `extras` are further eval means (the ViT's "S/top1" at
        `eval/S/top1`). This process's view: only process 0 reads the file."""
        keys = {name: f"eval/{name}/loss" for name in names} | {e: f"eval/{e}" for e in extras}
        return [(step, {name: float(row[key]) for name, key in keys.items()})
                for step, row in sorted(self._rows.items())
                if step < before and all(key in row for key in keys.values())]

    def has(self, step: int, prefix: str) -> bool:
        """Whether metrics.jsonl holds a value named `prefix...` at `step` (process 0's
        answer on every process)."""
        return bool(_process_0s(np.int32(any(k.startswith(prefix)
                                             for k in self._rows.get(step, {})))))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        if self._jsonl is None:
            from tensorboardX import SummaryWriter  # Light: no TensorFlow needed.
            if self._model_dir.is_url:  # gs:// (tensorboardX writes its events there too).
                _gcs_event_files_close_once()
                self._jsonl = _WholeObjectLog(self._model_dir.metrics_file)
            else:
                self._model_dir.path.mkdir(parents=True, exist_ok=True)
                self._jsonl = open(self._model_dir.metrics_file, "a")
            self._tb = SummaryWriter(str(self._model_dir.tensorboard),
                                     purge_step=self._purge_step)
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            try:
                self._tb.close()
            except Exception:
                # The bucket refused the events' last upload (it is gone, say): close again,
                # now with that file's uploads given up (_gcs_event_files_close_once), so
                # that tensorboardX's exit hook and thread do not retry and print it.
                self._tb.close()
                raise
            finally:
                self._jsonl.close()
                self._tb = self._jsonl = None


class _WholeObjectLog:
    """metrics.jsonl on a bucket, where an object cannot be appended to: the file's lines
    are held here and each `flush` rewrites the whole object (one object write is atomic,
    so a reader sees the rows up to some flush, never a partial line). A few hundred bytes
    per logged step: rewriting is cheap next to a step; not meant for per-step logging of
    very long runs at high frequency."""

    def __init__(self, path):
        self._path = path
        self._text = path.read_text() if path.is_file() else ""

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        write_atomically(self._path, self._text)

    def close(self) -> None:
        self.flush()


def _gcs_event_files_close_once() -> None:
    """tensorboardX's gs:// event file uploads its whole buffer on `close` and again when
    it is garbage-collected (`__del__` calls `close`): at interpreter exit, after the
    network or the bucket may be gone, that second upload retries for minutes. Registers
    (once) a writer factory whose files upload on the first `close` only, and not at all
    once an upload has failed."""
    from tensorboardX import record_writer
    if getattr(record_writer, "matlm_close_once", False):
        return

    class ClosingOnce(record_writer.GCSRecordWriter):
        closed = failed = False

        def flush(self):
            if self.failed:  # Given up after a failed upload: no retries at exit.
                return
            try:
                super().flush()
            except Exception:
                self.failed = True
                raise

        def close(self):
            if not self.closed:
                self.closed = True
                self.flush()

    class Factory(record_writer.GCSRecordWriterFactory):
        def open(self, path):
            return ClosingOnce(path)

    record_writer.register_writer_factory("gs", Factory())
    record_writer.matlm_close_once = True
