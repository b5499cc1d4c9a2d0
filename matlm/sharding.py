"""Logical-axis rules: the one table that maps parameter and activation axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (tensor/model parallel). Parameters name their
logical axes in `matlm.model.layers`; this table decides where each goes.
Note on nesting under tensor parallelism: a prefix slice of an `mlp` axis sharded
over `tensor` would put small granularities on the first shards only; the trainer
keeps nesting shard-local (see DESIGN.md).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # Stacked axis of scanned layers: each device holds every layer.
)


def logical_to_mesh_specs(logical_tree, rules: Sequence = DEFAULT_RULES):
    """PartitionSpecs over mesh axes for a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh(logical_tree, rules)


def named_shardings(logical_tree, mesh: jax.sharding.Mesh, rules: Sequence = DEFAULT_RULES):
    """NamedShardings on `mesh` for a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)
