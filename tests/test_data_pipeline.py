"""The batch pipeline: format, epoch counts, resume, host sharding, mixtures."""
import json

import numpy as np
import pytest

from matlm import data
from matlm.data import documents, mixture_schedule, pipeline


def _wiki_docs(vocab, split):
    """The split's documents tokenised independently of the pipeline (reference)."""
    texts = documents.select_split(documents.wiki_articles(), split,
                                   documents.WIKI_VALIDATION_FRACTION)
    return [vocab.tokenizer.encode(t) + [vocab.eos_id] for t in texts]


def test_batch_format(wiki_vocab):
    it = data.make_batch_iterator("matlm_wiki", "train", seq_len=64, global_batch_size=4,
                                  vocab=wiki_vocab, seed=0)
    batch = next(it)
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for name, value in batch.items():
        assert value.shape == (4, 64), name
        assert value.dtype == (np.float32 if name == "loss_mask" else np.int32), name
    assert batch["targets"].max() < wiki_vocab.vocab_size
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)


def test_one_epoch_of_validation_counts_every_token(wiki_vocab):
    docs = _wiki_docs(wiki_vocab, "validation")
    it = data.make_batch_iterator("matlm_wiki", "validation", seq_len=100, global_batch_size=8,
                                  vocab=wiki_vocab, seed=1, repeat=False)
    batches = list(it)
    assert len(batches) == it.num_batches
    targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    reference = np.concatenate(docs)
    assert len(targets) == len(reference)  # Counted independently, EOS included.
    np.testing.assert_array_equal(np.bincount(targets, minlength=wiki_vocab.vocab_size),
                                  np.bincount(reference, minlength=wiki_vocab.vocab_size))
    assert sum((b["targets"] == wiki_vocab.eos_id).sum() for b in batches) == len(docs)


def test_resume_equals_continuous_run(wiki_vocab):
    kwargs = dict(seq_len=32, global_batch_size=16, vocab=wiki_vocab, seed=5)
    continuous = data.make_batch_iterator("matlm_wiki", "validation", **kwargs)
    # Steps run across an epoch boundary (~2.5k rows per epoch here, 16 per step).
    for _ in range(150):
        next(continuous)
    saved = json.loads(json.dumps(continuous.state))
    expected = [next(continuous) for _ in range(15)]
    resumed = data.restore_batch_iterator(saved, wiki_vocab)
    direct = data.make_batch_iterator("matlm_wiki", "validation", start_step=150, **kwargs)
    for want in expected:
        got, got_direct = next(resumed), next(direct)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            np.testing.assert_array_equal(got_direct[k], want[k])
    other_seed = data.make_batch_iterator("matlm_wiki", "validation", **{**kwargs, "seed": 6})
    assert not np.array_equal(other_seed.batch(150)["targets"], expected[0]["targets"])


def test_state_mismatch_is_rejected(wiki_vocab):
    it = data.make_batch_iterator("matlm_wiki", "validation", seq_len=32, global_batch_size=4,
                                  vocab=wiki_vocab, seed=0)
    state = dict(it.state, seq_len=64)
    with pytest.raises(data.StateError, match="seq_len"):
        it.set_state(state)


@pytest.mark.parametrize("task, split", [("matlm_wiki", "validation"), ("test_mix_hosts", "train")])
def test_hosts_share_one_global_batch_whatever_their_number(wiki_vocab, tmp_path, task, split):
    if task == "test_mix_hosts":
        (tmp_path / "a.txt").write_text("zebra " * 300)
        local = data.register_local_files_task(pattern=str(tmp_path / "*.txt"),
                                               name="test_zebra_hosts", validation_fraction=0.0)
        data.register_mixture(task, {"matlm_wiki": 1.0, local: 1.0})
    B = 12
    one = data.make_batch_iterator(task, split, 32, B, wiki_vocab, seed=0)
    for hosts in (2, 4):
        its = [data.make_batch_iterator(task, split, 32, B, wiki_vocab, seed=0, host_index=h,
                                        num_hosts=hosts) for h in range(hosts)]
        for step in (0, 7, 300):  # 300: past the first epoch of the validation split.
            want = one.batch(step)
            got = [it.batch(step) for it in its]
            assert all(g["targets"].shape == (B // hosts, 32) for g in got)
            for name in want:  # Host h holds rows [h*b, (h+1)*b) of the one-host batch.
                np.testing.assert_array_equal(np.concatenate([g[name] for g in got]),
                                              want[name], err_msg=f"{hosts} hosts, {name}")
    # Over one epoch the hosts' rows are disjoint and hold every token of the split once.
    if task == "matlm_wiki":
        epoch = [data.make_batch_iterator(task, split, 32, B, wiki_vocab, seed=0, host_index=h,
                                          num_hosts=3, repeat=False) for h in range(3)]
        assert len({it.num_batches for it in epoch}) == 1  # Same count on every host.
        targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for it in epoch for b in it])
        reference = np.concatenate(_wiki_docs(wiki_vocab, split))
        np.testing.assert_array_equal(np.bincount(targets), np.bincount(reference))


def test_resume_on_another_number_of_hosts_continues_the_same_batches(wiki_vocab):
    two = [data.make_batch_iterator("matlm_wiki", "validation", 32, 8, wiki_vocab, seed=3,
                                    host_index=h, num_hosts=2) for h in range(2)]
    for it in two:
        for _ in range(5):
            next(it)
    saved = json.loads(json.dumps(two[0].state))
    resumed = [data.restore_batch_iterator(saved, wiki_vocab, host_index=h, num_hosts=4)
               for h in range(4)]
    continued = [next(it) for it in two]
    got = [next(it) for it in resumed]
    np.testing.assert_array_equal(np.concatenate([g["targets"] for g in got]),
                                  np.concatenate([c["targets"] for c in continued]))


def test_eval_iterator_pads_to_a_common_length(wiki_vocab):
    config = data.DataConfig()
    it = config.eval_iterator(64, 8, wiki_vocab)
    padded = config.eval_iterator(64, 8, wiki_vocab, pad_to_num_batches=it.num_batches + 2)
    batches = list(padded)
    assert len(batches) == it.num_batches + 2
    assert batches[-1]["loss_mask"].sum() == 0
    with pytest.raises(data.DataError, match="pad_to_num_batches"):
        config.eval_iterator(64, 8, wiki_vocab, pad_to_num_batches=1)


def test_mixture_schedule_has_exact_rates_and_no_repeats():
    schedule = mixture_schedule.MixtureSchedule([3.0, 1.0], seed_key=(0,), block=100)
    task, index = schedule.locate(np.arange(1000))
    assert (task == 0).sum() == 750 and (task == 1).sum() == 250
    # Each task's rows are consumed in order 0, 1, 2... without gaps or repeats.
    np.testing.assert_array_equal(np.sort(index[task == 0]), np.arange(750))
    np.testing.assert_array_equal(np.sort(index[task == 1]), np.arange(250))
    # Random access agrees with sequential.
    t2, i2 = schedule.locate(np.array([999, 3, 450]))
    np.testing.assert_array_equal(t2, task[[999, 3, 450]])
    np.testing.assert_array_equal(i2, index[[999, 3, 450]])


def test_mixture_batches_and_resume(wiki_vocab, tmp_path):
    (tmp_path / "a.txt").write_text("zebra " * 300)
    local = data.register_local_files_task(pattern=str(tmp_path / "*.txt"),
                                           name="test_zebra", validation_fraction=0.0)
    data.register_mixture("test_mix", {"matlm_wiki": 1.0, local: 1.0})
    it = data.make_batch_iterator("test_mix", "train", 16, 8, wiki_vocab, seed=0)
    zebra = list(set(wiki_vocab.tokenizer.encode("zebra " * 300))) + [wiki_vocab.eos_id]
    rows = np.concatenate([next(it)["targets"] for _ in range(64)])
    zebra_rows = np.mean([np.isin(r, zebra).all() for r in rows])
    assert 0.35 < zebra_rows < 0.65  # Rates 1:1.
    resumed = data.make_batch_iterator("test_mix", "train", 16, 8, wiki_vocab, seed=0,
                                       start_step=64)
    np.testing.assert_array_equal(resumed.batch(64)["targets"], next(it)["targets"])


def test_seed_stream_tags_keep_their_values():
    """The tags are part of every saved run's data order: a new use takes a new value,
    an existing one never changes (and no two uses share one)."""
    from matlm.data.seed_streams import SeedStream
    assert {s.name: int(s) for s in SeedStream} == {
        "DOC_ORDER": 1, "MIX_ORDER": 2, "FILE_ORDER": 3, "COMPONENT_STREAMS": 4,
        "IMAGE_ORDER": 5}
