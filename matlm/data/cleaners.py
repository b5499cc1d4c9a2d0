"""Text cleaners of TFDS tasks, registered by name (`tfds_task.cleaner = "wiki40b"`).

A cleaner turns one stored text into the plain text the model reads. Each is written
once, in Python, and serves both ways a TFDS task is read: record by record when it is
streamed (`matlm.data.tfds_corpus`), and inside tf.data when it is held in memory
(`matlm.data.tasks`, through `tf.numpy_function`), so the two paths give the same text.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from matlm.data.errors import DataError

Cleaner = Callable[[str], str]

_WIKI40B_MARKERS = re.compile(r"\n?_START_(ARTICLE|SECTION|PARAGRAPH)_\n")


def wiki40b_to_prose(text: str) -> str:
    """wiki40b marks structure with `_START_ARTICLE_` etc. and `_NEWLINE_`: plain text."""
    return _WIKI40B_MARKERS.sub("\n\n", text).replace("_NEWLINE_", "\n").strip()


# name -> cleaner; "none" keeps the text as TFDS stores it.
CLEANERS: dict[str, Optional[Cleaner]] = {"none": None, "wiki40b": wiki40b_to_prose}


def get_cleaner(name: str) -> Optional[Cleaner]:
    """The cleaner registered as `name` (None for "none"); DataError naming the known ones."""
    if name not in CLEANERS:
        raise DataError(f"unknown cleaner {name!r}; expected one of {list(CLEANERS)}")
    return CLEANERS[name]
