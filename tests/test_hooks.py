"""The hook-based Trainer loop on a stand-in train step (no model, milliseconds per step):
metrics are fetched one step behind the device, hooks fire at the right steps, a
non-finite step stops the loop before any state hook sees it, preemption saves the
current step, and training does not import evaluation."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.training.hooks import Hook, Preemption
from matlm.training.trainer import NonFiniteError, Trainer

REPO = Path(__file__).resolve().parents[1]
NAMES = ("A", "B")


@jax.jit
def _step(state, batch):
    # Loss = the batch value times the step number, so each step's metrics are
    # recognisable; a NaN batch poisons that step only.
    new = {"step": state["step"] + 1, "w": state["w"] + batch}
    loss = batch * new["step"]
    metrics = {"loss": loss, "ce": jnp.stack([loss, 2 * loss]), "trained": jnp.ones(2),
               "grad_norm": jnp.float32(1), "param_norm": jnp.abs(new["w"]),
               "learning_rate": jnp.float32(0.1)}
    return new, metrics


def make_trainer(events, batches=None, first=0, last=6, sync=False):
    def train_step(state, batch):
        out = _step(state, batch)
        events.append(("dispatch", int(out[0]["step"])))  # Only the step counter is read.
        return out
    state = {"step": jnp.int32(first), "w": jnp.float32(0)}
    batches = iter(batches if batches is not None else [np.float32(1)] * (last - first))
    return Trainer(train_step, state, batches, first_step=first, last_step=last,
                   granularity_names=NAMES, sync=sync)


def record(events, kind):
    def hook(info):
        events.append((kind, info.step))
        if info.metrics is not None:  # The metrics handed over are that step's own.
            assert float(info.metrics["loss"]) == info.step
            np.testing.assert_array_equal(info.metrics["ce"], [info.step, 2 * info.step])
        if info.state is not None:  # The state handed over is the one after that step.
            assert int(info.state["step"]) == info.step
    return hook


def test_metrics_are_fetched_one_step_behind_the_device():
    events = []
    trainer = make_trainer(events, last=5)
    trainer.add_hook(record(events, "metrics"), every=1, needs_state=False)
    trainer.add_hook(record(events, "state"), every=3)
    assert trainer.run() == 5
    # Step N's metrics come back only after step N+1 was dispatched, except where a state
    # hook is due (step 3): everything up to it is fetched and checked first.
    assert events == [("dispatch", 1), ("dispatch", 2), ("metrics", 1), ("dispatch", 3),
                      ("metrics", 2), ("metrics", 3), ("state", 3), ("dispatch", 4),
                      ("dispatch", 5), ("metrics", 4), ("metrics", 5)]


def test_sync_mode_fetches_every_step_before_the_next():
    events = []
    trainer = make_trainer(events, last=4, sync=True)
    trainer.add_hook(record(events, "metrics"), every=1, needs_state=False)
    trainer.run()
    assert events == [("dispatch", 1), ("metrics", 1), ("dispatch", 2), ("metrics", 2),
                      ("dispatch", 3), ("metrics", 3), ("dispatch", 4), ("metrics", 4)]


def test_hooks_fire_at_their_steps_in_order():
    events = []
    trainer = make_trainer(events, last=7)
    trainer.add_hook(record(events, "eval"), every=3, at_start=True, at_end=True)
    trainer.add_hook(record(events, "save"), every=2, at_end=True)
    trainer.add_hook(record(events, "when"), when=lambda step: step == 5)
    trainer.add_hook(record(events, "log"), every=4, at_end=True, needs_state=False)
    trainer.run()
    fired = [e for e in events if e[0] != "dispatch"]
    assert fired == [("eval", 0), ("save", 2), ("eval", 3), ("log", 4), ("save", 4),
                     ("when", 5), ("eval", 6), ("save", 6), ("log", 7), ("eval", 7),
                     ("save", 7)]  # A step's metrics hooks run before its state hooks.


def test_a_resumed_job_with_nothing_left_fires_start_and_end_hooks_once():
    events = []
    trainer = make_trainer(events, first=4, last=4)
    trainer.add_hook(record(events, "eval"), every=2, at_start=True, at_end=True)
    trainer.add_hook(record(events, "save"), every=2, at_end=True)
    assert trainer.run() == 4
    assert events == [("eval", 4), ("save", 4)]


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("save_every, poisoned", [(1, 5), (4, 4), (4, 3)])
def test_non_finite_step_stops_before_any_state_hook_sees_it(sync, save_every, poisoned):
    events = []
    batches = [np.float32(1)] * 8
    batches[poisoned - 1] = np.float32(np.nan)
    trainer = make_trainer(events, batches, last=8, sync=sync)
    trainer.add_hook(record(events, "metrics"), every=1, needs_state=False)
    trainer.add_hook(record(events, "save"), every=save_every)
    with pytest.raises(NonFiniteError, match=rf"non-finite loss at step {poisoned} "
                                             r"\(granularity A, B\); stopped before saving"):
        trainer.run()
    saved = [s for kind, s in events if kind == "save"]
    assert saved == [s for s in range(1, poisoned) if s % save_every == 0]
    assert [s for kind, s in events if kind == "metrics"] == list(range(1, poisoned))


def test_non_finite_check_names_loss_or_parameters_and_the_granularities():
    from matlm.training.hooks import nonfinite
    good = {"loss": 1.0, "ce": [1.0, 1.0], "trained": [1, 0], "param_norm": 3.0}
    assert nonfinite(good, NAMES) is None
    assert nonfinite({**good, "param_norm": np.nan}, NAMES) == ("parameters", ["A"])
    assert nonfinite({**good, "ce": [1.0, np.nan], "trained": [1, 1]}, NAMES) == ("loss", ["B"])
    # An untrained granularity's CE is not looked at; a bad total loss names the trained.
    assert nonfinite({**good, "ce": [1.0, np.nan]}, NAMES) is None
    assert nonfinite({**good, "loss": np.inf}, NAMES) == ("loss", ["A"])


class _Saves(Hook):
    def __init__(self):
        super().__init__(every=100, at_end=True, name="checkpoint")
        self.saved = []

    def __call__(self, info):
        self.saved.append(info.step)


def test_stop_at_saves_that_step_and_stops():
    events = []
    trainer = make_trainer(events, last=6)
    saves = trainer.add_hook(_Saves())
    trainer.add_hook(Preemption(saves, stop_at=3))
    assert trainer.run() == 3
    assert trainer.stop_reason == "stop_at" and saves.saved == [3]
    assert max(s for kind, s in events if kind == "dispatch") == 3


def test_sigterm_saves_the_current_step_and_restores_the_handler():
    events = []
    trainer = make_trainer(events, last=6)
    saves = trainer.add_hook(_Saves())
    preemption = trainer.add_hook(Preemption(saves))

    def terminate_after_step_2(info):
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    trainer.add_hook(terminate_after_step_2, every=1, needs_state=False)
    before = signal.getsignal(signal.SIGTERM)
    assert trainer.run() == 3  # Step 2's metrics arrive while step 3 runs.
    assert trainer.stop_reason == "SIGTERM" and saves.saved == [3]
    assert preemption.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_an_eval_hook_saves_that_step_and_skips_the_other_hooks():
    from matlm.training.preemption import SIGNALS
    events = []
    trainer = make_trainer(events, last=6)

    def eval_interrupted_at_step_2(info):
        events.append(("eval", info.step))
        if info.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # Arrives mid-eval...
            SIGNALS.check()  # ... which gives up at its next batch.
            events.append(("eval finished", info.step))
    trainer.add_hook(eval_interrupted_at_step_2, every=2)
    trainer.add_hook(record(events, "after eval"), every=1)  # Not a saving hook.
    saves = trainer.add_hook(_Saves())
    saves.on_stop = True  # A saving hook still runs on a stopping step.
    saves.every = 5
    trainer.add_hook(Preemption(saves))
    assert trainer.run() == 2
    assert trainer.stop_reason == "SIGTERM"
    assert saves.saved == [2]  # Saved by the preemption hook although not due at 2.
    assert ("eval finished", 2) not in events and ("after eval", 2) not in events
    assert ("after eval", 1) in events
    assert max(s for kind, s in events if kind == "dispatch") == 2


def test_add_hook_refuses_a_schedule_for_a_hook_object():
    trainer = make_trainer([])
    with pytest.raises(ValueError, match="give the schedule to the Hook itself"):
        trainer.add_hook(_Saves(), every=3)


def test_training_does_not_import_evaluation():
    code = ("import sys, matlm.training.trainer, matlm.training.hooks, "
            "matlm.model_dir, matlm.cli.train\n"
            "bad = sorted(m for m in sys.modules if m.startswith('matlm.evaluation'))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


FINALIZER_SIGNAL_SCRIPT = """
import gc, os, signal, sys
from matlm.training.preemption import SIGNALS, Preempted

class SignalsWhileFinalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # The handler runs between these bytecodes.
            pass

hook_before = sys.unraisablehook
assert SIGNALS.install()
obj = SignalsWhileFinalized()
del obj
gc.collect()
assert SIGNALS.received == "SIGINT", SIGNALS.received
try:
    SIGNALS.check()
    raise SystemExit("check() did not raise")
except Preempted:
    pass
SIGNALS.uninstall()
assert sys.unraisablehook is hook_before  # uninstall() put it back.
print("ok")
"""


def test_a_signal_that_lands_in_a_finalizer_is_recorded_not_printed_and_raised_later():
    """A signal delivered while the main thread runs a `__del__` or gc callback (JAX has
    one) cannot propagate: no "Exception ignored" traceback, and `check()` raises it.
    In a subprocess: pytest replaces sys.unraisablehook with its own."""
    done = subprocess.run([sys.executable, "-c", FINALIZER_SIGNAL_SCRIPT],
                          cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_progress_clock_starts_after_the_first_step():
    """The first step holds compilation and the step-0 eval: counted in the bar's rate, it
    made the first ETA ~30x too long (issue 28)."""
    import io
    import time
    from types import SimpleNamespace
    from tqdm import tqdm
    from matlm.training.hooks import LogMetrics
    bar = tqdm(total=1000, initial=10, file=io.StringIO(), mininterval=0, miniters=1)
    hook = LogMetrics(writer=None, log_every=10**6, names=NAMES, tokens_per_step=1,
                      flops_of=lambda metrics: 0.0, peak_flops_total=1.0, progress=bar)
    assert bar.postfix == "compiling…"
    trainer = SimpleNamespace(loop_started=time.perf_counter(), last_step=1000,
                              stall_seconds=0.0)
    time.sleep(1.0)  # "Compilation".
    for step in (11, 12, 13):
        hook(SimpleNamespace(step=step, metrics={}, trainer=trainer, fetched_at=0.0))
        time.sleep(0.001)
    assert bar.n == 13 and not bar.postfix
    rate = bar.format_dict["rate"]  # Steps/s, from the steps after the first only.
    assert rate is not None and rate > 20, rate  # With the first step: < 6.


def test_the_resume_message_says_why_rows_past_the_step_exist(tmp_path, capsys):
    import json
    from matlm.model_dir import ModelDir
    from matlm.training.metrics import MetricsWriter
    from matlm.training.trainer import rows_past_reason
    model_dir = ModelDir(tmp_path)
    rows = "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in range(0, 11))
    model_dir.metrics_file.write_text(rows)
    assert rows_past_reason(model_dir, 5) is None  # No checkpoint set aside: a kill.
    MetricsWriter(model_dir).resume_at(8, why=rows_past_reason(model_dir, 8))
    assert capsys.readouterr().out.strip() == (
        "metrics.jsonl: dropped 2 rows past step 8 (written by a job that stopped before "
        "saving them; they are recomputed)")
    (model_dir.checkpoints / "8.corrupt").mkdir(parents=True)
    assert rows_past_reason(model_dir, 8) is None  # Not past the step resumed from.
    (model_dir.checkpoints / "8.corrupt1").mkdir()  # Set aside twice: the newest one counts.
    MetricsWriter(model_dir).resume_at(5, why=rows_past_reason(model_dir, 5))
    assert capsys.readouterr().out.strip() == (
        "metrics.jsonl: dropped 3 rows past step 5 (written up to checkpoint 8, which was set "
        "aside as corrupt, so this job resumes from step 5; they are recomputed)")
    assert [json.loads(r)["step"] for r in model_dir.metrics_file.read_text().splitlines()] \
        == list(range(6))


def test_the_cpu_peak_for_mfu_is_the_best_of_a_timed_window_and_labelled_an_estimate(
        monkeypatch):
    from matlm.training import metrics
    # As many repeats as the window holds (the old five did not see past a busy moment):
    # the call lasts the whole window, however fast each matmul is. (Not a comparison of
    # repeat counts between two windows: a busy neighbour can slow the longer one.)
    start = time.perf_counter()
    flops, reps = metrics.measured_matmul_flops(n=64, warmup_s=0.0, budget_s=0.2, min_reps=3)
    assert time.perf_counter() - start >= 0.2
    assert math.isfinite(flops) and flops > 0 and reps >= 3
    monkeypatch.setattr(metrics, "measured_matmul_flops", lambda: (1e11, 42))
    peak, source = metrics.peak_flops_per_device(None)
    assert peak == 1e11 and source.startswith("an estimate: the best of 42 fp32 matmuls on ")
    assert "TrainConfig.peak_flops_per_device" in source
    assert metrics.peak_flops_per_device(2e12) == (2e12, "configured")


def test_a_resumed_run_keeps_its_earlier_evals_for_the_final_table(tmp_path):
    """The final table's "val loss @ step" column starts at step 0 after a resume, read
    from metrics.jsonl (not at the step the job resumed from)."""
    import json
    from matlm.model_dir import ModelDir
    from matlm.training.metrics import MetricsWriter
    model_dir = ModelDir(tmp_path)
    rows = [{"step": 0, "eval/A/loss": 9.0, "eval/B/loss": 8.0}, {"step": 5, "train/loss": 7.0},
            {"step": 10, "eval/A/loss": 6.0, "eval/B/loss": 5.0},
            {"step": 12, "eval/A/loss": 1.0},  # Incomplete: not a row of the table.
            {"step": 20, "eval/A/loss": 4.0, "eval/B/loss": 3.0}]
    model_dir.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = MetricsWriter(model_dir)
    writer.resume_at(20)
    assert writer.earlier_evals(NAMES, before=20) == [(0, {"A": 9.0, "B": 8.0}),
                                                      (10, {"A": 6.0, "B": 5.0})]
    assert MetricsWriter(model_dir).earlier_evals(NAMES, before=20) == []  # Not resumed.
