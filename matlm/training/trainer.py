"""The trainer loop: validate → restore or init → step, log, eval, checkpoint → report.

Everything that can be wrong with the inputs (objective, mesh, batch, model dir, data,
vocabulary) is checked before the first compile. SIGTERM/SIGINT saves the current step
and returns normally (exit 0), so a preempted job resumes exactly where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from matlm.model import ModelConfig
from matlm.model.counting import (joint_train_flops_per_token, param_count,
                                  train_flops_per_token)
from matlm.training import mesh as mesh_lib
from matlm.training.checkpointing import (CheckpointError, RunCheckpointer,
                                          model_config_to_dict, read_run_config)
from matlm.training.config import TrainConfig
from matlm.training.metrics import MetricsWriter, peak_flops_per_device
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import (abstract_state, init_state, make_eval_step,
                                       make_train_step)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


@dataclasses.dataclass
class TrainResult:
    final_step: int
    eval_history: list  # [(step, {granularity: mean CE})]
    interrupted: bool = False


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop saves and returns at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._set)
            except ValueError:  # Not the main thread: no signal handling.
                pass
        return self

    def _set(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_model_dir(model_dir: Path, model_config: ModelConfig) -> None:
    """A model dir that already holds a run must hold a run of *this* model."""
    if not (model_dir / "run_config.json").exists():
        if (model_dir / "checkpoints").exists() and any((model_dir / "checkpoints").iterdir()):
            raise CheckpointError(f"{model_dir} holds checkpoints but no run_config.json; "
                                  "refusing to train over them. Use a new --model_dir.")
        return
    saved = read_run_config(model_dir).get("model", {})
    current = model_config_to_dict(model_config)
    diffs = [f"{k}: saved {saved.get(k)!r}, now {json.loads(json.dumps(v))!r}"
             for k, v in current.items() if json.loads(json.dumps(v)) != saved.get(k)]
    if diffs:
        raise CheckpointError(
            f"{model_dir} holds a run of a different model ({'; '.join(diffs)}). "
            "Nothing was changed; use a new --model_dir or the saved model config.")


def check_data_state_matches(data_state: dict, data_config, train_config: TrainConfig,
                             hosts: int) -> None:
    """Resuming replays the saved pipeline: its shape and task must be this run's."""
    expected = {"task": data_config.task, "seq_len": train_config.seq_len,
                "global_batch_size": train_config.global_batch_size, "num_hosts": hosts}
    diffs = [f"{k}: checkpoint {data_state.get(k)!r}, now {v!r}"
             for k, v in expected.items() if data_state.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"cannot resume: the checkpoint's data pipeline differs ({'; '.join(diffs)}). "
            "Resume with the original settings, or start a new --model_dir.")


def _write_run_files(model_dir: Path, model_config, data_config, train_config, vocab_path):
    if jax.process_index() != 0:
        return
    model_dir.mkdir(parents=True, exist_ok=True)
    run_config = model_dir / "run_config.json"
    if not run_config.exists():
        run_config.write_text(json.dumps({
            "model": model_config_to_dict(model_config),
            "data": dataclasses.asdict(data_config),
            "train": dataclasses.asdict(train_config)}, indent=2))
    if vocab_path and not (model_dir / "vocab.model").exists():
        shutil.copyfile(vocab_path, model_dir / "vocab.model")


def evaluate(eval_step, params, make_eval_iterator, max_batches: int, mesh) -> dict:
    """Mean validation CE per submodel over the eval split (or its first batches)."""
    sums: dict = {}
    for i, batch in enumerate(make_eval_iterator()):
        if max_batches and i >= max_batches:
            break
        out = jax.device_get(eval_step(params, mesh_lib.global_batch(batch, mesh)))
        for name, (ce_sum, count) in out.items():
            s, c = sums.get(name, (0.0, 0.0))
            sums[name] = (s + float(ce_sum), c + float(count))
    if not sums:
        raise TrainingError("the validation split produced no batches")
    return {name: s / max(c, 1.0) for name, (s, c) in sums.items()}


def train(model_config: ModelConfig, data_config, train_config: TrainConfig,
          model_dir, vocab=None, show_progress: bool = True,
          stop_at: Optional[int] = None) -> TrainResult:
    """Trains (or resumes) a run in `model_dir`; returns its eval history.

    `stop_at`: save and return at this step as if preempted, without changing the
    schedule (which always spans `train_config.steps`), e.g. to split a run into jobs.
    """
    from matlm import data as data_lib  # TensorFlow enters here, not at import time.

    model_dir = Path(model_dir).absolute()
    # --- Validate everything before any compile or write. -----------------------------
    objective = build_objective(model_config, train_config)
    mesh = mesh_lib.make_mesh(train_config.mesh_shape)
    mesh_lib.check_batch_fits(mesh, train_config.global_batch_size, train_config.microbatches)
    mesh_lib.check_shard_local_nesting(mesh, model_config.ffn_nest_blocks)
    check_model_dir(model_dir, model_config)
    if vocab is None:
        # A resumed run keeps the vocabulary it started with (copied into the model dir).
        own = model_dir / "vocab.model"
        vocab = data_lib.load_vocabulary(str(own)) if own.exists() else data_config.vocabulary()
    if vocab.vocab_size > model_config.vocab_size:
        raise CheckpointError(
            f"the vocabulary has {vocab.vocab_size} ids but the model only "
            f"{model_config.vocab_size}: set ModelConfig.vocab_size ≥ {vocab.vocab_size}")
    host, hosts = jax.process_index(), jax.process_count()

    def make_eval_iterator(pad_to=None):
        return data_config.eval_iterator(train_config.seq_len, train_config.global_batch_size,
                                         vocab, host_index=host, num_hosts=hosts,
                                         pad_to_num_batches=pad_to)
    local_eval_batches = make_eval_iterator().num_batches  # Fails now on a bad split.
    if not local_eval_batches:
        raise TrainingError(f"the eval split {data_config.eval_split!r} of {data_config.task!r} "
                            "is empty on this host; give a task with validation data")
    if hosts > 1:
        # Every host must run the same number of (collective) eval steps: pad to the max.
        from jax.experimental import multihost_utils
        most = int(np.max(multihost_utils.process_allgather(np.int32(local_eval_batches))))
        make_eval_iterator = functools.partial(make_eval_iterator, pad_to=most)

    vocab_path = getattr(vocab, "sentencepiece_model_file", "") or ""
    _write_run_files(model_dir, model_config, data_config, train_config, vocab_path)

    # --- Restore or initialise. ---------------------------------------------------------
    optimizer = make_optimizer(train_config)
    schedule = learning_rate_schedule(train_config)
    checkpointer = RunCheckpointer(model_dir, keep=train_config.keep_checkpoints)
    target = abstract_state(model_config, optimizer, mesh)
    restored = checkpointer.restore_latest(target)
    if restored is None:
        state = init_state(model_config, optimizer, mesh, train_config.seed)
        batches = data_config.train_iterator(train_config.seq_len,
                                             train_config.global_batch_size, vocab,
                                             host_index=host, num_hosts=hosts)
    else:
        params, opt_state, data_state, meta, step = restored
        check_data_state_matches(data_state, data_config, train_config, hosts)
        state = type(target)(step=jax.device_put(np.int32(step), target.step.sharding),
                             params=params, opt_state=opt_state)
        batches = data_lib.restore_batch_iterator(data_state, vocab, host_index=host)
        print(f"resumed from {checkpointer.directory / str(step)} (step {step})")
    start = int(state.step)

    train_step = make_train_step(model_config, objective, optimizer, schedule, mesh,
                                 train_config.microbatches)
    spec = model_config.granularities
    widths_by_name = {name: spec.uniform(name) for name in spec.names}
    eval_step = make_eval_step(model_config, widths_by_name, mesh)
    writer = MetricsWriter(model_dir, enabled=host == 0)
    peak, peak_source = peak_flops_per_device(train_config.peak_flops_per_device)
    tokens_per_step = train_config.global_batch_size * train_config.seq_len
    flops_per_token = np.array([train_flops_per_token(model_config, train_config.seq_len, w)
                                for w in objective.widths], dtype=np.float64)
    # Training every granularity runs one joint pass that shares streams (MFU counts the
    # FLOPs executed); sampled granularities run one after another.
    joint_flops_per_token = (joint_train_flops_per_token(model_config, train_config.seq_len,
                                                         objective.widths)
                             if objective.mode == "all" else None)
    meta = {"model": model_config_to_dict(model_config), "seed": train_config.seed}

    def run_eval(step):
        losses = evaluate(eval_step, state.params, make_eval_iterator,
                          train_config.eval_batches, mesh)
        writer.write(step, {f"eval/{n}/loss": v for n, v in losses.items()}
                     | {f"eval/{n}/perplexity": math.exp(min(v, 50)) for n, v in losses.items()})
        if train_config.downstream_eval_tasks:
            from matlm.evaluation import in_loop_eval
            writer.write(step, in_loop_eval(
                state.params, model_config, vocab, list(train_config.downstream_eval_tasks),
                train_config.downstream_eval_examples, widths_by_name))
        history.append((step, losses))
        return losses

    def save(step):
        checkpointer.save(step, state, batches.state, {**meta, "step": step})

    history: list = []
    run_eval(start)
    print(f"training {param_count(model_config):,} parameters, granularities "
          f"{', '.join(objective.names)} ({objective.mode}), steps {start}→{train_config.steps}, "
          f"mesh {dict(mesh.shape)}, MFU peak {peak / 1e9:.0f} GFLOP/s per device ({peak_source})")
    progress = tqdm(total=train_config.steps, initial=start, disable=not show_progress or host,
                    unit="step", dynamic_ncols=True)
    window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
    interrupted = False
    try:
        with _StopFlag() as stop:
            for step in range(start, train_config.steps):
                batch = mesh_lib.global_batch(next(batches), mesh)
                state, metrics = train_step(state, batch)
                metrics = jax.device_get(metrics)
                trained = metrics["trained"] > 0
                bad = [n for n, t, ce in zip(objective.names, trained, metrics["ce"])
                       if t and not np.isfinite(ce)]
                what = "loss" if bad or not np.isfinite(metrics["loss"]) else (
                    "parameters" if not np.isfinite(metrics["param_norm"]) else None)
                if what:
                    trained_names = [n for n, t in zip(objective.names, trained) if t]
                    raise TrainingError(
                        f"non-finite {what} at step {step + 1} (granularity "
                        f"{', '.join(bad or trained_names)}); stopped before saving it. The "
                        f"last good checkpoint ({checkpointer.steps()[-1] if checkpointer.steps() else 'none'}) "
                        "is kept: lower the learning rate or check the data, then resume.")
                done = step + 1
                window_steps += 1
                window_flops += tokens_per_step * (
                    joint_flops_per_token if joint_flops_per_token is not None
                    else float(flops_per_token[trained].sum()))
                progress.update(1)
                if done % train_config.log_every == 0 or done == train_config.steps:
                    elapsed = time.perf_counter() - window_start
                    scalars = {"train/loss": float(metrics["loss"]),
                               "train/grad_norm": float(metrics["grad_norm"]),
                               "train/param_norm": float(metrics["param_norm"]),
                               "train/learning_rate": float(metrics["learning_rate"]),
                               "perf/step_time_s": elapsed / window_steps,
                               "perf/tokens_per_s": tokens_per_step * window_steps / elapsed,
                               "perf/mfu": window_flops / elapsed / (peak * jax.device_count())}
                    scalars |= {f"train/{n}/loss": float(ce) for n, t, ce in
                                zip(objective.names, trained, metrics["ce"]) if t}
                    writer.write(done, scalars)
                    progress.set_postfix(loss=f"{scalars['train/loss']:.3f}",
                                         tok_s=f"{scalars['perf/tokens_per_s']:.0f}",
                                         mfu=f"{scalars['perf/mfu']:.1%}")
                    window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
                if train_config.eval_every and done % train_config.eval_every == 0 \
                        and done < train_config.steps:
                    run_eval(done)
                if done % train_config.checkpoint_every == 0:
                    save(done)
                if stop.signal or done == stop_at:
                    progress.write(f"{stop.signal or 'stop_at'}: saving step {done} and exiting")
                    save(done)
                    interrupted = True
                    break
        progress.close()
        final = int(state.step)
        if not interrupted:
            save(final)
            if not history or history[-1][0] != final:
                run_eval(final)
    finally:
        # Also on errors: let in-flight async saves finish so no half-written step is
        # left behind, and flush the metrics.
        checkpointer.wait()
        writer.close()
    return TrainResult(final_step=final, eval_history=history, interrupted=interrupted)
