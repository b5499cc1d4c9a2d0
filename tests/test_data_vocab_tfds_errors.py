"""Vocabulary training/loading, TFDS tasks on mock data, and clear errors for bad input."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from matlm import data
from matlm.cli import main as cli


def test_vocab_trains_offline_and_round_trips(wiki_vocab, tmp_path):
    assert (wiki_vocab.pad_id, wiki_vocab.eos_id, wiki_vocab.unk_id, data.start_id(wiki_vocab)) \
        == (data.PAD_ID, data.EOS_ID, data.UNK_ID, data.BOS_ID)
    text = "Anarchism is a political philosophy. Ünïcode → bytes: 漢字!"
    assert wiki_vocab.decode(wiki_vocab.encode(text)) == text  # Byte fallback: lossless.
    assert data.UNK_ID not in wiki_vocab.encode(text)
    # The CLI trains on a task and writes a loadable model.
    out = tmp_path / "small.model"
    assert cli.main(["vocab", "--task=matlm_wiki", "--vocab_size=500", f"--output={out}",
                     "--max_documents=10"]) == 0
    assert data.load_vocabulary(out).vocab_size == 500


def test_external_sentencepiece_model_works_if_installed():
    import importlib.util, os
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common not installed")
    path = os.path.join(os.path.dirname(spec.origin), "data", "tokenizer.model.v1")
    vocab = data.load_vocabulary(path)
    assert data.start_id(vocab) == vocab.tokenizer.bos_id()


def in_memory_copy(builtin: str) -> str:
    """The built-in TFDS task registered with streaming=False (tfds.testing.mock_data has
    no shard files to stream; tests/test_data_tfds_streaming.py prepares real ones)."""
    from matlm.data.tfds_tasks import BUILTIN_TFDS_TASKS
    return data.register_tfds_task(name=f"{builtin}_in_memory", streaming=False,
                                   **BUILTIN_TFDS_TASKS[builtin])


@pytest.mark.parametrize("builtin", ["matlm_c4_en", "matlm_lm1b", "matlm_wiki40b_en"])
def test_tfds_tasks_produce_batches_from_mock_data(builtin, wiki_vocab):
    from matlm.data import corpora
    assert builtin in corpora.CORPORA  # Built-in TFDS tasks stream by default.
    task = in_memory_copy(builtin)
    with tfds.testing.mock_data(num_examples=30):
        it = data.make_batch_iterator(task, "train", seq_len=32, global_batch_size=4,
                                      vocab=wiki_vocab, seed=0, host_index=1, num_hosts=2)
        batch = next(it)
        # Count: mock documents are tokenised and all land in the epoch. The in-memory path
        # reads the whole split on every host (host 1 of 2 too): its rows of the global batch.
        assert it._streams[0].store.num_docs == 30
        ev = data.make_batch_iterator(task, "validation", 32, 4, wiki_vocab, seed=0,
                                      repeat=False)
        total = sum(b["loss_mask"].sum() for b in ev)
    assert batch["targets"].shape == (2, 32) and batch["loss_mask"].sum() > 0
    assert total == ev.num_tokens


def test_tfds_mixture_with_embedded_task(wiki_vocab):
    data.register_mixture("test_c4_wiki", [(in_memory_copy("matlm_c4_en"), 0.5),
                                           ("matlm_wiki", 0.5)])
    with tfds.testing.mock_data(num_examples=20):
        batch = data.make_batch_iterator("test_c4_wiki", "train", 32, 8, wiki_vocab,
                                         seed=0).batch(3)
    assert batch["targets"].shape == (8, 32)


def test_unknown_task(wiki_vocab):
    with pytest.raises(data.UnknownTaskError, match="'no_such_task'.*matlm_wiki"):
        data.make_batch_iterator("no_such_task", "train", 32, 4, wiki_vocab, seed=0)


def test_unknown_split(wiki_vocab):
    with pytest.raises(data.UnknownSplitError, match="'tset'"):
        data.make_batch_iterator("matlm_wiki", "tset", 32, 4, wiki_vocab, seed=0)


@pytest.mark.parametrize("seq_len", [1, 0, -3])
def test_sequence_length_below_two(seq_len, wiki_vocab):
    with pytest.raises(data.SequenceLengthError, match="seq_len"):
        data.make_batch_iterator("matlm_wiki", "train", seq_len, 4, wiki_vocab, seed=0)


def test_batch_not_divisible_by_hosts(wiki_vocab):
    with pytest.raises(data.BatchSizeError, match="divisible"):
        data.make_batch_iterator("matlm_wiki", "train", 32, 6, wiki_vocab, seed=0,
                                 num_hosts=4)


def test_empty_or_missing_glob(tmp_path):
    with pytest.raises(data.EmptyGlobError, match="matches no file"):
        data.register_local_files_task(pattern=str(tmp_path / "missing_dir" / "*.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(data.EmptyGlobError, match="only empty files"):
        data.register_local_files_task(pattern=str(tmp_path / "*.txt"))


def test_jsonl_without_the_named_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(data.MissingFieldError, match=r"d.jsonl:2.*'text'"):
        data.register_local_files_task(pattern=str(tmp_path / "*.jsonl"))


def test_local_files_txt_blocks_and_jsonl(tmp_path, wiki_vocab):
    (tmp_path / "a.txt").write_text("First block.\n\nSecond block.\n\n\nThird.")
    (tmp_path / "b.jsonl").write_text('{"body": "From json."}\n')
    name = data.register_local_files_task(pattern=str(tmp_path / "*"), name="test_local",
                                          txt_split="blank_lines", jsonl_field="body",
                                          validation_fraction=0.0)
    it = data.make_batch_iterator(name, "train", 64, 1, wiki_vocab, seed=0, shuffle=False,
                                  repeat=False)
    batch = next(it)
    assert batch["segment_ids"].max() == 4  # Three blocks and one jsonl record.
    seg, tgt = batch["segment_ids"][0], batch["targets"][0]
    texts = [wiki_vocab.decode(tgt[seg == s].tolist()) for s in range(1, 5)]
    assert texts == ["First block.", "Second block.", "Third.", "From json."]


def test_bad_vocabulary_file(tmp_path):
    bad = tmp_path / "not_sp.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(data.VocabularyError, match="not a SentencePiece model"):
        data.load_vocabulary(bad)
    with pytest.raises(data.VocabularyError, match="does not exist"):
        data.load_vocabulary(tmp_path / "absent.model")


def test_cli_reports_bad_input_in_one_line(capsys, tmp_path):
    assert cli.main(["vocab", "--task=no_such_task", f"--output={tmp_path / 'x.model'}"]) == 2
    assert "unknown task or mixture 'no_such_task'" in capsys.readouterr().err
