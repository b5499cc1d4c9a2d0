"""seqio Tasks and Mixtures of raw text, registered by name.

Every matlm task yields examples `{"text": tf.string}` (one document each); the
vocabulary is chosen at run time by the pipeline (`matlm.data.pipeline`), so tasks are
registered once and work with any SentencePiece model.

Importing this module registers the embedded default task:
- `matlm_wiki`: the 106 English Wikipedia articles in the gensim wheel, markup stripped
  (`matlm.data.wikitext`), split by a stable hash of the title (10% validation).

Gin-configurable registration functions (each returns the registered name, so a gin
file can write `DataConfig.task = @local_files_task()`; re-registering a name replaces it):
- `local_files_task(name, pattern, ...)`: your own `.txt` / `.jsonl` files, read whole
  at registration (modest corpora).
- `streaming_files_task(name, pattern, ...)`: the same files streamed: nothing is read at
  registration, training reads as it goes (`matlm.data.streaming`; corpora of any size).
- `tfds_task(name, tfds_name, ...)`: any TFDS text dataset (see `matlm.data.tfds_tasks`
  for the built-in `matlm_c4_en`, `matlm_lm1b`, `matlm_wiki40b_en`).
- `mixture(name, tasks_and_rates)`: a seqio Mixture sampled with the given rates.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

from matlm.data import tf_setup  # noqa: F401  (before seqio: hides accelerators from TF)
import gin
import seqio

from matlm.data import cleaners, corpora, documents, streaming, tfds_corpus
from matlm.data.documents import WIKI_VALIDATION_FRACTION
from matlm.data.errors import DataError, UnknownSplitError, UnknownTaskError
from matlm.data.tf_setup import tf

TEXT_KEY = "text"
# Tasks output raw text; rank-0 strings, not token ids (tokenising happens in the pipeline).
TEXT_FEATURES = {
    TEXT_KEY: seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False,
                            required=False, dtype=tf.string, rank=0),
}
DEFAULT_TASK = "matlm_wiki"


def _register_task(name: str, source: seqio.DataSource,
                   preprocessors: Sequence[Callable] = ()) -> str:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)  # No-op when absent; makes registration idempotent.
    corpora.CORPORA.pop(name, None)  # Re-registered in memory: no longer streamed.
    seqio.TaskRegistry.add(name, source=source, preprocessors=list(preprocessors),
                           output_features=TEXT_FEATURES)
    return name


def _in_memory_source(keyed_texts_by_split: Mapping[str, Sequence[str]]) -> seqio.DataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        del shuffle_files, seed  # Order is decided by the pipeline, deterministically.
        texts = list(keyed_texts_by_split[split])
        return tf.data.Dataset.from_tensor_slices(
            {TEXT_KEY: tf.constant(texts, dtype=tf.string, shape=[len(texts)])})

    return seqio.FunctionDataSource(
        dataset_fn, splits=list(keyed_texts_by_split),
        num_input_examples={s: len(t) for s, t in keyed_texts_by_split.items()})


def register_wiki_task(name: str = DEFAULT_TASK,
                       validation_fraction: float = WIKI_VALIDATION_FRACTION) -> str:
    """Registers the embedded Wikipedia task. The articles are parsed on first read."""
    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        del shuffle_files, seed
        texts = documents.select_split(documents.wiki_articles(), split, validation_fraction)
        return tf.data.Dataset.from_tensor_slices(
            {TEXT_KEY: tf.constant(texts, dtype=tf.string, shape=[len(texts)])})

    source = seqio.FunctionDataSource(dataset_fn, splits=list(documents.SPLITS))
    return _register_task(name, source)


def register_local_files_task(pattern: str,
                              name: str = "matlm_local_files",
                              jsonl_field: str = "text",
                              txt_split: str = "file",
                              validation_pattern: str | None = None,
                              validation_fraction: float = 0.05) -> str:
    """Registers a task over local `.txt`/`.jsonl` files; returns its name.

    Files are read (and validated) now, so an empty glob or a jsonl record without
    `jsonl_field` fails before training starts. Without `validation_pattern`, a stable
    hash of each document's key puts `validation_fraction` of documents in validation.
    """
    train = documents.read_local_documents(pattern, jsonl_field, txt_split)
    if validation_pattern:
        by_split = {
            "train": [text for _, text in train],
            "validation": [text for _, text in documents.read_local_documents(
                validation_pattern, jsonl_field, txt_split)],
        }
    else:
        by_split = {split: documents.select_split(train, split, validation_fraction)
                    for split in documents.SPLITS}
    return _register_task(name, _in_memory_source(by_split))


def register_streaming_files_task(pattern: str,
                                  name: str = "matlm_streaming_files",
                                  jsonl_field: str = "text",
                                  txt_split: str = "file",
                                  validation_pattern: str | None = None,
                                  validation_fraction: float = 0.05,
                                  max_validation_documents: int = 2000) -> str:
    """Registers a task whose train split is streamed from `pattern`'s files (listed now,
    read during training: `matlm.data.streaming`); returns its name. Validation is the
    first `max_validation_documents` documents of the validation split, in file order."""
    _check_max_validation_documents("streaming_files_task", max_validation_documents)
    corpus = streaming.StreamingCorpus(pattern, jsonl_field, txt_split, validation_pattern,
                                       validation_fraction, max_validation_documents)
    return _register_streamed_task(name, corpus)


def _check_max_validation_documents(configurable: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{configurable}.max_validation_documents must be an integer >= 1, "
                        f"got {value!r}")


def _register_streamed_task(name: str, corpus) -> str:
    """A seqio task over a streamed corpus (`matlm.data.streaming` trains on the corpus
    itself): its validation split is the corpus's first validation documents, its train
    split every train text in order (for `matlm vocab`, which stops at --max_documents)."""
    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        del shuffle_files, seed
        if split == "validation":
            texts = corpus.validation_texts()
            return tf.data.Dataset.from_tensor_slices(
                {TEXT_KEY: tf.constant(texts, dtype=tf.string, shape=[len(texts)])})

        def every_train_text():
            for path in corpus.split_files("train"):
                for _, text in corpus.records(path, "train"):
                    yield {TEXT_KEY: text}
        return tf.data.Dataset.from_generator(
            every_train_text, output_signature={TEXT_KEY: tf.TensorSpec([], tf.string)})

    _register_task(name, seqio.FunctionDataSource(dataset_fn, splits=list(documents.SPLITS)))
    corpora.CORPORA[name] = corpus
    return name


def clean_texts(clean: cleaners.Cleaner, dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A seqio preprocessor applying a registered (Python) cleaner to every text: the
    function a streamed task applies record by record (`matlm.data.cleaners`)."""
    def clean_bytes(text: bytes) -> bytes:
        return clean(text.decode("utf-8")).encode("utf-8")

    def clean_example(example):
        text = tf.numpy_function(clean_bytes, [example[TEXT_KEY]], tf.string, stateful=False)
        text.set_shape([])
        return {TEXT_KEY: text}
    return dataset.map(clean_example, num_parallel_calls=tf.data.AUTOTUNE)


def register_tfds_task(name: str,
                       tfds_name: str,
                       splits: Mapping[str, str] | None = None,
                       data_dir: str | None = None,
                       text_key: str = "text",
                       cleaner: str = "none",
                       streaming: bool = True,
                       max_validation_documents: int = 2000) -> str:
    """Registers a task reading prepared TFDS data; returns its name.

    `tfds_name` is `dataset[/config]:version`. `splits` maps matlm split names to TFDS
    splits (default train/validation). `data_dir=None` uses `TFDS_DATA_DIR` (TFDS's own
    default). Nothing is downloaded: the data must have been prepared already.

    `streaming=True` (default): training streams the shards (`matlm.data.tfds_corpus`),
    validation is the split's first `max_validation_documents` examples. `streaming=False`
    tokenises whole splits in memory at start-up (small datasets only).
    """
    clean = cleaners.get_cleaner(cleaner)  # Checked first: a typo fails either way.
    splits = dict(splits or {"train": "train", "validation": "validation"})
    if streaming:
        if unknown := set(splits) - set(documents.SPLITS):
            raise DataError(f"tfds_task.splits maps unknown matlm splits {sorted(unknown)}; "
                            f"a streamed task's keys must be among {list(documents.SPLITS)}")
        _check_max_validation_documents("tfds_task", max_validation_documents)
        return _register_streamed_task(name, tfds_corpus.TfdsCorpus(
            tfds_name, splits, data_dir, text_key, cleaner, max_validation_documents))
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir, splits=splits)
    preprocessors = [functools.partial(seqio.preprocessors.rekey, key_map={TEXT_KEY: text_key})]
    if clean is not None:
        preprocessors.append(functools.partial(clean_texts, clean))
    return _register_task(name, source, preprocessors)


def register_mixture(name: str,
                     tasks_and_rates: Mapping[str, float] | Sequence[tuple[str, float]]
                     ) -> str:
    """Registers a seqio Mixture of matlm tasks with sampling rates; returns its name."""
    pairs = list(tasks_and_rates.items() if isinstance(tasks_and_rates, Mapping)
                 else tasks_and_rates)
    if not pairs:
        raise DataError(f"mixture {name!r} has no tasks")
    for task_name, rate in pairs:
        get_task(task_name)  # Raises UnknownTaskError naming it.
        if not rate > 0:
            raise DataError(f"mixture {name!r}: rate of {task_name!r} must be > 0, got {rate}")
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in pairs])
    return name


# Gin names (`@local_files_task()` etc.). The plain functions above stay unwrapped, so
# built-in registrations at import never pick up bindings meant for a user's task.
local_files_task = gin.external_configurable(
    register_local_files_task, name="local_files_task", module="matlm")
streaming_files_task = gin.external_configurable(
    register_streaming_files_task, name="streaming_files_task", module="matlm")
tfds_task = gin.external_configurable(register_tfds_task, name="tfds_task", module="matlm")
mixture = gin.external_configurable(register_mixture, name="mixture", module="matlm")


def registered_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_task(name: str) -> seqio.Task:
    """A registered matlm text task, or UnknownTaskError listing the known ones."""
    try:
        task = seqio.TaskRegistry.get(name)
    except ValueError:
        raise UnknownTaskError(_unknown_message(name)) from None
    if TEXT_KEY not in task.output_features:
        raise UnknownTaskError(f"{name!r} is a seqio task but not a matlm text task "
                               f"(no {TEXT_KEY!r} output feature)")
    return task


def components(name: str) -> list[tuple[seqio.Task, float]]:
    """[(task, rate)] of a mixture, or [(task, 1.0)] of a task."""
    if name in seqio.MixtureRegistry.names():
        mix = seqio.MixtureRegistry.get(name)
        return [(get_task(t.name), float(mix.get_rate(t))) for t in mix.tasks]
    return [(get_task(name), 1.0)]


def held_out_task(name: str) -> str:
    """The task whose eval split measures held-out loss for `name`: the task itself, or a
    mixture's component with the largest rate (the first of equals). A mixture has no
    single finite eval stream, and its largest part is what its loss mostly reflects."""
    parts = components(name)
    return max(parts, key=lambda part: part[1])[0].name


def check_split(task: seqio.Task, split: str) -> None:
    if split not in task.splits:
        raise UnknownSplitError(
            f"task {task.name!r} has no split {split!r}; it has {sorted(task.splits)}")


def _unknown_message(name: str) -> str:
    ours = [n for n in registered_names() if n.startswith("matlm")]
    return (f"unknown task or mixture {name!r}. Registered matlm tasks: {ours}. "
            "Tasks of your own are registered from gin, e.g. "
            "--gin_file=configs/data/local_files.gin")


register_wiki_task()
