"""The training loop: `Trainer` (dispatch steps, fetch metrics one step behind, check them,
fire hooks) and `train()` (validate → restore or init → the run's hooks → loop → report).

Everything that can be wrong with the inputs (objective, mesh, batch, model dir, data,
vocabulary) is checked before the first compile. SIGTERM/SIGINT saves the current step
and returns normally (exit 0), so a preempted job resumes exactly where it stopped.
The hooks and their guarantees are in `matlm.training.hooks` and docs/training_loop.md.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from matlm.model import ModelConfig, family_of
from matlm.model.counting import param_count
from matlm.model_dir import CheckpointError, ModelDir, RunCheckpointer, model_config_to_dict
from matlm.model_dir.lock import acquire_for_job
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig, TrainConfigError
from matlm.training.hooks import (DOWNSTREAM_EVAL_HOOK, Checkpoint, Hook, LogMetrics,
                                  Preempted, Preemption, RunContext, SaveWatch, StepInfo,
                                  TrainingError, ValidationEval, nonfinite,
                                  validation_losses)
from matlm.training.metrics import MetricsWriter, peak_flops_per_device
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.preemption import SIGNALS
from matlm.training.train_step import (abstract_state, batch_sharding_of, init_state,
                                       make_eval_step, make_train_step)

__all__ = ["Trainer", "TrainResult", "TrainingError", "NonFiniteError", "train"]


class NonFiniteError(TrainingError):
    """A step produced a non-finite loss or parameter norm."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    # [(step, {granularity: mean CE})]: the run's evals (after a resume, the earlier jobs'
    # from metrics.jsonl first), so the final table compares with step 0.
    eval_history: list
    interrupted: bool = False
    start_step: int = 0  # Where this job started (the restored step, or 0).


class Trainer:
    """Runs `train_step` from `first_step` to `last_step`, firing hooks (see hooks.py).

    The device is never waited on for logging: step N+1 is dispatched before step N's
    metrics are fetched. State hooks due at step N first fetch and check every pending
    step up to N. `sync=True` fetches every step right after dispatching it (a reference
    for tests and debugging; same results, slower).
    """

    def __init__(self, train_step: Callable, state, batches: Iterator, *, first_step: int,
                 last_step: int, granularity_names: Sequence[str],
                 put_batch: Callable = lambda batch: batch, sync: bool = False):
        self.train_step, self.state, self.batches = train_step, state, batches
        self.first_step, self.last_step = first_step, last_step
        self.names, self.put_batch, self.sync = list(granularity_names), put_batch, sync
        self.hooks: list[Hook] = []
        self.stop_reason: Optional[str] = None
        self.stall_seconds = 0.0  # Time state hooks held the loop with the device idle.
        self.loop_started = time.perf_counter()
        self._pending: collections.deque = collections.deque()  # (step, device metrics)
        self._last_metrics = (None, None)  # (step, host metrics) of the newest fetched step.

    def add_hook(self, fn, every: int = 0, **schedule) -> Hook:
        """Registers `fn(info)` (or a `Hook`) to run every `every` steps; keyword
        arguments as `Hook` (at_start, at_end, needs_state, when, name). Hooks due at the
        same step run in the order they were added."""
        hook = fn if isinstance(fn, Hook) else Hook(fn, every, **schedule)
        if isinstance(fn, Hook) and (every or schedule):
            raise ValueError("give the schedule to the Hook itself, not to add_hook")
        self.hooks.append(hook)
        return hook

    def request_stop(self, reason: str) -> None:
        """Stops the loop after the current step's hooks (e.g. preemption)."""
        self.stop_reason = reason

    def _fetch(self, keep: int) -> None:
        """Brings the metrics of all but the newest `keep` pending steps to the host, in
        order; checks each and runs the metrics hooks due at it."""
        while len(self._pending) > keep:
            step, metrics = self._pending.popleft()
            metrics = jax.device_get(metrics)
            fetched_at = time.perf_counter()
            bad = nonfinite(metrics, self.names)
            if bad:
                what, names = bad
                raise NonFiniteError(f"non-finite {what} at step {step} (granularity "
                                     f"{', '.join(names)}); stopped before saving it.")
            self._last_metrics = (step, metrics)
            for hook in self.hooks:
                if not hook.needs_state and hook.due(step, self.first_step, self.last_step):
                    hook(StepInfo(step, metrics, None, self, fetched_at))

    def _run_state_hooks(self, step: int) -> None:
        if not any(h.needs_state and h.due(step, self.first_step, self.last_step)
                   for h in self.hooks):
            return
        self._fetch(keep=0)  # NaN check of every step up to this one, before any save.
        metrics = self._last_metrics[1] if self._last_metrics[0] == step else None
        info = StepInfo(step, metrics, self.state, self)
        started = time.perf_counter()
        for hook in self.hooks:
            # Due-ness is re-evaluated hook by hook: a signal that arrives during an eval
            # makes the preemption hook due at this very step.
            if not (hook.needs_state and hook.due(step, self.first_step, self.last_step)):
                continue
            if self.stop_reason is not None and not hook.on_stop:
                continue  # Stopping: only the saving hooks still run.
            try:
                hook(info)
            except Preempted as e:  # A hook (an eval) gave up on a signal: stop here.
                self.request_stop(e.reason)
        self.stall_seconds += time.perf_counter() - started

    def run(self) -> int:
        """Trains; returns the step reached (last_step, or where a hook stopped it)."""
        opened = []
        try:
            for hook in self.hooks:
                hook.open(self)
                opened.append(hook)
            step = self.first_step
            self._run_state_hooks(step)
            self.stall_seconds = 0.0
            self.loop_started = time.perf_counter()
            while step < self.last_step and self.stop_reason is None:
                batch = self.put_batch(next(self.batches))
                self.state, metrics = self.train_step(self.state, batch)
                step += 1
                self._pending.append((step, metrics))
                # Step N-1's metrics are fetched while step N runs on the device.
                self._fetch(keep=0 if self.sync else 1)
                self._run_state_hooks(step)
            self._fetch(keep=0)
            return step
        finally:
            for hook in reversed(opened):
                hook.close()


def check_data_state_matches(data_state: dict, data_config, train_config: TrainConfig,
                             tokens: bool = True) -> None:
    """Resuming replays the saved pipeline: its shape and task (image set, for a family
    that reads images) must be this run's. The number of hosts may differ: the global
    batches do not depend on it."""
    if tokens:
        expected = {"task": data_config.task, "seq_len": train_config.seq_len,
                    "global_batch_size": train_config.global_batch_size}
    else:
        expected = {"dataset": data_config.dataset,
                    "global_batch_size": train_config.global_batch_size}
    diffs = [f"{k}: checkpoint {data_state.get(k)!r}, now {v!r}"
             for k, v in expected.items() if data_state.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"cannot resume: the checkpoint's data pipeline differs ({'; '.join(diffs)}). "
            "Resume with the original settings, or start a new --model_dir.")


def check_not_past_steps(model_dir: ModelDir, steps: int) -> None:
    """Refuses (TrainConfigError, before anything is written) a run whose newest checkpoint
    is already past `steps`: training cannot go back, and the schedule spans `steps`."""
    saved = model_dir.checkpoint_steps()
    if saved and saved[-1] > steps:
        raise TrainConfigError(
            f"{model_dir.path} is already at step {saved[-1]} > {steps} (--steps, or "
            f"TrainConfig.steps): give --steps above {saved[-1]} to train it further, or a new "
            "--model_dir to start over")


def rows_past_reason(model_dir: ModelDir, start: int) -> Optional[str]:
    """Why metrics.jsonl may hold rows past `start` when a newer checkpoint was set aside
    as corrupt (then the job that wrote them did save them); None otherwise."""
    set_aside = [int(p.name.split(".", 1)[0]) for p in model_dir.set_aside_checkpoints()
                 if p.name.split(".", 1)[0].isdigit()]
    newer = [step for step in set_aside if step > start]
    if not newer:
        return None
    return (f"written up to checkpoint {max(newer)}, which was set aside as corrupt, so "
            f"this job resumes from step {start}")


def missing_directories(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_while_empty(directories: Sequence[Path]) -> None:
    """Removes `directories` (deepest first) until one is not empty or not there."""
    for directory in directories:
        try:
            directory.rmdir()
        except (OSError, ValueError):  # Not empty: the job wrote its run files there (or
            # someone else). A gs:// dir (etils.epath) says so with a ValueError.
            return


def train(model_config: ModelConfig, data_config, train_config: TrainConfig,
          model_dir, vocab=None, show_progress: bool = True,
          stop_at: Optional[int] = None,
          hooks: Sequence[Callable[[RunContext], Hook]] = (), sync: bool = False,
          check_memory: bool = True) -> TrainResult:
    """Trains (or resumes) a run in `model_dir`; returns its eval history.

    `stop_at`: save and return at this step as if preempted, without changing the
    schedule (which always spans `train_config.steps`), e.g. to split a run into jobs.
    `hooks`: factories `fn(context) -> Hook` of extra hooks; they run after validation
    and before checkpointing at each step (`matlm train` adds the downstream-eval hook
    here when TrainConfig.downstream_eval_tasks is set).
    `sync`: fetch each step's metrics before the next step (see `Trainer`).
    `check_memory`: refuse a model whose parameters, optimizer state and activations
    cannot fit the local devices (matlm.training.memory_check) before anything is written.

    The model dir is locked for this job (matlm.model_dir.lock) once the cheap checks
    pass, before the expensive start-up (vocabulary, restore or compile, step-0 eval), so
    a second job is refused at once. A start that fails or is stopped before the run files
    are written leaves the model dir as it found it (a dir it created is removed again).
    SIGTERM/SIGINT: before the first step, `Preempted` propagates at the end of the
    current start-up phase (nothing new to save); from the first step on, the current
    step is saved and the result says `interrupted` (matlm.training.preemption).
    """
    with contextlib.ExitStack() as cleanup:  # Runs its callbacks last-in first-out.
        if SIGNALS.install():  # Start-up mode: `SIGNALS.check()` raises Preempted.
            cleanup.callback(SIGNALS.uninstall)
        return _train(model_config, data_config, train_config, model_dir, vocab,
                      show_progress, stop_at, hooks, sync, check_memory, cleanup)


def _train(model_config, data_config, train_config, model_dir, vocab, show_progress, stop_at,
           hooks, sync, check_memory, cleanup: contextlib.ExitStack) -> TrainResult:
    from matlm import data as data_lib  # TensorFlow enters here, not at import time.

    model_dir = ModelDir(model_dir)
    # --- Validate everything before any compile or write. -----------------------------
    objective = build_objective(model_config, train_config)
    mesh = mesh_lib.make_mesh(train_config.mesh_shape)
    mesh_lib.check_batch_fits(mesh, train_config.global_batch_size, train_config.microbatches)
    mesh_lib.check_shard_local_nesting(mesh, model_config.ffn_nest_blocks)
    if stop_at is not None and not 0 <= stop_at <= train_config.steps:
        raise TrainConfigError(f"--stop_at must be a step in [0, {train_config.steps}] "
                                  f"(TrainConfig.steps), got {stop_at}")
    if check_memory:
        from matlm.training.memory_check import check_fits_local_memory
        check_fits_local_memory(model_config, train_config, mesh)
    model_dir.check_same_model(model_config)
    check_not_past_steps(model_dir, train_config.steps)
    family = family_of(model_config)  # What the model reads: tokens of a vocabulary or not.
    if train_config.downstream_eval_tasks and not family.tokens:
        raise TrainingError(f"TrainConfig.downstream_eval_tasks evaluates text, but the "
                            f"{family.name!r} family reads no tokens: leave it empty")
    SIGNALS.check()  # Before the lock: a signal until here leaves the dir untouched.
    # --- The writer lock, before the expensive start-up: a second job is refused now. ----
    created = missing_directories(model_dir.path)
    lock = acquire_for_job(model_dir.path)  # Also refuses an unwritable dir.
    if lock is not None:  # Process 0's; released when train() returns or raises.
        # Last-in first-out: after the release, a dir this job created and left empty
        # (a refused or stopped start) is removed again.
        cleanup.callback(remove_while_empty, created)
        cleanup.callback(lock.release)
    # --- Validation that needs the vocabulary and the data (seconds, or minutes to train
    # a vocabulary): nothing is written to the model dir until it passes. ----------------
    if not family.tokens:
        # Images: no vocabulary; the data must be the shape the model reads.
        data_config.check(model_config.image_shape, model_config.patch_size)
    elif vocab is None:
        # A resumed run keeps the vocabulary it started with (copied into the model dir).
        vocab = model_dir.vocabulary(fallback=data_config.vocabulary)
    if family.tokens and vocab.vocab_size > model_config.vocab_size:
        raise CheckpointError(
            f"the vocabulary has {vocab.vocab_size} ids but the model only "
            f"{model_config.vocab_size}: set ModelConfig.vocab_size ≥ {vocab.vocab_size}")
    host, hosts = jax.process_index(), jax.process_count()

    def make_eval_iterator():
        # Each host takes its rows of the same global batches, so every host runs the same
        # number of (collective) eval steps.
        if not family.tokens:
            return data_config.eval_iterator(model_config.image_shape,
                                             train_config.global_batch_size,
                                             host_index=host, num_hosts=hosts)
        return data_config.eval_iterator(train_config.seq_len, train_config.global_batch_size,
                                         vocab, host_index=host, num_hosts=hosts)

    def make_train_iterator():
        if not family.tokens:
            return data_config.train_iterator(model_config.image_shape,
                                              train_config.global_batch_size,
                                              host_index=host, num_hosts=hosts)
        return data_config.train_iterator(train_config.seq_len,
                                          train_config.global_batch_size, vocab,
                                          host_index=host, num_hosts=hosts)

    def restore_train_iterator(data_state):
        if not family.tokens:
            from matlm.data.image_config import restore_image_iterator
            return restore_image_iterator(data_state, host_index=host, num_hosts=hosts)
        return data_lib.restore_batch_iterator(data_state, vocab, host_index=host,
                                               num_hosts=hosts)
    if not make_eval_iterator().num_batches:  # Fails now on a bad split.
        raise TrainingError(f"the eval split {data_config.eval_split!r} of "
                            f"{data_config.eval_task!r} is empty; give a task with "
                            "validation data")

    spec = model_config.granularities
    writer = MetricsWriter(model_dir, enabled=host == 0)  # Opens its files on first write.
    context = RunContext(model_config=model_config, data_config=data_config,
                         train_config=train_config, model_dir=model_dir, vocab=vocab, mesh=mesh,
                         objective=objective, writer=writer,
                         widths_by_name={name: spec.uniform(name) for name in spec.names})
    extra_hooks = [factory(context) for factory in hooks]
    if train_config.downstream_eval_tasks and not any(
            h.name == DOWNSTREAM_EVAL_HOOK for h in extra_hooks):
        raise TrainingError(
            "TrainConfig.downstream_eval_tasks is set but no downstream-eval hook was given: "
            "pass hooks=[matlm.evaluation.in_loop.downstream_eval_hook] to train() "
            "(`matlm train` does)")
    SIGNALS.check()  # Before the first file: a signal until here leaves nothing behind.
    # --- The first files: run_config.json, vocab.model. ---------------------------------
    model_dir.write_run_files(model_config, data_config, train_config,
                              getattr(vocab, "sentencepiece_model_file", "") or "")
    SIGNALS.check()  # Spares the restore or the initialising compile (seconds).

    # --- Restore or initialise. ---------------------------------------------------------
    optimizer = make_optimizer(train_config)
    schedule = learning_rate_schedule(train_config)
    checkpointer = RunCheckpointer(model_dir, keep=train_config.keep_checkpoints)
    target = abstract_state(model_config, optimizer, mesh)
    restored = checkpointer.restore_latest(target)
    if restored is None:
        state = init_state(model_config, optimizer, mesh, train_config.seed)
        batches = make_train_iterator()
    elif restored[1] is None:  # Params only (e.g. `matlm extract`): fine-tune from them.
        params, _, _, _, step = restored
        shardings = jax.tree.map(lambda x: x.sharding, target)
        state = jax.jit(lambda p: type(target)(step=np.int32(step), params=p,
                                               opt_state=optimizer.init(p)),
                        out_shardings=shardings)(params)
        batches = make_train_iterator()
        print(f"fine-tuning the parameters of {checkpointer.directory / str(step)} "
              f"(step {step}; a fresh optimizer state and data pipeline)")
    else:
        params, opt_state, data_state, meta, step = restored
        check_data_state_matches(data_state, data_config, train_config, family.tokens)
        state = type(target)(step=jax.device_put(np.int32(step), target.step.sharding),
                             params=params, opt_state=opt_state)
        batches = restore_train_iterator(data_state)
        print(f"resumed from {checkpointer.directory / str(step)} (step {step})")
    start = int(state.step)
    SIGNALS.check()  # Restore or initialisation (a compile) was the last start-up phase.
    # Rows a killed job wrote past `start` are written again.
    writer.resume_at(start, why=rows_past_reason(model_dir, start))

    # --- The loop and its hooks. --------------------------------------------------------
    train_step = make_train_step(model_config, objective, optimizer, schedule, mesh,
                                 train_config.microbatches)
    eval_step = make_eval_step(model_config, context.widths_by_name, mesh,
                               train_config.loss_chunk_size)
    peak, peak_source = peak_flops_per_device(train_config.peak_flops_per_device)
    # The ViT's tokens are its images' patches (and class token): `num_tokens` each.
    tokens_per_step = train_config.global_batch_size * (
        train_config.seq_len if family.tokens else model_config.num_tokens)
    batch_sharding = batch_sharding_of(model_config, mesh)
    # A classifier's eval also counts top-1 hits (train_step.make_eval_step).
    eval_extras = [] if family.tokens else [f"{name}/top1" for name in spec.names]

    flops_by_trained: dict = {}  # Counted once per set of trained granularities, not per step.

    def flops_of(metrics) -> float:
        # The FLOPs executed (joint pass over shared streams, or the sampled granularities).
        trained = tuple(bool(t) for t in np.asarray(metrics["trained"]) > 0)
        if trained not in flops_by_trained:
            flops_by_trained[trained] = tokens_per_step * objective.train_flops_per_token(
                model_config, train_config.seq_len, trained)
        return flops_by_trained[trained]

    trainer = Trainer(train_step, state, batches, first_step=start,
                      last_step=train_config.steps, granularity_names=objective.names,
                      put_batch=lambda batch: mesh_lib.global_batch(batch, mesh, batch_sharding),
                      sync=sync)
    # First of the metrics hooks: a failed save stops the job before anything else writes.
    trainer.add_hook(SaveWatch(checkpointer))
    progress = tqdm(total=train_config.steps, initial=start, disable=not show_progress or host,
                    unit="step", dynamic_ncols=True)
    trainer.add_hook(LogMetrics(writer, train_config.log_every, objective.names,
                                tokens_per_step, flops_of, peak * jax.device_count(), progress))
    validation = trainer.add_hook(ValidationEval(
        lambda params: validation_losses(eval_step, params, make_eval_iterator,
                                         train_config.eval_batches, mesh, batch_sharding),
        writer, every=train_config.eval_every, names=spec.names, extras=eval_extras,
        perplexity=family.tokens))
    for hook in extra_hooks:
        trainer.add_hook(hook)
    checkpoint = trainer.add_hook(Checkpoint(
        checkpointer, train_config.checkpoint_every, lambda: batches.state,
        {"model": model_config_to_dict(model_config), "seed": train_config.seed},
        before_save=lock.ensure_held if lock is not None else lambda: None))
    trainer.add_hook(Preemption(checkpoint, stop_at))

    print(f"training {param_count(model_config):,} parameters, granularities "
          f"{', '.join(objective.names)} ({objective.mode}), steps {start}→{train_config.steps}, "
          f"mesh {dict(mesh.shape)}, MFU peak {peak / 1e9:.0f} GFLOP/s per device ({peak_source})")
    try:
        final = trainer.run()
    except NonFiniteError as e:
        saved = checkpointer.steps()
        hint = ""
        if restored is not None:
            # Checksums catch a corrupted file on restore; say how to check anyway, since
            # a checkpoint written by an older matlm carries none.
            hint = (f" This job resumed from checkpoint {restored[-1]}: if that checkpoint is "
                    f"bad, `matlm verify --model_dir={model_dir.path}` checks every checkpoint.")
        raise NonFiniteError(
            f"{e} The last good checkpoint ({saved[-1] if saved else 'none'}) is kept: "
            f"lower the learning rate or check the data, then resume.{hint}") from None
    finally:
        failing = sys.exc_info()[1] is not None
        try:
            writer.close()
        except Exception:
            if not failing:
                raise
            # The run's own error (a failed save: the bucket gone, say) is the one to report;
            # the metrics' last upload failing with it is its consequence.
    # The run's evals from step 0 on (the final table's first column), not only this job's.
    history = writer.earlier_evals(spec.names, before=start, extras=eval_extras) + \
        validation.history
    return TrainResult(final_step=final, eval_history=history,
                       interrupted=trainer.stop_reason is not None, start_step=start)
