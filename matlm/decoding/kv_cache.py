"""KV-cache decoding for any submodel: a fixed-shape cache, `extend` and `prefill`.

The cache holds, per layer, the keys and values of every position decoded so far:
`[B, S, K, E]` in the compute dtype, S a fixed cache length (a bucket: callers pick it
from a short list so that the jitted functions compile once per bucket, not per length),
and `lengths_B`, the number of valid positions of each row. Rows advance independently:

- `extend(params, config, cache, tokens_BK, widths)` runs K new tokens per row through the
  model (`build_model(config).apply(..., kv_cache=...)`, MatLM: its own modules, not a copy of
  the forward pass); row b's tokens take positions lengths_B[b] + [0, K), with RoPE at
  those absolute positions, and each attends to its row's positions up to its own.
- `prefill` is `extend` by a right-padded [B, T] prompt batch followed by a rewind to
  each row's true length: **right padding**, so every row's prompt starts at position 0
  (its RoPE positions are those of training) and the padding's keys are written past
  the row's length, where the mask ignores them and the next tokens overwrite them.
- `KVCache.rewind(lengths_B)` moves the lengths back (speculative decoding discards
  rejected draft tokens this way); nothing is erased.

Widths work as in `MatLM.apply`: None (the full model), a static tuple of per-layer ints
(kernels sliced) or a traced int32 [L] array (masked FFNs, one compile for any width
vector). Attention weights are shared by every width, so a draft submodel may `extend`
the target's own cache (the shared-attention-cache variant of speculative decoding).

Scanned parameters (`params["layers"]`) are unstacked on entry (layout.unstack_layers):
under jit the slicing is part of the compiled function; a loop that calls `extend` many
times should unstack once itself (matlm.decoding.generate does).

Overflow: the caller keeps `lengths_B + K <= S`. Past it, writes at positions >= S are
dropped (never clamped onto valid positions) and the logits of those tokens are
meaningless; earlier positions are never corrupted.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from matlm.model.config import ModelConfig
from matlm.model.layout import unstack_layers
from matlm.model.families import build_model


@flax.struct.dataclass
class KVCache:
    keys: tuple  # Per layer [B, S, K, E], compute dtype.
    values: tuple  # Per layer [B, S, K, E].
    lengths_B: jax.Array  # int32 [B]: the valid positions of each row.

    def rewind(self, lengths_B) -> "KVCache":
        """The cache with each row cut to its first `lengths_B[b]` positions (later ones
        are ignored by the mask, then overwritten)."""
        return self.replace(lengths_B=jnp.asarray(lengths_B, jnp.int32))

    @property
    def max_len(self) -> int:
        """S, the cache length."""
        return self.keys[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


def init_cache(config: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache of `max_len` positions for `batch_size` rows."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"a KV cache needs batch_size >= 1 and max_len >= 1, got "
                         f"batch_size={batch_size}, max_len={max_len}")
    shape = (batch_size, max_len, config.num_kv_heads, config.head_size)
    dtype = jnp.dtype(config.compute_dtype)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
                   lengths_B=jnp.zeros((batch_size,), jnp.int32))


def decoding_form(params, config: ModelConfig):
    """(params, config) in the unrolled layer form the cached path runs."""
    if config.scan_layers:
        config = dataclasses.replace(config, scan_layers=False)
    return unstack_layers(params), config


def extend(params, config: ModelConfig, cache: KVCache, tokens_BK, widths=None
           ) -> tuple[jax.Array, KVCache]:
    """Appends K tokens to every row: float32 logits [B, K, V] and the cache with
    lengths_B + K (module docstring). Pure and jittable with `config` (and static
    widths) static."""
    params, config = decoding_form(params, config)
    if isinstance(widths, list):
        widths = tuple(widths)
    tokens_BK = jnp.asarray(tokens_BK, jnp.int32)
    if tokens_BK.ndim != 2 or tokens_BK.shape[0] != cache.batch_size:
        raise ValueError(f"tokens must be [batch={cache.batch_size}, K], got shape "
                         f"{tokens_BK.shape}")
    logits_BKV, (keys, values) = build_model(config).apply(
        {"params": params}, tokens_BK, widths=widths,
        kv_cache=(cache.keys, cache.values, cache.lengths_B))
    return logits_BKV, KVCache(keys=keys, values=values,
                               lengths_B=cache.lengths_B + tokens_BK.shape[1])


def prefill(params, config: ModelConfig, cache: KVCache, tokens_BT, lengths_B, widths=None
            ) -> tuple[jax.Array, KVCache]:
    """Right-padded prompts [B, T] with true lengths `lengths_B`: logits [B, T, V] (row b's
    next-token logits are at lengths_B[b] - 1) and the cache holding each row's prompt
    (lengths: the cache's previous lengths + lengths_B, i.e. lengths_B for a fresh one)."""
    start_B = cache.lengths_B
    logits_BTV, cache = extend(params, config, cache, tokens_BT, widths)
    return logits_BTV, cache.rewind(start_B + jnp.asarray(lengths_B, jnp.int32))
