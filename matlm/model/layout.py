"""Parameter layouts: unrolled vs stacked (scanned) layers, and where each nested FFN
hidden unit lives in the stored kernels.

Layers. Unrolled models (`ModelConfig.scan_layers=False`) store `params["layer_{i}"]`;
scanned ones store one tree `params["layers"]` whose leaves carry a leading axis of size
n_layers. `stack_layers` / `unstack_layers` convert parameters; `convert_layer_form`
converts any tree holding parameter-shaped subtrees (a whole checkpoint: parameters and
Adam moments) to the form a config wants. Exported and extracted models keep per-layer
parameters (unstack first): their layers may differ in width.

FFN units.
With `ffn_nest_blocks = N`, a layer's d_ff hidden units are stored as N equal blocks and
granularity m uses the first m/N units *of each block*. In nesting ("logical") order,
unit u lives at physical index (u mod N)·(d_ff/N) + u div N, so that the first m logical
units are exactly the units granularity m uses, and every tensor shard (holding whole
blocks) gets an equal share of every granularity.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

LAYERS = "layers"  # The stacked layers' key and logical axis (matlm.model.nested_stack).
_LAYER_KEY = re.compile(r"layer_(\d+)$")


def is_stacked(params) -> bool:
    """True for a parameter tree in the scanned form (`params["layers"]`)."""
    return LAYERS in params


def _layer_indices(params) -> list[int]:
    return sorted(int(m.group(1)) for k in params if (m := _LAYER_KEY.match(str(k))))


def stack_layers(params):
    """Unrolled `layer_0 .. layer_{L-1}` → one tree `layers` with a leading [L] axis on
    every leaf (the scanned form). Other entries are kept as they are."""
    if is_stacked(params):
        raise ValueError("these parameters are already stacked (they hold 'layers')")
    indices = _layer_indices(params)
    if indices != list(range(len(indices))) or not indices:
        raise ValueError(f"stack_layers needs layer_0 .. layer_(L-1), found layers {indices}")
    per_layer = [params[f"layer_{i}"] for i in indices]
    shapes = [jax.tree.map(np.shape, p) for p in per_layer]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("layers of different shapes (per-layer FFN widths, layer_d_ff) "
                         "cannot be stacked; keep such a model unrolled (scan_layers=False)")
    out = {k: v for k, v in params.items() if not _LAYER_KEY.match(str(k))}
    out[LAYERS] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params):
    """The scanned form's `layers` → `layer_0 .. layer_{L-1}` (the unrolled form); a tree
    already unrolled is returned unchanged."""
    if not is_stacked(params):
        return params
    stacked = params[LAYERS]
    n_layers = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if len(n_layers) != 1:
        raise ValueError(f"stacked layers disagree on the layer count: {sorted(n_layers)}")
    out = {k: v for k, v in params.items() if k != LAYERS}
    for i in range(n_layers.pop()):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def _is_params(node) -> bool:
    return isinstance(node, dict) and (LAYERS in node or "layer_0" in node)


def convert_layer_form(tree, config):
    """`tree` with every parameter-shaped subtree (parameters, Adam moments, gradients) in
    the layer form `config.scan_layers` asks for; e.g. to restore a checkpoint written by
    an unrolled run into a scanned one or back. Checks the layer count."""
    def convert(node):
        if not _is_params(node):
            return node
        node = unstack_layers(node)
        found = len(_layer_indices(node))
        if found != config.n_layers:
            raise ValueError(f"the parameters hold {found} layers but the config has "
                             f"n_layers={config.n_layers}")
        return stack_layers(node) if config.scan_layers else node
    return jax.tree.map(convert, tree, is_leaf=_is_params)


def logical_to_physical(d_ff: int, nest_blocks: int) -> np.ndarray:
    """perm[u] = the stored index of the u-th unit in nesting order."""
    u = np.arange(d_ff)
    return (u % nest_blocks) * (d_ff // nest_blocks) + u // nest_blocks


def ffn_to_contiguous(params, nest_blocks: int):
    """Reorders every layer's FFN kernels into nesting order (a plain prefix layout,
    `ffn_nest_blocks = 1`), e.g. to export or to compare with a dense model. Either
    layer form (stacked kernels carry a leading layer axis)."""
    if nest_blocks == 1:
        return params
    out = dict(params)
    for name, layer in params.items():
        if not (_LAYER_KEY.match(name) or name == LAYERS):
            continue
        lead = 1 if name == LAYERS else 0
        ffn = {}
        for kernel, w in layer["ffn"].items():
            axis = lead + (0 if kernel == "wo" else 1)
            perm = logical_to_physical(w.shape[axis], nest_blocks)
            ffn[kernel] = np.take(np.asarray(w), perm, axis=axis)
        out[name] = {**layer, "ffn": ffn}
    return out
