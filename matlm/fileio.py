"""Small file-system primitives every layer shares, written once.

`write_atomically` is the one way matlm replaces a file that someone else may read at the
same moment (run config, vocabulary, trial records, metrics, export files): the bytes go
to a temporary file in the same directory, are fsynced, and the temporary is renamed over
the target, so a reader (or a process killed mid-write) sees the old file or the new one,
never a partial one. The directory is fsynced too, so the rename itself survives a crash.

A URL (`gs://bucket/…`, as a string or an etils.epath path) has no rename: one object
write is atomic by itself (a reader sees the old object or the new one), so the bytes are
written whole through etils.epath (matlm.model_dir.storage parses and checks such paths).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union


def write_atomically(path: Union[str, os.PathLike], data: Union[bytes, str]) -> None:
    """Replaces `path` with `data` (str is written as UTF-8) by write, fsync, rename;
    on an object store (a URL) by one whole-object write."""
    if isinstance(data, str):
        data = data.encode()
    if "://" in os.fspath(path):
        from etils import epath
        epath.Path(path).write_bytes(data)
        return
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; some file systems refuse to open a directory for reading.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
