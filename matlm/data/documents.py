"""Reading raw documents from the embedded Wikipedia sample and from local files.

Pure Python: these functions return lists of strings; `matlm.data.tasks` wraps them
in seqio data sources. Train/validation splits are assigned per document by a
stable hash of a document key (article title, or file path + block number), so the
split never depends on file order, on the number of hosts or on Python's hash seed.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import json
import os
import re
from typing import Sequence

from matlm.data import wikitext
from matlm.data.errors import DataError, EmptyGlobError, MissingFieldError

SPLITS = ("train", "validation")


def in_validation(key: str, validation_fraction: float) -> bool:
    """Stable split assignment: a key's hash, mapped to [0, 1), below the fraction."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def select_split(keyed_texts: Sequence[tuple[str, str]], split: str,
                 validation_fraction: float) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    want_validation = split == "validation"
    return [text for key, text in keyed_texts
            if in_validation(key, validation_fraction) == want_validation]


# The share of the embedded Wikipedia sample's articles (by title hash) held out for
# validation: the `matlm_wiki` task's split, and the articles the default vocabulary is
# not trained on.
WIKI_VALIDATION_FRACTION = 0.1


@functools.lru_cache(maxsize=2)
def wiki_articles(path: str | None = None) -> tuple[tuple[str, str], ...]:
    """(title, plain text) of every article of the embedded Wikipedia sample (cached)."""
    path = path or wikitext.gensim_wiki_dump_path()
    return tuple((a.title, a.text) for a in wikitext.iter_articles(path))


BLANK_LINES = re.compile(r"\n\s*\n")  # Separates documents when txt_split="blank_lines".
TXT_SPLITS = ("file", "blank_lines")


def check_txt_split(txt_split: str) -> None:
    if txt_split not in TXT_SPLITS:
        raise DataError(f"txt_split must be 'file' or 'blank_lines', got {txt_split!r}")


def list_local_files(pattern: str, what: str = "local files") -> list[str]:
    """The .txt/.jsonl files matching `pattern`, sorted; EmptyGlobError or DataError
    naming the pattern (`what`: how the error names it) when there is none or another kind."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        raise EmptyGlobError(f"{what} pattern {pattern!r} matches no file")
    unsupported = [p for p in paths if not p.endswith((".txt", ".jsonl"))]
    if unsupported:
        raise DataError(f"{what} pattern {pattern!r} matches files that are neither "
                        f".txt nor .jsonl, e.g. {unsupported[0]!r}")
    return paths


def jsonl_text(path: str, line_number: int, line: str, field: str,
               configurable: str = "local_files_task") -> str:
    """The text of one non-blank jsonl line; DataError / MissingFieldError naming
    path:line (and the gin binding that names the field) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise MissingFieldError(
            f"{path}:{line_number}: jsonl record has no field {field!r} "
            f"(set {configurable}.jsonl_field to the field that holds the text)")
    text = record[field]
    if not isinstance(text, str):
        raise MissingFieldError(
            f"{path}:{line_number}: field {field!r} is {type(text).__name__}, not text")
    return text.strip()


def read_local_documents(pattern: str, jsonl_field: str = "text",
                         txt_split: str = "file") -> list[tuple[str, str]]:
    """(key, text) for each document in the files matching `pattern`, sorted by path.

    `.txt`: one document per file (`txt_split="file"`) or per blank-line-separated
    block (`txt_split="blank_lines"`). `.jsonl`: one document per line, its text in
    `jsonl_field`. Raises EmptyGlobError / MissingFieldError naming the problem.
    """
    check_txt_split(txt_split)
    paths = list_local_files(pattern)
    documents: list[tuple[str, str]] = []
    for path in paths:
        with open_utf8_text(path) as f:
            if path.endswith(".jsonl"):
                documents.extend(_jsonl_documents(path, f, jsonl_field))
            elif txt_split == "file":
                documents.append((path, f.read().strip()))
            else:
                blocks = BLANK_LINES.split(f.read())
                documents.extend((f"{path}#{i}", b.strip()) for i, b in enumerate(blocks))
    documents = [(key, text) for key, text in documents if text]
    if not documents:
        raise EmptyGlobError(f"local files pattern {pattern!r} matches only empty files")
    return documents


def open_utf8_text(path: str) -> io.StringIO:
    """The file's text as `open(path, encoding="utf-8")` reads it (universal newlines),
    decoded whole so that a file that is not UTF-8 is a one-line DataError naming the file
    and the byte offset (a text-mode read names neither: its offsets count from the chunk)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}, byte {data[e.start]:#04x} at "
                        f"offset {e.start}); convert it to UTF-8, e.g. with iconv") from None
    return io.StringIO(text, newline=None)


def _jsonl_documents(path, lines, field):
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            yield f"{path}:{line_number}", jsonl_text(path, line_number, line, field)
