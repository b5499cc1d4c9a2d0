"""Exports load in transformers 4.x as well as 5.x (docs/export.md): in transformers
4.57, a uniform export is a plain LlamaForCausalLM and a Mix'n'Match export runs its
remote code, both with matlm's logits and greedy continuation, and AutoTokenizer gives
matlm's ids (BOS first) and text.

The export extra pins transformers 5.x, which tests/test_export_hf.py loads in-process.
transformers 4.x runs in a second environment: the pinned 4.x wheels (TRANSFORMERS4,
~135 MB, ~15 s) are installed once with pip into the cache dir
(`$MATLM_CACHE_DIR/transformers4`, default `<repo>/.matlm_cache/transformers4`) and
put ahead of the main venv on PYTHONPATH, so torch, safetensors, numpy and the rest come
from the main venv and are not installed twice. scripts/probe_hf_export.py runs there
(importing neither matlm nor jax) and writes what the exports compute as JSON.

If pip cannot install the wheels (no network on first use), the test fails rather than
skips: a skip would leave CI green while nothing checks that exports still load in 4.x,
which is the regression this test exists for. Deselect it offline with `-m "not slow"`,
or point MATLM_CACHE_DIR at a cache where it ran once.
"""
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")  # The export extra; CI installs it.
pytest.importorskip("transformers")

from hf_export_cases import (ATOL, BASE, greedy_continuation, random_params,  # noqa: E402
                             random_tokens, tokenizer_texts)
from matlm.data.vocabulary import cache_dir  # noqa: E402
from matlm.export import export_hf  # noqa: E402
from matlm.model.transformer import MatLM  # noqa: E402

pytestmark = pytest.mark.slow

# The newest transformers 4.x, and the tokenizers and huggingface_hub it requires
# (tokenizers>=0.22,<=0.23.0 and huggingface-hub>=0.34,<1.0: older than the 5.x extra's,
# so they are installed next to it). Its other dependencies are in the main venv.
TRANSFORMERS4 = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2")
PROBE = Path(__file__).resolve().parents[1] / "scripts" / "probe_hf_export.py"


def transformers4_dir() -> Path:
    """The dir holding TRANSFORMERS4, installed on first use (under a lock: parallel test
    runs install once) and reused while its marker lists the same pins."""
    target = cache_dir() / "transformers4"
    marker, pins = target / "INSTALLED", "\n".join(TRANSFORMERS4) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".transformers4.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == pins:
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".transformers4.", suffix=".tmp"))
        try:
            command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                       "--only-binary=:all:", "--target", str(tmp), *TRANSFORMERS4]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                pytest.fail(f"could not install {' '.join(TRANSFORMERS4)} with pip "
                            f"({' '.join(command)}): {result.stderr.strip()[-2000:]}\n"
                            "This test needs PyPI once, then reuses the cache; offline, "
                            'deselect it with -m "not slow".', pytrace=False)
            (tmp / "INSTALLED").write_text(pins)
            shutil.rmtree(target, ignore_errors=True)  # Other pins: replaced whole.
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_probe(request: dict, tmp_path: Path, site: Path) -> dict:
    """scripts/probe_hf_export.py with `site` ahead of the main venv's packages."""
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # transformers 4.x also imports TensorFlow and flax when they are installed (the
        # main venv has both): slow and noisy, and not what a torch user loads.
        USE_TF="0", USE_FLAX="0", USE_TORCH="1",
        # Local dirs only; the remote code is copied into a module cache of this run's own
        # (4.x and 5.x would otherwise share one, under the same module name).
        HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "request.json"),
                             str(tmp_path / "result.json")], env=env, capture_output=True,
                            text=True)
    if result.returncode:
        pytest.fail(f"{PROBE.name} failed under {site}:\n{result.stderr[-4000:]}",
                    pytrace=False)
    return json.loads((tmp_path / "result.json").read_text())


@pytest.fixture(scope="module")
def exports(tmp_path_factory, wiki_vocab):
    """{name: (config, params, widths, dir)}: a uniform tied SwiGLU export (plain Llama) and
    a Mix'n'Match untied GeGLU export (remote code)."""
    root = tmp_path_factory.mktemp("exports")
    untied = dataclasses.replace(BASE, tie_embeddings=False, activation="geglu")
    cases = {"uniform": (BASE, random_params(BASE, 0), "M"),
             "mixnmatch": (untied, random_params(untied, 1), "S,XL,M")}
    out = {}
    for name, (config, params, widths) in cases.items():
        done = export_hf(params, config, widths, wiki_vocab.sentencepiece_model_file,
                         root / name)
        assert done.remote_code == (name == "mixnmatch")
        out[name] = (config, params, done.widths, done.path)
    return out


@pytest.fixture(scope="module")
def probed(exports, tmp_path_factory):
    """What the exports compute in transformers 4.x, and the texts it tokenized."""
    site = transformers4_dir()
    texts = tokenizer_texts()
    request = {"exports": {name: {"path": str(path), "trust_remote_code": name == "mixnmatch"}
                           for name, (_, _, _, path) in exports.items()},
               "tokens": random_tokens(3).tolist(), "texts": texts}
    return run_probe(request, tmp_path_factory.mktemp("probe"), site), texts


def test_probe_ran_transformers4(probed):
    result, _ = probed
    pinned = dict(pin.split("==") for pin in TRANSFORMERS4)
    assert result["versions"] == pinned


@pytest.mark.parametrize("name,model_class", [("uniform", "LlamaForCausalLM"),
                                              ("mixnmatch", "MatLMForCausalLM")])
def test_logits_and_generate_equal_matlm(exports, probed, name, model_class):
    config, params, widths, _ = exports[name]
    got = probed[0]["exports"][name]
    assert got["model_class"] == model_class
    assert got["ffn_widths"] == list(widths)  # Each layer at its own width, nothing padded.
    tokens = random_tokens(3)
    want = np.asarray(MatLM(config).apply({"params": params}, tokens, widths=widths))
    diff = np.abs(np.asarray(got["logits"], np.float32) - want).max()
    assert diff < ATOL, diff
    np.testing.assert_array_equal(
        got["generated"], greedy_continuation(config, params, tokens[:1, :4], widths))


@pytest.mark.parametrize("name", ["uniform", "mixnmatch"])
def test_tokenizer_equals_matlm_vocabulary(probed, wiki_vocab, name):
    result, texts = probed
    got = result["exports"][name]
    sp = wiki_vocab.tokenizer
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert got["special_ids"] == {"bos": sp.bos_id(), "eos": sp.eos_id(),
                                  "pad": sp.pad_id(), "unk": sp.unk_id()}
    want = [list(wiki_vocab.encode(t)) for t in texts]
    mismatched = [t[:60] for t, a, b in zip(texts, want, got["ids"]) if a != b]
    assert not mismatched, (len(mismatched), mismatched[:3])
    # BOS first by default: matlm starts every document with it.
    assert got["ids_with_special_tokens"] == [[sp.bos_id(), *ids] for ids in want]
    assert got["decoded"] == [wiki_vocab.decode(ids) for ids in want]
