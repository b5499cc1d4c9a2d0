"""Where a model dir lives: a local path or a `gs://bucket/path` URL, behind one path type.

`model_dir_path(text)` is the one place a model dir's location is parsed:

- a local path becomes an absolute `pathlib.Path` (unchanged behaviour);
- `gs://bucket/path` becomes an `etils.epath.Path`, the path type Orbax and T5X use: it has
  pathlib's methods (`/`, `exists`, `is_dir`, `glob`, `read_text`, `write_bytes` …) and
  reaches the bucket through gcsfs (or TensorFlow's GCS file system when TensorFlow is
  installed and `EPATH_USE_TF` is not `false`). Orbax and TensorStore write the
  checkpoints' arrays there directly.

Checked at parse time, without touching the network (one line, `StorageError`, exit 2):
a URL scheme other than gs://, `gs://` with no bucket name or an invalid one, and no GCS
client installed (the `gcs` extra). `check_access(path, write=...)` then asks the bucket
(one list, and for a writer one probe object written and deleted) so that a missing
bucket or a missing permission (saying which: list, read or write) fails before any work.

Listings are never cached (gcsfs would, for the life of the process): a reader beside a
writer, and this process after its own google-cloud-storage writes, see the bucket as it
is.

On a bucket there is no rename and no append: an object write is atomic by itself (a
reader sees the old object or the new one), so `matlm.fileio.write_atomically` writes small files whole,
and Orbax marks a complete checkpoint with its `commit_success.txt` object instead of a
directory rename (`is_url` tells the callers that care).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from matlm.messages import causes, first_line
from matlm.model_dir.errors import CheckpointError

if TYPE_CHECKING:
    from etils import epath

GCS_EXTRA = "pip install 'matlm[gcs]' (google-cloud-storage and gcsfs)"
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


class StorageError(CheckpointError):
    """A model dir location that cannot be used: bad URL, no client, no bucket, no access."""


def is_url(path) -> bool:
    """Whether `path` (str, pathlib or epath path) names an object-store location."""
    return "://" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False


def split_gs_url(url: str) -> tuple[str, str]:
    """("bucket", "path/inside") of "gs://bucket/path/inside" (no trailing slash)."""
    rest = str(url)[len("gs://"):]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def model_dir_path(path) -> Union[Path, "epath.Path"]:
    """The path object of a model dir given as text or a path (see the module docstring)."""
    if not is_url(path):
        return Path(path).absolute()
    text = os.fspath(path)
    scheme = text.split("://", 1)[0]
    if scheme != "gs":
        raise StorageError(f"model dir {text!r}: {scheme}:// is not supported; use a local "
                           "path or a gs://bucket/path URL")
    bucket, prefix = split_gs_url(text)
    if not bucket:
        raise StorageError(f"model dir {text!r} names no bucket; write gs://BUCKET/path")
    if not _BUCKET_NAME.match(bucket) or ".." in bucket:
        raise StorageError(f"model dir {text!r}: {bucket!r} is not a valid GCS bucket name "
                           "(lowercase letters, digits, '-', '_' and '.', from 3 to 63 characters)")
    missing = missing_clients()
    if missing:
        raise StorageError(f"model dir {text!r} is on GCS but {', '.join(missing)} "
                           f"is not installed: {GCS_EXTRA}")
    _no_stale_listings()
    # etils.epath would use TensorFlow's GCS file system wherever TensorFlow is installed
    # (it is, for the data pipeline); gcsfs is the client matlm is tested against (the
    # emulator speaks its protocol; TensorFlow's has no emulator setting), so it is the
    # default everywhere. EPATH_USE_TF=true in the environment still selects TensorFlow.
    os.environ.setdefault("EPATH_USE_TF", "false")
    from etils import epath
    return epath.Path(f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}")


def _no_stale_listings() -> None:
    """gcsfs (under etils.epath and Orbax) caches directory listings for the life of the
    process by default: another process's writes (a new checkpoint for a reader, a lock
    object) or this process's own writes through google-cloud-storage would go unseen,
    e.g. a checkpoint whose commit marker was deleted would still list as complete. Turned
    off through fsspec's configuration, unless the user configured it."""
    import fsspec.config
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def missing_clients() -> list[str]:
    """The GCS client packages a gs:// model dir needs that are not importable."""
    import importlib.util
    return [name for name, module in (("google-cloud-storage", "google.cloud.storage"),
                                      ("gcsfs", "gcsfs"))
            if _find_spec(importlib.util, module) is None]


def _find_spec(util, module: str):
    try:
        return util.find_spec(module)
    except ModuleNotFoundError:  # A missing parent package (google.cloud).
        return None


@functools.lru_cache(maxsize=1)
def gcs_client():
    """One google-cloud-storage client per process (application-default credentials; an
    emulator named by STORAGE_EMULATOR_HOST is used anonymously by the library itself)."""
    from google.cloud import storage
    return storage.Client()


def bucket_and_prefix(path) -> tuple[str, str]:
    return split_gs_url(os.fspath(path))


def check_access(path, write: bool) -> None:
    """For a gs:// path: raises a one-line StorageError when its bucket does not exist or
    this job may not list it (or, with `write`, create and delete an object under it).
    Local paths are left to the callers' own checks."""
    if not is_url(path):
        return
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    bucket_name, prefix = bucket_and_prefix(path)
    where = f"gs://{bucket_name}/{prefix}".rstrip("/")
    try:
        bucket = gcs_client().bucket(bucket_name)
        next(iter(bucket.list_blobs(prefix=prefix + "/" if prefix else None, max_results=1)),
             None)
    except auth.DefaultCredentialsError:
        # matlm never reads or prints credentials: it names where they are looked for.
        raise StorageError(f"model dir {where}: no Google Cloud credentials found "
                           "(application-default credentials: on a TPU/GCE VM its service "
                           "account; elsewhere `gcloud auth application-default login`)"
                           ) from None
    except (api.RetryError, api.ServiceUnavailable, ConnectionError) as e:
        raise StorageError(f"model dir {where}: cannot reach Cloud Storage "
                           f"({type(e).__name__}); check the network") from None
    except api.NotFound:
        raise StorageError(f"model dir {where}: bucket gs://{bucket_name} does not exist "
                           "(create it, or fix the name)") from None
    except api.Forbidden:
        raise StorageError(f"model dir {where}: no permission to list gs://{bucket_name} "
                           "(grant storage.objects.list, e.g. roles/storage.objectViewer)"
                           ) from None
    if not write:
        return
    try:
        probe_write(path)
    except api.Forbidden:
        raise StorageError(f"model dir {where}: no permission to write in gs://{bucket_name} "
                           "(grant storage.objects.create and .delete, e.g. "
                           "roles/storage.objectUser)") from None


def probe_write(path) -> None:
    """Creates and deletes one empty object under gs:// `path`/: raises the client's
    exception (NotFound: no bucket; Forbidden: no write permission) when it cannot."""
    bucket_name, prefix = bucket_and_prefix(path)
    probe = gcs_client().bucket(bucket_name).blob(
        f"{prefix}/.write-check.{uuid.uuid4().hex}".lstrip("/"))
    probe.upload_from_string(b"", if_generation_match=0)
    probe.delete()


def move_dir(source, target) -> None:
    """Moves every object under gs:// `source`/ to `target`/ (a bucket has no rename: copy,
    then delete). Orbax's commit markers (`commit_success.txt`) are deleted first, so a
    move cut short leaves a source that reads as an incomplete checkpoint, never a whole
    one, and a target holding every object."""
    bucket_name, source_prefix = bucket_and_prefix(source)
    target_bucket, target_prefix = bucket_and_prefix(target)
    if target_bucket != bucket_name:
        raise StorageError(f"cannot move {source} to another bucket ({target})")
    bucket = gcs_client().bucket(bucket_name)
    blobs = list(bucket.list_blobs(prefix=source_prefix + "/"))
    for blob in blobs:
        bucket.copy_blob(blob, bucket, target_prefix + blob.name[len(source_prefix):])
    for blob in sorted(blobs, key=lambda b: not b.name.endswith(COMMIT_MARKER)):
        blob.delete()


def remove_tree(path) -> None:
    """Deletes every object under gs:// `path`/."""
    bucket_name, prefix = bucket_and_prefix(path)
    bucket = gcs_client().bucket(bucket_name)
    for blob in list(bucket.list_blobs(prefix=prefix + "/")):
        blob.delete()


# TensorStore's status codes in its error messages, and HTTP codes of GCS responses.
_STATUS_ERRNO = (("PERMISSION_DENIED", errno.EACCES), ("UNAUTHENTICATED", errno.EACCES),
                 ("NOT_FOUND", errno.ENOENT), ("RESOURCE_EXHAUSTED", errno.ENOSPC),
                 ("HTTP response code: 403", errno.EACCES),
                 ("HTTP response code: 404", errno.ENOENT),
                 ("Forbidden: ", errno.EACCES))  # gcsfs's 403: an OSError with no errno.


def bucket_fault_of(error: Optional[BaseException]) -> Optional[int]:
    """The errno that stands for the bucket-side fault behind `error`, looked for in its
    causes too, or None (not a storage fault: a bug). gcsfs raises FileNotFoundError (404),
    an OSError "Forbidden: …" (403) or its HttpError, all without an errno;
    google-cloud-storage its HTTP exceptions; TensorStore a status message: ENOENT (no
    bucket or object), EACCES (no permission), ENOSPC (quota), EIO (the service failed:
    429/5xx after the clients' own retries)."""
    for cause in causes(error):
        if isinstance(cause, FileNotFoundError):
            return errno.ENOENT
        if isinstance(cause, PermissionError):
            return errno.EACCES
        # google.api_core.exceptions.GoogleAPICallError, gcsfs.retry.HttpError (401, 5xx).
        code = getattr(cause, "code", None)
        if type(cause).__module__.startswith(("google.", "gcsfs.")) and isinstance(code, int):
            return {403: errno.EACCES, 401: errno.EACCES, 404: errno.ENOENT}.get(
                code, errno.EIO if code == 429 or code >= 500 else None)
        text = str(cause)
        for status, number in _STATUS_ERRNO:
            if status in text:
                return number
    return None


# GCS names the missing permission in every 403 body, whichever client quotes it.
_DENIED_PERMISSION = re.compile(r"does not have ([\w.]+) access|Permission '([\w.]+)' denied")
# The bucket in a JSON API path (".../b/NAME/o", gcsfs: "b/NAME/o") or a URL.
_BUCKET_IN_REQUEST = re.compile(r"(?:\bb/|gs://)([a-z0-9][a-z0-9._-]*[a-z0-9])")
_READ_PERMISSIONS = ("storage.objects.list", "storage.objects.get", "storage.buckets.get")


def denied_permission(error: Optional[BaseException]) -> Optional[str]:
    """The permission a GCS 403 in `error` (or its causes) names, e.g.
    "storage.objects.create"; None when there is none."""
    found = _DENIED_PERMISSION.search("\n".join(str(c) for c in causes(error)))
    return next((g for g in found.groups() if g), None) if found else None


def _is_gcs_refusal(error: BaseException) -> bool:
    """Whether `error` is a GCS client's 401/403 (not a local file's PermissionError)."""
    if type(error).__module__.startswith(("google.", "gcsfs.")):
        return getattr(error, "code", None) in (401, 403)
    return any(status in str(error) for status, number in _STATUS_ERRNO
               if number == errno.EACCES)


def why_refused(error: BaseException, limit: int = 120) -> str:
    """What to say of a failed bucket request inside another message: "this job lacks
    <permission>" for a 403 that names one, else the error's first line."""
    permission = denied_permission(error)
    return f"this job lacks {permission}" if permission else first_line(error, limit)


def refusal_message(error: Optional[BaseException]) -> Optional[str]:
    """One line for a request Cloud Storage refused for want of permission (401/403) in
    `error` or its causes, from any client (google-cloud-storage, gcsfs, TensorStore):
    which permission GCS said is missing, on which bucket, and the role that grants it;
    None for any other error. For a permission lost after the up-front `check_access`
    (revoked mid-run, or a command whose reads start elsewhere)."""
    # A local PermissionError (EACCES as well) is the CLI's OSError handling, not this.
    if bucket_fault_of(error) != errno.EACCES or not any(map(_is_gcs_refusal, causes(error))):
        return None
    permission = denied_permission(error)
    bucket = _BUCKET_IN_REQUEST.search("\n".join(str(c) for c in causes(error)))
    where = f" on gs://{bucket.group(1)}" if bucket else ""
    if permission is None:
        return (f"Cloud Storage refused a request{where} (no permission): "
                f"{first_line(error, 160)}; grant this job access, then run the same command")
    role = ("roles/storage.objectViewer" if permission in _READ_PERMISSIONS
            else "roles/storage.objectUser")
    return (f"Cloud Storage refused a request{where}: this job lacks {permission}; grant it "
            f"(e.g. {role}), then run the same command")


def output_path(text) -> Union[Path, "epath.Path"]:
    """Where a command writes its results (`--output`): a local path as given (relative
    stays relative), or a gs:// URL, parsed as a model dir is and checked for write access
    before any work (one-line StorageError)."""
    if not is_url(text):
        return Path(text)
    path = model_dir_path(text)
    check_access(path, write=True)
    return path


@contextlib.contextmanager
def staged_dir(dest):
    """Yields a local dir to write results into with ordinary file APIs (csv, matplotlib,
    numpy, pyarrow, transformers' save_pretrained). A local `dest` is that dir itself
    (created). For a gs:// `dest` it is a temporary dir whose files are uploaded under
    `dest` once the block has finished without an exception (each object written whole):
    a command that fails leaves nothing half-written in the bucket."""
    if not is_url(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    with tempfile.TemporaryDirectory(prefix="matlm-upload-") as local:
        yield Path(local)
        upload_tree(Path(local), dest)


@contextlib.contextmanager
def staged_file(dest):
    """`staged_dir` for one file: yields the local path to write `dest` to."""
    if not is_url(dest):
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    with staged_dir(dest.parent) as local:
        yield local / dest.name


def upload_tree(local: Path, dest) -> list[str]:
    """Uploads every file under the local dir `local` to gs:// `dest`/ (same relative
    names, streamed from disk); returns the object names written."""
    bucket_name, prefix = bucket_and_prefix(dest)
    bucket = gcs_client().bucket(bucket_name)
    written = []
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        name = "/".join(filter(None, (prefix, path.relative_to(local).as_posix())))
        bucket.blob(name).upload_from_filename(str(path))
        written.append(name)
    return written


def tree_bytes(path) -> int:
    """Bytes of the files under `path`, a local dir or a gs:// prefix (objects' sizes)."""
    if not is_url(path):
        return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    bucket_name, prefix = bucket_and_prefix(path)
    return sum(blob.size or 0 for blob in gcs_client().bucket(bucket_name).list_blobs(
        prefix=prefix + "/" if prefix else None))


COMMIT_MARKER = "commit_success.txt"  # Orbax's "this checkpoint is complete" on GCS.
