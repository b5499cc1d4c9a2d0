"""The rows of one in-memory task: its split tokenised once into a `TokenStore` (cached in
the process), laid out epoch by epoch as `matlm.data.packing` describes.

`TaskRows` is the endless row stream of one task: its k-th row is row `k mod R` of epoch
`k div R` (R rows per epoch), each epoch with fresh seeded document and row orders. Both
the in-memory pipeline (`matlm.data.pipeline`) and a mixture with streamed components
(`matlm.data.stream_mixture`) serve in-memory tasks with it, with the same seed keys, so a
task's rows are the same whichever of them asks.
"""
from __future__ import annotations

import collections

from matlm.data import tf_setup  # noqa: F401  (before seqio: hides accelerators from TF)
import numpy as np
import seqio

from matlm.data import packing, tasks, vocabulary
from matlm.data.errors import DataError
from matlm.data.seed_streams import SeedStream

_TOKENIZE_CHUNK = 2048  # Documents per SentencePiece batch call.


def tokenize_task_split(task: seqio.Task, split: str,
                        vocab: seqio.SentencePieceVocabulary) -> packing.TokenStore:
    """The documents of a task split, tokenised and EOS-terminated, in source order."""
    tasks.check_split(task, split)
    # No in-memory cache: each split is read once into a TokenStore anyway.
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                               use_cached=False, try_in_mem_cache=False)
    eos = np.array([vocab.eos_id], np.int32)
    docs: list[np.ndarray] = []
    texts: list[str] = []

    def flush():
        for ids in vocab.tokenizer.encode(texts):
            docs.append(np.concatenate([np.asarray(ids, np.int32), eos]))
        texts.clear()

    for example in dataset.as_numpy_iterator():
        text = example[tasks.TEXT_KEY].decode("utf-8")
        if text:
            texts.append(text)
        if len(texts) >= _TOKENIZE_CHUNK:
            flush()
    flush()
    if not docs:
        raise DataError(f"task {task.name!r} split {split!r} has no documents")
    return packing.TokenStore.from_documents(docs)


# In-process cache of token stores: rebuilding an iterator (resume, eval) re-reads nothing.
_STORES: "collections.OrderedDict[tuple, packing.TokenStore]" = collections.OrderedDict()
_MAX_STORES = 8


def token_store(task: seqio.Task, split: str, vocab) -> packing.TokenStore:
    key = (task, split, vocabulary.fingerprint(vocab))
    if key not in _STORES:
        _STORES[key] = tokenize_task_split(task, split, vocab)
        while len(_STORES) > _MAX_STORES:
            _STORES.popitem(last=False)
    _STORES.move_to_end(key)
    return _STORES[key]


class TaskRows:
    """The endless (or one-epoch) row stream of one task on one host."""

    def __init__(self, store: packing.TokenStore, seq_len: int, seed_key: tuple[int, ...],
                 shuffle: bool):
        self.store, self.seq_len, self.seed_key, self.shuffle = store, seq_len, seed_key, shuffle
        self.rows_per_epoch = store.num_rows(seq_len)
        self._layouts: "collections.OrderedDict[int, packing.EpochLayout]" = (
            collections.OrderedDict())

    def layout(self, epoch: int) -> packing.EpochLayout:
        if epoch not in self._layouts:
            rng = (np.random.default_rng([*self.seed_key, SeedStream.DOC_ORDER, epoch])
                   if self.shuffle else None)
            self._layouts[epoch] = packing.EpochLayout(self.store, self.seq_len, rng)
            while len(self._layouts) > 2:
                self._layouts.popitem(last=False)
        return self._layouts[epoch]

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out = packing.empty_rows(len(indices), self.seq_len)
        epochs = indices // self.rows_per_epoch
        for epoch in np.unique(epochs):
            where = epochs == epoch
            got = self.layout(int(epoch)).rows(indices[where] % self.rows_per_epoch)
            for name, value in got.items():
                out[name][where] = value
        return out
