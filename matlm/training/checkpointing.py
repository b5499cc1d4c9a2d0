"""Orbax checkpoints of a run, and loading a checkpoint's model for inference.

Layout of a model dir:

    MODEL_DIR/
      run_config.json        {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
      vocab.model            the SentencePiece model the run trained with (copied in)
      checkpoints/<step>/    Orbax items: params, opt_state, data (pipeline state), meta
      metrics.jsonl, tensorboard/, eval/<step>/

Saves are asynchronous (training continues while files are written); a step dir only
appears once complete (Orbax writes to a temporary dir and renames it). A newest
checkpoint that fails to restore is moved aside to `<step>.corrupt` — never deleted or
overwritten — with a warning naming it, and the previous one is restored.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import flax.linen
import jax
import orbax.checkpoint as ocp

from matlm.model import ModelConfig, abstract_params

log = logging.getLogger(__name__)
ITEMS = ("params", "opt_state", "data", "meta")


class CheckpointError(ValueError):
    """A missing, empty, mismatched or unreadable checkpoint."""


def checkpoints_dir(model_dir) -> Path:
    return Path(model_dir).absolute() / "checkpoints"


def _manager(model_dir, **options) -> ocp.CheckpointManager:
    """The Orbax manager of a model dir's checkpoints (one place for the item layout)."""
    return ocp.CheckpointManager(checkpoints_dir(model_dir), item_names=ITEMS,
                                 options=ocp.CheckpointManagerOptions(**options))


def model_config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise CheckpointError(f"saved model config has unknown fields {sorted(unknown)}; "
                              "was it written by a newer matlm?")
    return ModelConfig(**d)


class RunCheckpointer:
    """Saves and restores a training run's state (see module docstring)."""

    def __init__(self, model_dir, keep: int = 3, async_save: bool = True):
        self.directory = checkpoints_dir(model_dir)
        self.manager = _manager(model_dir, max_to_keep=keep, create=True,
                                enable_async_checkpointing=async_save)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        if step in self.manager.all_steps():
            return  # Already saved (e.g. a final save right after a periodic one).
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state):
        """(params, opt_state, data_state, meta, step) of the newest checkpoint that
        restores, or None when there is none. Unreadable ones are moved aside."""
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state.params),
                    opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
            except Exception as e:  # Orbax/TensorStore raise many kinds on bad files.
                self._set_aside(step, e)
                continue
            return restored.params, restored.opt_state, restored.data, restored.meta, step
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.corrupt")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{step}.corrupt{n}"), n + 1
        if jax.process_index() == 0:
            os.rename(path, target)
        log.warning("checkpoint %s could not be restored (%s: %s); moved it to %s and "
                    "falling back to the previous checkpoint", path, type(error).__name__,
                    str(error).splitlines()[0][:200], target)
        print(f"WARNING: checkpoint {path} is incomplete or corrupt "
              f"({type(error).__name__}); moved aside to {target.name}, trying the previous one")
        self.manager.reload()


@dataclasses.dataclass
class LoadedCheckpoint:
    model_config: ModelConfig
    params: Any
    step: int
    vocab_path: str
    data_config: dict


def read_run_config(model_dir) -> dict:
    path = Path(model_dir) / "run_config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {model_dir} is not a matlm model dir "
                              "(train one with `matlm train --model_dir=...`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def load_checkpoint_for_inference(model_dir, step: Optional[int] = None,
                                  shardings=None) -> LoadedCheckpoint:
    """The model config, parameters (only) and vocabulary of one checkpoint.

    `step=None` takes the newest. `shardings`: a tree of shardings for the params
    (default: everything on the first device).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint dir {model_dir} does not exist")
    run_config = read_run_config(model_dir)
    model_config = model_config_from_dict(run_config["model"])
    ckpt_dir = checkpoints_dir(model_dir)
    manager = _manager(model_dir, read_only=True, create=False) if ckpt_dir.is_dir() else None
    steps = sorted(manager.all_steps()) if manager else []
    if not steps:
        raise CheckpointError(f"{model_dir} holds no complete checkpoint under {ckpt_dir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"no checkpoint at step {step} in {ckpt_dir}; available: {steps}")
    shapes = flax.linen.meta.unbox(abstract_params(model_config))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt_dir / str(step)} could not be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    vocab = model_dir / "vocab.model"
    return LoadedCheckpoint(model_config=model_config, params=restored.params, step=step,
                            vocab_path=str(vocab) if vocab.is_file() else "",
                            data_config=run_config.get("data", {}))


def save_for_inference(model_dir, model_config: ModelConfig, params, step: int,
                       vocab_path: str = "", data_config: Optional[dict] = None) -> None:
    """Writes a params-only checkpoint in the run layout (tests, imports of outside
    weights). Refuses to overwrite an existing step."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"model": model_config_to_dict(model_config), "data": data_config or {},
                  "train": {}}
    (model_dir / "run_config.json").write_text(json.dumps(run_config, indent=2))
    if vocab_path:
        shutil.copyfile(vocab_path, model_dir / "vocab.model")
    manager = _manager(model_dir, create=True, enable_async_checkpointing=False)
    if step in manager.all_steps():
        raise CheckpointError(f"{checkpoints_dir(model_dir) / str(step)} already exists")
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        meta=ocp.args.JsonSave({"step": step, "model": model_config_to_dict(model_config)})))
    manager.wait_until_finished()
