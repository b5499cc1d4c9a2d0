"""Logical-axis rules: the one table that maps parameter and activation axes to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (tensor/model parallel). Parameters name their
logical axes in `matlm.model.layers`; activations name theirs at a few points of the
forward pass with `constrain` (`activation_*` names); batches are placed by the same
table. This table decides where each goes.

Why activations need names of their own: a parameter's `embed` axis is sharded over
`fsdp` (its storage), but the activations' embed axis must stay whole while their batch
axis is split over data×fsdp. Left to propagation alone, XLA may follow the parameters
and keep activations split along embed with their batch gathered: a full-batch copy of
every activation per chip.
Note on nesting under tensor parallelism: a prefix slice of an `mlp` axis sharded
over `tensor` would put small granularities on the first shards only; the trainer
keeps nesting shard-local (see `matlm.model.layout`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

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
    # Activations and batches (matlm.sharding.constrain, matlm.training.mesh).
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

# The mesh and rules that `constrain` applies, set while a step is traced (see
# `activation_sharding`); None outside it, where `constrain` is the identity (single-device
# evaluation, tests, tracing without a mesh).
_ACTIVATION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar(
    "matlm_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Sequence = DEFAULT_RULES):
    """Within this context, `constrain` pins activations to `mesh` by `rules`. Wrap the
    *tracing* of a step (the first call of a jitted function, or `.lower`)."""
    token = _ACTIVATION_CONTEXT.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def current_rules() -> tuple:
    """The rules in force: those of the enclosing `activation_sharding`, else the default
    table. Code that places work by hand (splash attention's shard_map) reads them here,
    so that it follows the rules a step was traced with."""
    context = _ACTIVATION_CONTEXT.get()
    return DEFAULT_RULES if context is None else context[1]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its logical axis names (one per dimension), under
    `activation_sharding`; the identity elsewhere. Mesh axes that do not divide a
    dimension are dropped for it (a tiny model on a big mesh stays replicated there)."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    if len(logical_axes) != x.ndim:
        raise ValueError(f"{len(logical_axes)} logical axes {tuple(logical_axes)} for an "
                         f"array of shape {x.shape}")
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh)))


def fit_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (those stay replicated), so a
    tiny model still runs on a big mesh; real configs divide evenly."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def logical_to_mesh_specs(logical_tree, rules: Sequence = DEFAULT_RULES):
    """PartitionSpecs over mesh axes for a tree of logical PartitionSpecs."""
    return nn.logical_to_mesh(logical_tree, rules)

