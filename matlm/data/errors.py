"""Errors for bad data-layer input, each naming the problem before training starts.

All derive from `DataError`, itself a `ValueError`, so the CLI reports them as a
one-line error (see `matlm/cli/main.py`).
"""


class DataError(ValueError):
    """Bad input to the data pipeline."""


class UnknownTaskError(DataError):
    """A task or mixture name that is not registered."""


class UnknownSplitError(DataError):
    """A split the task does not have."""


class EmptyGlobError(DataError):
    """A local-files pattern that matches no file (or only empty files)."""


class MissingFieldError(DataError):
    """A jsonl record without the configured text field."""


class SequenceLengthError(DataError):
    """A sequence length below 2 (next-token prediction needs an input and a target)."""


class BatchSizeError(DataError):
    """A global batch size that is not positive or not divisible by the number of hosts."""


class VocabularyError(DataError):
    """A vocabulary file that is missing or is not a usable SentencePiece model."""


class StateError(DataError):
    """A saved pipeline state that does not match the pipeline being restored."""
