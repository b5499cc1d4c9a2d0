"""`matlm extract`: the extracted model computes exactly the parent's submodel, its dir
shrinks with its parameters, eval/info/train accept it, and bad input is refused before
anything is written."""
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.cli.main import main
from matlm.data.config import DataConfig
from matlm.model import MatLM, ModelConfig, init_params
from matlm.model.counting import param_count
from matlm.model.layout import ffn_to_contiguous, unstack_layers
from matlm.model.reference import dense_forward, slice_params
from matlm.model_dir.storage import tree_bytes as directory_bytes
from matlm.submodels.extract import extract_submodel

# S=16, M=32, L=64, XL=128; 3 layers so that a Mix'n'Match vector has three widths.
CONFIG = ModelConfig(vocab_size=2048, d_model=32, n_layers=3, n_heads=2, d_ff=128)
MIXED = "S,XL,L"  # (16, 128, 64)


def _tokens(config, seed=1):
    return jax.random.randint(jax.random.key(seed), (2, 24), 0, config.vocab_size)


def _logical_prefix(kernel, nest_blocks, width, axis):
    """The first `width` units in nesting order, computed independently of
    matlm.model.layout: unit j*N + b is unit j of block b."""
    k = np.moveaxis(np.asarray(kernel), axis, -1)
    lead, d_ff = k.shape[:-1], k.shape[-1]
    logical = k.reshape(*lead, nest_blocks, d_ff // nest_blocks).swapaxes(-1, -2)
    return np.moveaxis(logical.reshape(*lead, d_ff)[..., :width], -1, axis)


@pytest.mark.parametrize("nest_blocks,scan,widths", [
    (1, False, "M"), (1, False, MIXED), (4, False, "M"), (4, False, MIXED),
    (4, True, "96"), (4, True, MIXED)])  # Uniform extractions of a scanned parent stay scanned.
def test_extracted_logits_equal_the_parents_submodel(nest_blocks, scan, widths):
    config = dataclasses.replace(CONFIG, ffn_nest_blocks=nest_blocks, scan_layers=scan)
    params = init_params(config, jax.random.key(0))
    vector = config.resolve_widths(widths)
    small, small_config = extract_submodel(params, config, widths)
    assert small_config.ffn_dims == vector and small_config.ffn_nest_blocks == 1
    assert small_config.layer_d_ff == (() if len(set(vector)) == 1 else vector)
    # Each kernel: the parent's first units in nesting order, nothing else.
    parent_layers, small_layers = unstack_layers(params), unstack_layers(small)
    for i, w in enumerate(vector):
        for name, kernel in parent_layers[f"layer_{i}"]["ffn"].items():
            axis = 0 if name == "wo" else 1
            np.testing.assert_array_equal(small_layers[f"layer_{i}"]["ffn"][name],
                                          _logical_prefix(kernel, nest_blocks, w, axis))
    n_small = sum(x.size for x in jax.tree.leaves(small))
    assert n_small == param_count(small_config) == param_count(config, vector)

    tokens = _tokens(config)
    got = MatLM(small_config).apply({"params": small}, tokens)
    # The parent's sliced submodel over the same (contiguous) unit order: bit-identical.
    contiguous_config = dataclasses.replace(config, ffn_nest_blocks=1)
    contiguous = ffn_to_contiguous(params, nest_blocks)
    np.testing.assert_array_equal(
        got, MatLM(contiguous_config).apply({"params": contiguous}, tokens, widths=vector))
    sliced = MatLM(config).apply({"params": params}, tokens, widths=vector)
    masked = MatLM(config).apply({"params": params}, tokens, widths=jnp.asarray(vector))
    if nest_blocks == 1:
        np.testing.assert_array_equal(got, sliced)
    else:
        # The parent's own layout adds the same units in block order: fp32 rounding only
        # (a wrong unit order is off by O(1)).
        np.testing.assert_allclose(got, sliced, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, masked, rtol=2e-5, atol=2e-5)
    # The independent dense oracle on the parent's weights cut by reference.slice_params.
    oracle = dense_forward(small_config, slice_params(contiguous, vector), tokens)
    np.testing.assert_allclose(got, oracle, rtol=2e-5, atol=2e-5)


def test_granularities_of_an_extracted_model_nest_inside_the_parents():
    params = init_params(CONFIG, jax.random.key(0))
    _, uniform = extract_submodel(params, CONFIG, "L")
    assert uniform.granularities.by_name == {"S": 16, "M": 32, "L": 64}
    _, odd = extract_submodel(params, CONFIG, 96)
    assert odd.granularities.by_name == {"S": 16, "M": 32, "L": 64, "96": 96}
    _, mixed = extract_submodel(params, CONFIG, MIXED)
    # A named granularity uses what each layer kept: the parent's M is (16, 32, 32) here.
    assert mixed.resolve_widths("M") == (16, 32, 32)
    assert mixed.resolve_widths("XL") == (16, 128, 64) == mixed.ffn_dims
    with pytest.raises(ValueError, match="layer 0: width 32 exceeds the stored width 16"):
        mixed.resolve_widths("32")


@pytest.fixture(scope="module")
def parent(tmp_path_factory, wiki_vocab):
    """A checkpoint with shard-local nest blocks, saved like a run's (params + vocab)."""
    from matlm.model_dir import save_for_inference
    config = dataclasses.replace(CONFIG, ffn_nest_blocks=2)
    model_dir = tmp_path_factory.mktemp("parent")
    save_for_inference(model_dir, config, init_params(config, jax.random.key(0)), 7,
                       wiki_vocab.sentencepiece_model_file, {"task": "matlm_wiki"})
    return model_dir, config


@pytest.fixture(scope="module")
def extracted(parent, tmp_path_factory):
    model_dir, _ = parent
    out = tmp_path_factory.mktemp("extracted") / "mix"
    assert main(["extract", f"--model_dir={model_dir}", f"--widths={MIXED}",
                 f"--output={out}"]) == 0
    return out


def test_the_extracted_dir_holds_the_extracted_params_and_shrinks(parent, extracted, capsys):
    from matlm.model_dir import ModelDir, load_checkpoint_for_inference
    model_dir, config = parent
    loaded = load_checkpoint_for_inference(extracted)
    parent_loaded = load_checkpoint_for_inference(model_dir)
    want, want_config = extract_submodel(parent_loaded.params, config, MIXED)
    assert loaded.model_config == want_config and loaded.step == 0
    jax.tree.map(np.testing.assert_array_equal, loaded.params, want)
    assert (extracted / "vocab.model").read_bytes() == (model_dir / "vocab.model").read_bytes()
    assert ModelDir(extracted).run_config().data == DataConfig(task="matlm_wiki")
    provenance = json.loads((extracted / "extracted_from.json").read_text())
    assert provenance["widths"] == [16, 128, 64] and provenance["step"] == 7
    # Params only: no optimizer state; the params item shrinks with the parameter count.
    assert not (extracted / "checkpoints" / "0" / "opt_state").exists()
    small = directory_bytes(extracted / "checkpoints" / "0" / "params")
    big = directory_bytes(model_dir / "checkpoints" / "7" / "params")
    ratio = param_count(want_config) / param_count(config)
    assert small < big
    assert small / big == pytest.approx(ratio, rel=0.1), (small, big, ratio)


def test_eval_and_info_read_the_extracted_dir(parent, extracted, tmp_path, capsys):
    model_dir, config = parent
    assert main(["info", f"--model_dir={extracted}"]) == 0
    printed = capsys.readouterr().out
    small_config = extract_submodel(init_params(config, jax.random.key(0)), config, MIXED)[1]
    assert f"{param_count(small_config):,}" in printed and "16,128,64" in printed

    def loss(checkpoint, *flags):
        out = tmp_path / checkpoint.name
        assert main(["eval", f"--model_dir={checkpoint}", "--tasks=loss",
                     "--max_examples=2", "--max_len=64", "--no_plots", "--no_progress",
                     f"--output={out}", *flags]) == 0
        return json.loads((out / "results.json").read_text())["tasks"]["loss:matlm_wiki"][
            "metrics"]
    small = loss(extracted)
    assert list(small) == ["S", "M", "L", "XL"]
    big = loss(model_dir, "--granularities=S", f"--widths={MIXED}")
    # The extracted model's whole (XL) is the parent's S,XL,L submodel; its S is the
    # parent's S (every layer keeps at least 16 units).
    assert small["XL"]["loss"] == pytest.approx(big[MIXED]["loss"], rel=1e-6)
    assert small["S"]["loss"] == pytest.approx(big["S"]["loss"], rel=1e-6)


@pytest.mark.usefixtures("one_device")
def test_one_fine_tuning_step_starts_from_the_extracted_params(extracted, tmp_path, wiki_vocab):
    from matlm import data
    from matlm.gin_config import model_config_from_gin, parse_gin
    from matlm.training.config import TrainConfig
    from matlm.model_dir import load_checkpoint_for_inference
    from matlm.training.trainer import train
    extracted = Path(shutil.copytree(extracted, tmp_path / "tuned"))  # Others read the original.
    parse_gin([str(extracted / "model.gin")], [])  # The bindings extract wrote.
    config = model_config_from_gin()
    start = load_checkpoint_for_inference(extracted)
    assert config == start.model_config
    train_config = TrainConfig(steps=1, seq_len=32, global_batch_size=2, learning_rate=1e-3,
                               warmup_steps=0, eval_every=0, eval_batches=1,
                               checkpoint_every=1, mesh_shape=(1, 1, 1),
                               granularities=("XL",))  # Dense: the whole model only.
    result = train(config, data.DataConfig(task="matlm_wiki"), train_config, extracted,
                   vocab=wiki_vocab, show_progress=False)
    assert result.final_step == 1
    tuned = load_checkpoint_for_inference(extracted, step=1)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         tuned.params, start.params)
    # One AdamW step of lr 1e-3 moves each weight by about 1e-3: trained from the extracted
    # weights, not re-initialised (that would move them by O(1)).
    assert 0 < max(jax.tree.leaves(moved)) < 5e-3
    assert not list((extracted / "checkpoints").glob("*.corrupt*"))


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_is_refused_before_anything_is_written(parent, extracted, tmp_path, capsys):
    model_dir, _ = parent
    out = tmp_path / "out"
    base = [f"--model_dir={model_dir}", f"--output={out}"]
    err = _refused(capsys, ["extract", *base, "--widths=S,M"])
    assert "--widths='S,M'" in err and "2 entries but the model has 3 layers" in err
    err = _refused(capsys, ["extract", *base, "--widths=XXL"])
    assert "unknown granularity 'XXL'" in err and "S=16, M=32, L=64, XL=128" in err
    err = _refused(capsys, ["extract", *base, "--widths=200"])
    assert "--widths='200'" in err and "exceeds d_ff=128" in err
    err = _refused(capsys, ["extract", f"--model_dir={tmp_path}/nope",
                            f"--output={out}", "--widths=M"])
    assert "nope" in err and "does not exist" in err
    err = _refused(capsys, ["extract", *base, "--widths=M", "--step=3"])
    assert "--step=3" in err and "[7]" in err
    assert not out.exists()
    # An output dir that holds anything is left exactly as it was.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _refused(capsys, ["extract", *base, "--widths=M"])
    assert "exists and is not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    # An extracted model can only be cut narrower.
    again = tmp_path / "again"
    for widths, message in [("128", "layer 0: width 128 exceeds the stored width 16"),
                            ("16,128,128", "layer 2: width 128 exceeds the stored width 64")]:
        err = _refused(capsys, ["extract", f"--model_dir={extracted}",
                                f"--output={again}", f"--widths={widths}"])
        assert message in err and "can only be cut narrower" in err
    assert not again.exists()


def test_an_extracted_model_extracts_narrower(extracted, tmp_path, capsys):
    from matlm.model_dir import load_checkpoint_for_inference
    out = tmp_path / "s"
    assert main(["extract", f"--model_dir={extracted}", f"--output={out}",
                 "--widths=M"]) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "checkpoint on disk:" in printed
    twice = load_checkpoint_for_inference(out)
    once = load_checkpoint_for_inference(extracted)
    assert twice.model_config.ffn_dims == (16, 32, 32)
    want, _ = extract_submodel(once.params, once.model_config, "M")
    jax.tree.map(np.testing.assert_array_equal, twice.params, want)
