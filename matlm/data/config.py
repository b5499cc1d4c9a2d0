"""`DataConfig`: the data knobs a run binds in gin (`configs/data/*.gin`).

After `matlm.gin_config.parse_gin(...)`, call `data_config_from_gin()`.

    DataConfig.task = "matlm_wiki"              # or @local_files_task(), @mixture(), ...
    DataConfig.vocab_path = None                # None: the cached default vocabulary
    DataConfig.default_vocab_size = 8192
"""
from __future__ import annotations

import dataclasses

from matlm.data import tf_setup  # noqa: F401  (before seqio: hides accelerators from TF)
import gin
import seqio

from matlm.config_checks import check_fields, checked
from matlm.data import pipeline, vocabulary
from matlm.data.errors import DataError
from matlm.data.tasks import DEFAULT_TASK, held_out_task
from matlm.gin_config import config_from_gin


class DataConfigError(DataError):
    """A DataConfig field of the wrong type or range."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Each field declares its type and range (matlm.config_checks), checked at construction.
    task: str = checked(DEFAULT_TASK, str)  # A name; @local_files_task() etc. return one.
    train_split: str = checked("train", str)
    eval_split: str = checked("validation", str)
    seed: int = checked(0, int, ge=0)
    # Any SentencePiece .model; None: default_vocabulary().
    vocab_path: str | None = checked(None, str, optional=True)
    # Byte fallback alone takes 256 + 4 ids (matlm.data.vocabulary.train_vocabulary).
    default_vocab_size: int = checked(vocabulary.DEFAULT_VOCAB_SIZE, int,
                                      ge=vocabulary.MIN_VOCAB_SIZE)

    def __post_init__(self):
        check_fields(self, DataConfigError)

    @property
    def eval_task(self) -> str:
        """The task held-out loss reads: `task`, or a mixture's largest-rate component."""
        return held_out_task(self.task)

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
        """One pass over the eval split of `eval_task`, in source order (no shuffling)."""
        return pipeline.make_batch_iterator(
            self.eval_task, self.eval_split, seq_len, global_batch_size, vocab, self.seed,
            host_index=host_index, num_hosts=num_hosts, shuffle=False, repeat=False,
            pad_to_num_batches=pad_to_num_batches)


# Gin returns a wrapping subclass; code keeps using the plain dataclass.
_GinDataConfig = gin.external_configurable(DataConfig, module="matlm")


def data_config_from_gin() -> DataConfig:
    """The DataConfig the parsed gin bindings describe (evaluating `@local_files_task()`
    and the like registers those tasks now, so bad input fails before training)."""
    return config_from_gin(DataConfig, _GinDataConfig)
