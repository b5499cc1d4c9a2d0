"""Bad input is one line naming the flag or binding and the expected value, exit 2, and
nothing written (issue 11, item 5). A new case is one row of CASES.

Also: the declarative field checks, gin errors inside files, the include resolution
(no "Path not found" log), the huge-page re-exec fallback and the memory check."""
import dataclasses
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from matlm.cli.main import main
from matlm.gin_config import ConfigError, parse_gin, train_config_from_gin
from matlm.model import ModelConfig, init_params
from matlm.training.config import TrainConfig, TrainConfigError

REPO = Path(__file__).resolve().parents[1]
EVAL_MODEL = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, d_ff=128)


# (command, extra argv, expected exit code, substring of the one-line error). `{out}` is
# the path that must not exist afterwards (train: --model_dir, vocab: --output, eval:
# --output; added automatically), `{ckpt}` a tiny saved checkpoint.
CASES = [
    ("train", ["--gin.TrainConfig.learning_rate=-0.1"], 2,
     "TrainConfig.learning_rate must be a finite number > 0, got -0.1"),
    ("train", ["--gin.TrainConfig.learning_rate=0"], 2, "learning_rate must be a finite number > 0, got 0"),
    ("train", ["--gin.TrainConfig.learning_rate=nan"], 2, "--gin.TrainConfig.learning_rate=nan: nan is not accepted"),
    ("train", ["--gin.TrainConfig.learning_rate=-inf"], 2, "-inf is not accepted"),
    ("train", ["--gin.TrainConfig.learning_rate=1e999"], 2, "learning_rate must be a finite number > 0, got inf"),
    ("train", ["--gin.TrainConfig.learning_rate='fast'"], 2, "learning_rate must be a finite number > 0, got 'fast'"),
    ("train", ["--gin.TrainConfig.warmup_steps=-1"], 2, "TrainConfig.warmup_steps must be an integer >= 0, got -1"),
    ("train", ["--gin.TrainConfig.steps=True"], 2, "TrainConfig.steps must be an integer >= 1, got True"),
    ("train", ["--gin.TrainConfig.steps=10.5"], 2, "TrainConfig.steps must be an integer >= 1, got 10.5"),
    ("train", ["--gin.TrainConfig.checkpoint_every=-1"], 2, "checkpoint_every must be an integer >= 0, got -1"),
    ("train", ["--gin.TrainConfig.eval_every=-5"], 2, "eval_every must be an integer >= 0"),
    ("train", ["--gin.TrainConfig.decay=linear"], 2,
     "--gin.TrainConfig.decay=linear: linear is not a Python literal"),
    ("train", ["--gin.TrainConfig.decay=linear"], 2, """quote strings, e.g. --gin.TrainConfig.decay="'linear'\""""),
    ("train", ["--gin.TrainConfig.decay='lin'"], 2, "TrainConfig.decay must be one of 'cosine', 'linear', 'constant', got 'lin'"),
    ("train", ["--gin.TrainConfig.learning_rate=(1,"], 2, "unbalanced brackets"),
    ("train", ["--gin.TrainConfig.lr=1"], 2, "--gin.TrainConfig.lr=1: Configurable 'TrainConfig' doesn't have a parameter named 'lr'"),
    ("train", ["--gin.TrainConfig.end_learning_rate_fraction=1.5"], 2, "end_learning_rate_fraction must be a finite number in [0, 1], got 1.5"),
    ("train", ["--gin.TrainConfig.adam_b1=1.0"], 2, "TrainConfig.adam_b1 must be a finite number in [0, 1), got 1.0"),
    ("train", ["--gin.TrainConfig.adam_b2=-0.5"], 2, "TrainConfig.adam_b2 must be a finite number in [0, 1)"),
    ("train", ["--gin.TrainConfig.adam_eps=0"], 2, "TrainConfig.adam_eps must be a finite number > 0, got 0"),
    ("train", ["--gin.TrainConfig.weight_decay=-0.1"], 2, "weight_decay must be a finite number >= 0"),
    ("train", ["--gin.TrainConfig.clip_grad_norm=-1.0"], 2, "clip_grad_norm must be a finite number > 0"),
    ("train", ["--gin.TrainConfig.z_loss=-1e-4"], 2, "TrainConfig.z_loss must be a finite number >= 0"),
    ("train", ["--gin.TrainConfig.seq_len=1"], 2, "TrainConfig.seq_len must be an integer >= 2, got 1"),
    ("train", ["--gin.TrainConfig.global_batch_size=0"], 2, "global_batch_size must be an integer >= 1"),
    ("train", ["--gin.TrainConfig.mesh_shape=(0, 1, 1)"], 2,
     "TrainConfig.mesh_shape must be a tuple of integers >= 1 or -1, got (0, 1, 1)"),
    ("train", ["--gin.TrainConfig.granularity_weights=(0.25, -1, 0.25, 0.25)"], 2,
     "granularity_weights must be a tuple of finite numbers >= 0"),
    ("train", ["--gin.TrainConfig.sample_probabilities=(0.5, nan)"], 2, "nan is not accepted"),
    # The objective's options (docs/objective.md).
    ("train", ["--gin.TrainConfig.distill_weight=1.5"], 2,
     "TrainConfig.distill_weight must be a finite number in [0, 1], got 1.5"),
    ("train", ["--gin.TrainConfig.distill_weight=-0.1"], 2, "distill_weight must be a finite number in [0, 1]"),
    ("train", ["--gin.TrainConfig.distill_temperature=0.0"], 2,
     "TrainConfig.distill_temperature must be a finite number > 0, got 0.0"),
    ("train", ["--gin.TrainConfig.distill_weight=0.5", "--gin.TrainConfig.granularities=('XL',)"], 2,
     "TrainConfig.distill_weight=0.5 needs at least two granularities trained per step"),
    ("train", ["--gin.TrainConfig.granularity_mode='sandwich'", "--gin.TrainConfig.sample_k=1"], 2,
     "TrainConfig.sample_k=1: granularity_mode='sandwich' trains the smallest and the largest"),
    ("train", ["--gin.TrainConfig.granularity_weights='table6'"], 2,
     "granularity_weights must be a tuple of finite numbers >= 0 or one of 'uniform', "
     "'paper_table6', got 'table6'"),
    ("train", ["--gin.TrainConfig.peak_flops_per_device=-1"], 2, "peak_flops_per_device must be a finite number > 0 or None"),
    ("train", ["--gin.ModelConfig.rope_theta=0"], 2, "ModelConfig.rope_theta must be a finite number > 0, got 0"),
    ("train", ["--gin.ModelConfig.norm_eps=-1e-6"], 2, "ModelConfig.norm_eps must be a finite number > 0"),
    ("train", ["--gin.ModelConfig.d_model=64.0"], 2, "ModelConfig.d_model must be an integer >= 1, got 64.0"),
    ("train", ["--gin.ModelConfig.tie_embeddings=1"], 2, "ModelConfig.tie_embeddings must be True or False, got 1"),
    ("train", ["--gin.ModelConfig.remat_policy='all'"], 2, "ModelConfig.remat_policy must be one of 'none', 'full'"),
    ("train", ["--gin.DataConfig.seed=-1"], 2, "DataConfig.seed must be an integer >= 0, got -1"),
    ("train", ["--gin.DataConfig.default_vocab_size=100"], 2, "DataConfig.default_vocab_size must be an integer >= 300"),
    ("train", ["--gin.ModelConfig.d_model=65536"], 2, "does not fit the local devices' memory"),
    # A gin binding written with a space (argparse would read it as a --gin_file name).
    ("train", ["--gin", "TrainConfig.steps=3"], 2,
     "--gin TrainConfig.steps=3: write a gin binding as one argument, --gin.TrainConfig.steps=3"),
    ("eval", ["--gin=Foo.bar=1"], 2, "--gin=Foo.bar=1: write a gin binding as one argument, "
     "--gin.Foo.bar=1"),
    ("train", ["--stop_at=-1"], 2, "--stop_at must be a step in [0, 200]"),
    ("train", ["--stop_at=201"], 2, "--stop_at must be a step in [0, 200]"),
    ("train", ["--model_dir=/etc/hostname"], 2, "--model_dir /etc/hostname exists and is not a directory"),
    ("train", ["--model_dir=/proc/matlm_run"], 2, "cannot create --model_dir /proc/matlm_run"),
    ("train", ["--model_dir=gs://"], 2, "names no bucket; write gs://BUCKET/path"),
    ("train", ["--model_dir=s3://bucket/run"], 2, "s3:// is not supported"),
    ("train", ["--gin_file=configs/runs/default.gin", "--gin_file=configs/data/streaming_files.gin",
               "--gin.streaming_files_task.pattern='/nonexistent/*.jsonl'"], 2,
     "streaming files pattern '/nonexistent/*.jsonl' matches no file"),
    ("train", ["--gin_file=configs/runs/default.gin", "--gin_file=configs/data/streaming_files.gin",
               "--gin.streaming_files_task.max_validation_documents=0"], 2,
     "max_validation_documents must be an integer >= 1, got 0"),
    # Inputs in files ({files}: the `inputs` fixture) and runs ({run}: a run at step 5).
    ("train", ["--model_dir={run}", "--steps=3"], 2,
     "is already at step 5 > 3 (--steps, or TrainConfig.steps): give --steps above 5 to "
     "train it further, or a new --model_dir to start over"),
    ("train", ["--gin_file=configs/runs/default.gin", "--gin_file=configs/data/local_files.gin",
               "--gin.local_files_task.pattern='{files}/latin1/*.txt'"], 2,
     "latin1/caf.txt: not UTF-8 text (invalid continuation byte, byte 0xe9 at offset 3)"),
    ("sweep", ["--sweep={files}/lr.yaml", "--base_dir={files}/notes.txt"], 2,
     "notes.txt' is a file, not a directory; give a new or existing directory"),
    ("sweep", ["--sweep={files}/lr.yaml", "--base_dir={files}/notes.txt/sweep"], 2,
     "notes.txt' is a file, not a directory"),
    ("vocab", ["--output={tmp}", "--max_documents=5"], 2, "is a directory"),
    ("vocab", ["--output=/proc/matlm_vocab/x.model", "--max_documents=5"], 2, "cannot write in '/proc'"),
    ("vocab", ["--max_documents=0"], 2, "--max_documents must be an integer >= 1, got 0"),
    ("vocab", ["--max_documents=-3"], 2, "--max_documents must be an integer >= 1, got -3"),
    ("vocab", ["--vocab_size=0"], 2, "--vocab_size must be an integer >= 300, got 0"),
    ("eval", ["--num_shots=-1"], 2, "--num_shots must be an integer >= 0, got -1"),
    ("eval", ["--batch_size=0"], 2, "--batch_size must be an integer >= 1, got 0"),
    ("eval", ["--max_len=0"], 2, "--max_len must be an integer >= 2, got 0"),
    ("eval", ["--max_examples=0"], 2, "--max_examples must be an integer >= 1, got 0"),
    ("eval", ["--step=-1"], 2, "--step must be an integer >= 0, got -1"),
    # The model comes from the checkpoint: a binding of the run's configs would be ignored.
    ("eval", ["--gin.ModelConfig.d_model=256"], 2,
     "--gin.ModelConfig.d_model=256 sets ModelConfig.d_model, but matlm eval takes the model "
     "and its training and data config from --model_dir's run_config.json"),
    ("eval", ["--gin.ModelConfig.n_layers=8"], 2, "--gin.ModelConfig.n_layers=8 sets ModelConfig.n_layers"),
    ("eval", ["--gin_file=configs/models/matlm_78m.gin"], 2,
     "--gin_file=configs/models/matlm_78m.gin sets ModelConfig.activation (and 13 more "
     "fields), but matlm eval takes the model"),
    ("eval", ["--gin.matlm.TrainConfig.seq_len=64"], 2, "--gin.matlm.TrainConfig.seq_len=64 sets TrainConfig.seq_len"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, wiki_vocab):
    from matlm.model_dir import save_for_inference
    model_dir = tmp_path_factory.mktemp("model")
    save_for_inference(model_dir, EVAL_MODEL, init_params(EVAL_MODEL, jax.random.key(0)), 5,
                       wiki_vocab.sentencepiece_model_file, {"task": "matlm_wiki"})
    return model_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad input files: a Latin-1 text file, a file where a dir is expected, a sweep spec."""
    files = tmp_path_factory.mktemp("inputs")
    (files / "latin1").mkdir()
    (files / "latin1" / "caf.txt").write_bytes("café au lait".encode("latin-1"))
    (files / "notes.txt").write_text("notes\n")
    (files / "lr.yaml").write_text("grid: {TrainConfig.learning_rate: [1e-3]}\n")
    return files


@pytest.fixture(scope="module")
def run(tmp_path_factory, wiki_vocab):
    """A run of the default recipe's model whose newest checkpoint is step 5."""
    from matlm.gin_config import model_config_from_gin
    from matlm.model_dir import save_for_inference
    parse_gin(["configs/runs/default.gin"])
    config = model_config_from_gin()
    model_dir = tmp_path_factory.mktemp("run")
    save_for_inference(model_dir, config, init_params(config, jax.random.key(0)), 5,
                       wiki_vocab.sentencepiece_model_file, {"task": "matlm_wiki"})
    return model_dir


def _listing(path: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.fixture
def no_model_work(monkeypatch):
    import matlm.model_dir as model_dir
    from matlm.training import trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was validated")
    monkeypatch.setattr(model_dir, "load_checkpoint_for_inference", forbidden)
    monkeypatch.setattr(trainer, "init_state", forbidden, raising=False)


@pytest.mark.parametrize("command, argv, code, message", CASES)
def test_bad_input_is_one_line_and_writes_nothing(command, argv, code, message, tmp_path,
                                                  capsys, request, no_model_work):
    out = tmp_path / "out"
    fixtures = {name: request.getfixturevalue(name) for name in ("run", "inputs")
                if any(f"{{{'files' if name == 'inputs' else name}}}" in a for a in argv)}
    argv = [a.format(tmp=tmp_path, run=fixtures.get("run"), files=fixtures.get("inputs"))
            for a in argv]
    untouched = {name: _listing(path) for name, path in fixtures.items()}
    extra = {"train": ([] if any(a.startswith("--model_dir") for a in argv)
                       else [f"--model_dir={out}"]) + ["--no_progress"],
             "vocab": [] if any(a.startswith("--output") for a in argv) else [f"--output={out}"],
             "eval": [f"--model_dir={request.getfixturevalue('ckpt')}" if command == "eval"
                      else "", f"--output={out}", "--no_progress"],
             "sweep": []}[command]
    before = set(tmp_path.iterdir())
    assert main([command, *argv, *extra]) == code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"matlm {command}: error: ") and message in lines[0], lines[0]
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before  # No temp file, no partial dir.
    assert {name: _listing(path) for name, path in fixtures.items()} == untouched


def test_eval_task_bindings_still_apply_where_model_bindings_are_refused():
    import gin
    import matlm.evaluation.tasks  # noqa: F401 - registers eval_task.
    parse_gin(["configs/eval/offline.gin"], ["piqa/eval_task.primary_metric = 'acc'"],
              model_from_dir="matlm eval")
    assert gin.get_bindings("piqa/eval_task")["primary_metric"] == "acc"
    with pytest.raises(ConfigError, match="^--gin.ModelConfig.d_model=64 sets ModelConfig.d_model, "
                       "but matlm search takes the model"):
        parse_gin([], ["ModelConfig.d_model = 64"], model_from_dir="matlm search")
    parse_gin([], ["ModelConfig.d_model = 64"])  # Commands that build the model apply it.


@pytest.mark.parametrize("command", ["export", "extract"])
def test_commands_without_gin_refuse_any_binding(command, capsys):
    assert main([command, "--model_dir=/nonexistent", "--output=/nonexistent/out", "--widths=M",
                 "--gin.ModelConfig.d_model=256"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"matlm {command}: error: matlm {command} takes no gin bindings: the model comes from "
        "--model_dir's run_config.json (got 'ModelConfig.d_model = 256')")


# --- The declarative checks themselves. ------------------------------------------------
def test_every_numeric_field_declares_a_check():
    from matlm.data.config import DataConfig
    for cls in (ModelConfig, TrainConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert "check" in f.metadata, f"{cls.__name__}.{f.name} has no declared check"


def test_checkpoint_every_zero_means_only_at_the_end():
    from matlm.training.hooks import Hook
    config = TrainConfig(checkpoint_every=0)
    hook = Hook(lambda info: None, config.checkpoint_every, at_end=True)
    # No modulo by zero at any step; due only at the last one.
    assert [s for s in range(0, 11) if hook.due(s, 0, 10)] == [10]


def test_lists_become_tuples_and_numpy_numbers_pass():
    import numpy as np
    config = TrainConfig(mesh_shape=[1, -1, 1], learning_rate=np.float32(1e-3),
                         steps=np.int64(5))
    assert config.mesh_shape == (1, -1, 1)


def test_vocab_flag_minimum_matches_the_library():
    from matlm.cli import vocab as vocab_cli
    from matlm.data import vocabulary
    assert vocab_cli.MIN_VOCAB_SIZE == vocabulary.MIN_VOCAB_SIZE


# --- Gin files: errors name the file and line; includes never log "Path not found". ----
def test_gin_file_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.gin"
    path.write_text("# a comment\ninclude 'configs/models/tiny.gin'\n\n"
                    "TrainConfig.steps = 3\nTrainConfig.decay = linear\n")
    with pytest.raises(ConfigError) as error:
        parse_gin([str(path)])
    message = str(error.value)
    assert "\n" not in message
    assert f"gin file {str(path)!r} line 5: TrainConfig.decay = linear" in message
    assert "TrainConfig.decay = 'linear'" in message  # The fix, in gin-file spelling.


def test_unknown_name_in_a_gin_file_names_the_line(tmp_path):
    path = tmp_path / "bad.gin"
    path.write_text("TrainConfig.steps = 3\n\nTrainConfig.stpes = 4\n")
    with pytest.raises(ConfigError, match=r"line 3: TrainConfig.stpes = 4: .*'stpes'") as error:
        parse_gin([str(path)])
    assert "\n" not in str(error.value)


def test_missing_include_names_the_including_line(tmp_path):
    path = tmp_path / "bad.gin"
    path.write_text("TrainConfig.steps = 3\ninclude 'configs/models/nope.gin'\n")
    with pytest.raises(ConfigError, match=r"line 2: included file 'configs/models/nope.gin' "
                                          "not found"):
        parse_gin([str(path)])


def test_includes_outside_the_repo_log_nothing_and_keep_overrides(tmp_path, monkeypatch,
                                                                   caplog):
    monkeypatch.chdir(tmp_path)  # Where every run outside the repo logged "Path not found".
    with caplog.at_level(logging.INFO):
        parse_gin([str(REPO / "configs" / "runs" / "default.gin")],
                  ["TrainConfig.steps = 7"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    config = train_config_from_gin()
    from matlm.gin_config import model_config_from_gin
    assert config.steps == 7 and config.warmup_steps == 20  # The run file's own binding.
    tiny = (REPO / "configs" / "models" / "tiny.gin").read_text()
    d_model = next(int(line.split("=")[1]) for line in tiny.splitlines()
                   if line.replace(" ", "").startswith("ModelConfig.d_model="))
    assert model_config_from_gin().d_model == d_model  # From the included tiny.gin.


def test_gin_errors_inside_a_configurable_are_one_line():
    parse_gin([], ["TrainConfig.warmup_steps = -2"])
    with pytest.raises(TrainConfigError) as error:
        train_config_from_gin()
    assert str(error.value) == "TrainConfig.warmup_steps must be an integer >= 0, got -2"


# --- The huge-page re-exec. --------------------------------------------------------------
def test_reexec_that_cannot_exec_carries_on_with_one_warning():
    # An interpreter path that cannot be exec'd: the process must go on without huge pages.
    probe = ("import os, sys\n"
             "from matlm import runtime\n"
             "runtime.hugepage_malloc_wanted = lambda environ=None: True\n"
             "sys.executable = '/nonexistent/python'\n"
             "runtime.reexec_with_hugepage_malloc()\n"
             "print('carried on')\n")
    env = {k: v for k, v in os.environ.items() if k != "MATLM_NO_HUGEPAGES"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "carried on"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "running without huge pages" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# --- The memory check. -------------------------------------------------------------------
def _mesh(shape, n):
    from matlm.training.mesh import make_mesh
    return make_mesh(shape, jax.devices()[:n])


def test_memory_estimate_counts_params_optimizer_and_gradients_exactly():
    from matlm.model.counting import param_count
    from matlm.training.memory_check import estimate
    model = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, d_ff=128)
    n = param_count(model)  # Independent of the abstract state the estimate walks.
    one = estimate(model, TrainConfig(mesh_shape=(1, 1, 1)), _mesh((1, 1, 1), 1))
    assert one.params_bytes == 4 * n
    # AdamW mu, nu (float32), and two int32 step counts: Adam's and the schedule's.
    assert one.optimizer_bytes == 2 * 4 * n + 2 * 4
    assert one.gradient_bytes == 4 * n
    accumulated = estimate(model, TrainConfig(mesh_shape=(1, 1, 1), microbatches=2),
                           _mesh((1, 1, 1), 1))
    assert accumulated.gradient_bytes == 2 * 4 * n  # Accumulator + one microbatch's grads.
    # FSDP over 8 devices: every kernel is split 8 ways (d_model = 32 and the vocabulary
    # divide by 8); only the norm scales stay whole.
    norms = (2 * model.n_layers + 1) * model.d_model
    fsdp = estimate(model, TrainConfig(mesh_shape=(1, 8, 1)), _mesh((1, 8, 1), 8))
    assert fsdp.params_bytes == 4 * ((n - norms) // 8 + norms)
    assert 0 < one.activation_bytes and one.available_bytes > 0


def test_full_remat_and_loss_chunks_shrink_the_activation_estimate():
    from matlm.training.memory_check import activation_bytes
    model = ModelConfig(vocab_size=2048, d_model=64, n_layers=8, n_heads=4, d_ff=256)
    train = TrainConfig(seq_len=256, global_batch_size=16, loss_chunk_size=0)
    kept = activation_bytes(model, train, 1, 1, "cpu")
    remat = activation_bytes(dataclasses.replace(model, remat_policy="full"), train, 1, 1, "cpu")
    chunked = activation_bytes(model, dataclasses.replace(train, loss_chunk_size=64), 1, 1, "cpu")
    assert remat < kept and chunked < kept
    # Without chunking the float32 logits of all four granularities (and their gradient).
    logits = 2 * 4 * 2048 * 4 * 16 * 256
    assert kept - chunked == logits - logits // 4 // 4


def test_the_default_run_and_the_test_configs_pass_the_memory_check():
    from matlm.gin_config import model_config_from_gin
    from matlm.training.memory_check import check_fits_local_memory
    parse_gin(["configs/runs/default.gin"])
    model, train = model_config_from_gin(), train_config_from_gin()
    result = check_fits_local_memory(model, train, _mesh((1, 1, 1), 1))
    assert result.fits and result.total_bytes < result.available_bytes


def test_a_69b_model_is_refused_with_the_numbers():
    from matlm.gin_config import model_config_from_gin
    from matlm.training.memory_check import MemoryCheckError, check_fits_local_memory
    parse_gin(["configs/runs/default.gin"], ["ModelConfig.d_model = 65536"])
    model, train = model_config_from_gin(), train_config_from_gin()
    with pytest.raises(MemoryCheckError) as error:
        check_fits_local_memory(model, train, _mesh((1, 1, 1), 1))
    message = str(error.value)
    assert "\n" not in message
    for part in ("GiB parameters", "GiB optimizer state", "GiB gradients",
                 "GiB activations", "available", "FSDP", "remat"):
        assert part in message


@pytest.mark.parametrize("recipe", sorted((REPO / "configs" / "runs").glob("c4_*.gin")),
                         ids=lambda p: p.stem)
def test_pod_recipes_pass_on_the_slice_they_name(recipe):
    # They fit with >= 15 % headroom when compiled (README's fit table): the estimate
    # must not refuse them on their own slice.
    from jax.sharding import AbstractMesh, AxisType
    from matlm.gin_config import model_config_from_gin
    from matlm.launch.topology import parse_topology, slice_from_gin_files
    from matlm.training.memory_check import estimate
    chip, grid = parse_topology(slice_from_gin_files([str(recipe)]))
    parse_gin([str(recipe)])
    model, train = model_config_from_gin(), train_config_from_gin()
    chips = math.prod(grid)
    shape = tuple(chips // -math.prod(train.mesh_shape) if s == -1 else s
                  for s in train.mesh_shape)
    mesh = AbstractMesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    result = estimate(model, train, mesh, available=chip.hbm_bytes, platform="tpu")
    assert result.fits, result.describe()
