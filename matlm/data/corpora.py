"""The registry of streamed corpora, and what a streamed corpus is.

A task registered as streamed (`streaming_files_task`, `tfds_task`) keeps its corpus here,
by task name; the pipeline streams a task exactly when its name is in `CORPORA`
(`matlm.data.streaming`, `matlm.data.stream_mixture`). `matlm.data.tasks` is the only
writer: registering a name again, streamed or not, replaces its entry.

Two kinds of corpus implement `Corpus`: local files (`streaming.StreamingCorpus`) and
prepared TFDS shards (`tfds_corpus.TfdsCorpus`). The module sits below both and below the
registry's readers, so none of them imports another to reach it.
"""
from __future__ import annotations

from typing import Iterator, Protocol


class Corpus(Protocol):
    """The units (files, shards) of a split and their records, read in order."""

    def split_files(self, split: str) -> list[str]:
        """The split's units, in their stored order (streams permute them per epoch)."""

    def records(self, path: str, split: str, residue: int = 0, modulus: int = 1,
                start: int = 0) -> Iterator[tuple[int, str]]:
        """(record index, text) of one unit's non-empty texts with index ≡ residue (mod
        modulus) and index ≥ start, in unit order; counts each record read in
        RECORDS_READ."""

    def validation_texts(self) -> list[str]:
        """The corpus's finite validation set (its first validation documents)."""


# Task name -> corpus of every task registered as streamed.
CORPORA: dict[str, Corpus] = {}

# Records read so far in this process by any corpus (tests check that start-up and resume
# read O(streams) records, not the corpus).
RECORDS_READ = [0]


def first_texts(corpus: Corpus, split: str, limit: int) -> list[str]:
    """The first `limit` texts of a corpus's split in unit order (a streamed task's
    validation set: finite, in memory)."""
    texts: list[str] = []
    for path in corpus.split_files(split):
        for _, text in corpus.records(path, split):
            texts.append(text)
            if len(texts) >= limit:
                return texts
    return texts
