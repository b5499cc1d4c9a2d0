"""Checkpoint integrity: per-array fingerprints (against a NumPy reference, across
shardings), byte and bit flips in checkpoint files caught on restore and by `matlm verify`,
readers that never write, and run files written atomically."""
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from matlm.cli.main import main as matlm_main
from matlm.model import ModelConfig
from matlm.model_dir import (CheckpointError, ModelDir, RunCheckpointer, integrity,
                             load_checkpoint_for_inference)
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig
from matlm.training.optimizer import make_optimizer
from matlm.training.train_step import abstract_state, init_state

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
TRAIN = TrainConfig(steps=4, seq_len=16, global_batch_size=8, mesh_shape=(1, 1, 1))


# --- The fingerprint against an independent NumPy reference. ------------------------------
def reference_fingerprint(x: np.ndarray) -> str:
    """The documented formula in NumPy: uint64 sums reduced mod 2³² at the end."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint32)
    else:
        words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize])
    words = words.reshape(-1).astype(np.uint64)
    i = np.arange(words.size, dtype=np.uint64)
    word1 = int(np.sum(words * (2 * i + 1) % 2**32) % 2**32)

    def mix(h):
        h = h.astype(np.uint64) % 2**32
        h ^= h >> 16
        h = h * 0x85EBCA6B % 2**32
        h ^= h >> 13
        h = h * 0xC2B2AE35 % 2**32
        return h ^ (h >> 16)
    word2 = int(np.sum(mix(words ^ mix(i + 0x9E3779B9))) % 2**32)
    return f"{word1:08x}{word2:08x}"


DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.int8, np.uint8, np.bool_]


def random_array(dtype, shape=(16, 24), seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.normal(size=shape).astype(dtype)


def fingerprint(x) -> str:
    return integrity.fingerprints({"x": x})["x"]


def test_fingerprint_matches_the_reference_on_any_sharding():
    arrays = {np.dtype(d).name: random_array(d, seed=k) for k, d in enumerate(DTYPES)}
    expected = {name: reference_fingerprint(a) for name, a in arrays.items()}
    one_device = {name: jax.device_put(a, jax.devices()[0]) for name, a in arrays.items()}
    assert integrity.fingerprints(one_device) == expected
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for spec in (jax.P("a", "b"), jax.P("b", "a"), jax.P(None, ("a", "b"))):
        sharded = {name: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
                   for name, a in arrays.items()}
        assert len(sharded["float32"].sharding.device_set) == 8
        assert integrity.fingerprints(sharded) == expected, spec


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_fingerprint_changes_for_any_single_bit_flip(dtype):
    original = random_array(dtype)
    before = fingerprint(original)
    rng = np.random.default_rng(1)
    for _ in range(8):
        flipped = original.copy()
        if dtype == np.bool_:
            flipped.reshape(-1)[rng.integers(flipped.size)] ^= True
        else:
            raw = flipped.view(np.uint8).reshape(-1)
            raw[rng.integers(raw.size)] ^= np.uint8(1 << rng.integers(8))
        assert fingerprint(flipped) != before
    swapped = original.copy().reshape(-1)
    j = int(np.nonzero(swapped != swapped[0])[0][0])
    swapped[[0, j]] = swapped[[j, 0]]  # Same multiset of values: a plain sum misses this.
    assert fingerprint(swapped.reshape(original.shape)) != before


# --- Checkpoints on disk. -----------------------------------------------------------------
def make_state(seed):
    """A state with every float leaf random (real Adam moments are not zeros either)."""
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = init_state(MODEL, make_optimizer(TRAIN), mesh, seed)
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(state))))
    return jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape, x.dtype)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, state)


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model dir with checkpoints at steps 1 and 2, and the states they hold."""
    path = tmp_path_factory.mktemp("pristine")
    ModelDir(path).write_run_files(MODEL, None, TRAIN)
    states = {}
    checkpointer = RunCheckpointer(path, async_save=False)
    for step in (1, 2):
        state = make_state(seed=step)
        states[step] = host((state.params, state.opt_state))
        checkpointer.save(step, state, {"position": step}, {"step": step})
    checkpointer.wait()
    return path, states


@pytest.fixture
def model_dir(saved, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(saved[0], path)
    return path


def target():
    return abstract_state(MODEL, make_optimizer(TRAIN),
                          mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


def biggest_data_file(model_dir, step, item) -> Path:
    """The largest array data file (OCDBT `d/` file) of one item of one checkpoint."""
    files = [p for p in (Path(model_dir) / "checkpoints" / str(step) / item).rglob("*")
             if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def flip_bytes(path, count):
    """Inverts `count` bytes in the middle of `path` (same size), or one bit if count=0.

    Orbax stores each chunk as a zstd frame without a content checksum; these random
    arrays compress to Huffman-coded literals, and a flip in the middle decodes silently
    into wrong values (no decode error): exactly the corruption only checksums catch.
    """
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if count:
        data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    else:
        data[middle] ^= 0x10
    path.write_bytes(bytes(data))


def listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(path).rglob("*"))


def differs(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_byte_flip_in_params_falls_back_to_the_previous_checkpoint(
        model_dir, saved, verify, monkeypatch, capsys):
    monkeypatch.setattr(integrity, "VERIFY", verify)
    flip_bytes(biggest_data_file(model_dir, 2, "params"), 64)
    checkpointer = RunCheckpointer(model_dir)
    params, opt_state, data, meta, step = checkpointer.restore_latest(target())
    corrupt = model_dir / "checkpoints" / "2.corrupt"
    if verify:
        out = capsys.readouterr().out
        assert step == checkpointer.restored_step == 1 and corrupt.is_dir()
        assert "checkpoints/2 is incomplete or corrupt (IntegrityError" in out
        assert "do not match their checksums: params/" in out
        assert not differs((params, opt_state), saved[1][1]) and data == {"position": 1}
    else:
        # Without the checksums the same flip goes unnoticed: corrupt values are restored.
        assert step == 2 and not corrupt.exists()
        assert differs(params, saved[1][2][0])


def test_bit_flip_in_opt_state_is_caught(model_dir, saved, capsys):
    flip_bytes(biggest_data_file(model_dir, 2, "opt_state"), 0)
    checkpointer = RunCheckpointer(model_dir)
    *_, step = checkpointer.restore_latest(target())
    assert step == 1 and (model_dir / "checkpoints" / "2.corrupt").is_dir()
    assert "do not match their checksums: opt_state/" in capsys.readouterr().out


def test_restored_step_is_recorded(model_dir):
    checkpointer = RunCheckpointer(model_dir)
    assert checkpointer.restored_step is None
    checkpointer.restore_latest(target())
    assert checkpointer.restored_step == 2


def test_verify_reports_flips_and_writes_nothing(model_dir, capsys):
    before = listing(model_dir)
    assert matlm_main(["verify", f"--model_dir={model_dir}"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["ok"] == [1, 2]
    assert listing(model_dir) == before

    flip_bytes(biggest_data_file(model_dir, 2, "params"), 64)
    before = listing(model_dir)
    assert matlm_main(["verify", f"--model_dir={model_dir}"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["corrupt"] == [2]
    row = next(line for line in out.splitlines() if line.startswith("2 "))
    assert "CORRUPT" in row and "params/" in row
    assert listing(model_dir) == before  # Nothing moved, nothing written.
    assert matlm_main(["verify", f"--model_dir={model_dir}", "--step", "1"]) == 0


def test_verify_bad_input_exits_2(tmp_path, model_dir, capsys):
    assert matlm_main(["verify", f"--model_dir={tmp_path / 'missing'}"]) == 2
    assert matlm_main(["verify", f"--model_dir={model_dir}", "--step", "7"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "does not exist" in err[0] and "--step 7" in err[1]
    assert not (tmp_path / "missing").exists()


def test_verify_lists_checkpoints_set_aside(model_dir, capsys):
    flip_bytes(biggest_data_file(model_dir, 2, "params"), 64)
    RunCheckpointer(model_dir).restore_latest(target())
    capsys.readouterr()
    assert matlm_main(["verify", f"--model_dir={model_dir}"]) == 0
    out = capsys.readouterr().out
    assert "2.corrupt" in out and "set aside earlier" in out
    assert json.loads(out.splitlines()[-1])["set_aside"] == ["2.corrupt"]


def test_inference_loader_refuses_a_corrupt_checkpoint_and_moves_nothing(model_dir, saved):
    assert not differs(load_checkpoint_for_inference(model_dir).params, saved[1][2][0])
    flip_bytes(biggest_data_file(model_dir, 2, "params"), 64)
    before = listing(model_dir)
    with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupt .*params/.*matlm verify"):
        load_checkpoint_for_inference(model_dir)
    assert listing(model_dir) == before
    assert load_checkpoint_for_inference(model_dir, step=1).step == 1


def test_an_unreadable_checkpoint_is_named_in_one_line_without_tensorstores_repr(model_dir):
    os.truncate(biggest_data_file(model_dir, 2, "params"), 0)  # Emptied: Orbax cannot read it.
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint_for_inference(model_dir)
    message = str(refused.value)
    assert message.startswith(f"checkpoint {model_dir / 'checkpoints' / '2'} could not be read ("
                              "Exception: Encountered error while reading array index"), message
    # Orbax's "See full TensorStore details: <bound method …>" says nothing: cut.
    assert "TensorStore details" not in message and "\n" not in message, message


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, monkeypatch, capsys):
    # A checkpoint written before checksums existed: `meta` as it was then.
    monkeypatch.setattr(integrity, "record", lambda meta, items, data_state=None: meta)
    ModelDir(tmp_path).write_run_files(MODEL, None, TRAIN)
    checkpointer = RunCheckpointer(tmp_path, async_save=False)
    checkpointer.save(3, make_state(seed=3), {"position": 3}, {"step": 3})
    checkpointer.wait()
    monkeypatch.undo()
    *_, step = RunCheckpointer(tmp_path).restore_latest(target())
    assert step == 3
    assert "written without checksums; not verified" in capsys.readouterr().out
    assert matlm_main(["verify", f"--model_dir={tmp_path}"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["unverified"] == [3]


def test_run_files_are_replaced_atomically(tmp_path, monkeypatch):
    vocab = tmp_path / "source.model"
    vocab.write_bytes(b"spm" * 1000)
    model_dir = ModelDir(tmp_path / "run")

    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        model_dir.write_run_files(MODEL, None, TRAIN, str(vocab))
    assert os.listdir(model_dir.path) == []  # No partial run_config.json, no temp file.
    monkeypatch.undo()
    model_dir.write_run_files(MODEL, None, TRAIN, str(vocab))
    assert sorted(os.listdir(model_dir.path)) == ["run_config.json", "vocab.model"]
    assert model_dir.vocab_file.read_bytes() == vocab.read_bytes()
    assert model_dir.model_config() == MODEL
