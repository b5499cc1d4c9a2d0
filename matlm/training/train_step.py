"""The train state, and the pure, jitted train and eval steps with explicit shardings.

The model is the one `model_config`'s family builds (matlm.model.families), never a
class named here."""
from __future__ import annotations

from typing import Any

import functools

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from matlm.model import ModelConfig, abstract_params, build_model, init_params, logical_axes
from matlm.model.families import family_of
from matlm.training import mesh as mesh_lib
from matlm.sharding import activation_sharding
from matlm.training.objective import Objective, hidden_loss, joint_loss, loss_head


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: the number of optimizer updates applied.
    params: Any
    opt_state: Any


def state_shardings(model_config: ModelConfig, optimizer, mesh) -> TrainState:
    """Shardings of every leaf of the train state: parameters by the rule table,
    optimizer moments like their parameters, scalars replicated."""
    shapes = flax.linen.meta.unbox(abstract_params(model_config))
    params = mesh_lib.param_shardings(logical_axes(model_config), shapes, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, params,
                                transform_non_params=lambda _: mesh_lib.replicated(mesh),
                                is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=mesh_lib.replicated(mesh), params=params, opt_state=opt)


def abstract_state(model_config: ModelConfig, optimizer, mesh) -> TrainState:
    """ShapeDtypeStructs with shardings: the target to restore a checkpoint onto."""
    shardings = state_shardings(model_config, optimizer, mesh)
    shapes = jax.eval_shape(lambda: init_state_fn(model_config, optimizer)(jax.random.key(0)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)


def init_state_fn(model_config: ModelConfig, optimizer):
    def init(rng):
        params = init_params(model_config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))
    return init


def init_state(model_config: ModelConfig, optimizer, mesh, seed: int) -> TrainState:
    """A freshly initialised state, created directly in its shardings."""
    shardings = state_shardings(model_config, optimizer, mesh)
    init = jax.jit(init_state_fn(model_config, optimizer), out_shardings=shardings)
    return init(jax.random.key(seed))


def traced_in_mesh(fn, mesh):
    """`fn`, traced with `mesh` in context: the model's activation sharding constraints
    (matlm.sharding.constrain) pin to it, and code that asks which mesh and platform it is
    compiled for (`jax.sharding.get_abstract_mesh()`: attention picks splash for a TPU
    mesh and runs it per shard) sees it. jit traces on the first call (or `.lower`),
    inside; `jax.set_mesh` itself is refused inside a trace, its abstract mesh is not."""
    @functools.wraps(fn)
    def wrapped(*args):
        with activation_sharding(mesh), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return wrapped


def _split_microbatches(batch, n: int):
    """[B, T] → [n, B/n, T], taking every n-th row so each microbatch stays spread over
    all batch shards (a contiguous split would put a microbatch on a few devices)."""
    def split(x):
        B = x.shape[0]
        return x.reshape(B // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def batch_sharding_of(model_config, mesh) -> NamedSharding:
    """The sharding of every array of the family's batches: the LM's [B, T] rows over
    data×fsdp (`mesh.batch_sharding`); a family without token batches (the ViT's images
    [B, H, W, C], labels and mask [B]) shards only the leading example axis, the same
    way, whatever each array's rank."""
    sharding = mesh_lib.batch_sharding(mesh)
    if family_of(model_config).tokens:
        return sharding
    return NamedSharding(mesh, P(sharding.spec[0]))


def make_train_step(model_config: ModelConfig, objective: Objective, optimizer, schedule,
                    mesh, microbatches: int = 1, donate: bool = True):
    """`train_step(state, batch) -> (state, metrics)`, jitted once with in/out shardings.

    metrics: `loss` (the weighted objective), `ce` [g] (CE of each granularity, 0 where
    not trained this step), `kl` [g] (each student's distillation KL, 0 for the teacher,
    the untrained and without distillation), `trained` [g] (1 where trained), `grad_norm`, `param_norm`
    (after the update), `learning_rate`; the ViT family adds `acc` [g] (top-1 accuracy
    on the batch, 0 where not trained). The batch is the family's
    (`batch_sharding_of`).
    """
    model = build_model(model_config)
    metric_names = loss_head(model_config).metrics
    shardings = state_shardings(model_config, optimizer, mesh)

    def loss_and_grads(params, batch, indices):
        fn = lambda p, b: joint_loss(model, objective, p, b, indices)
        if microbatches == 1:
            return jax.value_and_grad(fn, has_aux=True)(params, batch)

        def accumulate(carry, micro):
            (loss, per_granularity), grads = jax.value_and_grad(fn, has_aux=True)(params, micro)
            return jax.tree.map(jnp.add, carry, (loss, per_granularity, grads)), None

        g = len(objective.names)
        init = (jnp.zeros((), jnp.float32), tuple(jnp.zeros((g,)) for _ in metric_names),
                jax.tree.map(jnp.zeros_like, params))
        (loss, per_granularity, grads), _ = jax.lax.scan(
            accumulate, init, _split_microbatches(batch, microbatches))
        scale = lambda x: x * (1.0 / microbatches)
        return (scale(loss), jax.tree.map(scale, per_granularity)), jax.tree.map(scale, grads)

    def train_step(state: TrainState, batch):
        indices = objective.indices(state.step)
        (loss, per_granularity), grads = loss_and_grads(state.params, batch, indices)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        trained_G = jnp.zeros((len(objective.names),), jnp.float32).at[indices].set(1.0)
        metrics = {"loss": loss, **dict(zip(metric_names, per_granularity)),
                   "trained": trained_G,
                   "grad_norm": optax.tree.norm(grads),
                   # Also guards checkpoints: a non-finite update is caught before saving.
                   "param_norm": optax.tree.norm(params),
                   "learning_rate": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(traced_in_mesh(train_step, mesh),
                   in_shardings=(shardings, batch_sharding_of(model_config, mesh)),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def make_eval_step(model_config: ModelConfig, widths_by_name: dict, mesh, loss_chunk: int = 0):
    """`eval_step(params, batch) -> {name: (sum CE, count)}` for every submodel;
    cross entropy in sequence chunks of `loss_chunk` positions (0: at once). Counts are
    tokens for the LM; for the ViT they are (real, mask 1) examples, and every submodel
    also has `{name}/top1: (correct predictions, count)`."""
    if not family_of(model_config).tokens:
        return _make_vit_eval_step(model_config, widths_by_name, mesh)
    model = build_model(model_config)

    names = list(widths_by_name)

    def eval_step(params, batch):
        # One pass over shared residual streams (matlm.model.streams), as in training.
        hidden = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                             batch["positions"], joint_widths=[widths_by_name[n] for n in names],
                             return_hidden=True)
        count = batch["loss_mask"].sum()
        out = {}
        for name, submodel_hidden in zip(names, hidden):
            _, ce = hidden_loss(model_config, params, submodel_hidden, batch, 0.0, loss_chunk)
            out[name] = (ce * count, count)
        return out

    return jax.jit(traced_in_mesh(eval_step, mesh),
                   in_shardings=(None, mesh_lib.batch_sharding(mesh)),
                   out_shardings=mesh_lib.replicated(mesh))


def _make_vit_eval_step(model_config, widths_by_name: dict, mesh):
    """The ViT's eval step: the summed classification loss (the one it trains with) and
    top-1 hits over the real examples, per submodel, from one joint pass over shared
    streams."""
    from matlm.training.vit_objective import classification_losses, top1_correct
    model = build_model(model_config)
    names = list(widths_by_name)

    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch["images"],
                             joint_widths=[widths_by_name[n] for n in names])
        mask_B = batch["mask"]
        count = mask_B.sum()
        out = {}
        for name, logits_BK in zip(names, logits):
            loss_B, _ = classification_losses(model_config, logits_BK,
                                              {"labels": batch["labels"]})
            out[name] = ((loss_B * mask_B).sum(), count)
            out[f"{name}/top1"] = ((top1_correct(logits_BK, batch["labels"]) * mask_B).sum(),
                                   count)
        return out

    return jax.jit(traced_in_mesh(eval_step, mesh),
                   in_shardings=(None, batch_sharding_of(model_config, mesh)),
                   out_shardings=mesh_lib.replicated(mesh))
