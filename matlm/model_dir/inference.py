"""Parameters only, for the commands that use a trained model (eval, search, extract,
export, generate): open a model dir named on the command line, load one checkpoint's
parameters, or write a params-only checkpoint in the run layout.

TensorFlow-free: these read the model section of run_config.json, never the data one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen
import jax
import orbax.checkpoint as ocp

from matlm.model import ModelConfig, abstract_params
from matlm.model_dir import integrity, storage
from matlm.model_dir.errors import CheckpointError
from matlm.model_dir.layout import ModelDir, as_model_dir
from matlm.model_dir.restore import restore_and_verify
from matlm.model_dir.run_config import (RunConfig, model_config_from_dict,
                                        model_config_to_dict, read_run_config_dict,
                                        write_run_config)


@dataclasses.dataclass
class LoadedCheckpoint:
    model_config: ModelConfig
    params: Any
    step: int
    vocab_path: str
    data_config: dict  # run_config.json's "data" object as saved (typed: RunConfig.data).


def _existing(checkpoint_dir, flag: str) -> ModelDir:
    model_dir = ModelDir(checkpoint_dir)
    storage.check_access(model_dir.path, write=False)  # gs://: bucket there, listable.
    if not model_dir.path.is_dir():
        raise CheckpointError(f"{flag}={str(checkpoint_dir)!r}: checkpoint dir does not exist")
    return model_dir


def open_run(checkpoint_dir, flag: str = "--model_dir") -> tuple[ModelDir, RunConfig]:
    """A model dir named on the command line and its typed run config, read before any
    parameter is loaded; a missing dir is a one-line CheckpointError naming the flag."""
    model_dir = _existing(checkpoint_dir, flag)
    return model_dir, model_dir.run_config()


def load_checkpoint_for_inference(model_dir, step: Optional[int] = None,
                                  shardings=None) -> LoadedCheckpoint:
    """The model config, parameters (only) and vocabulary path of one checkpoint.

    `step=None` takes the newest. `shardings`: a tree of shardings for the params
    (default: everything on the first device).
    """
    model_dir = as_model_dir(model_dir)
    storage.check_access(model_dir.path, write=False)
    if not model_dir.path.is_dir():
        raise CheckpointError(f"checkpoint dir {model_dir.path} does not exist")
    run_config = read_run_config_dict(model_dir.path)
    model_config = model_config_from_dict(run_config["model"])
    step = model_dir.resolve_step(step)
    shapes = flax.linen.meta.unbox(abstract_params(model_config))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
    path = model_dir.checkpoint_path(step)
    restored = restore_and_verify(model_dir.checkpoint_manager(read_only=True, create=False),
                                  path, step, {"params": target}, optional=("meta",))
    # A reader: a corrupt checkpoint is reported, never moved (that is the writer's job).
    if restored.problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({restored.problem}); run `matlm verify "
            f"--model_dir={model_dir.path}` to check every checkpoint, or pass --step to use "
            "an earlier one")
    return LoadedCheckpoint(model_config=model_config, params=restored.items["params"],
                            step=step, vocab_path=model_dir.local_vocab_file(),
                            data_config=run_config.get("data", {}))


def save_for_inference(model_dir, model_config: ModelConfig, params, step: int,
                       vocab_path: str = "", data_config=None) -> None:
    """Writes a params-only checkpoint in the run layout (tests, imports of outside
    weights, `matlm extract`). `data_config`: a DataConfig or its saved dict. Refuses to
    overwrite an existing step."""
    model_dir = as_model_dir(model_dir)
    if step in model_dir.checkpoint_steps():  # Before anything is written.
        raise CheckpointError(f"{model_dir.checkpoint_path(step)} already exists")
    model_dir.make_dir()
    write_run_config(model_dir.run_config_file, model_config, data_config)
    if vocab_path:
        model_dir.write_vocabulary(vocab_path)
    manager = model_dir.checkpoint_manager(create=True, enable_async_checkpointing=False)
    if step in manager.all_steps():
        raise CheckpointError(f"{model_dir.checkpoint_path(step)} already exists")
    meta = integrity.record({"step": step, "model": model_config_to_dict(model_config)},
                            {"params": params})
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
