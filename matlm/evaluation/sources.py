"""Where an eval task's raw records come from; each returns a split as a list of dicts.

- `ArrowSource`: a HuggingFace `save_to_disk` folder (`<root>/<path>/<split>/data-*.arrow`,
  read with `pyarrow.ipc.open_stream`).
- `JsonlSource`: a (gzipped) jsonl file (LAMBADA's requests, your own data).

Paths are absolute, or relative to the source's `data_root`, or (neither) relative to
the offline eval data dir, the only case that needs `matlm setup-eval-data`.
- `TfdsSource`: a prepared TFDS dataset (pods); nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from matlm.evaluation.errors import EmptySplitError, EvalError
from matlm.evaluation.setup_data import require_eval_data


def _splits_error(kind: str, split: str, splits) -> EvalError:
    return EvalError(f"{kind} source has no split {split!r}; it has {sorted(splits)}")


def resolve_path(path: str, data_root: Optional[str]) -> Path:
    """An absolute `path` as it is; a relative one under `data_root` when given, else
    under the offline eval data (which must then be set up: `matlm setup-eval-data`)."""
    resolved = Path(path).expanduser()
    if resolved.is_absolute():
        return resolved
    if data_root:
        return Path(data_root).expanduser() / resolved
    return require_eval_data() / resolved


@dataclasses.dataclass(frozen=True)
class ArrowSource:
    """A HuggingFace `save_to_disk` folder: `path` absolute, or relative to `data_root`
    (default: the offline eval data dir); `splits` maps split → sub-folder name."""

    path: str
    splits: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"validation": "validation"})
    data_root: Optional[str] = None

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def read(self, split: str) -> list[dict]:
        import pyarrow.ipc  # Local: only needed here.
        if split not in self.splits:
            raise _splits_error("arrow", split, self.splits)
        folder = resolve_path(self.path, self.data_root) / self.splits[split]
        if not folder.is_dir():
            raise EvalError(f"arrow source folder {str(folder)!r} does not exist")
        files = sorted(folder.glob("data-*.arrow"))
        if not files:
            raise EmptySplitError(f"no arrow files in {str(folder)!r}")
        records: list[dict] = []
        for file in files:
            with open(file, "rb") as f:
                records.extend(pyarrow.ipc.open_stream(f).read_all().to_pylist())
        return records


@dataclasses.dataclass(frozen=True)
class JsonlSource:
    """A jsonl(.gz) file per split: absolute, or relative to `data_root` (default: the
    offline eval data dir)."""

    splits: Mapping[str, str]
    data_root: Optional[str] = None

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def read(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise _splits_error("jsonl", split, self.splits)
        path = resolve_path(self.splits[split], self.data_root)
        if not path.is_file():
            raise EvalError(f"jsonl file {str(path)!r} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def _to_python(value: Any) -> Any:
    """TFDS numpy values → plain Python (bytes → str, arrays → lists)."""
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """`tfds_name` (`dataset[/config][:version]`), `splits` maps split → TFDS split."""

    tfds_name: str
    splits: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"train": "train", "validation": "validation"})
    data_dir: Optional[str] = None

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def read(self, split: str) -> list[dict]:
        from matlm.data.tf_setup import tf  # noqa: F401  (hide accelerators from TF first)
        import tensorflow_datasets as tfds
        if split not in self.splits:
            raise _splits_error("tfds", split, self.splits)
        try:
            dataset = tfds.load(self.tfds_name, split=self.splits[split], data_dir=self.data_dir,
                                download=False, shuffle_files=False)
        except Exception as e:  # TFDS raises assorted types for unprepared data.
            raise EvalError(f"cannot read TFDS {self.tfds_name!r} split "
                            f"{self.splits[split]!r} (data must be prepared beforehand; "
                            f"TFDS_DATA_DIR or data_dir): {e}") from e
        return [_to_python(r) for r in tfds.as_numpy(dataset)]
