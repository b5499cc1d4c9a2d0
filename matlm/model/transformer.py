"""MatLM: the decoder-only MatFormer language model (Flax Linen), the "lm" family.

A thin family on the shared body: token embedding (+ position encoding) -> the nested
stack (matlm.model.nested_stack: scanned groups, shared streams, static and traced
widths) under a causal mask -> final norm and the vocabulary head.

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
and scanned (matlm.model.nested_stack explains how every call form shares them).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from matlm.model.config import ModelConfig
from matlm.model.attention import decode_mask, make_attention_mask
from matlm.model.layers import RMSNorm, _param, rope_tables
from matlm.model.head import head_logits
from matlm.model.nested_stack import (LAYERS, outputs_per_submodel,  # noqa: F401
                                       run_cached_stack, run_stack)
from matlm.sharding import constrain


class MatLM(nn.Module):
    config: ModelConfig
    # An LM's attention is causal; a subclass may say otherwise (a bidirectional encoder
    # over the same embedding and head), the mask carries it to every kernel.
    causal: ClassVar[bool] = True

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

        embedding_VD, x_BTD, rope = self._embed(tokens_BT, positions_BT, table_len=T)
        # Rows over the batch shards, embed whole (the table itself is split over fsdp).
        x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
        # Shared by every layer, computed once per forward.
        mask = make_attention_mask(segment_ids_BT, cfg, causal=self.causal)
        streams, final_members = run_stack(self, cfg, x_BTD, rope, mask, widths, joint_widths)

        # ---- The head: final norm and logits of each final stream. ----
        final_norm, table = self._head_params(embedding_VD)

        def head(x_BTD):
            if return_hidden:  # The loss applies the head itself, in chunks.
                return final_norm(x_BTD)
            return head_logits(cfg, table, final_norm(x_BTD))

        return outputs_per_submodel(streams, final_members, len(joint_widths or ()), head)

    def _embed(self, tokens_BT, positions_BT, table_len: int):
        """(token table, token embeddings [B, T, D], RoPE tables or None): positions enter
        as `config.position_encoding` says, rotary tables over [0, table_len) or a
        learned [max_positions, D] table added here."""
        cfg = self.config
        embedding_VD = _param(self, "embedding", (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"), nn.initializers.normal(stddev=1.0))
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        if cfg.position_encoding == "rope":
            return embedding_VD, x_BTD, rope_tables(positions_BT, cfg.head_size, cfg.rope_theta,
                                                    table_len=table_len)
        if cfg.position_encoding == "learned":
            if tokens_BT.shape[1] > cfg.max_positions:
                raise ValueError(f"{tokens_BT.shape[1]} positions exceed the learned position "
                                 f"table (ModelConfig.max_positions={cfg.max_positions})")
            # Small, like GPT-2's: the token table (unit variance) dominates at init.
            position_PD = _param(self, "position_embedding", (cfg.max_positions, cfg.d_model),
                                 ("length", "embed"), nn.initializers.normal(stddev=0.02))
            x_BTD = x_BTD + jnp.take(position_PD, positions_BT, axis=0).astype(x_BTD.dtype)
        return embedding_VD, x_BTD, None

    def _head_params(self, embedding_VD):
        """(final norm, head table): the tied [V, D] embedding or a [D, V] unembedding."""
        cfg = self.config
        final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
        if cfg.tie_embeddings:
            return final_norm, embedding_VD
        return final_norm, _param(self, "unembedding", (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"), nn.initializers.normal(cfg.d_model ** -0.5))

    def _cached(self, tokens_BT, widths, kv_cache):
        """The kv_cache form of __call__: the same parameters and modules as the unrolled
        stack, attention against the cache."""
        keys, values, lengths_B = kv_cache
        T, S = tokens_BT.shape[1], keys[0].shape[1]
        positions_BT = lengths_B[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)
        # Token t of row b sees cache positions <= its own: the row's past and the new
        # tokens up to t (the mask's definition of causal, matlm.model.attention).
        mask = decode_mask(positions_BT, S)
        # The tables cover every position a caller may pass (lengths_B[b] + T - 1 < S + T).
        embedding_VD, x_BTD, rope = self._embed(tokens_BT, positions_BT, table_len=S + T)
        x_BTD, new_keys, new_values = run_cached_stack(self, self.config, x_BTD, rope, mask,
                                                       widths, keys, values, positions_BT)
        final_norm, table = self._head_params(embedding_VD)
        return head_logits(self.config, table, final_norm(x_BTD)), (new_keys, new_values)
