"""Hooks of the training loop (Levanter-style) and the ones every run uses.

    trainer = Trainer(train_step, state, batches, first_step=0, last_step=1000, ...)
    trainer.add_hook(save_fn, every=100, at_end=True)          # sees the state at step 100, 200 …
    trainer.add_hook(log_fn, every=10, needs_state=False)      # sees fetched metrics only
    trainer.run()

A hook is a callable `fn(info: StepInfo)` with a schedule. Two kinds (see
docs/training_loop.md for the order and the guarantees):

- **metrics hooks** (`needs_state=False`): called with each due step's metrics once they
  are back on the host, in step order. The loop fetches step N's metrics only after it
  has dispatched step N+1, so these never make the device wait.
- **state hooks** (`needs_state=True`, the default): called with the train state right
  after step N, before step N+1 is dispatched (which donates that state). Before they
  run, the loop fetches and checks the metrics of every step up to N: a non-finite loss
  or parameter norm stops the job first, so a checkpoint never holds a non-finite state.

A hook fires at most once per step: at multiples of `every`, at the first step of the job
(`at_start`, before any training: `info.metrics` is None), at the run's last step
(`at_end`; not when the job is stopped early), or when `when(step)` says so.
`open(trainer)` / `close()` bracket the run (signal handlers, flushing, waiting for
asynchronous saves); `close()` also runs when the loop raises.

This module never imports `matlm.evaluation`: downstream evaluation is a hook that
`matlm train` adds (`matlm.evaluation.in_loop.downstream_eval_hook`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from matlm.training import mesh as mesh_lib
from matlm.training.preemption import SIGNALS, Preempted  # noqa: F401 (re-exported)


# The name of the hook `matlm train` adds when TrainConfig.downstream_eval_tasks is set
# (matlm.evaluation.in_loop.downstream_eval_hook); train() refuses the setting without it.
DOWNSTREAM_EVAL_HOOK = "downstream_eval"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


@dataclasses.dataclass
class StepInfo:
    step: int  # Optimizer updates applied so far: the step that just completed.
    metrics: Optional[dict]  # That step's metrics on the host (numpy); None at the start.
    state: Any  # The TrainState after `step` (state hooks only; None for metrics hooks).
    # It is donated to the next step: read it during the call, never keep it.
    trainer: Any  # The Trainer (request_stop, stall_seconds, loop_started).
    fetched_at: float = 0.0  # time.perf_counter() when the metrics reached the host.


class Hook:
    """A callable with a schedule. Wrap a function (`Hook(fn, every=10)`) or subclass and
    override `__call__` (and `open`/`close` when the hook holds resources)."""

    def __init__(self, fn: Optional[Callable[[StepInfo], Any]] = None, every: int = 0, *,
                 at_start: bool = False, at_end: bool = False, needs_state: bool = True,
                 when: Optional[Callable[[int], bool]] = None, name: str = "",
                 on_stop: bool = False):
        if every < 0:
            raise ValueError(f"a hook's `every` must be ≥ 0 (0: not periodic), got {every}")
        self.fn = fn
        self.every = every
        self.at_start = at_start
        self.at_end = at_end
        self.needs_state = needs_state
        self.when = when
        # Once the loop is stopping at a step (a signal, --stop_at), only hooks with
        # on_stop (saving) still run there; evals and the like are skipped.
        self.on_stop = on_stop
        self.name = name or getattr(fn, "__name__", type(self).__name__)

    def due(self, step: int, first: int, last: int) -> bool:
        if step == first:  # Before any training in this job.
            return self.at_start or (self.at_end and step == last)
        return bool((self.every and step % self.every == 0) or (self.at_end and step == last)
                    or (self.when is not None and self.when(step)))

    def __call__(self, info: StepInfo) -> None:
        self.fn(info)

    def open(self, trainer) -> None:
        pass

    def close(self) -> None:
        pass

    def __repr__(self):
        return f"<Hook {self.name} every={self.every}>"


@dataclasses.dataclass
class RunContext:
    """What a run's hooks may need, built once by `train()` and handed to hook factories
    (`train(..., hooks=[factory])`, `factory(context) -> Hook`)."""
    model_config: Any
    data_config: Any
    train_config: Any
    model_dir: Any  # matlm.model_dir.ModelDir
    vocab: Any
    mesh: Any
    objective: Any
    writer: Any  # matlm.training.metrics.MetricsWriter
    widths_by_name: dict  # {granularity name: per-layer widths}


# --- The hooks every run uses. --------------------------------------------------------------

class LogMetrics(Hook):
    """Progress bar every step; every `log_every` steps (and at the last) one row of train
    metrics and throughput. Step time, tokens/s and MFU are measured between the moments
    the metrics of two log steps reached the host, less the time state hooks (eval,
    checkpoint) held the loop — so they count training steps only."""

    def __init__(self, writer, log_every: int, names, tokens_per_step: int,
                 flops_of: Callable[[dict], float], peak_flops_total: float,
                 progress: Optional[tqdm] = None):
        super().__init__(every=1, at_end=True, needs_state=False, name="log_metrics")
        self.writer, self.log_every, self.names = writer, log_every, list(names)
        self.tokens_per_step, self.flops_of = tokens_per_step, flops_of
        self.peak_flops_total, self.progress = peak_flops_total, progress
        self._window = None  # (start time, stall seconds at start, steps, FLOPs)
        self._progress_timed = False  # Whether the bar's clock runs (after the first step).
        if progress is not None:  # Until the first step is done: no rate or ETA to show.
            progress.set_postfix_str("compiling…")

    def __call__(self, info: StepInfo) -> None:
        metrics, trainer = info.metrics, info.trainer
        if self._window is None:
            self._window = (trainer.loop_started, 0.0, 0, 0.0)
        start, stall0, steps, flops = self._window
        steps, flops = steps + 1, flops + self.flops_of(metrics)
        self._window = (start, stall0, steps, flops)
        if self.progress is not None:
            if not self._progress_timed:
                self._start_progress_timer(info.step)
            else:
                self.progress.update(1)
        if info.step % self.log_every and info.step != trainer.last_step:
            return
        elapsed = max(info.fetched_at - start - (trainer.stall_seconds - stall0), 1e-9)
        trained = metrics["trained"] > 0
        scalars = {"train/loss": float(metrics["loss"]),
                   "train/grad_norm": float(metrics["grad_norm"]),
                   "train/param_norm": float(metrics["param_norm"]),
                   "train/learning_rate": float(metrics["learning_rate"]),
                   "perf/step_time_s": elapsed / steps,
                   "perf/tokens_per_s": self.tokens_per_step * steps / elapsed,
                   "perf/mfu": flops / elapsed / self.peak_flops_total}
        scalars |= {f"train/{n}/loss": float(ce) for n, t, ce in
                    zip(self.names, trained, metrics["ce"]) if t}
        # The distillation KL of each student (zero for the teacher and without it).
        scalars |= {f"train/{n}/kl": float(kl) for n, t, kl in
                    zip(self.names, trained, metrics.get("kl", ())) if t and kl}
        # The ViT's top-1 accuracy on the batch (a family whose loss head reports it).
        scalars |= {f"train/{n}/top1": float(acc) for n, t, acc in
                    zip(self.names, trained, metrics.get("acc", ())) if t}
        self.writer.write(info.step, scalars)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                                      tok_s=f"{scalars['perf/tokens_per_s']:.0f}",
                                      mfu=f"{scalars['perf/mfu']:.1%}")
        self._window = (info.fetched_at, trainer.stall_seconds, 0, 0.0)

    def _start_progress_timer(self, step: int) -> None:
        """Shows `step` as done and starts the bar's clock now: the job's first step holds
        compilation and the step-0 eval, which made the first ETA ~30x too long."""
        self._progress_timed = True
        bar = self.progress
        if bar.disable:  # --no_progress, or not process 0: nothing is shown.
            return
        # What tqdm.reset() does, without its refresh that would show n=0 and a negative
        # rate for a moment: the clock restarts now and the rate's moving averages are empty.
        bar.initial = bar.n = bar.last_print_n = step
        bar.start_t = bar.last_print_t = bar._time()
        bar._ema_dn, bar._ema_dt = (type(bar._ema_dn)(bar.smoothing),
                                    type(bar._ema_dt)(bar.smoothing))
        bar.set_postfix_str("")  # Drops "compiling…" and redraws.

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()


def validation_losses(eval_step, params, make_eval_iterator, max_batches: int, mesh,
                      sharding=None) -> dict:
    """Mean validation CE per submodel over the eval split (or its first batches), and
    any further mean the eval step sums (the ViT's "{name}/top1"). Gives up between
    batches (raises `Preempted`) when a signal arrived. `sharding`: the family's batch
    sharding (default the LM's)."""
    sums: dict = {}
    for i, batch in enumerate(make_eval_iterator()):
        SIGNALS.check()
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(eval_step(params, mesh_lib.global_batch(batch, mesh, sharding)))
        for name, (ce_sum, count) in out.items():
            s, c = sums.get(name, (0.0, 0.0))
            sums[name] = (s + float(ce_sum), c + float(count))
    if not sums:
        raise TrainingError("the validation split produced no batches")
    return {name: s / max(c, 1.0) for name, (s, c) in sums.items()}


class ValidationEval(Hook):
    """Validation loss and perplexity per granularity: at the start, every `every` steps
    and at the end. `extras`: further means the eval step returns, written as
    `eval/{extra}` (the ViT's "S/top1", ...); `perplexity=False` (a classifier) writes no
    perplexity. `history` holds [(step, {granularity: loss, extra: value})].

    A step whose values metrics.jsonl already holds (the restored step of a resumed job,
    a finished run started again) is not evaluated again: the recorded values are the
    ones these parameters give, and writing them twice would duplicate the row."""

    def __init__(self, losses_fn: Callable[[Any], dict], writer, every: int, names,
                 extras=(), perplexity: bool = True):
        super().__init__(every=every, at_start=True, at_end=True, name="validation_eval")
        self.losses_fn, self.writer, self.names = losses_fn, writer, list(names)
        self.extras, self.perplexity = list(extras), perplexity
        self.history: list = []

    def __call__(self, info: StepInfo) -> None:
        names = self.names + self.extras
        keys = [f"eval/{n}/loss" for n in self.names] + [f"eval/{e}" for e in self.extras]
        recorded = self.writer.recorded(info.step, keys)
        if recorded is not None:
            self.history.append((info.step, dict(zip(names, recorded))))
            return
        means = self.losses_fn(info.state.params)
        scalars = {f"eval/{n}/loss": means[n] for n in self.names}
        if self.perplexity:
            scalars |= {f"eval/{n}/perplexity": math.exp(min(means[n], 50)) for n in self.names}
        scalars |= {f"eval/{e}": means[e] for e in self.extras}
        self.writer.write(info.step, scalars)
        self.history.append((info.step, {n: means[n] for n in names}))


class Checkpoint(Hook):
    """Saves the state, the data pipeline's position and `meta` every `every` steps and at
    the end (asynchronously; `close` waits for the writes). `before_save()` runs first
    (the writer-lock check: a job that lost its lock must not write)."""

    def __init__(self, checkpointer, every: int, data_state: Callable[[], dict], meta: dict,
                 before_save: Callable[[], None] = lambda: None):
        super().__init__(every=every, at_end=True, name="checkpoint", on_stop=True)
        self.checkpointer, self.data_state, self.meta = checkpointer, data_state, meta
        self.before_save = before_save

    def __call__(self, info: StepInfo) -> None:
        self.before_save()
        self.checkpointer.save(info.step, info.state, self.data_state(),
                               {**self.meta, "step": info.step})

    def close(self) -> None:
        # Also on errors: let in-flight saves finish so no half-written step is left.
        self.checkpointer.wait()


class SaveWatch(Hook):
    """Checks after every step, without waiting, whether the asynchronous save in flight
    has failed (disk full, permission lost): its error then stops the job at once, naming
    its step, instead of at the next save. A metrics hook: it never makes the device wait."""

    def __init__(self, checkpointer):
        super().__init__(every=1, needs_state=False, name="save_watch")
        self.checkpointer = checkpointer

    def __call__(self, info: StepInfo) -> None:
        self.checkpointer.poll()


class Preemption(Hook):
    """SIGTERM/SIGINT (preemption, Ctrl-C) or `stop_at`: save the current step through
    `checkpoint` and stop the loop (the job then exits 0 and a rerun resumes). At the
    job's first step there is nothing new to save: it only stops.

    Signals are `matlm.training.preemption.SIGNALS` (installed for the whole job by
    `train()`); `open` installs them in deferred mode when nobody has (a bare Trainer)."""

    def __init__(self, checkpoint: Checkpoint, stop_at: Optional[int] = None):
        super().__init__(when=self._wanted, name="preemption", on_stop=True)
        self.checkpoint, self.stop_at = checkpoint, stop_at
        self._installed = False
        self.signal: Optional[str] = None  # The signal it stopped the loop for.

    def _wanted(self, step: int) -> bool:
        return SIGNALS.received is not None or step == self.stop_at

    def open(self, trainer) -> None:
        self._installed = SIGNALS.install()
        SIGNALS.check()  # One that landed in a gc callback at start-up (and was swallowed).
        SIGNALS.defer()  # From the first step on, a signal saves and stops the loop.

    def __call__(self, info: StepInfo) -> None:
        self.signal = SIGNALS.received
        reason = self.signal or "stop_at"
        if info.step > info.trainer.first_step:
            tqdm.write(f"{reason}: saving step {info.step} and exiting")
            self.checkpoint(info)
        else:
            tqdm.write(f"{reason}: nothing new to save at step {info.step}; exiting")
        info.trainer.request_stop(reason)

    def close(self) -> None:
        if self._installed:
            SIGNALS.uninstall()
            self._installed = False


def nonfinite(metrics: dict, names) -> Optional[tuple[str, list]]:
    """(what, granularities) when a step's loss or parameter norm is not finite, else None."""
    trained = np.asarray(metrics["trained"]) > 0
    bad = [n for n, t, ce in zip(names, trained, metrics["ce"]) if t and not np.isfinite(ce)]
    if bad or not np.isfinite(metrics["loss"]):
        what = "loss"
    elif not np.isfinite(metrics["param_norm"]):
        what = "parameters"
    else:
        return None
    return what, bad or [n for n, t in zip(names, trained) if t]
