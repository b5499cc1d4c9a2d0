"""How matlm quotes an exception inside its own one-line errors, written once.

Errors from libraries (Orbax, TensorFlow, tensorstore) are often many lines long; matlm's
messages quote only their first non-empty line, with the exception's type, so the user
sees what failed in one line. An empty message falls back to the type name instead of
raising IndexError.
"""
from __future__ import annotations


def causes(error: BaseException | None):
    """`error`, then what it was raised from or during (`__cause__`, else `__context__`),
    each once: where a library's real failure hides under its wrappers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of `error`'s message (at most `limit` characters); the
    exception's type name where the message is empty."""
    text = str(error)
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def error_summary(error: BaseException, limit: int = 200) -> str:
    """`Type: first line` — how a wrapped exception is quoted in a matlm error."""
    return f"{type(error).__name__}: {first_line(error, limit)}"
