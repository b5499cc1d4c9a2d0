"""`DataConfig`: the data knobs a run binds in gin (`configs/data/*.gin`).

After `matlm.gin_config.parse_gin(...)`, call `data_config_from_gin()`.

    DataConfig.task = "matlm_wiki"              # or @local_files_task(), @mixture(), ...
    DataConfig.vocab_path = None                # None: the cached default vocabulary
    DataConfig.default_vocab_size = 8192
"""
from __future__ import annotations

import dataclasses

import gin
import seqio

from matlm.data import pipeline, vocabulary
from matlm.data.tasks import DEFAULT_TASK


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: str = DEFAULT_TASK
    train_split: str = "train"
    eval_split: str = "validation"
    seed: int = 0
    vocab_path: str | None = None  # Any SentencePiece .model; None: default_vocabulary().
    default_vocab_size: int = vocabulary.DEFAULT_VOCAB_SIZE

    def vocabulary(self) -> seqio.SentencePieceVocabulary:
        if self.vocab_path:
            return vocabulary.load_vocabulary(self.vocab_path)
        return vocabulary.default_vocabulary(vocab_size=self.default_vocab_size)

    def train_iterator(self, seq_len: int, global_batch_size: int, vocab,
                       host_index: int = 0, num_hosts: int = 1,
                       start_step: int = 0) -> pipeline.BatchIterator:
        return pipeline.make_batch_iterator(
            self.task, self.train_split, seq_len, global_batch_size, vocab, self.seed,
            host_index=host_index, num_hosts=num_hosts, start_step=start_step)

    def eval_iterator(self, seq_len: int, global_batch_size: int, vocab,
                      host_index: int = 0, num_hosts: int = 1,
                      pad_to_num_batches: int | None = None) -> pipeline.BatchIterator:
        """One pass over the eval split, in source order (no shuffling)."""
        return pipeline.make_batch_iterator(
            self.task, self.eval_split, seq_len, global_batch_size, vocab, self.seed,
            host_index=host_index, num_hosts=num_hosts, shuffle=False, repeat=False,
            pad_to_num_batches=pad_to_num_batches)


# Gin returns a wrapping subclass; code keeps using the plain dataclass.
_GinDataConfig = gin.external_configurable(DataConfig, module="matlm")


def data_config_from_gin() -> DataConfig:
    """The DataConfig the parsed gin bindings describe (evaluating `@local_files_task()`
    and the like registers those tasks now, so bad input fails before training)."""
    bound = _GinDataConfig()
    return DataConfig(**{f.name: getattr(bound, f.name) for f in dataclasses.fields(DataConfig)})
