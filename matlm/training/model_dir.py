"""The model dir: the one module that knows its layout, used by training and eval alike.

    MODEL_DIR/
      run_config.json        {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
      vocab.model            the SentencePiece model the run trained with (copied in)
      checkpoints/<step>/    Orbax items: params, opt_state, data (pipeline state), meta
      metrics.jsonl          one JSON object per log/eval step (process 0)
      tensorboard/           event files
      eval/<step>/           written by `matlm eval`

Everything that reads or writes these paths goes through `ModelDir` (paths, run config,
the model check, vocabulary), `RunCheckpointer` (a training run's state) or
`load_checkpoint_for_inference` / `save_for_inference` (parameters only), so the layout
and the Orbax item names live here and nowhere else.

Saves are asynchronous (training continues while files are written); a step dir only
appears once complete (Orbax writes to a temporary dir and renames it). Every checkpoint
records a content checksum per array (and of the data pipeline state) in its `meta` item,
in the same atomic save (`matlm.training.integrity`). A newest checkpoint that fails to
restore or whose contents do not match its checksums is moved aside to `<step>.corrupt` —
never deleted or overwritten — with a warning naming it (and the arrays that differ), and
the previous one is restored. Readers (`load_checkpoint_for_inference`, `matlm verify`)
verify too but never move or write anything. run_config.json and vocab.model are written
to a temporary file and renamed, so a reader never sees them half-written.

TensorFlow-free: the vocabulary loader (`matlm.data`) is imported only when a vocabulary
is loaded.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen
import jax
import orbax.checkpoint as ocp

from matlm.model import ModelConfig, abstract_params
from matlm.training import integrity
from matlm.training.config import TrainConfig

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "data", "meta")


class CheckpointError(ValueError):
    """A missing, empty, mismatched or unreadable model dir or checkpoint."""


def model_config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"saved model config has unknown fields {sorted(unknown)}; "
                              "was it written by a newer matlm?")
    return ModelConfig(**d)


def train_config_from_dict(d: dict) -> tuple[TrainConfig, list[str]]:
    """A saved run's TrainConfig, and the saved fields this TrainConfig does not know
    (written by another matlm version; left out). Raises TrainConfigError (a ValueError)
    or TypeError where the saved values do not make a valid recipe."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return (TrainConfig(**{k: v for k, v in d.items() if k in known}),
            sorted(set(d) - known))


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same dir and a rename, so
    a concurrent reader sees the old file or the new one, never a partial one."""
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


def _run_config_bytes(model_config: ModelConfig, data: dict, train: dict) -> bytes:
    return json.dumps({"model": model_config_to_dict(model_config), "data": data,
                       "train": train}, indent=2).encode()


def _json_value(value):
    """What `value` reads back as after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


# ModelConfig fields that change how a step is computed, not the parameters it trains.
EXECUTION_ONLY_FIELDS = frozenset({"remat_policy", "attention_impl", "attention_query_block"})


class ModelDir:
    """Paths and files of one model dir (see the module docstring)."""

    def __init__(self, path):
        if "://" in str(path):
            # pathlib would quietly turn gs://bucket/run into the local dir gs:/bucket/run.
            raise CheckpointError(
                f"model dir {str(path)!r} is a URL; matlm model dirs are filesystem paths "
                "(mount a bucket with gcsfuse and give its path, or use a local/NFS dir)")
        self.path = Path(path).absolute()

    def __repr__(self):
        return f"ModelDir({str(self.path)!r})"

    # --- Paths (the layout). ---------------------------------------------------------------
    @property
    def run_config_file(self) -> Path:
        return self.path / "run_config.json"

    @property
    def vocab_file(self) -> Path:
        return self.path / "vocab.model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

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

    # --- The run config. -------------------------------------------------------------------
    def read_run_config(self) -> dict:
        path = self.run_config_file
        if not path.is_file():
            raise CheckpointError(f"{path} not found: {self.path} is not a matlm model dir "
                                  "(train one with `matlm train --model_dir=...`)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e

    def model_config(self) -> ModelConfig:
        """The ModelConfig the run was trained with."""
        return model_config_from_dict(self.read_run_config()["model"])

    def check_same_model(self, model_config: ModelConfig) -> None:
        """A model dir that already holds a run must hold a run of *this* model."""
        if not self.run_config_file.exists():
            if self.checkpoints.exists() and any(self.checkpoints.iterdir()):
                raise CheckpointError(f"{self.path} holds checkpoints but no run_config.json; "
                                      "refusing to train over them. Use a new --model_dir.")
            return
        saved = self.read_run_config().get("model", {})
        current = model_config_to_dict(model_config)
        # A field the saved config lacks was added after the run started: the run had its
        # default. Fields that only change how the same parameters are computed (memory,
        # kernels) may change between jobs, e.g. to resume on another slice.
        defaults = model_config_to_dict(ModelConfig())
        diffs = [f"{k}: saved {saved.get(k, defaults[k])!r}, now {_json_value(v)!r}"
                 for k, v in current.items() if k not in EXECUTION_ONLY_FIELDS
                 and _json_value(v) != saved.get(k, _json_value(defaults[k]))]
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
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.run_config_file.exists():
            _write_atomically(self.run_config_file, _run_config_bytes(
                model_config,
                dataclasses.asdict(data_config) if data_config is not None else {},
                dataclasses.asdict(train_config) if train_config is not None else {}))
        if vocab_path and not self.vocab_file.exists():
            _write_atomically(self.vocab_file, Path(vocab_path).read_bytes())

    # --- Vocabulary. -----------------------------------------------------------------------
    def vocabulary(self, fallback: Callable[[], Any]):
        """The run's own vocab.model if the dir has one (a resumed or evaluated run keeps
        the vocabulary it trained with), else `fallback()`."""
        if self.vocab_file.is_file():
            from matlm import data  # TensorFlow enters here, not at import time.
            return data.load_vocabulary(str(self.vocab_file))
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


class RunCheckpointer:
    """Saves and restores a training run's state (see the module docstring)."""

    def __init__(self, model_dir, keep: int = 3, async_save: bool = True):
        self.model_dir = as_model_dir(model_dir)
        self.directory = self.model_dir.checkpoints
        self.manager = self.model_dir.checkpoint_manager(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # The step `restore_latest` restored in this job (None: none, or a fresh start), so
        # that a failure right after a resume can point at the checkpoint it came from.
        self.restored_step: Optional[int] = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        if step in self.manager.all_steps():
            return  # Already saved (e.g. a final save right after a periodic one).
        # Checksums of the live state, dispatched now: after `save` returns the state is
        # donated to the next step. They go into `meta`, written in the same atomic save.
        meta = integrity.record(meta, {"params": state.params, "opt_state": state.opt_state},
                                data_state)
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """(params, opt_state, data_state, meta, step) of the newest checkpoint that
        restores and matches its checksums, or None when there is none. Unreadable or
        corrupt ones are moved aside."""
        for step in reversed(self.steps()):
            if not any((self.directory / str(step) / item).is_dir()
                       for item in ("opt_state", "data")):
                # A params-only checkpoint (`save_for_inference`, `matlm extract`): not a
                # broken run but a model to fine-tune; never moved aside. (A run's
                # checkpoint missing one of them is still restored below and set aside.)
                return self._restore_params_only(step, abstract_state.params)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
                problem = check_integrity(
                    self.directory / str(step), restored.meta,
                    {"params": restored.params, "opt_state": restored.opt_state},
                    restored.data)
            except Exception as e:  # Orbax/TensorStore raise many kinds on bad files.
                self._set_aside(step, e)
                continue
            if problem is not None:
                self._set_aside(step, problem)
                continue
            self.restored_step = step
            return restored.params, restored.opt_state, restored.data, restored.meta, step
        return None

    def _restore_params_only(self, step: int, params_target):
        """(params, None, None, meta, step) of a params-only checkpoint: the trainer starts
        a fresh optimizer and data pipeline from these parameters (fine-tuning)."""
        path = self.directory / str(step)
        items = {"params": ocp.args.StandardRestore(params_target)}
        if (path / "meta").is_dir():
            items["meta"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many kinds on bad files.
            raise CheckpointError(f"params-only checkpoint {path} could not be read "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                  "does the model config match the one it was saved with?"
                                  ) from e
        meta = restored["meta"] if "meta" in items else None
        problem = check_integrity(path, meta, {"params": restored.params})
        if problem is not None:
            raise CheckpointError(f"params-only checkpoint {path} is corrupt ({problem})")
        self.restored_step = step
        return restored.params, None, None, meta, step

    def _set_aside(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.corrupt")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{step}.corrupt{n}"), n + 1
        if jax.process_index() == 0:
            os.rename(path, target)
        detail = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        # One line for the user (a logging call as well printed it twice under absl).
        print(f"WARNING: checkpoint {path} is incomplete or corrupt ({detail}); "
              f"moved aside to {target.name}, trying the previous one")
        self.manager.reload()


def check_integrity(path: Path, meta, items: dict, data_state=None):
    """None when the restored `items` match the checksums in `meta`, else the
    IntegrityError to report. A checkpoint written before checksums existed passes with
    a one-line warning."""
    if not integrity.has_checksums(meta):
        log.warning("checkpoint %s was written without checksums; not verified", path)
        print(f"WARNING: checkpoint {path} was written without checksums; not verified")
        return None
    return integrity.verify(meta, items, data_state)


@dataclasses.dataclass
class LoadedCheckpoint:
    model_config: ModelConfig
    params: Any
    step: int
    vocab_path: str
    data_config: dict


def read_run_config(model_dir) -> dict:
    return as_model_dir(model_dir).read_run_config()


def open_existing(checkpoint_dir, flag: str = "--checkpoint_dir"
                  ) -> tuple[ModelDir, dict, ModelConfig]:
    """A model dir named on the command line, its run_config.json and ModelConfig, read
    before any parameter is loaded; a missing dir is a one-line CheckpointError naming
    the flag (the commands that read checkpoints: eval, search, extract, export)."""
    model_dir = ModelDir(checkpoint_dir)
    if not model_dir.path.is_dir():
        raise CheckpointError(f"{flag}={str(checkpoint_dir)!r}: checkpoint dir does not exist")
    run_config = model_dir.read_run_config()
    return model_dir, run_config, model_config_from_dict(run_config["model"])


def load_checkpoint_for_inference(model_dir, step: Optional[int] = None,
                                  shardings=None) -> LoadedCheckpoint:
    """The model config, parameters (only) and vocabulary path of one checkpoint.

    `step=None` takes the newest. `shardings`: a tree of shardings for the params
    (default: everything on the first device).
    """
    model_dir = as_model_dir(model_dir)
    if not model_dir.path.is_dir():
        raise CheckpointError(f"checkpoint dir {model_dir.path} does not exist")
    run_config = model_dir.read_run_config()
    model_config = model_config_from_dict(run_config["model"])
    step = model_dir.resolve_step(step)
    shapes = flax.linen.meta.unbox(abstract_params(model_config))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
    manager = model_dir.checkpoint_manager(read_only=True, create=False)
    path = model_dir.checkpoints / str(step)
    items = {"params": ocp.args.StandardRestore(target)}
    if (path / "meta").is_dir():
        items["meta"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be "
                              f"read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    # A reader: a corrupt checkpoint is reported, never moved (that is the writer's job).
    problem = check_integrity(path, restored["meta"] if "meta" in items else None,
                              {"params": restored.params})
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({problem}); run `matlm verify "
            f"--model_dir={model_dir.path}` to check every checkpoint, or pass --step to use "
            "an earlier one")
    return LoadedCheckpoint(model_config=model_config, params=restored.params, step=step,
                            vocab_path=str(model_dir.vocab_file)
                            if model_dir.vocab_file.is_file() else "",
                            data_config=run_config.get("data", {}))


def save_for_inference(model_dir, model_config: ModelConfig, params, step: int,
                       vocab_path: str = "", data_config: Optional[dict] = None) -> None:
    """Writes a params-only checkpoint in the run layout (tests, imports of outside
    weights). Refuses to overwrite an existing step."""
    model_dir = as_model_dir(model_dir)
    if step in model_dir.checkpoint_steps():  # Before anything is written.
        raise CheckpointError(f"{model_dir.checkpoints / str(step)} already exists")
    model_dir.path.mkdir(parents=True, exist_ok=True)
    _write_atomically(model_dir.run_config_file,
                      _run_config_bytes(model_config, data_config or {}, {}))
    if vocab_path:
        _write_atomically(model_dir.vocab_file, Path(vocab_path).read_bytes())
    manager = model_dir.checkpoint_manager(create=True, enable_async_checkpointing=False)
    if step in manager.all_steps():
        raise CheckpointError(f"{model_dir.checkpoints / str(step)} already exists")
    meta = integrity.record({"step": step, "model": model_config_to_dict(model_config)},
                            {"params": params})
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


@dataclasses.dataclass
class VerifyResult:
    """What `verify_checkpoint` found in one checkpoint."""
    step: int
    status: str  # "ok" | "CORRUPT" | "unreadable" | "unverified"
    arrays: int  # Arrays restored and compared.
    detail: str = ""


def verify_checkpoint(model_dir, step: int, params_target, opt_state_target=None
                      ) -> VerifyResult:
    """Restores one checkpoint onto the given targets (ShapeDtypeStructs with shardings;
    `opt_state_target=None` checks the parameters only) and compares it with its
    checksums, whatever `integrity.VERIFY` says. A reader: moves and writes nothing."""
    model_dir = as_model_dir(model_dir)
    path = model_dir.checkpoints / str(step)
    items = {"params": ocp.args.StandardRestore(params_target)}
    if opt_state_target is not None and (path / "opt_state").is_dir():
        items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
    for name in ("data", "meta"):
        if (path / name).is_dir():
            items[name] = ocp.args.JsonRestore()
    manager = model_dir.checkpoint_manager(read_only=True, create=False)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax/TensorStore raise many kinds on bad files.
        return VerifyResult(step, "unreadable", 0, f"{type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:200]}")
    arrays = {name: restored[name] for name in ("params", "opt_state") if name in items}
    count = len(jax.tree.leaves(arrays))
    skipped = "" if "opt_state" in arrays or not (path / "opt_state").is_dir() else \
        "; opt_state not checked (no optimizer config)"
    meta = restored["meta"] if "meta" in items else None
    if not integrity.has_checksums(meta):
        return VerifyResult(step, "unverified", count, "written without checksums" + skipped)
    data = restored["data"] if "data" in items else None
    bad = integrity.mismatches(meta, arrays, data)
    if bad:
        return VerifyResult(step, "CORRUPT", count,
                            integrity.describe(bad, count + int(data is not None)) + skipped)
    return VerifyResult(step, "ok", count, skipped.lstrip("; "))
