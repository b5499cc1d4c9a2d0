"""The embedded corpus (`matlm_wiki`) as packed token rows without TensorFlow or seqio.

The trainer's pipeline reads `matlm_wiki` through seqio; a machine without TensorFlow (the
GPU image: `scripts/gpu_check.py`) still needs real text to train on and prompts to
decode. This reads the same articles and split (`matlm.data.documents`), tokenises them
with SentencePiece directly (the same `.model` as `default_vocabulary`) and packs them
with `matlm.data.packing`, so rows have the trainer's format (inputs, targets,
segment_ids, positions, loss_mask). No resume contract: a benchmark's batches only.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import sentencepiece as spm

from matlm.data import documents, packing, vocabulary, wikitext


def articles(source: Optional[str] = None, max_articles: Optional[int] = None):
    """(title, text) of the sample's articles: all (parsed once, cached), or the first
    `max_articles` (a quick read for smoke runs)."""
    if max_articles is None:
        return documents.wiki_articles(source)
    path = source or wikitext.gensim_wiki_dump_path()
    return tuple((a.title, a.text) for a in itertools.islice(wikitext.iter_articles(path),
                                                             max_articles))


def load_processor(vocab_size: int, cache: Optional[str] = None,
                   source: Optional[str] = None,
                   max_articles: Optional[int] = None) -> spm.SentencePieceProcessor:
    """The default vocabulary (trained on first use) as a plain SentencePiece processor;
    with `max_articles`, one trained afresh on those articles' train split into `cache`."""
    if max_articles is None:
        path = vocabulary.default_vocabulary_path(vocab_size, cache, source)
    else:
        path = Path(cache or vocabulary.cache_dir()) / f"wiki{max_articles}_sp{vocab_size}.model"
        vocabulary.train_vocabulary(split_texts("train", source, max_articles), vocab_size,
                                    path)
    return spm.SentencePieceProcessor(model_file=str(path))


def split_texts(split: str, source: Optional[str] = None,
                max_articles: Optional[int] = None) -> list[str]:
    """The article texts of a `matlm_wiki` split, in source order."""
    return list(documents.select_split(articles(source, max_articles), split,
                                       documents.WIKI_VALIDATION_FRACTION))


def token_store(processor: spm.SentencePieceProcessor, split: str,
                source: Optional[str] = None,
                max_articles: Optional[int] = None) -> packing.TokenStore:
    """A split's documents tokenised, each ending in EOS, back to back."""
    eos = processor.eos_id()
    docs = [np.asarray(processor.encode(text) + [eos], np.int32)
            for text in split_texts(split, source, max_articles)]
    return packing.TokenStore.from_documents(docs)


def packed_batches(store: packing.TokenStore, seq_len: int, batch_size: int, start_id: int,
                   seed: int = 0) -> Iterator[dict]:
    """Endless batches of packed rows (numpy), a fresh seeded epoch layout each epoch."""
    rng = np.random.default_rng(seed)
    while True:
        layout = packing.EpochLayout(store, seq_len, rng)
        for first in range(0, layout.num_rows - batch_size + 1, batch_size):
            rows = layout.rows(np.arange(first, first + batch_size))
            yield packing.model_features(rows, start_id)
        if layout.num_rows < batch_size:
            raise ValueError(f"the corpus packs into {layout.num_rows} rows of {seq_len} "
                             f"tokens, fewer than one batch of {batch_size}: lower the "
                             "batch size or the sequence length")
