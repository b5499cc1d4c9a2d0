"""The device mesh and the shardings of parameters, optimizer state and batches."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from matlm.sharding import DEFAULT_RULES, MESH_AXES, fit_spec, logical_to_mesh_specs


class MeshError(ValueError):
    """A mesh shape that does not fit the devices or the batch."""


def make_mesh(mesh_shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; a -1 entry takes the remaining devices."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    shape = list(mesh_shape)
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape) or n % known:
        raise MeshError(f"mesh {tuple(mesh_shape)} (data, fsdp, tensor) does not divide the "
                        f"{n} available devices")
    if -1 in shape:
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise MeshError(f"mesh {tuple(shape)} uses {math.prod(shape)} devices but {n} are "
                        "available; use -1 for one axis to take the rest")
    # Auto axes: shardings are given at the jit boundary and XLA (GSPMD) propagates
    # them inside, as MaxText/T5X do; no per-op sharding annotations needed in the model.
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_batch_fits(mesh, global_batch_size: int, microbatches: int) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_micro = global_batch_size // microbatches
    if per_micro % shards:
        raise MeshError(
            f"the batch per microbatch ({global_batch_size} / {microbatches} microbatches = "
            f"{per_micro}) is not divisible by data×fsdp = {shards} batch shards")
    if global_batch_size % jax.process_count():
        raise MeshError(f"global_batch_size={global_batch_size} is not divisible by "
                        f"{jax.process_count()} processes")


def check_shard_local_nesting(mesh, ffn_nest_blocks: int) -> None:
    """Under tensor parallelism every tensor shard must hold whole nesting blocks, or the
    small granularities would sit on the first shards only (idle chips, no speed-up)."""
    tensor = mesh.shape["tensor"]
    if tensor > 1 and ffn_nest_blocks % tensor:
        raise MeshError(
            f"tensor parallelism over {tensor} shards needs ModelConfig.ffn_nest_blocks to be "
            f"a multiple of {tensor} (it is {ffn_nest_blocks}): with one plain prefix the "
            "small granularities would live on the first shards only")


def param_shardings(logical_specs, abstract_params, mesh, rules=DEFAULT_RULES):
    """NamedShardings for a parameter tree from its logical PartitionSpecs."""
    mesh_specs = logical_to_mesh_specs(logical_specs, rules)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
                        mesh_specs, abstract_params,
                        is_leaf=lambda s: isinstance(s, P))


BATCH_AXES = ("activation_batch", "activation_length")


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """[B, T] batches by the rule table: rows over data×fsdp, positions unsharded."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, rules))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh, sharding: NamedSharding | None = None) -> dict:
    """Assembles this process's rows into global arrays sharded over data×fsdp
    (`sharding`: the family's batch sharding, `train_step.batch_sharding_of`; default the
    LM's [B, T] one)."""
    sharding = sharding or batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
