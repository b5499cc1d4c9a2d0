"""Prepared TFDS datasets (C4 and the like) read shard by shard, for streamed training.

    tfds_task.tfds_name = "c4/en:3.1.0"      # streaming=True is the default

A `TfdsCorpus` is what `matlm.data.streaming` streams (a `matlm.data.corpora.Corpus`,
like its `StreamingCorpus` of local files): the *units* are the split's shard files as
listed in the dataset's `dataset_info.json`, a *record* is one serialized example of a
shard, read in shard order. So everything `streaming` guarantees holds for TFDS: a global
batch that is a pure function of (seed, step) for any number of hosts, every example read
by exactly one stream per epoch, start-up that reads O(streams) records, and a resume that
re-reads at most one shard's head per stream.

Why shards and not seqio's file sharding or `tfds.data_sources`: seqio shards files per
host (`ShardInfo`), which ties the batch order to the host count; and random access
(`tfds.data_sources`) needs ArrayRecord, while most prepared C4 copies are TFRecord. Both
formats are read here: TFRecord with `tf.data.TFRecordDataset` (local or gs://; resuming
skips the shard's first records without parsing them), ArrayRecord with its reader (random
access: resuming seeks). Shuffle quality: TFDS shuffles examples across the whole split by
key hash when it prepares a dataset, so a shard is already a random sample; the streams
add a per-epoch seeded shard order and B different shards per step.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Optional

from matlm.data import cleaners, corpora
from matlm.data.errors import DataError
from matlm.messages import first_line

_ARRAY_RECORD_CHUNK = 128  # Records fetched per ArrayRecord read call.
_TFRECORD_BATCH = 128  # Records handed from tf.data to Python at once.


class TfdsCorpus:
    """The shards of a prepared TFDS dataset and how to read their texts (a
    `corpora.Corpus`). Nothing is read when it is made (built-in tasks are registered at
    import, data or not): the dataset's metadata is loaded on first use, with a one-line
    DataError if it is not there."""

    def __init__(self, tfds_name: str, splits: Mapping[str, str], data_dir: Optional[str],
                 text_key: str = "text", cleaner: str = "none",
                 max_validation_documents: int = 2000):
        self.tfds_name, self.splits, self.data_dir = tfds_name, dict(splits), data_dir
        self.text_key, self.clean = text_key, cleaners.get_cleaner(cleaner)
        self.max_validation_documents = max_validation_documents
        self._info = None
        self._files: dict[str, list[str]] = {}
        self._lengths: dict[str, int] = {}  # Shard path -> its example count (the metadata's).

    def _where(self) -> str:
        if self.data_dir:
            return self.data_dir
        if os.environ.get("TFDS_DATA_DIR"):
            return f"{os.environ['TFDS_DATA_DIR']} ($TFDS_DATA_DIR)"
        return "TFDS's default data dir (~/tensorflow_datasets; $TFDS_DATA_DIR is not set)"

    def info(self):
        if self._info is None:
            import tensorflow_datasets as tfds
            try:
                builder = tfds.builder(self.tfds_name, data_dir=self.data_dir)
                info = builder.info
                prepared = info.splits and all(s in info.splits for s in self.splits.values())
            except Exception as e:  # Unknown name, unreadable dataset_info.json, ...
                raise DataError(f"TFDS dataset {self.tfds_name!r} cannot be read from "
                                f"{self._where()}: {first_line(e)}") from None
            if not prepared:
                raise DataError(
                    f"TFDS dataset {self.tfds_name!r} is not prepared in {self._where()} "
                    f"(no splits {sorted(set(self.splits.values()))} there): prepare it with "
                    "`tfds build` where downloads are allowed, then set tfds_task.data_dir "
                    "or TFDS_DATA_DIR to its directory; matlm downloads nothing")
            if self.text_key not in info.features:
                raise DataError(f"TFDS dataset {self.tfds_name!r} has no feature "
                                f"{self.text_key!r} (it has {sorted(info.features)}): set "
                                "tfds_task.text_key")
            self._info = info
        return self._info

    def split_files(self, split: str) -> list[str]:
        if split not in self._files:
            if split not in self.splits:
                raise DataError(f"TFDS task {self.tfds_name!r} has no split {split!r}; "
                                f"it has {sorted(self.splits)}")
            split_info = self.info().splits[self.splits[split]]
            if split_info.num_examples == 0:
                raise DataError(f"TFDS dataset {self.tfds_name!r} split "
                                f"{self.splits[split]!r} in {self._where()} has no examples "
                                "(all its shards are empty): re-prepare it")
            self._files[split] = [str(p) for p in split_info.filepaths]
            self._lengths.update(zip(self._files[split], split_info.shard_lengths))
        return self._files[split]

    def records(self, path: str, split: str, residue: int = 0, modulus: int = 1,
                start: int = 0) -> Iterator[tuple[int, str]]:
        """(record index, text) of one shard's examples with index ≡ residue (mod
        modulus) and index ≥ start whose (cleaned) text is not empty, in shard order.
        The text is as TFDS stores it (like the in-memory path: no stripping)."""
        import tensorflow as tf
        op_error = tf.errors.OpError  # Bound now: at interpreter exit `tf.errors` is gone.
        expected = self._lengths.get(path)
        if expected is None:
            self.split_files(split)
            expected = self._lengths.get(path)
        end = start  # One past the last record index read.
        try:
            for index, raw in self._raw_texts(path, start):
                end = index + 1
                if index % modulus != residue:
                    continue
                corpora.RECORDS_READ[0] += 1
                text = self._decode(raw, path, index)
                if text:
                    yield index, text
        except op_error as e:
            raise DataError(f"corrupt TFDS shard {path} (at or after record {end}): "
                            f"{first_line(e.message)}; re-prepare the dataset") from None
        # A truncated shard, or one from another preparation, reads "fine" but short.
        if expected is not None and max(end, start) != max(expected, start):
            raise DataError(f"TFDS shard {path} has {max(end, start)} records but "
                            f"dataset_info.json lists {expected}: it is truncated or from "
                            "another preparation; re-prepare the dataset")

    def _raw_texts(self, path: str, start: int) -> Iterator[tuple[int, bytes]]:
        """(record index, the text feature's bytes) from record `start` on."""
        if self.info().file_format.value == "array_record":
            for index, serialized in self._array_records(path, start):
                yield index, self._example_text(serialized, path, index)
            return
        import tensorflow as tf
        feature = {self.text_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
        # skip() drops records without handing them to Python: the resume cost of a shard.
        # Batches parsed inside tf.data, because handing elements to Python one by one
        # costs ~250 µs each, and parsing protos in Python another ~5 µs.
        batches = (tf.data.TFRecordDataset(path).skip(start).batch(_TFRECORD_BATCH)
                   .map(lambda serialized: tf.io.parse_example(serialized, feature)[
                       self.text_key])
                   .as_numpy_iterator())
        index = start
        for batch in batches:
            yield from enumerate(batch, index)
            index += len(batch)

    def _array_records(self, path: str, start: int) -> Iterator[tuple[int, bytes]]:
        from array_record.python.array_record_module import ArrayRecordReader

        def corrupt(e: Exception, where: str) -> DataError:
            # ArrayRecord raises plain RuntimeErrors on bad data.
            return DataError(f"corrupt TFDS shard {path} ({where}): "
                             f"{first_line(e)}; re-prepare the dataset")
        try:
            reader = ArrayRecordReader(path)
            ok, n = reader.ok(), reader.num_records()
        except Exception as e:
            raise corrupt(e, "its index") from None
        if not ok:  # A reader that cannot read its index says so only here.
            raise DataError(f"corrupt TFDS shard {path}: ArrayRecord cannot read its "
                            "index; re-prepare the dataset")
        try:
            for first in range(start, n, _ARRAY_RECORD_CHUNK):  # Random access: seek.
                chunk = list(range(first, min(first + _ARRAY_RECORD_CHUNK, n)))
                try:
                    got = reader.read(chunk)
                except Exception as e:
                    raise corrupt(e, f"records {first}..{chunk[-1]}") from None
                yield from zip(chunk, got)
        finally:
            # A reader that met corrupt data raises the same error again on close: the
            # DataError above already says it.
            with contextlib.suppress(RuntimeError):
                reader.close()

    def _example_text(self, serialized: bytes, path: str, index: int) -> bytes:
        from tensorflow.core.example import example_pb2
        try:
            feature = example_pb2.Example.FromString(serialized).features.feature[self.text_key]
        except Exception as e:  # A record that is not a tf.train.Example.
            raise DataError(f"corrupt TFDS record {index} in {path}: not a tf.train.Example "
                            f"({type(e).__name__}); re-prepare the dataset") from None
        return feature.bytes_list.value[0] if feature.bytes_list.value else b""

    def _decode(self, raw: bytes, path: str, index: int) -> str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"corrupt TFDS record {index} in {path}: its {self.text_key!r} "
                            f"text is not UTF-8 ({e.reason}); re-prepare the dataset") from None
        return self.clean(text) if self.clean else text

    def validation_texts(self) -> list[str]:
        return corpora.first_texts(self, "validation", self.max_validation_documents)
