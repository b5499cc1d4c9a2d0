"""MatLM: the decoder-only MatFormer language model (Flax Linen).

`MatLM(config).apply(params, tokens, widths=...)` runs one submodel:
- `widths=None`: the full model (every layer at its stored width);
- `widths=(m_0, ..., m_{L-1})` python ints: static widths, kernels sliced (training,
  exported submodels);
- `widths=jnp.array([...], int32)` traced: masked FFNs, so one compiled function
  evaluates any Mix'n'Match width vector.
Layers are unrolled (not scanned): Mix'n'Match widths differ per layer, and static
slices of different sizes cannot share one scanned body.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from matlm.model.config import ModelConfig
from matlm.model.layers import Block, RMSNorm, _param, attention_bias, rope_tables

_REMAT_POLICIES = {
    "full": None,  # Recompute everything in the backward pass.
    "dots_saveable": jax.checkpoint_policies.checkpoint_dots,
}


class MatLM(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None,
                 widths: Sequence[int] | jax.Array | None = None):
        """Returns float32 logits [B, T, vocab]."""
        cfg = self.config
        B, T = tokens_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        traced = widths is not None and not isinstance(widths, (tuple, list))
        if widths is not None and not traced and len(widths) != cfg.n_layers:
            raise ValueError(f"{len(widths)} widths for {cfg.n_layers} layers")

        embedding_VD = _param(self, "embedding", (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"), nn.initializers.normal(stddev=1.0))
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        # Shared by every layer: computed once per forward.
        bias_BTT = attention_bias(segment_ids_BT)
        rope = rope_tables(positions_BT, cfg.head_size, cfg.rope_theta)

        block_cls = Block
        if cfg.remat_policy != "none":
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy])
        for i, d_ff in enumerate(cfg.ffn_dims):
            static = None if widths is None or traced else int(widths[i])
            block = block_cls(cfg, d_ff=d_ff, static_width=static, name=f"layer_{i}")
            x_BTD = block(x_BTD, rope, bias_BTT, widths[i] if traced else None)

        x_BTD = RMSNorm(cfg.norm_eps, name="final_norm")(x_BTD)
        dtype = jnp.dtype(cfg.compute_dtype)
        # Flattened tokens: 2-D matmuls are much faster in XLA:CPU's backward pass.
        x_ND = x_BTD.astype(dtype).reshape(B * T, cfg.d_model)
        if cfg.tie_embeddings:
            # Contract against the [V, D] table directly (no transposed copy), scaled so
            # logits start O(1) with unit-variance embeddings; the scale is applied to the
            # [N, D] input, V/D times fewer multiplies than on the [N, V] logits.
            x_ND = x_ND * jnp.asarray(cfg.d_model ** -0.5, dtype)
            logits_NV = jnp.einsum("nd,vd->nv", x_ND, embedding_VD.astype(dtype))
        else:
            out_DV = _param(self, "unembedding", (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"), nn.initializers.normal(cfg.d_model ** -0.5))
            logits_NV = x_ND @ out_DV.astype(dtype)
        return logits_NV.reshape(B, T, cfg.vocab_size).astype(jnp.float32)


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
