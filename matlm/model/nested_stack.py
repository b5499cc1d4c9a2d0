"""The nested-layer stack every family shares: L pre-norm blocks with nested FFNs, run
unrolled or scanned, at static, traced or several (joint) widths.

`run_stack(module, config, x_BTD, rope, mask, widths=..., joint_widths=...)` runs the
blocks of the parent Flax `module` (a family's model: MatLM today, an encoder next) and
returns (final residual streams, the submodels each carries or None). It creates the
parameters in the parent's own scope, `params["layer_{i}"]` (unrolled) or
`params["layers"]` (scanned), so a family's parameter tree is its own entries (embeddings,
head) plus these: the names every checkpoint already has. A function rather than a
submodule for that reason (a submodule would add a level to every name). What the
family decides is passed in: the mask (causal or not, matlm.model.attention) and the RoPE
tables (or None); the stack itself reads only the body config (`config.body`).

Width forms (the model's `widths=`):
- None: the full model (every layer at its stored width);
- python ints, one per layer: static widths, kernels sliced;
- a traced int32 [L] array: masked FFNs, one compiled function for any width vector;
- `joint_widths`: several static-width submodels over shared residual streams
  (matlm.model.streams).

Scanned layers. The L blocks' parameters live in one tree, `params["layers"]`, each leaf
with a leading axis of size L (logical axis "layers", replicated). They are created once
by vmapping Block's init over L rngs, and the stack then runs *functionally*: groups of
consecutive layers that execute the same code run as one `jax.lax.scan` of
`Block(...).apply({"params": layer_slice}, ...)` over their slice of the stack. One
stacked tree and functional groups (rather than `nn.scan`, whose body is one module with
one static configuration) are what let every call form share the same parameters:
- `widths=None`, uniform static widths (S/M/L/XL, and each `lax.switch` branch of the
  sampled objective): one group, one scan over all L layers;
- static Mix'n'Match vectors: one group per run of equal widths (static slices of
  different sizes cannot share a scan body); an all-distinct vector is L single calls;
- traced widths: one scan, the [L] width array a scan input (the masked path);
- `joint_widths`: one group per run of layers with the same stream plan, the carry the
  tuple of residual streams; S/M/L/XL is [layer 0 (shared, splits into 4)] + a scan
  over layers 1..L-1.
The remat policy wraps the scanned body (`jax.checkpoint`), as `nn.remat` wraps each
unrolled block. Parameters initialise differently from the unrolled form (other rngs);
`matlm.model.layout.stack_layers` / `unstack_layers` convert trained parameters.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from matlm.model.config import BodyConfig
from matlm.model.layers import Block
# The stacked parameters of scanned layers: params[LAYERS], leading logical axis LAYERS.
from matlm.model.layout import LAYERS
from matlm.model.streams import stream_plan

_REMAT_POLICIES = {
    "full": None,  # Recompute everything in the backward pass.
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    # Keeps the projection and FFN matmul outputs ([tokens, features], no batch dims) and
    # recomputes attention's batched score/mixing einsums: dots_saveable's saved score
    # blocks ([B, H, T, S] per layer and granularity) are what overflows HBM at T = 2048.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def is_traced(widths) -> bool:
    """Whether `widths` is a traced width array (else None or static ints)."""
    return widths is not None and not isinstance(widths, (tuple, list))


def check_widths(config: BodyConfig, widths, joint_widths=None) -> None:
    """A ValueError for a static width vector of the wrong length, or both forms."""
    if widths is not None and not is_traced(widths) and len(widths) != config.n_layers:
        raise ValueError(f"{len(widths)} widths for {config.n_layers} layers")
    if joint_widths is not None and widths is not None:
        raise ValueError("pass widths (one submodel) or joint_widths (several), not both")


def run_stack(module: nn.Module, config: BodyConfig, x_BTD, rope, mask,
              widths: Sequence[int] | jax.Array | None = None,
              joint_widths: Sequence[Sequence[int]] | None = None):
    """The blocks of `module` over x_BTD: (final streams, submodels each carries or None;
    None for one submodel, whose stream is streams[0])."""
    body = config.body
    check_widths(body, widths, joint_widths)
    run = _scanned if body.scan_layers else _unrolled
    return run(module, body, x_BTD, rope, mask, widths, is_traced(widths), joint_widths)


def outputs_per_submodel(streams, final_members, n_submodels: int, head):
    """`head` of each stream that `run_stack` returned, as one output per submodel of a
    joint pass (`final_members[i]`: the submodels stream i carries; identical width vectors
    share one stream, so its head runs once); a single pass (`final_members` None) gives
    the head of its one stream."""
    if final_members is None:
        return head(streams[0])
    by_submodel = {}
    for x, members in zip(streams, final_members, strict=True):
        stream_out = head(x)
        by_submodel.update((m, stream_out) for m in members)
    return tuple(by_submodel[m] for m in range(n_submodels))


def run_cached_stack(module: nn.Module, config: BodyConfig, x_BTD, rope, mask, widths,
                     keys, values, positions_BT):
    """The unrolled blocks of `module` against per-layer KV caches (cached decoding; no
    remat: inference): (output, new keys, new values). The new tokens' keys and values are
    written at `positions_BT`; `mask` is their attention.decode_mask."""
    body = config.body
    if body.scan_layers:
        raise ValueError("cached decoding runs unrolled layers: unstack the parameters "
                         "(matlm.model.layout.unstack_layers) and set scan_layers=False "
                         "(matlm.decoding.kv_cache.extend does both)")
    check_widths(body, widths)
    traced = is_traced(widths)
    new_keys, new_values = [], []
    for i, d_ff in enumerate(body.ffn_dims):
        static = None if widths is None or traced else int(widths[i])
        block = Block(body, d_ff=d_ff, static_width=static, parent=module, name=f"layer_{i}")
        x_BTD, (k_BSKE, v_BSKE) = block(x_BTD, rope, mask, widths[i] if traced else None,
                                        cache=(keys[i], values[i], positions_BT))
        new_keys.append(k_BSKE)
        new_values.append(v_BSKE)
    return x_BTD, tuple(new_keys), tuple(new_values)


def _unrolled(module: nn.Module, cfg: BodyConfig, x_BTD, rope, mask, widths, traced,
              joint_widths):
    """Runs layers `layer_0 .. layer_{L-1}` one by one: (final streams, submodels each
    carries or None)."""
    block_cls = Block
    if cfg.remat_policy != "none":
        block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy])
    if joint_widths is None:
        for i, d_ff in enumerate(cfg.ffn_dims):
            static = None if widths is None or traced else int(widths[i])
            block = block_cls(cfg, d_ff=d_ff, static_width=static, parent=module,
                              name=f"layer_{i}")
            x_BTD = block(x_BTD, rope, mask, widths[i] if traced else None)
        return (x_BTD,), None
    layers, final_members = stream_plan(joint_widths)
    if len(layers) != cfg.n_layers:
        raise ValueError(f"{len(layers)} widths for {cfg.n_layers} layers")
    streams = (x_BTD,)
    for i, (d_ff, plan) in enumerate(zip(cfg.ffn_dims, layers)):
        block = block_cls(cfg, d_ff=d_ff, stream_widths=tuple(w for _, w in plan),
                          parent=module, name=f"layer_{i}")
        streams = tuple(x for split in block(streams, rope, mask) for x in split)
    return streams, final_members


def _layer_groups(keys) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive equal keys: the layers one scan can run."""
    groups, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            groups.append((start, i))
            start = i
    return groups


def _scanned(module: nn.Module, cfg: BodyConfig, x_BTD, rope, mask, widths, traced,
             joint_widths):
    """Runs the stacked layers `params["layers"]` in scanned groups (module docstring):
    (final streams, submodels each carries or None)."""
    L, d_ff = cfg.n_layers, cfg.d_ff  # Config validation: every layer stores d_ff.

    def init_stacked(rng):
        # Block's own init, vmapped over L rngs: boxed leaves with a leading L axis, to
        # which the logical axis name is added. Shapes do not depend on the inputs; the
        # discarded forward pass of init is dead code under jit / eval_shape.
        init_one = lambda r: Block(cfg, d_ff=d_ff, parent=None).init(r, x_BTD, rope, mask)
        boxed = jax.vmap(init_one)(jax.random.split(rng, L))["params"]
        return jax.tree.map(lambda box: box.replace(names=(LAYERS,) + tuple(box.names)),
                            boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))

    stacked = module.param(LAYERS, init_stacked)
    policy = cfg.remat_policy

    def layer_fn(**block_kwargs):
        """(single-layer call, scan body) of one layer under the remat policy, each
        `(carry, layer params[, traced width]) -> carry`."""
        block = Block(cfg, d_ff=d_ff, parent=None, **block_kwargs)

        def apply(carry, params, traced_width=None):
            out = block.apply({"params": params}, carry, rope, mask, traced_width)
            if block.stream_widths is not None:  # Flatten the per-stream splits.
                out = tuple(x for split in out for x in split)
            return out
        if policy == "none":
            return apply, apply
        checkpoint = lambda prevent_cse: jax.checkpoint(
            apply, policy=_REMAT_POLICIES[policy], prevent_cse=prevent_cse)
        # In a scan body prevent_cse=False: the loop already keeps XLA from merging the
        # recomputation into the forward pass (nn.remat's default guards unrolled layers).
        return checkpoint(True), checkpoint(False)

    def run_group(fns, carry, start, stop, xs=()):
        """Layers [start, stop) over their slice of the stack (one scan, or one plain call
        for a single layer)."""
        single, scan_body = fns
        if stop - start == 1:
            return single(carry, jax.tree.map(lambda a: a[start], stacked),
                          *(x[start] for x in xs))
        params = stacked if (start, stop) == (0, L) else jax.tree.map(
            lambda a: a[start:stop], stacked)
        xs = tuple(x[start:stop] for x in xs)
        carry, _ = jax.lax.scan(lambda c, p: (scan_body(c, *p), None), carry, (params,) + xs)
        return carry

    if joint_widths is None:
        if traced:
            widths_L = jnp.asarray(widths)
            if widths_L.shape != (L,):
                raise ValueError(f"traced widths of shape {widths_L.shape} for {L} layers; "
                                 f"pass one width per layer, shape ({L},)")
            return (run_group(layer_fn(), x_BTD, 0, L, (widths_L,)),), None
        keys = (None,) * L if widths is None else tuple(int(w) for w in widths)
        for start, stop in _layer_groups(keys):
            x_BTD = run_group(layer_fn(static_width=keys[start]), x_BTD, start, stop)
        return (x_BTD,), None

    layers, final_members = stream_plan(joint_widths)
    if len(layers) != L:
        raise ValueError(f"{len(layers)} widths for {L} layers")
    keys = [tuple(w for _, w in plan) for plan in layers]
    # A layer that splits a stream changes the carry's structure, so it runs alone; runs of
    # identical plans have one width per stream (a split changes the next layer's plan).
    keys = [k if all(len(w) == 1 for w in k) else (i, k) for i, k in enumerate(keys)]
    streams = (x_BTD,)
    for start, stop in _layer_groups(keys):
        stream_widths = tuple(w for _, w in layers[start])
        streams = run_group(layer_fn(stream_widths=stream_widths), streams, start, stop)
    return streams, final_members
