"""`ModelDir`: the paths of one model dir and the files at them (the layout is in the
package docstring). The Orbax item names of a checkpoint are here too (`ITEMS`).

The dir may be local (`pathlib.Path`) or on a bucket (`gs://…`, an `etils.epath.Path`):
`matlm.model_dir.storage` parses it; the paths below are of the same type either way."""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from matlm.fileio import write_atomically
from matlm.model import ModelConfig
from matlm.model_dir import run_config as run_config_lib
from matlm.model_dir import storage
from matlm.model_dir.errors import CheckpointError

ITEMS = ("params", "opt_state", "data", "meta")


class ModelDir:
    """Paths and files of one model dir (see the package docstring)."""

    def __init__(self, path):
        # A local path or a gs:// URL (bad URL, no GCS client: one-line StorageError).
        self.path = storage.model_dir_path(path)

    @property
    def is_url(self) -> bool:
        """On an object store (gs://): no renames, no appends, whole-object writes."""
        return storage.is_url(self.path)

    def __repr__(self):
        return f"ModelDir({str(self.path)!r})"

    # --- Paths (the layout). ---------------------------------------------------------------
    @property
    def run_config_file(self) -> Path:
        return self.path / run_config_lib.FILE_NAME

    @property
    def vocab_file(self) -> Path:
        return self.path / "vocab.model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / str(step)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def eval_dir(self, step: int) -> Path:
        return self.path / "eval" / str(step)

    def latest_eval_results(self) -> Optional[Path]:
        """results.json of `matlm eval` at the newest evaluated step, or None."""
        steps = sorted(int(p.parent.name) for p in (self.path / "eval").glob("*/results.json")
                       if p.parent.name.isdigit())
        return self.eval_dir(steps[-1]) / "results.json" if steps else None

    # --- The run config (matlm.model_dir.run_config). ----------------------------------------
    def run_config(self) -> run_config_lib.RunConfig:
        """The run's typed configs; a dir without run_config.json is a CheckpointError."""
        return run_config_lib.run_config_from_dict(self._saved_run_config(),
                                                   source=str(self.run_config_file))

    def _saved_run_config(self) -> dict:
        """run_config.json as parsed JSON; everyone outside this package reads run_config()."""
        return run_config_lib.read_run_config_dict(self.path)

    def model_config(self) -> ModelConfig:
        """The ModelConfig the run was trained with."""
        return run_config_lib.model_config_from_dict(self._saved_run_config()["model"])

    def check_same_model(self, model_config: ModelConfig) -> None:
        """A model dir that already holds a run must hold a run of *this* model."""
        storage.check_access(self.path, write=False)  # gs://: the bucket, listable.
        if not self.run_config_file.exists():
            if self.checkpoints.exists() and any(self.checkpoints.iterdir()):
                raise CheckpointError(f"{self.path} holds checkpoints but no run_config.json; "
                                      "refusing to train over them. Use a new --model_dir.")
            return
        diffs = run_config_lib.model_differences(self._saved_run_config().get("model", {}),
                                                 model_config)
        if diffs:
            raise CheckpointError(
                f"{self.path} holds a run of a different model ({'; '.join(diffs)}). "
                "Nothing was changed; use a new --model_dir or the saved model config.")

    def write_run_files(self, model_config: ModelConfig, data_config, train_config,
                        vocab_path: str = "") -> None:
        """run_config.json and vocab.model, on process 0, unless already there (a resumed
        run keeps the files it started with)."""
        if jax.process_index() != 0:
            return
        self.make_dir()
        if not self.run_config_file.exists():
            run_config_lib.write_run_config(self.run_config_file, model_config, data_config,
                                            train_config)
        if vocab_path and not self.vocab_file.exists():
            self.write_vocabulary(vocab_path)

    def make_dir(self) -> None:
        """Creates the dir locally. On a bucket there are no dirs to create (and gcsfs's
        mkdir would create a missing *bucket*): the bucket is checked instead."""
        if self.is_url:
            storage.check_access(self.path, write=True)
            return
        self.path.mkdir(parents=True, exist_ok=True)

    def write_vocabulary(self, vocab_path: str) -> None:
        """Copies the SentencePiece model in, atomically."""
        write_atomically(self.vocab_file, storage.model_dir_path(vocab_path).read_bytes())

    def local_vocab_file(self) -> str:
        """A local path of vocab.model ("" when the dir has none): the file itself, or for a
        dir on a bucket a copy in the temp dir named by its content (SentencePiece reads
        local files only)."""
        if not self.vocab_file.is_file():
            return ""
        if not self.is_url:
            return str(self.vocab_file)
        data = self.vocab_file.read_bytes()
        local = Path(tempfile.gettempdir()) / "matlm-vocab" / \
            f"{hashlib.sha256(data).hexdigest()[:32]}.model"
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(local, data)
        return str(local)

    # --- Vocabulary. -----------------------------------------------------------------------
    def vocabulary(self, fallback: Callable[[], Any]):
        """The run's own vocab.model if the dir has one (a resumed or evaluated run keeps
        the vocabulary it trained with), else `fallback()`."""
        local = self.local_vocab_file()
        if local:
            from matlm import data  # TensorFlow enters here, not at import time.
            return data.load_vocabulary(local)
        return fallback()

    # --- Checkpoints. ----------------------------------------------------------------------
    def checkpoint_manager(self, **options) -> ocp.CheckpointManager:
        """The Orbax manager of this dir's checkpoints (one place for the item layout)."""
        if options.get("read_only"):
            _quiet_read_only_notes()
        return ocp.CheckpointManager(self.checkpoints, item_names=ITEMS,
                                     options=ocp.CheckpointManagerOptions(**options))

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints (none when there is no checkpoints dir)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(self.checkpoint_manager(read_only=True, create=False).all_steps())

    def resolve_step(self, step: Optional[int] = None) -> int:
        """`step` if a complete checkpoint holds it, the newest when None; otherwise a
        one-line CheckpointError (no checkpoint at all, or none at that step)."""
        steps = self.checkpoint_steps()
        if not steps:
            raise CheckpointError(f"{self.path} holds no complete checkpoint under "
                                  f"{self.checkpoints}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"--step={step}: no checkpoint at that step in "
                                  f"{self.checkpoints}; available: {steps}")
        return step

    def set_aside_checkpoints(self) -> list[Path]:
        """The `<step>.corrupt[N]` dirs that restores moved aside (see RunCheckpointer)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("*.corrupt*") if p.is_dir())


class _DropReadOnlyNotes(logging.Filter):
    """Orbax logs two absl warnings each time a manager is opened read-only (what every
    reader — eval, verify — asks for on purpose); they say nothing to a user."""
    NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.NOTES)


def _quiet_read_only_notes() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropReadOnlyNotes) for f in absl_logger.filters):
        absl_logger.addFilter(_DropReadOnlyNotes())


def as_model_dir(model_dir) -> ModelDir:
    return model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
