"""Streaming rows from local-file corpora of any size: start-up and memory independent of
the corpus, a global batch that is a pure function of (seed, step) for any number of
hosts, and an exact resume that reads at most one file's head again.

    DataConfig.task = @streaming_files_task()
    streaming_files_task.pattern = "/data/corpus/*.jsonl"

**Streams.** The global batch has B rows; row p of every step comes from *stream p* (B
streams, one per batch position, whatever the number of hosts). Host h of H runs only
streams [h·B/H, (h+1)·B/H): it reads, tokenises and packs their documents as it goes, a
few dozen documents ahead. Stream p's k-th row is its next L tokens: documents back to
back, EOS-terminated, a new segment at each document (positions from 0), a document cut
by the row's end continuing in the stream's next row as a new segment.

**Which documents a stream reads.** The files (sorted) are reshuffled every epoch with a
seeded permutation. With F ≥ B files, stream p reads the files at permuted positions
p, p+B, p+2B, …; with F < B, stream p reads file (p mod F) of the permutation, keeping
its records r with r ≡ p div F (mod the number of streams sharing that file). Every
record of the split is read by exactly one stream per epoch; a record is a jsonl line, a
.txt file or a blank-line block, as in `local_files_task`; the train/validation split is
the same stable hash of the record's key. Shuffle quality: rows of one step come from B
different files (or record residues); the file order changes every epoch; documents
within a file are read in file order (pre-shuffle large files whose order matters).

**Resume.** A stream's position is (epoch, file of its epoch, record index, tokens of that
record already emitted): four integers. The iterator's `state` holds all B positions
(gathered from every host when there are several), so a job resumed on any number of
hosts continues on exactly the same rows; restoring a stream re-reads its current file
up to the record (no tokenising) — never the batches before.

**Mixtures** with streamed tasks: `matlm.data.stream_mixture` (B streams per streamed
component, one advanced each time the mixture's schedule gives it a row).

**Validation** (finite, for evals) is the first `max_validation_documents` documents of
the validation split in file order (or of `validation_pattern`'s files), held in memory.
"""
from __future__ import annotations

import collections
import os
from typing import Iterator, Optional

import numpy as np

from matlm.data import corpora, documents, packing, vocabulary
from matlm.data.errors import DataError, StateError
from matlm.data.seed_streams import SeedStream

STATE_VERSION = "stream-1"
_LOOKAHEAD = 128  # Documents tokenised together per stream (one SentencePiece call).
_ENCODE_THREADS = min(4, os.cpu_count() or 1)


class StreamingCorpus:
    """The files of a streamed task and how to read their records (nothing is read here):
    a `corpora.Corpus` of local files."""

    def __init__(self, pattern: str, jsonl_field: str = "text", txt_split: str = "file",
                 validation_pattern: Optional[str] = None, validation_fraction: float = 0.05,
                 max_validation_documents: int = 2000):
        documents.check_txt_split(txt_split)
        self.files = documents.list_local_files(pattern, "streaming files")
        self.validation_files = (documents.list_local_files(validation_pattern, "streaming files")
                                 if validation_pattern else None)
        self.jsonl_field, self.txt_split = jsonl_field, txt_split
        self.validation_fraction = validation_fraction
        self.max_validation_documents = max_validation_documents

    def split_files(self, split: str) -> list[str]:
        return self.validation_files if split == "validation" and self.validation_files \
            else self.files

    def records(self, path: str, split: str, residue: int = 0, modulus: int = 1,
                start: int = 0) -> Iterator[tuple[int, str]]:
        """(record index, text) of the split's non-empty records of one file with index ≡
        residue (mod modulus) and index ≥ start, in file order."""
        try:
            yield from self._records(path, split, residue, modulus, start)
        except UnicodeDecodeError as e:  # A text-mode read: its offset counts from a chunk.
            raise DataError(f"{path}: not UTF-8 text ({e.reason}); convert it to UTF-8, "
                            "e.g. with iconv") from None

    def _records(self, path: str, split: str, residue: int, modulus: int,
                 start: int) -> Iterator[tuple[int, str]]:
        hashed = not (split == "validation" and self.validation_files)
        want_validation = split == "validation"
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                raw = ((i, line) for i, line in enumerate(f))
            elif self.txt_split == "file":
                raw = iter([(0, f.read())])
            else:
                raw = enumerate(documents.BLANK_LINES.split(f.read()))
            for index, content in raw:
                if index < start or index % modulus != residue:
                    continue
                corpora.RECORDS_READ[0] += 1
                key, text = self._parse(path, index, content)
                if not text or (hashed and documents.in_validation(
                        key, self.validation_fraction) != want_validation):
                    continue
                yield index, text

    def _parse(self, path: str, index: int, content: str) -> tuple[str, str]:
        if path.endswith(".jsonl"):
            if not content.strip():
                return "", ""
            # The key local_files_task uses: path:line (1-based), so splits agree.
            line = index + 1
            return f"{path}:{line}", documents.jsonl_text(path, line, content, self.jsonl_field,
                                                         "streaming_files_task")
        if self.txt_split == "file":
            return path, content.strip()
        return f"{path}#{index}", content.strip()

    def validation_texts(self) -> list[str]:
        return corpora.first_texts(self, "validation", self.max_validation_documents)


class Stream:
    """One stream's rows (see the module docstring); `position` resumes it."""

    def __init__(self, corpus: corpora.Corpus, split: str, index: int, num_streams: int,
                 seed: "int | tuple[int, ...]", seq_len: int, vocab, position=(0, 0, 0, 0)):
        self.corpus, self.split, self.index, self.num_streams = corpus, split, index, num_streams
        self.seed, self.seq_len, self.vocab = seed, seq_len, vocab
        # A tuple seed names a component of a mixture (matlm.data.stream_mixture), so two
        # streamed components do not read their files in the same order; a single task's
        # int seed gives the key it always had.
        self._seed_key = tuple(int(v) for v in seed) if isinstance(seed, tuple) else (int(seed),)
        self.eos = vocab.eos_id
        epoch, unit, record, offset = (int(v) for v in position)
        self.epoch, self.unit = epoch, unit
        self._initial = [epoch, unit, record, offset]  # Until the first row moves it.
        self._docs: collections.deque = collections.deque()  # (record index, tokens)
        self._reader = self._open(record)
        self._current: Optional[tuple[int, np.ndarray]] = None
        self._offset = 0
        self._resume_offset = offset
        self._epoch_had_documents = False

    def units(self, epoch: int) -> list[tuple[str, int, int]]:
        """(file, residue, modulus) this stream reads in `epoch`, in order."""
        files = self.corpus.split_files(self.split)
        order = np.random.default_rng([*self._seed_key, SeedStream.FILE_ORDER, epoch]).permutation(
            len(files))
        F, B, p = len(files), self.num_streams, self.index
        if F >= B:
            return [(files[order[j]], 0, 1) for j in range(p, F, B)]
        return [(files[order[p % F]], p // F, len(range(p % F, B, F)))]

    def _open(self, start_record: int):
        units = self.units(self.epoch)
        if self.unit >= len(units):
            return iter(())
        path, residue, modulus = units[self.unit]
        return self.corpus.records(path, self.split, residue, modulus, start_record)

    @property
    def position(self) -> list[int]:
        if self._current is None:  # No row made yet: where it was started or restored.
            return list(self._initial)
        return [self.epoch, self.unit, self._current[0], self._offset]

    def _refill(self) -> bool:
        """Tokenises the next few records of the current file; False at its end."""
        batch = []
        for record, text in self._reader:
            batch.append((record, text))
            if len(batch) >= _LOOKAHEAD:
                break
        if not batch:
            return False
        ids = self.vocab.tokenizer.encode([text for _, text in batch],
                                          num_threads=_ENCODE_THREADS)
        for (record, _), tokens in zip(batch, ids):
            self._docs.append((record, np.asarray(tokens + [self.eos], np.int32)))
        return True

    def _next_document(self) -> None:
        empty_units = 0
        while not self._docs and not self._refill():
            # This file is done: the next one, or the next epoch's first.
            self.unit += 1
            if self.unit >= len(self.units(self.epoch)):
                if not self._epoch_had_documents and empty_units:
                    raise DataError(
                        f"stream {self.index} of {self.num_streams} found no {self.split} "
                        f"documents in a whole epoch: the corpus has fewer documents than "
                        f"the global batch has rows; use a smaller global_batch_size or "
                        f"more data")
                self.epoch, self.unit = self.epoch + 1, 0
                self._epoch_had_documents = False
            empty_units += 1
            self._reader = self._open(0)
        self._current = self._docs.popleft()
        self._offset, self._resume_offset = self._resume_offset, 0
        self._epoch_had_documents = True

    def next_row(self) -> dict[str, np.ndarray]:
        L = self.seq_len
        row = packing.empty_rows(1, L)
        filled, segment = 0, 0
        while filled < L:
            if self._current is None or self._offset >= len(self._current[1]):
                self._next_document()
                continue
            tokens = self._current[1]
            take = min(L - filled, len(tokens) - self._offset)
            segment += 1
            row["targets"][0, filled:filled + take] = tokens[self._offset:self._offset + take]
            row["segment_ids"][0, filled:filled + take] = segment
            row["positions"][0, filled:filled + take] = np.arange(take)
            filled += take
            self._offset += take
        return row


class StreamingBatches:
    """Per-host batches of a streamed task: `next()`, `state`, `num_batches=None`."""

    def __init__(self, corpus: corpora.Corpus, task: str, split: str, seq_len: int,
                 global_batch_size: int, vocab, seed: int, host_index: int = 0,
                 num_hosts: int = 1, start_step: int = 0, positions=None):
        if global_batch_size % num_hosts:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by "
                            f"the number of hosts ({num_hosts})")
        if positions is not None and len(positions) != global_batch_size:
            raise StateError(f"the saved stream state has {len(positions)} streams, the "
                             f"global batch {global_batch_size} rows")
        self.task, self.split, self.seq_len, self.seed = task, split, seq_len, seed
        self.global_batch_size, self.num_hosts, self.host_index = (
            global_batch_size, num_hosts, host_index)
        b = global_batch_size // num_hosts
        self.mine = range(host_index * b, (host_index + 1) * b)
        self.streams = [Stream(corpus, split, p, global_batch_size, seed, seq_len, vocab,
                               positions[p] if positions is not None else (0, 0, 0, 0))
                        for p in self.mine]
        self._start_id = vocabulary.start_id(vocab)
        self.step = start_step
        self.num_batches = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [s.next_row() for s in self.streams]
        self.step += 1
        merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        return packing.model_features(merged, self._start_id)

    @property
    def state(self) -> dict:
        """JSON; every stream's position (gathered from all hosts, a collective when there
        are several: call it on every host at the same step, as checkpointing does)."""
        mine = np.asarray([s.position for s in self.streams], np.int64)
        if self.num_hosts > 1:
            from jax.experimental import multihost_utils
            every = np.asarray(multihost_utils.process_allgather(mine))
            mine = every.reshape(self.global_batch_size, 4)
        return {"version": STATE_VERSION, "step": int(self.step), "task": self.task,
                "split": self.split, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "num_hosts": self.num_hosts, "positions": mine.tolist()}


def restore(state: dict, vocab, host_index: int = 0, num_hosts: int = 1) -> StreamingBatches:
    if state.get("version") != STATE_VERSION:
        raise StateError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
    if state["task"] not in corpora.CORPORA:
        raise StateError(f"the checkpoint streamed task {state['task']!r}, which is not "
                         "registered as a streaming task in this run")
    return StreamingBatches(corpora.CORPORA[state["task"]], state["task"], state["split"],
                            state["seq_len"], state["global_batch_size"], vocab, state["seed"],
                            host_index, num_hosts, start_step=state["step"],
                            positions=state["positions"])
