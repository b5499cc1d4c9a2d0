"""SIGTERM/SIGINT at start-up, swept over the moments of `matlm train` before its first step
(issue 28), and a second writer refused before the expensive start-up.

The promise each sweep case checks: a signal at any moment from the program's first line
to the first step
- exits 0 with one line ("... before the first step; nothing new to save" or, once the
  loop has opened, "stopped at step 0"), no traceback, no abort or segfault;
- leaves nothing half-written: the model dir is absent when the signal came before the run
  files were written, otherwise run_config.json is valid JSON and vocab.model is the whole
  vocabulary; no temporary file, no writer.lock, no checkpoint step; a resumed run's
  checkpoints are untouched.

Moments are chosen by markers, not sleeps: the process is started through `INJECT`, which
sends the signal from a helper thread when a named module starts importing or a named
function is entered (or returns), after a delay that puts it inside the native work that
follows (an extension's initialisation, a compile, SentencePiece's training). Two cases
send it after a sleep through the real `matlm` program (its huge-page re-exec included).
The uncovered window is the interpreter's own start-up before `matlm`'s first line (~20 ms).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from matlm.cli.main import main as matlm_main
from matlm.model_dir.lock import LOCK_FILE_NAME, WriterLock

REPO = Path(__file__).resolve().parents[1]

# Runs the `matlm` program (console_main) with a signal injected at FAULT_AT:
#   "import MODULE DELAY"          when MODULE starts importing
#   "call MODULE:ATTR DELAY"       when ATTR (a function, or Class.method) is entered
#   "return MODULE:ATTR DELAY"     when it has returned
# The signal comes from a thread DELAY seconds later; the file FAULT_LOG says it did (not
# stderr: matlm points file descriptor 2 at /dev/null while TensorFlow imports).
INJECT = r"""
import importlib.abc, importlib.util, os, signal, sys, threading, time
kind, target, delay = os.environ["FAULT_AT"].split()
sig = getattr(signal, os.environ["FAULT_SIGNAL"])
fired = []

def fire():
    if fired:
        return
    fired.append(1)
    def send():
        time.sleep(float(delay))
        with open(os.environ["FAULT_LOG"], "w") as log:
            log.write("sent")
        os.kill(os.getpid(), sig)
    threading.Thread(target=send, daemon=True).start()

module_name, _, attr = target.partition(":")

def wrap(module):
    *owner_path, name = attr.split(".")
    owner = module
    for part in owner_path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        if kind == "call":
            fire()
        result = original(*args, **kwargs)
        if kind == "return":
            fire()
        return result
    setattr(owner, name, wrapper)

class Marker(importlib.abc.MetaPathFinder):
    busy = False
    def find_spec(self, name, path, target=None):
        if name != module_name or self.busy:
            return None
        if kind == "import":
            fire()
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        load = spec.loader.exec_module
        def exec_module(module):
            load(module)
            wrap(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Marker())
from matlm.cli.main import console_main
sys.exit(console_main())
"""

TINY = ["--gin.ModelConfig.d_model=32", "--gin.ModelConfig.n_layers=2",
        "--gin.ModelConfig.n_heads=2", "--gin.ModelConfig.d_ff=128",
        "--gin.ModelConfig.vocab_size=2048"]


def train_flags(model_dir, vocab_file, steps=1000):
    vocab = [f"--gin.DataConfig.vocab_path='{vocab_file}'"] if vocab_file else [
        "--gin.DataConfig.vocab_path=None", "--gin.DataConfig.default_vocab_size=512"]
    return [f"--model_dir={model_dir}", "--no_progress", f"--steps={steps}",
            "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.checkpoint_every=2",
            "--gin.TrainConfig.eval_every=0", "--gin.TrainConfig.eval_batches=1",
            "--gin.TrainConfig.mesh_shape=(1,1,1)", "--gin.TrainConfig.seq_len=32",
            "--gin.TrainConfig.global_batch_size=4", "--gin.TrainConfig.warmup_steps=2",
            *TINY, *vocab]


def environment(cache_dir):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "MATLM_CACHE_DIR": str(cache_dir)}


# (signal, FAULT_AT or a sleep in seconds, what the model dir holds afterwards)
#   "absent": the signal came before the run files (the dir this job created is gone);
#   "run_files": complete run_config.json and vocab.model, no checkpoint;
#   "resumed": the prepared run's files and checkpoints, untouched.
MOMENTS = [
    # Module import (the first ~5 s): an extension's initialisation must not fail.
    (signal.SIGTERM, 0.15, "absent"),                               # the 0.15 s
    (signal.SIGINT, "import matlm.cli.train 0", "absent"),
    (signal.SIGTERM, "import jaxlib._jax 0.01", "absent"),         # was an ImportError
    (signal.SIGINT, "import jaxlib._jax 0.1", "absent"),
    (signal.SIGTERM, "import tensorflow 0.3", "absent"),
    (signal.SIGINT, "import tensorflow 1.0", "absent"),
    (signal.SIGTERM, "import orbax.checkpoint 0.05", "absent"),
    # Validation and the writer lock.
    (signal.SIGTERM, "call matlm.training.trainer:build_objective 0", "absent"),
    (signal.SIGINT, "call matlm.training.trainer:acquire_for_job 0", "absent"),
    (signal.SIGTERM, "return matlm.training.trainer:acquire_for_job 0", "absent"),
    # Vocabulary (trained fresh into an empty cache: see `vocab_file`) and the eval data.
    (signal.SIGTERM, "call matlm.data.vocabulary:train_vocabulary 0.2", "absent"),
    (signal.SIGINT, "return matlm.data.vocabulary:train_vocabulary 0", "absent"),
    (signal.SIGTERM, "call matlm.data.config:DataConfig.eval_iterator 0.1", "absent"),
    # The run files: written whole, or not at all.
    (signal.SIGTERM, "call matlm.model_dir.layout:ModelDir.write_run_files 0", "run_files"),
    (signal.SIGINT, "call matlm.model_dir.layout:ModelDir.write_vocabulary 0", "run_files"),
    # Restore (Orbax threads) and the initialising compile (XLA's thread pool): the
    # segfaults after "nothing new to save" came from a compile left running.
    (signal.SIGTERM, "call matlm.model_dir.checkpoints:RunCheckpointer.restore_latest 0.1",
     "resumed"),
    (signal.SIGINT, "call matlm.training.trainer:init_state 0", "run_files"),
    (signal.SIGTERM, "call matlm.training.trainer:init_state 0.3", "run_files"),
    (signal.SIGTERM, "call matlm.training.trainer:init_state 1.0", "run_files"),
    # The step-0 eval (its compile, its batches).
    (signal.SIGINT, "call matlm.training.trainer:validation_losses 0", "run_files"),
    (signal.SIGTERM, "call matlm.training.trainer:validation_losses 0.5", "run_files"),
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, wiki_vocab):
    return wiki_vocab.sentencepiece_model_file


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, vocab_file):
    """A run with checkpoint 2 (the restore moment resumes a copy of it), trained in this
    process on one of its 8 fake devices, as the subprocesses (one device) train."""
    import jax
    import matlm.training.mesh as mesh_lib
    model_dir = tmp_path_factory.mktemp("resumable") / "run"
    original = mesh_lib.make_mesh
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mesh_lib, "make_mesh",
                      lambda shape, devices=None: original(shape, devices or jax.devices()[:1]))
        assert matlm_main(["train", *train_flags(model_dir, vocab_file, steps=2)]) == 0
    return model_dir


def stray_files(model_dir: Path) -> list:
    """Temporary files and dirs a half-done write would leave (write_atomically's
    `.NAME.*.tmp`, Orbax's `*.orbax-checkpoint-tmp*`, a lock or a set-aside lock)."""
    return [str(p) for p in model_dir.rglob("*")
            if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name
            or p.name.startswith(LOCK_FILE_NAME)]


def snapshot(model_dir: Path) -> dict:
    return {str(p.relative_to(model_dir)): p.read_bytes() for p in sorted(model_dir.rglob("*"))
            if p.is_file()}


def matlm_program() -> list:
    script = Path(sys.executable).parent / "matlm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "matlm.cli.main"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, moment, left", MOMENTS,
                         ids=[f"{s.name}-{m}" for s, m, _ in MOMENTS])
def test_a_signal_at_start_up_exits_zero_and_leaves_nothing_half_written(
        tmp_path, request, vocab_file, sig, moment, left):
    """Promise: a signal at this moment of start-up exits 0 with one line and no
    traceback, abort or segfault; the model dir is absent, or holds whole run files (or a
    resumed run's untouched checkpoints); no temporary file, lock or new checkpoint."""
    model_dir = tmp_path / "run"
    cache = tmp_path / "cache"  # Empty: a run without vocab_path trains its vocabulary.
    before = {}
    if left == "resumed":
        shutil.copytree(request.getfixturevalue("resumable"), model_dir)
        before = snapshot(model_dir)
    fresh_vocabulary = "train_vocabulary" in str(moment)
    args = ["train", *train_flags(model_dir, None if fresh_vocabulary else vocab_file)]
    env = environment(cache)
    if isinstance(moment, float):  # A sleep, through the real program.
        proc = subprocess.Popen([*matlm_program(), *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(moment)
        proc.send_signal(sig)
    else:
        env |= {"FAULT_AT": moment, "FAULT_SIGNAL": sig.name,
                "FAULT_LOG": str(tmp_path / "fault.log")}
        proc = subprocess.Popen([sys.executable, "-c", INJECT, *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    report = f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert proc.returncode == 0, report
    for bad in ("Traceback", "Exception ignored", "Fatal Python error", "SIGSEGV"):
        assert bad not in err and bad not in out, report
    if not isinstance(moment, float):
        assert (tmp_path / "fault.log").exists(), report  # The marker was reached.
    assert (f"matlm train: {sig.name} before the first step; nothing new to save" in err
            or "stopped at step 0; nothing new to save" in out), report

    if model_dir.exists():
        assert stray_files(model_dir) == [], report
    if left == "absent":
        assert not model_dir.exists(), sorted(os.listdir(model_dir))
    elif left == "resumed":
        assert snapshot(model_dir) == before  # Not a byte changed.
    else:
        json.loads((model_dir / "run_config.json").read_text())  # Whole, valid JSON.
        assert (model_dir / "vocab.model").read_bytes() == Path(vocab_file).read_bytes()
        checkpoints = model_dir / "checkpoints"
        assert not checkpoints.exists() or not any(checkpoints.iterdir())
    if fresh_vocabulary and (cache / "vocab").exists():
        # The vocabulary cache holds whole models only (written by rename).
        assert not [p for p in (cache / "vocab").rglob("*") if p.name.endswith(".tmp")]


def test_a_second_writer_is_refused_before_the_vocabulary_and_any_compile(
        tmp_path, wiki_vocab, one_device, monkeypatch, capsys):
    """Promise: a second job on a model dir another job writes is refused with one line
    naming the holder, before it loads or trains a vocabulary, builds the eval data or
    compiles anything (the lock comes right after the cheap checks), and changes nothing."""
    from matlm.model_dir.layout import ModelDir
    from matlm.training import trainer

    def must_not_run(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"the refused job reached {what}")
        return fail
    monkeypatch.setattr(ModelDir, "vocabulary", must_not_run("the vocabulary"))
    monkeypatch.setattr(trainer, "init_state", must_not_run("the initialising compile"))
    monkeypatch.setattr(trainer, "abstract_state", must_not_run("the state's shapes"))
    model_dir = tmp_path / "run"
    with WriterLock(model_dir):  # The first job (this process: alive, on this host).
        before = snapshot(model_dir)
        started = time.perf_counter()
        assert matlm_main(["train", *train_flags(model_dir,
                                                 wiki_vocab.sentencepiece_model_file)]) == 2
        elapsed = time.perf_counter() - started
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "is being written by another job" in err, err
        assert f"pid {os.getpid()}" in err, err
        assert snapshot(model_dir) == before
    assert elapsed < 30, elapsed  # Seconds of checks, not a vocabulary or a compile.


def test_a_start_refused_after_the_lock_removes_the_dir_it_created(tmp_path, wiki_vocab,
                                                                   one_device, capsys):
    """Promise: a start that fails after taking the lock (here: a vocabulary larger than
    the model's) leaves no model dir behind when it created it, and an existing dir as it
    was (no lock, no file)."""
    model_dir = tmp_path / "new" / "run"
    flags = [*train_flags(model_dir, wiki_vocab.sentencepiece_model_file),
             "--gin.ModelConfig.vocab_size=1024"]
    assert matlm_main(["train", *flags]) == 2
    assert "ModelConfig.vocab_size" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    model_dir.mkdir(parents=True)
    assert matlm_main(["train", *flags]) == 2
    assert model_dir.is_dir() and not any(model_dir.iterdir())
