"""`matlm generate` end to end on a tiny saved checkpoint: the streamed single prompt and
the batch file equal the library's output, stops and max_new_tokens, speculative greedy
equals plain greedy, and bad input is one line with exit 2 before any model work."""
import io
import json

import jax
import pytest

from matlm.cli.generate import _Streamer, cut_at_stop
from matlm.cli.main import main
from matlm.model import ModelConfig, init_params

CONFIG = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, d_ff=128)
CONTEXT = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, wiki_vocab):
    from matlm.model_dir import save_for_inference
    model_dir = tmp_path_factory.mktemp("model")
    params = init_params(CONFIG, jax.random.key(0))
    save_for_inference(model_dir, CONFIG, params, 5, wiki_vocab.sentencepiece_model_file,
                       {"task": "matlm_wiki"})
    # A trained run records its context (seq_len); save_for_inference writes no train part.
    run_config = json.loads((model_dir / "run_config.json").read_text())
    run_config["train"] = {"seq_len": CONTEXT}
    (model_dir / "run_config.json").write_text(json.dumps(run_config))
    return model_dir, params


def library_text(params, vocab, text, max_new_tokens):
    """What the library generates greedily for `text`, decoded after the prompt."""
    from matlm import data
    from matlm.decoding.generate import generate
    prompt = [data.start_id(vocab), *vocab.encode(text)]
    new = generate(params, CONFIG, [prompt], max_new_tokens=max_new_tokens,
                   stop_ids=[vocab.eos_id])[0]
    return vocab.decode(prompt + new)[len(vocab.decode(prompt)):], new


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


def test_prompt_streams_the_library_output(checkpoint, wiki_vocab, monkeypatch, capsys):
    model_dir, params = checkpoint
    want, new = library_text(params, wiki_vocab, "The river", 20)
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["generate", f"--model_dir={model_dir}", "--prompt=The river",
                 "--max_new_tokens=20"]) == 0
    assert out.getvalue() == want + "\n"
    # Streamed: written in pieces as decoding chunks arrive (not once at the end).
    assert len([w for w in out.writes if w.strip()]) >= 2
    assert f"{len(new)} new tokens" in capsys.readouterr().err


def test_prompts_file_batch_stop_and_draft(checkpoint, wiki_vocab, tmp_path, capsys):
    model_dir, params = checkpoint
    texts = ["The river", "In 1850 the", "A"]
    wants = [library_text(params, wiki_vocab, t, 16)[0] for t in texts]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    base = ["generate", f"--model_dir={model_dir}", "--max_new_tokens=16"]
    # Plain lines to stdout.
    assert main(base + [f"--prompts_file={tmp_path}/p.txt"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == wants
    assert [r["prompt"] for r in rows] == texts
    assert all(r["new_tokens"] <= 16 for r in rows)
    # JSONL to a file, speculative with an S draft: greedy output is the same.
    assert main(base + [f"--prompts_file={tmp_path}/p.jsonl", f"--output={tmp_path}/o.jsonl",
                        "--draft=S", "--draft_tokens=3"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == wants
    err = capsys.readouterr().err
    assert "draft S, k=3" in err and "acceptance" in err and "tokens/s" in err
    # A stop sequence taken from the middle of the first completion cuts it there.
    stop = wants[0][len(wants[0]) // 2:][:3]
    assert stop.strip(), wants[0]
    assert main(base + [f"--prompts_file={tmp_path}/p.txt", f"--stop={stop}"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == [cut_at_stop(w, [stop])[0] for w in wants]
    assert rows[0]["completion"] == wants[0][:wants[0].index(stop)]


def test_streamer_holds_back_a_possible_stop_and_partial_characters():
    out = io.StringIO()
    texts = iter(["ab", "ab\n", "ab\ncd", "ab\ncd\ufffd", "ab\ncd\n\nxy"])
    streamer = _Streamer(lambda ids: next(texts), ["\n\n"], out)
    seen = []
    for _ in range(5):
        streamer(0, [1])
        seen.append(out.getvalue())
    assert seen == ["ab", "ab", "ab\ncd", "ab\ncd", "ab\ncd"]
    streamer.finish("ab\ncd")
    assert out.getvalue() == "ab\ncd\n"


@pytest.mark.parametrize("flags,message", [
    (["--prompt="], "--prompt is empty"),
    (["--prompt=x", "--draft=S", "--draft_tokens=0"], "--draft_tokens must be an integer >= 1"),
    (["--prompt=x", "--widths=M", "--draft=L"], "--draft='L' is wider than the target "
                                                "--widths='M' in layer 0 (64 > 32)"),
    (["--prompt=x", "--draft=XL"], "equals the target --widths='XL'"),
    (["--prompt=" + "word " * 60], "longer than the model's context of 48 tokens"),
    (["--prompt=x", "--temperature=-1"], "--temperature must be >= 0"),
    ([], "give exactly one of --prompt=TEXT or --prompts_file=FILE"),
])
def test_bad_input_is_one_line_before_any_model_work(checkpoint, capsys, no_model_work,
                                                    flags, message):
    model_dir, _ = checkpoint
    assert main(["generate", f"--model_dir={model_dir}", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_missing_model_dir(tmp_path, capsys, no_model_work):
    assert main(["generate", f"--model_dir={tmp_path}/nope", "--prompt=x"]) == 2
    err = capsys.readouterr().err
    assert "--model_dir=" in err and "does not exist" in err
    # The old spelling still works, with a one-line deprecation warning first.
    assert main(["generate", f"--checkpoint_dir={tmp_path}/nope", "--prompt=x"]) == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert warning == "matlm generate: warning: --checkpoint_dir is deprecated; use --model_dir"
    assert "--model_dir=" in error and "does not exist" in error
