"""`matlm export --format=hf`: the exported model's logits in transformers equal matlm's
(uniform -> plain LlamaForCausalLM, Mix'n'Match -> remote code at per-layer widths),
generate runs, the tokenizer equals matlm's vocabulary on real text, and bad input is
refused before anything is written."""
import dataclasses
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # The export extra; CI installs it.
transformers = pytest.importorskip("transformers")

from hf_export_cases import (ATOL, BASE, greedy_continuation, random_params,  # noqa: E402
                             random_tokens, tokenizer_texts)
from matlm.cli.main import main  # noqa: E402
from matlm.model import init_params  # noqa: E402
from matlm.model.transformer import MatLM  # noqa: E402


def _save(directory, config, params, vocab):
    from matlm.model_dir import save_for_inference
    save_for_inference(directory, config, params, 1, vocab.sentencepiece_model_file,
                       {"task": "matlm_wiki"})
    return directory


@pytest.fixture(scope="module")
def tied(tmp_path_factory, wiki_vocab):
    params = random_params(BASE, 0)
    return BASE, params, _save(tmp_path_factory.mktemp("tied"), BASE, params, wiki_vocab)


@pytest.fixture(scope="module")
def untied(tmp_path_factory, wiki_vocab):
    config = dataclasses.replace(BASE, tie_embeddings=False, activation="geglu")
    params = random_params(config, 1)
    return config, params, _save(tmp_path_factory.mktemp("untied"), config, params, wiki_vocab)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _export(capsys, *flags):
    assert main(["export", "--format=hf", *flags]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_uniform_export_is_a_plain_llama(tied, tmp_path, capsys):
    config, params, model_dir = tied
    out = _export(capsys, f"--model_dir={model_dir}", "--widths=M",
                  f"--output={tmp_path}/hf")
    assert "LlamaForCausalLM" in out
    hf_config = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in hf_config
    # RoPE's base under both names: 5.x reads rope_parameters, 4.x rope_theta.
    assert hf_config["rope_parameters"]["rope_theta"] == hf_config["rope_theta"] == 500.0
    assert not (tmp_path / "hf/modeling_matlm.py").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")  # No remote code.
    assert type(model) is transformers.LlamaForCausalLM
    assert model.config.tie_word_embeddings
    m = config.granularities.by_name["M"]
    assert all(layer.mlp.gate_proj.out_features == m for layer in model.model.layers)
    tokens = random_tokens()
    want = np.asarray(MatLM(config).apply({"params": params}, tokens, widths=(m,) * 3))
    got = _hf_logits(model, tokens)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    # The exported M differs from XL: a slice that ignored --widths would not pass above.
    full = np.asarray(MatLM(config).apply({"params": params}, tokens))
    assert np.abs(full - want).max() > 100 * ATOL
    generated = model.generate(torch.tensor(tokens[:1, :4], dtype=torch.long),
                               max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    # Greedy continuation = argmax of matlm's logits, token by token.
    np.testing.assert_array_equal(generated.numpy(),
                                  greedy_continuation(config, params, tokens[:1, :4], (m,) * 3))


def test_mixnmatch_export_runs_at_its_own_widths(untied, tmp_path, capsys):
    config, params, model_dir = untied
    out = _export(capsys, f"--model_dir={model_dir}", "--widths=S,XL,M",
                  f"--output={tmp_path}/hf")
    assert "trust_remote_code=True" in out
    widths = config.resolve_widths("S,XL,M")
    assert len(set(widths)) == 3
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              trust_remote_code=True)
    assert type(model).__name__ == "MatLMForCausalLM"
    assert not model.config.tie_word_embeddings and model.config.hidden_act == "gelu_pytorch_tanh"
    assert [layer.mlp.gate_proj.out_features for layer in model.model.layers] == list(widths)
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == list(widths)
    tokens = random_tokens(1)
    want = np.asarray(MatLM(config).apply({"params": params}, tokens, widths=widths))
    got = _hf_logits(model, tokens)
    assert np.abs(got - want).max() < ATOL, np.abs(got - want).max()
    generated = model.generate(torch.tensor(tokens[:1, :4], dtype=torch.long),
                               max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_export_of_an_extracted_dir(tied, tmp_path, capsys):
    """A `matlm extract` dir (per-layer layer_d_ff, contiguous layout) exports at its
    stored widths by default and equals the parent's submodel."""
    config, params, model_dir = tied
    assert main(["extract", f"--model_dir={model_dir}", "--widths=S,M,XL",
                 f"--output={tmp_path}/ex"]) == 0
    capsys.readouterr()
    _export(capsys, f"--model_dir={tmp_path}/ex", f"--output={tmp_path}/hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                              trust_remote_code=True)
    widths = config.resolve_widths("S,M,XL")
    tokens = random_tokens(2)
    want = np.asarray(MatLM(config).apply({"params": params}, tokens, widths=widths))
    assert np.abs(_hf_logits(model, tokens) - want).max() < ATOL


def test_tokenizer_equals_matlm_vocabulary(tied, tmp_path, capsys, wiki_vocab):
    _, _, model_dir = tied
    _export(capsys, f"--model_dir={model_dir}", "--widths=S", f"--output={tmp_path}/hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = wiki_vocab.tokenizer
    # A class name transformers 4.x knows too (TokenizersBackend is 5.x only), and the BOS
    # setting docs/export.md promises.
    written = json.loads((tmp_path / "hf/tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert written["add_bos_token"] is True and written["add_eos_token"] is False
    texts = tokenizer_texts()
    want = [list(wiki_vocab.encode(t)) for t in texts]
    got = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert sum(map(len, want)) > 500_000
    mismatched = [t[:60] for t, a, b in zip(texts, want, got) if a != b]
    assert not mismatched, (len(mismatched), mismatched[:3])
    # BOS first by default: matlm starts every document with it.
    assert tokenizer("hello")["input_ids"] == [sp.bos_id(), *wiki_vocab.encode("hello")]
    assert tokenizer.eos_token_id == sp.eos_id() and tokenizer.pad_token_id == sp.pad_id()
    # Decoding: HF's text equals matlm's for every sequence (and special ids are skipped).
    assert tokenizer.batch_decode(want) == [wiki_vocab.decode(ids) for ids in want]
    assert tokenizer.decode([sp.bos_id(), *want[0]], skip_special_tokens=True) == \
        wiki_vocab.decode(want[0])


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_non_gated_model_is_refused(tmp_path, capsys, wiki_vocab):
    config = dataclasses.replace(BASE, activation="gelu")
    model_dir = _save(tmp_path / "m", config, init_params(config, jax.random.key(0)), wiki_vocab)
    err = _error(capsys, ["export", f"--model_dir={model_dir}", f"--output={tmp_path}/hf"])
    assert "activation='gelu'" in err and "swiglu, geglu" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("position_encoding", ["learned", "none"])
def test_position_encoding_other_than_rope_is_refused(tmp_path, capsys, wiki_vocab,
                                                      position_encoding):
    config = dataclasses.replace(BASE, position_encoding=position_encoding)
    model_dir = _save(tmp_path / "m", config, init_params(config, jax.random.key(0)), wiki_vocab)
    err = _error(capsys, ["export", f"--model_dir={model_dir}", f"--output={tmp_path}/hf"])
    assert f"position_encoding={position_encoding!r} cannot be exported" in err
    assert not (tmp_path / "hf").exists()


def test_output_dir_that_is_not_empty_is_refused(tied, tmp_path, capsys):
    _, _, model_dir = tied
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/keep.txt").write_text("mine")
    err = _error(capsys, ["export", f"--model_dir={model_dir}", f"--output={tmp_path}/hf"])
    assert "exists and is not empty" in err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    assert (tmp_path / "hf/keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # No temporary dir left.


@pytest.mark.parametrize("flag,message", [
    ("--widths=S,M", "2 entries but the model has 3 layers"),
    ("--widths=S,M,XXL", "unknown granularity 'XXL'"),
    ("--widths=100", "exceeds d_ff=64"),
    ("--format=onnx", "--format='onnx' is not supported; expected one of: hf"),
])
def test_bad_widths_and_format(tied, tmp_path, capsys, flag, message):
    _, _, model_dir = tied
    err = _error(capsys, ["export", f"--model_dir={model_dir}", flag,
                          f"--output={tmp_path}/hf"])
    assert message in err, err
    assert not (tmp_path / "hf").exists()


def test_missing_extra_is_one_line(tied, tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    _, _, model_dir = tied
    err = _error(capsys, ["export", f"--model_dir={model_dir}", f"--output={tmp_path}/hf"])
    assert 'pip install -e ".[export]"' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
