"""MatLM: the decoder-only MatFormer language model (Flax Linen).

`MatLM(config).apply(params, tokens, widths=...)` runs one submodel:
- `widths=None`: the full model (every layer at its stored width);
- `widths=(m_0, ..., m_{L-1})` python ints: static widths, kernels sliced (training,
  exported submodels);
- `widths=jnp.array([...], int32)` traced: masked FFNs, so one compiled function
  evaluates any Mix'n'Match width vector;
- `joint_widths=(widths_0, widths_1, ...)`: several static-width submodels in one pass,
  a tuple of logits, sharing the layers where their inputs agree (the joint training
  objective; matlm.model.streams).

Layers are unrolled (`params["layer_{i}"]`) or, with `ModelConfig.scan_layers`, stacked
and scanned: compile time and HLO size then stay flat in depth.

Scanned layers. The L blocks' parameters live in one tree, `params["layers"]`, each leaf
with a leading axis of size L (logical axis "layers", replicated). They are created once
by vmapping Block's init over L rngs, and the decoder then runs *functionally*: groups of
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

from matlm.model.config import ModelConfig
from matlm.model.attention import make_attention_mask
from matlm.model.layers import Block, RMSNorm, _param, rope_tables
from matlm.model.head import head_logits
from matlm.model.streams import stream_plan
from matlm.sharding import constrain

# The stacked parameters of scanned layers: params[LAYERS], leading logical axis LAYERS.
LAYERS = "layers"

_REMAT_POLICIES = {
    "full": None,  # Recompute everything in the backward pass.
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
    # Keeps the projection and FFN matmul outputs ([tokens, features], no batch dims) and
    # recomputes attention's batched score/mixing einsums: dots_saveable's saved score
    # blocks ([B, H, T, S] per layer and granularity) are what overflows HBM at T = 2048.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class MatLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None,
                 widths: Sequence[int] | jax.Array | None = None,
                 joint_widths: Sequence[Sequence[int]] | None = None,
                 return_hidden: bool = False, kv_cache=None):
        """Returns float32 logits [B, T, vocab]; with `joint_widths` (static width vectors
        of several submodels), a tuple of them, one per submodel, computed over shared
        residual streams (matlm.model.streams). `return_hidden`: the final-normed hidden
        states [B, T, D] instead of logits, for a loss that applies the head
        (`matlm.model.head.head_logits`) in chunks.

        `kv_cache = (keys, values, lengths_B)` (cached decoding; the public interface is
        matlm.decoding.kv_cache): per-layer [B, S, K, E] caches whose row b holds
        lengths_B[b] valid positions. The T tokens then sit at positions lengths_B[b] +
        [0, T), each attending to its row's cache positions up to its own, and the result
        is (logits, (keys, values) with the T tokens written). Unrolled layers only."""
        if kv_cache is not None:
            return self._cached(tokens_BT, widths, kv_cache)
        cfg = self.config
        B, T = tokens_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        traced = widths is not None and not isinstance(widths, (tuple, list))
        if widths is not None and not traced and len(widths) != cfg.n_layers:
            raise ValueError(f"{len(widths)} widths for {cfg.n_layers} layers")
        if joint_widths is not None and widths is not None:
            raise ValueError("pass widths (one submodel) or joint_widths (several), not both")

        embedding_VD = _param(self, "embedding", (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"), nn.initializers.normal(stddev=1.0))
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        # Rows over the batch shards, embed whole (the table itself is split over fsdp).
        x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
        # Shared by every layer: computed once per forward.
        bias_BTT = make_attention_mask(segment_ids_BT, cfg)  # An opaque AttentionMask pytree.
        rope = rope_tables(positions_BT, cfg.head_size, cfg.rope_theta)

        if cfg.scan_layers:
            streams, final_members = _scanned_decoder(self, x_BTD, rope, bias_BTT, widths,
                                                      traced, joint_widths)
        else:
            streams, final_members = _unrolled_decoder(self, x_BTD, rope, bias_BTT, widths,
                                                       traced, joint_widths)

        # ---- The head: final norm and logits of each final stream. ----
        final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
        if cfg.tie_embeddings:
            table = embedding_VD
        else:
            table = _param(self, "unembedding", (cfg.d_model, cfg.vocab_size),
                           ("embed", "vocab"), nn.initializers.normal(cfg.d_model ** -0.5))

        def head(x_BTD):
            if return_hidden:  # The loss applies the head itself, in chunks.
                return final_norm(x_BTD)
            return head_logits(cfg, table, final_norm(x_BTD))

        if final_members is None:
            return head(streams[0])
        by_submodel = {}
        for x, members in zip(streams, final_members, strict=True):
            stream_out = head(x)  # Identical width vectors share one stream.
            by_submodel.update((m, stream_out) for m in members)
        return tuple(by_submodel[m] for m in range(len(joint_widths)))

    def _cached(self, tokens_BT, widths, kv_cache):
        """The kv_cache form of __call__: the same parameters and modules as the unrolled
        decoder (no remat: inference), attention against the cache."""
        cfg = self.config
        if cfg.scan_layers:
            raise ValueError("cached decoding runs unrolled layers: unstack the parameters "
                             "(matlm.model.layout.unstack_layers) and set scan_layers=False "
                             "(matlm.decoding.kv_cache.extend does both)")
        keys, values, lengths_B = kv_cache
        B, T = tokens_BT.shape
        S = keys[0].shape[1]
        traced = widths is not None and not isinstance(widths, (tuple, list))
        if widths is not None and not traced and len(widths) != cfg.n_layers:
            raise ValueError(f"{len(widths)} widths for {cfg.n_layers} layers")
        positions_BT = lengths_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)
        # Token t of row b sees cache positions <= its own: the row's past and the new
        # tokens up to t. Positions past the row's length hold stale entries (rewound or
        # never written) and stay masked until overwritten.
        allowed_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
        bias_BTS = jnp.where(allowed_BTS, 0.0, -1e30).astype(jnp.float32)
        # The table covers every position a caller may pass (lengths_B[b] + T - 1 < S + T).
        rope = rope_tables(positions_BT, cfg.head_size, cfg.rope_theta, table_len=S + T)

        embedding_VD = _param(self, "embedding", (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"), nn.initializers.normal(stddev=1.0))
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        new_keys, new_values = [], []
        for i, d_ff in enumerate(cfg.ffn_dims):
            static = None if widths is None or traced else int(widths[i])
            block = Block(cfg, d_ff=d_ff, static_width=static, name=f"layer_{i}")
            x_BTD, (k_BSKE, v_BSKE) = block(x_BTD, rope, bias_BTS,
                                            widths[i] if traced else None,
                                            cache=(keys[i], values[i], positions_BT))
            new_keys.append(k_BSKE)
            new_values.append(v_BSKE)
        final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
        table = embedding_VD if cfg.tie_embeddings else _param(
            self, "unembedding", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
            nn.initializers.normal(cfg.d_model ** -0.5))
        return head_logits(cfg, table, final_norm(x_BTD)), (tuple(new_keys), tuple(new_values))


def _unrolled_decoder(module: MatLM, x_BTD, rope, mask, widths, traced, joint_widths):
    """Runs layers `layer_0 .. layer_{L-1}` one by one: (final streams, submodels each
    carries or None)."""
    cfg = module.config
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


def _scanned_decoder(module: MatLM, x_BTD, rope, mask, widths, traced, joint_widths):
    """Runs the stacked layers `params["layers"]` in scanned groups (module docstring):
    (final streams, submodels each carries or None)."""
    cfg = module.config
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


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Real (unboxed) parameters; the logical axis names stay available via
    `abstract_params`."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.meta.unbox(MatLM(config).init(rng, tokens)["params"])


def abstract_params(config: ModelConfig, seq_len: int = 8):
    """Parameter shapes with their logical partitioning metadata, without allocating."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda r: MatLM(config).init(r, tokens), jax.random.key(0))["params"]


def logical_axes(config: ModelConfig):
    """A pytree of logical axis-name tuples, one per parameter."""
    return nn.get_partition_spec(abstract_params(config))
