"""Per-host batches of packed token rows: each host's share of a global batch that is a
pure function of (seed, step), whatever the number of hosts.

    it = make_batch_iterator("matlm_wiki", "train", seq_len=256, global_batch_size=32,
                             vocab=default_vocabulary(), seed=0,
                             host_index=jax.process_index(), num_hosts=jax.process_count())
    batch = next(it)          # dict of numpy arrays [32 // num_hosts, 256]
    saved = it.state          # small JSON-serialisable dict, identical on every host
    it = restore_batch_iterator(saved, vocab, host_index=jax.process_index(),
                                num_hosts=jax.process_count())   # any host count

Batch features (all [global_batch_size // num_hosts, seq_len]):
    inputs, targets  int32   targets are the packed tokens; inputs the previous token of
                             the same document, or the start id (see vocabulary.start_id)
    segment_ids      int32   0 = padding, documents 1, 2, 3... within a row
    positions        int32   restart at 0 for every segment
    loss_mask        float32 1 on real target tokens, 0 on padding

How the order is defined (why resuming is immediate, and on any number of hosts). The
split is tokenised once into a `TokenStore` and packed as described in
`matlm.data.packing`; a task's row stream is a `matlm.data.task_rows.TaskRows`. The
global k-th row is row `k mod R` of epoch `k div R` (R rows per epoch, fresh seeded
document and row orders each epoch); the global batch of step s is rows [s*B, (s+1)*B),
and host h of H materialises its share, rows [s*B + h*b, s*B + (h+1)*b) with b = B / H —
the rows `jax.make_array_from_process_local_data` places on its devices. So a job resumed
on a slice with another number of hosts continues on exactly the same data. A mixture
interleaves its tasks' row streams with a seeded schedule of fixed blocks over the global
rows (`matlm.data.mixture_schedule`), so the rates hold exactly per block and a row's
(task, index) is computed directly. Resuming at step N costs one epoch layout (two
permutations), not N batches. (A mixture that includes a streamed task uses the same
schedule: `matlm.data.stream_mixture`.)

This is the in-memory path, for corpora that fit a host (the embedded default, local
files of modest size): every host tokenises the whole split at start-up, so start-up
time and memory grow with the corpus (scripts/benchmark_data.py measures it).

`repeat=False` gives a finite iterator over one epoch (for evaluation): `num_batches`
batches, the last one padded with empty rows; pass `pad_to_num_batches` (e.g. the max over
hosts) so that every host yields the same number of batches.
"""
from __future__ import annotations

import dataclasses
import logging

from typing import Any

from matlm.data import tf_setup  # noqa: F401  (before seqio: hides accelerators from TF)
import numpy as np
import seqio

from matlm.data import (corpora, iterator_state, packing, stream_mixture, streaming, tasks,
                        vocabulary)
from matlm.data.errors import DataError, SequenceLengthError
from matlm.data.mixture_schedule import MixtureSchedule
from matlm.data.task_rows import TaskRows, token_store
from matlm.data import tfds_tasks  # noqa: F401  (registers the built-in TFDS tasks)

STATE_VERSION = 1
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    task: str
    split: str
    seq_len: int
    global_batch_size: int
    seed: int
    num_hosts: int = 1
    shuffle: bool = True
    repeat: bool = True

    def validate(self, host_index: int) -> None:
        if not isinstance(self.seq_len, (int, np.integer)) or self.seq_len < 2:
            raise SequenceLengthError(
                f"seq_len must be an integer >= 2 (one input and one target), got {self.seq_len!r}")
        iterator_state.check_host_layout(host_index, self.num_hosts, self.global_batch_size,
                                         self.seed)


class BatchIterator(iterator_state.StepIterator):
    """Iterator of per-host batches; `state` saves it, `restore_batch_iterator` rebuilds it.

    `batch(step)` is random access (pure: it does not move the iterator).
    """

    STATE_VERSION = STATE_VERSION

    def __init__(self, config: PipelineConfig, vocab: seqio.SentencePieceVocabulary,
                 host_index: int = 0, start_step: int = 0, pad_to_num_batches: int | None = None):
        config.validate(host_index)
        self.config, self.vocab, self.host_index = config, vocab, host_index
        self.per_host_batch_size = config.global_batch_size // config.num_hosts
        self._start_id = vocabulary.start_id(vocab)
        components = tasks.components(config.task)
        for task, _ in components:
            tasks.check_split(task, config.split)
        if len(components) > 1 and not config.repeat:
            raise DataError(f"{config.task!r} is a mixture: evaluate its tasks one by one "
                            "(repeat=False needs a single task)")
        self._streams = []
        # Seed keys name no host: every host lays out the same global row streams. (The
        # trailing 0, 1 keep the orders of runs made when they named host 0 of 1.)
        for i, (task, _) in enumerate(components):
            store = token_store(task, config.split, vocab)
            self._streams.append(TaskRows(store, config.seq_len, (config.seed, i, 0, 1),
                                          config.shuffle))
        self._schedule = (MixtureSchedule([r for _, r in components], (config.seed, 0, 1))
                          if len(components) > 1 else None)
        # One epoch in global batches: the same count on every host.
        self.num_batches = iterator_state.one_epoch_batches(
            self._streams[0].rows_per_epoch, config.global_batch_size, config.repeat,
            pad_to_num_batches)
        self.step = start_step

    @property
    def num_tokens(self) -> int:
        """Tokens (EOS included) in one epoch of each task, summed."""
        return sum(s.store.num_tokens for s in self._streams)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        b, L = self.per_host_batch_size, self.config.seq_len
        # This host's share of the global batch: global rows [s*B + h*b, s*B + (h+1)*b).
        k = (step * self.config.global_batch_size + self.host_index * b
             + np.arange(b, dtype=np.int64))
        if self._schedule is None:
            stream = self._streams[0]
            if self.config.repeat:
                rows = stream.rows(k)
            else:  # One epoch; rows past its end are empty padding rows.
                rows = packing.empty_rows(b, L)
                valid = k < stream.rows_per_epoch
                if valid.any():
                    got = stream.rows(k[valid])
                    for name in rows:
                        rows[name][valid] = got[name]
        else:
            task_of_row, index = self._schedule.locate(k)
            rows = packing.empty_rows(b, L)
            for t, stream in enumerate(self._streams):
                where = task_of_row == t
                if where.any():
                    got = stream.rows(index[where])
                    for name in rows:
                        rows[name][where] = got[name]
        return packing.model_features(rows, self._start_id)



def make_batch_iterator(task_or_mixture: str, split: str, seq_len: int,
                        global_batch_size: int, vocab: seqio.SentencePieceVocabulary,
                        seed: int, host_index: int = 0, num_hosts: int = 1,
                        start_step: int = 0, shuffle: bool = True, repeat: bool = True,
                        pad_to_num_batches: int | None = None) -> BatchIterator:
    """Batches of `task_or_mixture`'s `split` for this host (see the module docstring)."""
    config = PipelineConfig(task=task_or_mixture, split=split, seq_len=seq_len,
                            global_batch_size=global_batch_size, seed=seed,
                            num_hosts=num_hosts, shuffle=shuffle, repeat=repeat)
    _LOG.info("data pipeline %s host %d/%d from step %d", config, host_index, num_hosts,
                 start_step)
    if repeat and task_or_mixture in corpora.CORPORA:  # Training on a streamed task.
        if not shuffle or pad_to_num_batches is not None or start_step:
            raise DataError(f"{task_or_mixture!r} is streamed: it trains from step 0 or from "
                            "a saved state (restore_batch_iterator), shuffled")
        config.validate(host_index)
        return streaming.StreamingBatches(
            corpora.CORPORA[task_or_mixture], task_or_mixture, split, seq_len,
            global_batch_size, vocab, seed, host_index, num_hosts)
    components = tasks.components(task_or_mixture)
    if len(components) > 1 and any(t.name in corpora.CORPORA for t, _ in components):
        # A mixture with a streamed task (matlm.data.stream_mixture).
        if not repeat:
            raise DataError(f"{task_or_mixture!r} is a mixture: evaluate its tasks one by one "
                            "(repeat=False needs a single task)")
        if not shuffle or pad_to_num_batches is not None or start_step:
            raise DataError(f"mixture {task_or_mixture!r} includes a streamed task: it trains "
                            "from step 0 or from a saved state (restore_batch_iterator), "
                            "shuffled")
        config.validate(host_index)
        return stream_mixture.make(task_or_mixture, split, seq_len, global_batch_size, vocab,
                                   seed, host_index, num_hosts)
    return BatchIterator(config, vocab, host_index=host_index, start_step=start_step,
                         pad_to_num_batches=pad_to_num_batches)


def restore_batch_iterator(state: dict[str, Any], vocab: seqio.SentencePieceVocabulary,
                           host_index: int = 0, num_hosts: int = 1) -> BatchIterator:
    """Rebuilds the iterator a saved `state` came from, positioned at its step, for this
    job's hosts (which may be more or fewer than the saving job's: same global batches)."""
    if state.get("version") == streaming.STATE_VERSION:
        return streaming.restore(state, vocab, host_index, num_hosts)
    if state.get("version") == stream_mixture.STATE_VERSION:
        return stream_mixture.restore(state, vocab, host_index, num_hosts)
    config = iterator_state.config_from_state(state, PipelineConfig, STATE_VERSION,
                                              BatchIterator.PIPELINE, num_hosts)
    return BatchIterator(config, vocab, host_index=host_index, start_step=int(state["step"]))
