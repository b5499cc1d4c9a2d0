"""Streamed TFDS tasks (matlm.data.tfds_corpus) on a prepared mock of c4/en:3.1.0 in many
shards (scripts/make_mock_c4.py), TFRecord and ArrayRecord: every example once per epoch
(checked against TFDS's own reader), one global batch for 1, 2 and 4 hosts, exact resume
(also on another host count, and through `train`), bounded start-up, clean errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from matlm import data
from matlm.data import cleaners, corpora, streaming, tfds_corpus

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_mock_c4 import build_mock_c4  # noqa: E402

NUM_DOCS, NUM_SHARDS = 300, 12


@pytest.fixture(scope="session", params=["tfrecord", "array_record"])
def mock_c4(request, tmp_path_factory):
    """(data_dir, file_format) of a prepared mock C4 with 12 train shards."""
    data_dir = tmp_path_factory.mktemp(f"tfds_{request.param}")
    build_mock_c4(str(data_dir), NUM_DOCS, NUM_SHARDS, num_validation_docs=40,
                  file_format=request.param)
    return str(data_dir), request.param


@pytest.fixture
def c4_task(mock_c4):
    return data.register_tfds_task(name="test_c4", tfds_name="c4/en:3.1.0",
                                   data_dir=mock_c4[0])


def tfds_texts(data_dir, split):
    """The split's texts in TFDS's order, read by TFDS itself (the reference)."""
    import tensorflow_datasets as tfds
    builder = tfds.builder("c4/en:3.1.0", data_dir=data_dir)
    if builder.info.file_format.value == "array_record":
        examples = builder.as_data_source(split=split)
    else:
        examples = builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()
    return [ex["text"].decode() for ex in examples]


def batches(task, vocab, hosts=1, host=0, steps=12, B=8, L=32):
    it = data.make_batch_iterator(task, "train", L, B, vocab, seed=0, host_index=host,
                                  num_hosts=hosts)
    return it, [next(it) for _ in range(steps)]


@pytest.mark.parametrize("B", [4, 16], ids=["more_shards", "fewer_shards"])
def test_every_example_is_read_by_exactly_one_stream_per_epoch(mock_c4, c4_task, B, wiki_vocab):
    corpus = corpora.CORPORA[c4_task]
    assert len(corpus.split_files("train")) == NUM_SHARDS
    expected = sorted(tfds_texts(mock_c4[0], "train"))  # TFDS's own reader: the reference.
    assert len(expected) == NUM_DOCS
    for epoch in (0, 1):
        seen = []
        for s in range(B):
            stream = streaming.Stream(corpus, "train", s, B, 0, 32, wiki_vocab)
            for path, residue, modulus in stream.units(epoch):
                seen += [text for _, text in corpus.records(path, "train", residue, modulus)]
        assert sorted(seen) == expected


def test_hosts_materialise_their_rows_of_one_global_batch(c4_task, wiki_vocab):
    _, one = batches(c4_task, wiki_vocab)
    for hosts in (2, 4):
        per_host = [batches(c4_task, wiki_vocab, hosts, h)[1] for h in range(hosts)]
        for step, batch in enumerate(one):
            for name in batch:
                np.testing.assert_array_equal(
                    np.concatenate([per_host[h][step][name] for h in range(hosts)]),
                    batch[name], err_msg=f"{hosts} hosts, step {step}, {name}")


@pytest.mark.parametrize("resume_hosts", [1, 4])
def test_resume_equals_a_continuous_run(c4_task, wiki_vocab, resume_hosts):
    # 60 steps of 8 rows × 32 tokens pass an epoch of the 300 documents (~12 K tokens).
    _, continuous = batches(c4_task, wiki_vocab, steps=60)
    it, _ = batches(c4_task, wiki_vocab, steps=23)
    state = json.loads(json.dumps(it.state))  # Through JSON, as checkpoints store it.
    assert max(p[0] for p in state["positions"]) == 0  # Still in epoch 0 at step 23 ...
    resumed = [data.restore_batch_iterator(state, wiki_vocab, h, resume_hosts)
               for h in range(resume_hosts)]
    for step in range(23, 60):
        got = [next(r) for r in resumed]
        for name in continuous[step]:
            np.testing.assert_array_equal(np.concatenate([g[name] for g in got]),
                                          continuous[step][name], err_msg=f"{step} {name}")
    # ... and past it by 60 (simulated hosts: read the streams, `state` would allgather).
    assert max(s.position[0] for r in resumed for s in r.streams) >= 1


def test_start_up_reads_a_few_records_per_stream(c4_task, wiki_vocab):
    corpora.RECORDS_READ[0] = 0
    batches(c4_task, wiki_vocab, steps=1, B=4)
    # Each of the 4 streams tokenises at most one shard (25 examples) ahead: not the split.
    assert 0 < corpora.RECORDS_READ[0] <= 4 * NUM_DOCS // NUM_SHARDS


def test_validation_is_the_first_validation_examples(mock_c4, wiki_vocab):
    task = data.register_tfds_task(name="test_c4_val", tfds_name="c4/en:3.1.0",
                                   data_dir=mock_c4[0], max_validation_documents=7)
    assert corpora.CORPORA[task].validation_texts() == tfds_texts(mock_c4[0],
                                                                     "validation")[:7]
    ev = data.make_batch_iterator(task, "validation", 32, 4, wiki_vocab, seed=0, repeat=False)
    assert sum(b["loss_mask"].sum() for b in ev) == ev.num_tokens > 0


def test_wiki40b_cleaner_is_the_same_streamed_and_in_tf_data():
    """One registered cleaner: the streamed path applies it per record, the in-memory
    path inside tf.data (tasks.clean_texts); both give the same plain text."""
    from matlm.data import tasks
    from matlm.data.tf_setup import tf
    text = ("\n_START_ARTICLE_\nRiver\n_START_SECTION_\nCourse\n_START_PARAGRAPH_\n"
            "It flows._NEWLINE_It ends \u00e9.\n_START_PARAGRAPH_\nSecond.  ")
    expected = "River\n\nCourse\n\nIt flows.\nIt ends \u00e9.\n\nSecond."
    clean = cleaners.get_cleaner("wiki40b")
    assert clean(text) == expected
    by_tf = tasks.clean_texts(clean, tf.data.Dataset.from_tensors({"text": text}))
    assert next(iter(by_tf.as_numpy_iterator()))["text"].decode() == expected
    assert corpora.CORPORA["matlm_wiki40b_en"].clean is clean  # The built-in task's.
    assert cleaners.get_cleaner("none") is None
    with pytest.raises(data.DataError, match="unknown cleaner 'wiki41b'.*'none', 'wiki40b'"):
        data.register_tfds_task(name="test_bad_cleaner", tfds_name="c4/en:3.1.0",
                                cleaner="wiki41b")


def test_tfds_task_can_stay_in_memory(mock_c4, wiki_vocab):
    if mock_c4[1] != "tfrecord":
        pytest.skip("seqio's TfdsDataSource reads TFRecord datasets only")
    task = data.register_tfds_task(name="test_c4_mem", tfds_name="c4/en:3.1.0",
                                   data_dir=mock_c4[0], streaming=False)
    assert task not in corpora.CORPORA
    it = data.make_batch_iterator(task, "train", 32, 4, wiki_vocab, seed=0)
    assert it._streams[0].store.num_docs == NUM_DOCS


def _corrupt_copy(mock_c4, tmp_path):
    import shutil
    data_dir, file_format = mock_c4
    copy = tmp_path / "tfds"
    shutil.copytree(data_dir, copy)
    shard = sorted((copy / "c4" / "en" / "3.1.0").glob(f"c4-train.{file_format}-00003-*"))[0]
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    shard.write_bytes(bytes(raw))
    return str(copy), str(shard)


def test_bad_tfds_input_is_one_clear_error(mock_c4, tmp_path, wiki_vocab):
    # A missing dataset: names the dataset, the directory and what to do.
    task = data.register_tfds_task(name="test_c4_missing", tfds_name="c4/en:3.1.0",
                                   data_dir=str(tmp_path / "nothing_here"))
    with pytest.raises(data.DataError, match=r"'c4/en:3.1.0' is not prepared in .*nothing_here"
                                             r".*tfds build"):
        data.make_batch_iterator(task, "train", 32, 4, wiki_vocab, seed=0)
    # A feature that is not there.
    task = data.register_tfds_task(name="test_c4_key", tfds_name="c4/en:3.1.0",
                                   data_dir=mock_c4[0], text_key="content")
    with pytest.raises(data.DataError, match="no feature 'content'.*text_key"):
        data.make_batch_iterator(task, "train", 32, 4, wiki_vocab, seed=0)
    # A corrupt record: the shard is named when a stream reaches it.
    corrupt_dir, shard = _corrupt_copy(mock_c4, tmp_path)
    corpus = tfds_corpus.TfdsCorpus("c4/en:3.1.0", {"train": "train"}, corrupt_dir)
    with pytest.raises(data.DataError, match=f"corrupt TFDS (shard|record).*{shard.split('/')[-1]}"):
        list(corpus.records(shard, "train"))
    for path in corpus.split_files("train"):  # The other shards still read.
        if path != shard:
            assert len(list(corpus.records(path, "train"))) == NUM_DOCS // NUM_SHARDS
    # A shard cut short: fewer records than dataset_info.json lists.
    other = [p for p in corpus.split_files("train") if p != shard][0]
    if mock_c4[1] == "tfrecord":
        import tensorflow as tf
        kept = list(tf.data.TFRecordDataset(other).take(10).as_numpy_iterator())
        with tf.io.TFRecordWriter(other) as writer:
            for record in kept:
                writer.write(record)
        with pytest.raises(data.DataError, match="has 10 records but dataset_info.json lists 25"):
            list(corpus.records(other, "train"))


def test_an_empty_split_is_one_clear_error(tmp_path, wiki_vocab):
    data_dir = str(tmp_path / "tfds")
    build_mock_c4(data_dir, num_docs=3, num_shards=3, num_validation_docs=3)
    corpus = tfds_corpus.TfdsCorpus("c4/en:3.1.0", {"train": "train"}, data_dir)
    assert sum(len(list(corpus.records(p, "train"))) for p in corpus.split_files("train")) == 3
    # The dataset's metadata says its train shards are empty (as a failed preparation can).
    info_path = Path(data_dir) / "c4" / "en" / "3.1.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    for split in info["splits"]:
        if split["name"] == "train":
            split["shardLengths"] = ["0"] * len(split["shardLengths"])
            split.pop("numBytes", None)
    info_path.write_text(json.dumps(info))
    task = data.register_tfds_task(name="test_c4_empty", tfds_name="c4/en:3.1.0",
                                   data_dir=data_dir)
    with pytest.raises(data.DataError, match="split 'train' .* has no examples"):
        data.make_batch_iterator(task, "train", 32, 4, wiki_vocab, seed=0)


def test_the_cli_names_a_missing_tfds_dataset_in_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / "empty")}
    done = subprocess.run(
        [sys.executable, "-m", "matlm.cli.main", "train", "--gin_file=configs/runs/default.gin",
         "--gin_file=configs/data/c4_en.gin", "--gin.DataConfig.vocab_path=None",
         f"--model_dir={tmp_path / 'run'}", "--no_progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "is not prepared in" in done.stderr, done.stderr
    assert f"{tmp_path / 'empty'} ($TFDS_DATA_DIR)" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_training_on_a_streamed_tfds_mixture_resumes_bitwise(c4_task, mock_c4,
                                                             continuous_and_resumed):
    """Through `train`: streamed C4 mixed with the embedded task; the stream-mixture state
    goes through checkpoints; the held-out loss reads the largest component (C4)."""
    if mock_c4[1] != "tfrecord":
        pytest.skip("one format is enough through the trainer")
    mixture = data.register_mixture("test_c4_wiki", [(c4_task, 3.0), ("matlm_wiki", 1.0)])
    data_config = data.DataConfig(task=mixture)
    assert data_config.eval_task == c4_task
    continuous, resumed = continuous_and_resumed(data_config, eval_every=3)
    assert continuous == resumed
    assert sorted(step for step, k in resumed if k == "train/loss") == [1, 2, 3, 4, 5, 6]
    assert any(k.startswith("eval/") for _, k in resumed)
