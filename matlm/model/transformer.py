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
Layers are unrolled (not scanned): Mix'n'Match widths differ per layer, and static
slices of different sizes cannot share one scanned body.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from matlm.model.config import ModelConfig
from matlm.model.attention import make_attention_mask
from matlm.model.layers import Block, RMSNorm, _param, rope_tables
from matlm.model.streams import stream_plan

_REMAT_POLICIES = {
    "full": None,  # Recompute everything in the backward pass.
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
}


class MatLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None,
                 widths: Sequence[int] | jax.Array | None = None,
                 joint_widths: Sequence[Sequence[int]] | None = None):
        """Returns float32 logits [B, T, vocab]; with `joint_widths` (static width vectors
        of several submodels), a tuple of them, one per submodel, computed over shared
        residual streams (matlm.model.streams)."""
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
        # Shared by every layer: computed once per forward.
        bias_BTT = make_attention_mask(segment_ids_BT, cfg)  # An opaque AttentionMask pytree.
        rope = rope_tables(positions_BT, cfg.head_size, cfg.rope_theta)

        block_cls = Block
        if cfg.remat_policy != "none":
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy])
        if joint_widths is None:
            for i, d_ff in enumerate(cfg.ffn_dims):
                static = None if widths is None or traced else int(widths[i])
                block = block_cls(cfg, d_ff=d_ff, static_width=static, name=f"layer_{i}")
                x_BTD = block(x_BTD, rope, bias_BTT, widths[i] if traced else None)
            streams, final_members = (x_BTD,), None
        else:
            layers, final_members = stream_plan(joint_widths)
            if len(layers) != cfg.n_layers:
                raise ValueError(f"{len(layers)} widths for {cfg.n_layers} layers")
            streams = (x_BTD,)
            for i, (d_ff, plan) in enumerate(zip(cfg.ffn_dims, layers)):
                block = block_cls(cfg, d_ff=d_ff, stream_widths=tuple(w for _, w in plan),
                                  name=f"layer_{i}")
                streams = tuple(x for split in block(streams, rope, bias_BTT) for x in split)

        final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
        dtype = jnp.dtype(cfg.compute_dtype)
        if cfg.tie_embeddings:
            table = embedding_VD
        else:
            table = _param(self, "unembedding", (cfg.d_model, cfg.vocab_size),
                           ("embed", "vocab"), nn.initializers.normal(cfg.d_model ** -0.5))

        def logits(x_BTD):
            # Flattened tokens: 2-D matmuls are much faster in XLA:CPU's backward pass.
            x_ND = final_norm(x_BTD).astype(dtype).reshape(B * T, cfg.d_model)
            if cfg.tie_embeddings:
                # Contract against the [V, D] table directly (no transposed copy), scaled
                # so logits start O(1) with unit-variance embeddings; the scale is applied
                # to the [N, D] input, V/D times fewer multiplies than on the [N, V] logits.
                x_ND = x_ND * jnp.asarray(cfg.d_model ** -0.5, dtype)
                logits_NV = jnp.einsum("nd,vd->nv", x_ND, table.astype(dtype))
            else:
                logits_NV = x_ND @ table.astype(dtype)
            return logits_NV.reshape(B, T, cfg.vocab_size).astype(jnp.float32)

        if final_members is None:
            return logits(streams[0])
        by_submodel = {}
        for x, members in zip(streams, final_members, strict=True):
            stream_logits = logits(x)  # Identical width vectors share one stream.
            by_submodel.update((m, stream_logits) for m in members)
        return tuple(by_submodel[m] for m in range(len(joint_widths)))


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
