"""The output head: logits from final-normed hidden states, the one definition shared by
the model's forward pass and the chunked loss (matlm.training.objective).

With tied embeddings the head contracts against the [V, D] embedding table directly (no
transposed copy), scaled by d_model^-1/2 so logits start O(1) with unit-variance
embeddings; the scale rides on the [N, D] input, V/D times fewer multiplies than on the
[N, V] logits. Untied models have their own [D, V] `unembedding`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from matlm.model.config import ModelConfig
from matlm.sharding import constrain


def head_table(config: ModelConfig, params) -> jax.Array:
    """The head's weight: the [V, D] embedding (tied) or the [D, V] unembedding."""
    return params["embedding"] if config.tie_embeddings else params["unembedding"]


def head_logits(config: ModelConfig, table, x_xD) -> jax.Array:
    """float32 logits [..., V] of final-normed hidden states [..., D]."""
    dtype = jnp.dtype(config.compute_dtype)
    lead = x_xD.shape[:-1]
    # Flattened tokens: 2-D matmuls are much faster in XLA:CPU's backward pass.
    x_ND = x_xD.astype(dtype).reshape(-1, config.d_model)
    if config.tie_embeddings:
        x_ND = x_ND * jnp.asarray(config.d_model ** -0.5, dtype)
        logits_NV = jnp.einsum("nd,vd->nv", x_ND, table.astype(dtype))
    else:
        logits_NV = x_ND @ table.astype(dtype)
    # Tokens over the batch shards, vocab over tensor: never a whole [N, V] per chip.
    logits_NV = constrain(logits_NV, ("activation_batch", "activation_vocab"))
    return logits_NV.reshape(*lead, config.vocab_size).astype(jnp.float32)
