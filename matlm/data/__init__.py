"""The data layer: seqio tasks → tokenised, packed, per-host batches (numpy).

This package is the only place TensorFlow is imported, and it hides every GPU/TPU from
TensorFlow first (`tf_setup`). Public API:

- `make_batch_iterator(task_or_mixture, split, seq_len, global_batch_size, vocab, seed,
  host_index=0, num_hosts=1, start_step=0, shuffle=True, repeat=True,
  pad_to_num_batches=None) -> BatchIterator` (see `matlm.data.pipeline` for the batch
  format and the determinism/resume contract); `BatchIterator.state` (JSON dict) and
  `restore_batch_iterator(state, vocab, host_index, num_hosts)`. Streamed tasks
  (`streaming_files_task`, `tfds_task`) and mixtures including them return iterators
  with the same contract (`matlm.data.streaming`, `matlm.data.stream_mixture`).
- `default_vocabulary(vocab_size=8192)`, `load_vocabulary(path)`, `train_vocabulary`,
  `start_id(vocab)` (see `matlm.data.vocabulary` for special ids);
  `train_task_vocabulary` (`matlm.data.task_vocabulary`).
- Tasks: `matlm_wiki` (default), `matlm_c4_en`, `matlm_lm1b`, `matlm_wiki40b_en`, and the
  gin configurables `local_files_task`, `streaming_files_task`, `tfds_task`, `mixture`
  (`matlm.data.tasks`); `held_out_task(name)`: the task a mixture's held-out loss reads.
  Streamed tasks keep their corpus in `matlm.data.corpora.CORPORA`; TFDS text cleaners
  are registered in `matlm.data.cleaners`; the seed-stream tags in
  `matlm.data.seed_streams.SeedStream`.
- `DataConfig` (gin): task, splits, seed, vocabulary of a run; `data_config_from_gin()`.
- Errors: `DataError` (a ValueError) and its subclasses in `matlm.data.errors`.
"""
import importlib.util

# The image side (offline sets, ImageDataConfig) is numpy only; the text side needs
# TensorFlow and seqio. A machine without them (the GPU image) still gets the image side.
from matlm.data.image_config import ImageDataConfig, image_data_config_from_gin
from matlm.data.errors import (BatchSizeError, DataError, EmptyGlobError, MissingFieldError,
                               SequenceLengthError, StateError, UnknownSplitError,
                               UnknownTaskError, VocabularyError)

# Found, not imported: tf_setup must import TensorFlow (accelerators hidden, quietly).
_MISSING = [m for m in ("tensorflow", "seqio") if importlib.util.find_spec(m) is None]
TEXT_UNAVAILABLE = (f"matlm's text pipeline needs {' and '.join(_MISSING)}, not installed "
                    "here: install them with `pip install -e .`" if _MISSING else "")
if not TEXT_UNAVAILABLE:
    from matlm.data import tf_setup  # noqa: F401  (first: hide accelerators from TensorFlow)
    from matlm.data import tfds_tasks  # noqa: F401  (registers the built-in TFDS tasks)
    from matlm.data.config import DataConfig, data_config_from_gin
    from matlm.data.pipeline import BatchIterator, make_batch_iterator, restore_batch_iterator
    from matlm.data.tasks import (DEFAULT_TASK, local_files_task, mixture, register_local_files_task,
                                  held_out_task, register_mixture, register_streaming_files_task,
                                  register_tfds_task, registered_names, streaming_files_task,
                                  tfds_task)
    from matlm.data.task_vocabulary import train_task_vocabulary
    from matlm.data.vocabulary import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, default_vocabulary,
                                       load_vocabulary, start_id, train_vocabulary)


def __getattr__(name):
    # Reached for a name not defined here. A name the text side would have defined needs
    # TensorFlow and seqio; anything else (a submodule not yet imported, which
    # `from matlm.data import packing` first looks up as an attribute) is an
    # AttributeError, so that the import system goes on to import it.
    if TEXT_UNAVAILABLE and name in __all__:
        raise ImportError(f"matlm.data.{name}: {TEXT_UNAVAILABLE}")
    raise AttributeError(f"module 'matlm.data' has no attribute {name!r}")


__all__ = [
    "BatchIterator", "make_batch_iterator", "restore_batch_iterator", "DataConfig", "data_config_from_gin",
    "default_vocabulary", "load_vocabulary", "train_vocabulary", "train_task_vocabulary",
    "start_id", "PAD_ID", "EOS_ID", "UNK_ID", "BOS_ID", "DEFAULT_TASK",
    "local_files_task", "streaming_files_task", "tfds_task", "mixture",
    "register_local_files_task", "register_streaming_files_task",
    "register_tfds_task", "register_mixture", "registered_names", "held_out_task",
    "DataError", "UnknownTaskError", "UnknownSplitError", "EmptyGlobError",
    "MissingFieldError", "SequenceLengthError", "BatchSizeError", "VocabularyError",
    "StateError", "ImageDataConfig", "image_data_config_from_gin",
]
