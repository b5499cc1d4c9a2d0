"""SentencePiece vocabularies: train one on texts, load any `.model` file. (Training on a
registered task's text is `matlm.data.task_vocabulary`, above the task registry.)

Special ids. Models trained by matlm (`train_vocabulary`) use
    pad = 0, eos = 1, unk = 2, bos = 3
and byte fallback (no text is ever unknown). Other SentencePiece models (T5's,
mistral-common's) keep their own ids; the pipeline only relies on:
- `eos_id`: appended to every document (required: a model without EOS is rejected);
- pad = 0 (seqio's convention): filler in padding positions, which always carry
  segment_ids = 0 and loss_mask = 0, so it is harmless if 0 is also a real piece
  (e.g. `<unk>` in mistral's models);
- the "start" input of each document (`start_id`): the model's BOS if it has one, else
  pad = 0 (T5's convention). It is only ever an *input*, never a target.

Text is kept as it is (format version 2): no normalisation ("identity" rule, so no
NFKC either), no squashing of whitespace, "\n" a piece of its own (a user-defined
symbol) and runs of spaces allowed as pieces. Every string round-trips through
encode/decode, so prompts keep their line breaks and a "\n" stop sequence can fire.
Version 1 vocabularies (before 2026-11) normalised with `nmt_nfkc` and squashed
whitespace: "\n" became " ", so models trained with them never saw a line break.

The default vocabulary (`default_vocabulary`) is trained on `matlm_wiki`'s training
split on first use and cached under `$MATLM_CACHE_DIR/vocab/` (default
`<repo>/.matlm_cache/`), so no model file is shipped.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from matlm.data import documents, wikitext
from matlm.data.errors import VocabularyError
from matlm.fileio import write_atomically

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 8192
# Byte fallback alone needs 256 + 4 ids; below 300 there is hardly room for any piece.
MIN_VOCAB_SIZE = 300
CACHE_ENV_VAR = "MATLM_CACHE_DIR"
# Part of the default vocabulary's cache key: a cache trained by an older version (which
# normalised "\n" to " ") is not reused.
VOCAB_FORMAT_VERSION = 2
# Training sentences: paragraphs joined with their "\n" up to this many characters, so
# the trainer sees line starts (words after "\n" carry no "▁" prefix).
_CHUNK_CHARS = 4096
# SentencePiece trainer options that keep text as it is (see the module docstring).
_VERBATIM = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                 user_defined_symbols=["\n"], allow_whitespace_only_pieces=True)
_REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """`$MATLM_CACHE_DIR`, else `<repo>/.matlm_cache` (ignored by git)."""
    return Path(os.environ.get(CACHE_ENV_VAR) or _REPO_ROOT / ".matlm_cache")


def train_vocabulary(texts: Iterable[str], vocab_size: int, output_path: str | os.PathLike,
                     model_type: str = "unigram") -> Path:
    """Trains a SentencePiece model on `texts` (one document each) and writes it atomically."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise VocabularyError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 + 4 ids")
    output_path = check_output_path(output_path)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
            byte_fallback=True, character_coverage=0.9995, max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1, minloglevel=2, **_VERBATIM)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
        raise VocabularyError(f"cannot train a {vocab_size}-piece vocabulary: {e}") from e
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent processes (hosts sharing a cache) never read a half-written model.
    write_atomically(output_path, model.getvalue())
    return output_path


def check_output_path(output_path: str | os.PathLike) -> Path:
    """The path a vocabulary will be written to, checked before any training: not a
    directory, and its directory (the first existing ancestor, for one still to be
    created) writable. Raises VocabularyError naming the path."""
    path = Path(output_path).expanduser()
    if path.is_dir():
        raise VocabularyError(f"--output {str(output_path)!r} is a directory; give the path "
                              "of the .model file to write, e.g. DIR/vocab.model")
    if path.exists() and not os.access(path, os.W_OK):
        raise VocabularyError(f"--output {str(output_path)!r} exists and is not writable")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VocabularyError(f"--output {str(output_path)!r}: {str(ancestor)!r} is not a "
                              "directory")
    try:  # A real probe: permission bits say nothing for root, /proc or read-only mounts.
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise VocabularyError(f"--output {str(output_path)!r}: cannot write in "
                              f"{str(ancestor)!r} ({e.strerror or e})") from None
    return path


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: each document's non-blank lines, each with its "\n", packed
    into chunks of up to _CHUNK_CHARS characters (a longer line is a chunk of its own;
    past max_sentence_length the trainer skips it)."""
    for text in texts:
        chunk = ""
        for line in text.split("\n"):
            if not line.strip():
                continue
            if chunk and len(chunk) + len(line) + 1 > _CHUNK_CHARS:
                yield chunk
                chunk = ""
            chunk += line + "\n"
        if chunk:
            yield chunk


def round_trips(vocab, text: str) -> bool:
    """Whether `text` decodes back to itself (an old, normalising vocabulary turns "\n"
    into " " and squashes runs of spaces)."""
    return vocab.decode(vocab.encode(text)) == text


def load_vocabulary(path: str | os.PathLike) -> "seqio.SentencePieceVocabulary":
    """A seqio vocabulary for an existing SentencePiece `.model`, validated now."""
    # seqio (and TensorFlow under it) only here: training a vocabulary and finding the
    # default one's file need neither, so a machine without them (the GPU check) can.
    from matlm.data import tf_setup  # noqa: F401  (before seqio: hides accelerators from TF)
    import seqio
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VocabularyError(f"vocabulary file {path!r} does not exist")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(model_file=path)
    except (RuntimeError, OSError) as e:
        raise VocabularyError(
            f"vocabulary file {path!r} is not a SentencePiece model ({e})") from e
    if processor.eos_id() < 0:
        raise VocabularyError(f"SentencePiece model {path!r} has no EOS piece; the pipeline "
                              "needs one to terminate documents")
    return seqio.SentencePieceVocabulary(path)


def start_id(vocab) -> int:
    """The input token that starts each document: BOS if the model has one, else pad (0).
    `vocab`: a seqio SentencePiece vocabulary, or a plain SentencePiece processor (the
    TensorFlow-free path, `matlm.data.embedded_tokens`)."""
    processor = getattr(vocab, "tokenizer", vocab)
    bos = processor.bos_id()
    return int(bos) if bos >= 0 else int(getattr(vocab, "pad_id", PAD_ID))


def fingerprint(vocab: "seqio.SentencePieceVocabulary") -> str:
    """Content hash of the model, for cache keys (two copies of one model match)."""
    return hashlib.sha256(vocab.sp_model).hexdigest()[:16]


def default_vocabulary(vocab_size: int = DEFAULT_VOCAB_SIZE,
                       cache: str | os.PathLike | None = None) -> "seqio.SentencePieceVocabulary":
    """The vocabulary trained on `matlm_wiki` (train split), cached after the first call."""
    return load_vocabulary(default_vocabulary_path(vocab_size, cache))


def default_vocabulary_path(vocab_size: int = DEFAULT_VOCAB_SIZE,
                            cache: str | os.PathLike | None = None,
                            source: str | None = None) -> Path:
    """The default vocabulary's `.model` file, trained on `matlm_wiki`'s train split (of
    the Wikipedia dump `source`, default gensim's) on first use. SentencePiece only: no
    seqio or TensorFlow."""
    directory = Path(cache) if cache else cache_dir() / "vocab"
    # The key changes with the corpus, the stripping rules, the size and the trainer's
    # options (VOCAB_FORMAT_VERSION).
    size = os.path.getsize(source or wikitext.gensim_wiki_dump_path())
    key = hashlib.sha256(f"{size}:{wikitext.STRIPPER_VERSION}:{vocab_size}:"
                         f"v{VOCAB_FORMAT_VERSION}".encode()).hexdigest()[:10]
    path = directory / f"matlm_wiki_sp{vocab_size}_{key}.model"
    if not path.is_file():
        # source None: gensim's sample, the cache entry the pipeline shares.
        train_texts = documents.select_split(documents.wiki_articles(source), "train",
                                             documents.WIKI_VALIDATION_FRACTION)
        train_vocabulary(train_texts, vocab_size, path)
    return path
