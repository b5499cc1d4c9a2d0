"""Fault injection, end to end through `matlm train`: what a preempted, crashed, doubled or
corrupted job does to its model dir. A new case is one line in a table below.

- kill -9 during a checkpoint save → the resumed run equals a continuous one bitwise, and
  metrics.jsonl holds each step once;
- a corrupted checkpoint file (byte flip, bit flip, truncation, emptied) → set aside as
  `<step>.corrupt` with a warning, the previous checkpoint restored, the run finishes;
- two writers on one model dir → the second is refused at once, naming the first;
- SIGTERM/SIGINT during start-up, the first compile, the final eval → exit 0, no
  traceback, nothing lost; a finished run started again appends nothing.
(The bad-input table is tests/test_bad_input.py; lock details tests/test_lock.py.)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from matlm.cli.main import main as matlm_main
from matlm.model_dir.lock import LOCK_FILE_NAME
from matlm.model_dir import load_checkpoint_for_inference

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def flags(model_dir, vocab, steps=STEPS, *extra):
    return [f"--model_dir={model_dir}", "--no_progress", f"--gin.TrainConfig.steps={steps}",
            "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.checkpoint_every=2",
            "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.eval_batches=1",
            "--gin.TrainConfig.mesh_shape=(1,1,1)", "--gin.TrainConfig.seq_len=32",
            "--gin.TrainConfig.global_batch_size=4", "--gin.TrainConfig.warmup_steps=2",
            "--gin.ModelConfig.vocab_size=2048",
            f"--gin.DataConfig.vocab_path='{vocab.sentencepiece_model_file}'", *extra]


def command(*args):
    return [sys.executable, "-m", "matlm.cli.main", "train", *args]


ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def rows(model_dir) -> list:
    return [json.loads(line) for line in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(model_dir) -> dict:
    found = {}
    for row in rows(model_dir):
        if "train/loss" in row:
            assert row["step"] not in found, f"step {row['step']} logged twice"
            found[row["step"]] = row["train/loss"]
    return found


def eval_steps(model_dir) -> list:
    return [row["step"] for row in rows(model_dir) if any(k.startswith("eval/") for k in row)]


def checkpoint_steps(model_dir) -> list:
    return sorted(int(p.name) for p in (Path(model_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def _wait_for(proc, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened; exit {proc.poll()}")


def assert_params_equal(dir_a, dir_b, step):
    a = load_checkpoint_for_inference(dir_a, step).params
    b = load_checkpoint_for_inference(dir_b, step).params
    import jax
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.fixture(scope="module", autouse=True)
def one_device():
    # In-process runs build their mesh from jax.devices(): use the first of the 8 fake
    # ones, as the subprocess runs (one device) do.
    import jax
    import matlm.training.mesh as mesh_lib
    original = mesh_lib.make_mesh
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mesh_lib, "make_mesh",
                      lambda shape, devices=None: original(shape, devices or jax.devices()[:1]))
        yield


@pytest.fixture(scope="module")
def continuous(tmp_path_factory, wiki_vocab):
    """A run trained start to end in one job: the reference every fault is compared with."""
    model_dir = tmp_path_factory.mktemp("continuous") / "run"
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    return model_dir


# --- Crashes and corruption. ------------------------------------------------------------------

KILL_DURING_SAVE = """
import os, signal, sys
import matlm.model_dir as model_dir
original = model_dir.RunCheckpointer.save
def save_then_die(self, step, *args, **kwargs):
    original(self, step, *args, **kwargs)
    if step == {step}:  # The asynchronous save of this step is in flight: kill -9 now.
        os.kill(os.getpid(), signal.SIGKILL)
model_dir.RunCheckpointer.save = save_then_die
from matlm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_a_save_resumes_bitwise_with_each_step_logged_once(
        tmp_path, wiki_vocab, continuous, capsys):
    model_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(step=4), "train",
                             *flags(model_dir, wiki_vocab)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    # The lock of the killed job is stale (its pid is gone): the rerun takes it over.
    assert (model_dir / LOCK_FILE_NAME).exists()
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    assert "took over the stale writer lock" in capsys.readouterr().out
    assert train_rows(model_dir) == train_rows(continuous)  # Bitwise, each step once.
    assert rows(model_dir)[-1] == rows(continuous)[-1]  # The final eval.
    assert_params_equal(model_dir, continuous, STEPS)
    assert not (model_dir / LOCK_FILE_NAME).exists()


def _largest_file(root: Path) -> Path:
    return max((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def byte_flip(step_dir):
    path = _largest_file(step_dir / "params")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def bit_flip(step_dir):
    path = _largest_file(step_dir / "opt_state")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))


def truncate(step_dir):
    path = _largest_file(step_dir / "params")
    os.truncate(path, path.stat().st_size // 2)


def empty(step_dir):
    os.truncate(_largest_file(step_dir / "params"), 0)


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [byte_flip, bit_flip, truncate, empty])
def test_a_corrupted_newest_checkpoint_is_set_aside_and_the_run_goes_on(
        tmp_path, wiki_vocab, continuous, corrupt, capsys):
    model_dir = tmp_path / "run"
    shutil.copytree(continuous, model_dir)
    corrupt(model_dir / "checkpoints" / str(STEPS))
    # Started again, the finished run finds its newest checkpoint bad: it restores the
    # previous one and trains the last steps again.
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoints/{STEPS}" in out and "moved aside" in out
    assert (model_dir / "checkpoints" / f"{STEPS}.corrupt").is_dir()
    assert f"resumed from {model_dir / 'checkpoints' / str(STEPS - 2)}" in out
    # The retrained steps equal the continuous run's bitwise, and are logged once.
    assert train_rows(model_dir) == train_rows(continuous)
    assert rows(model_dir)[-1] == rows(continuous)[-1]  # The final eval.
    assert_params_equal(model_dir, continuous, STEPS)


# --- Two writers. -----------------------------------------------------------------------------

SECOND_WRITERS = [
    [],                                             # the same job started twice
    ["--gin.TrainConfig.learning_rate=0.01"],       # another recipe on the same dir
    ["--steps=2000", "--stop_at=1500"],             # another length
]


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, wiki_vocab, capsys):
    model_dir = tmp_path / "run"
    first = subprocess.Popen(command(*flags(model_dir, wiki_vocab, 1000)), cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(first, lambda: (model_dir / "metrics.jsonl").exists()
                  and bool(train_rows(model_dir)))
        config_before = (model_dir / "run_config.json").read_bytes()
        for second in SECOND_WRITERS:  # One process on one model dir, each refused at once.
            assert matlm_main(["train", *flags(model_dir, wiki_vocab, 1000), *second]) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"pid {first.pid}" in err and "another job" in err, err
        assert (model_dir / "run_config.json").read_bytes() == config_before
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    train_rows(model_dir)  # Each step once: the refused jobs wrote no row.
    assert not (model_dir / LOCK_FILE_NAME).exists()


# --- Signals outside the loop. ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, when", [
    (signal.SIGTERM, "importing"),      # before matlm has read its flags
    (signal.SIGINT, "importing"),       # Ctrl-C at start-up: no traceback
    (signal.SIGTERM, "locked"),         # model dir locked, run files written, restoring
    (signal.SIGINT, "first_step"),      # during the first compile: step 1 is saved
])
def test_a_signal_at_start_up_exits_zero_without_a_traceback(tmp_path, wiki_vocab, sig, when):
    model_dir = tmp_path / "run"
    proc = subprocess.Popen(command(*flags(model_dir, wiki_vocab, 1000)), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if when == "importing":
        time.sleep(1.0)
    elif when == "locked":
        _wait_for(proc, lambda: (model_dir / "run_config.json").exists())
    else:
        _wait_for(proc, lambda: (model_dir / "tensorboard").exists()
                  or (model_dir / "metrics.jsonl").exists())
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert not (model_dir / LOCK_FILE_NAME).exists()
    saved = checkpoint_steps(model_dir) if (model_dir / "checkpoints").exists() else []
    if when == "first_step":
        assert saved and saved[-1] >= 1  # The step it was at.
    else:
        assert saved == []  # Nothing new existed to save.
    # Whatever it left, the same command then runs (and resumes when there is a step).
    if when == "first_step":
        assert f"{sig.name}: saving step {saved[-1]}" in out


@pytest.mark.slow
def test_a_signal_during_the_final_save_exits_zero_with_the_step_saved(
        tmp_path, wiki_vocab, continuous, monkeypatch):
    import matlm.model_dir as model_dir_lib
    real = model_dir_lib.RunCheckpointer.wait

    waits = []

    def signal_then_wait(self):
        waits.append(1)  # The job waits once, for its final save, after the loop.
        if len(waits) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # While that save may be in flight.
        return real(self)

    model_dir = tmp_path / "run"
    monkeypatch.setattr(model_dir_lib.RunCheckpointer, "wait", signal_then_wait)
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    assert waits, "the final save was never waited on"
    assert checkpoint_steps(model_dir)[-1] == STEPS
    assert_params_equal(model_dir, continuous, STEPS)
    assert not (model_dir / LOCK_FILE_NAME).exists()


@pytest.mark.slow
def test_a_signal_during_the_final_eval_exits_zero_and_the_rerun_completes_it(
        tmp_path, wiki_vocab, continuous, monkeypatch, capsys):
    from matlm.training import trainer
    real = trainer.validation_losses
    calls = []

    def signal_during_the_final_eval(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # The start eval, then the final one (eval_every=0).
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    model_dir = tmp_path / "run"
    monkeypatch.setattr(trainer, "validation_losses", signal_during_the_final_eval)
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    assert checkpoint_steps(model_dir)[-1] == STEPS  # The final step is saved.
    assert eval_steps(model_dir) == [0]  # The final eval gave up, wrote nothing.
    monkeypatch.setattr(trainer, "validation_losses", real)
    # Started again, the finished run only completes its final eval...
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    assert eval_steps(model_dir) == [0, STEPS]
    assert rows(model_dir)[-1] == rows(continuous)[-1]  # The same numbers.
    # ... and a third start appends nothing at all.
    before = (model_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert matlm_main(["train", *flags(model_dir, wiki_vocab)]) == 0
    assert (model_dir / "metrics.jsonl").read_bytes() == before
    assert "validation loss per granularity" in capsys.readouterr().out
