"""Vocabularies trained on a registered task's text (`matlm vocab --task`).

Kept apart from `matlm.data.vocabulary`, which the pipeline and the streams need for
token ids: reading a task's text needs the task registry, which sits above them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from matlm.data import tasks
from matlm.data.vocabulary import train_vocabulary


def task_texts(task_name: str, split: str = "train",
               max_documents: int | None = None) -> Iterator[str]:
    """The raw documents of a task split (of each task of a mixture, up to
    `max_documents` each), in source order."""
    for task, _ in tasks.components(task_name):
        tasks.check_split(task, split)
        dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                                   num_epochs=1, use_cached=False)
        if max_documents:
            dataset = dataset.take(max_documents)
        for example in dataset.as_numpy_iterator():
            yield example[tasks.TEXT_KEY].decode("utf-8")


def train_task_vocabulary(task_name: str, vocab_size: int, output_path: str | os.PathLike,
                          max_documents: int | None = None) -> Path:
    """Trains a vocabulary on a task's (or mixture's) training split."""
    return train_vocabulary(task_texts(task_name, "train", max_documents), vocab_size,
                            output_path)
