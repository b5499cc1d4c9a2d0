"""Batched generation with the KV cache: prefill, then decoding in compiled chunks.

`generate(params, config, prompts, ...)` returns each prompt's new tokens. How it runs:

- Prompts are grouped (length-sorted) into batches of `batch_size` rows (short batches
  padded with dummy rows), **right-padded** to a prompt bucket T and prefilled at once
  (matlm.decoding.kv_cache.prefill); every row starts at position 0.
- The cache length S is a bucket too, covering the longest prompt of the batch plus its
  new tokens. Buckets are powers of two from 32 (ending at `max_len`, the model's
  context, when given: `matlm.decoding.buckets`), so one compiled
  prefill serves every batch with the same (batch, T, S, widths form) and one compiled
  decode chunk every batch with the same (batch, S, widths form) — not one per length.
- Decoding runs `chunk_steps` tokens per compiled call (a `lax.scan` of one-token
  `extend` + sample), then hands the tokens to the host, which applies the stops in order
  (a stop id ends a row and is dropped; `max_new_tokens`; the caller's `stop_fn(row,
  new_tokens)` after every token) and streams them (`on_tokens(row, token_ids)`). A row
  that stopped mid-chunk costs at most chunk_steps - 1 discarded steps; the batch ends
  when every row has stopped. Fewer host round trips than one call per token (on a GPU,
  the per-token dispatch and copy would dominate a small model's step).
- Sampling (matlm.decoding.sampling): new token n of prompt i is drawn with key
  fold_in(fold_in(key(seed), i), n), so a prompt's output depends on the seed and the
  prompt, not on its batch or row. Greedy ignores the key.
- Context: with `max_len`, a prompt longer than it is a ValueError, and a row stops when
  the tokens the model would read (prompt + new tokens but the last) reach max_len.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matlm.decoding import kv_cache
from matlm.decoding.buckets import cache_buckets
from matlm.decoding.sampling import SamplingConfig, sample_rows
from matlm.model.config import ModelConfig

DEFAULT_CHUNK_STEPS = 8


class GenerateError(ValueError):
    """Bad generation input (a ValueError: the CLI prints it as one line)."""


def split_widths(widths, config: ModelConfig):
    """(static widths: None or a tuple of ints, traced widths: None or an int32 [L] array)
    of the `widths` MatLM.apply accepts."""
    if widths is None:
        return None, None
    if isinstance(widths, (tuple, list)):
        static = tuple(int(w) for w in widths)
        if len(static) != config.n_layers:
            raise GenerateError(f"widths: {len(static)} widths for {config.n_layers} layers")
        return static, None
    traced = jnp.asarray(widths, jnp.int32)
    if traced.shape != (config.n_layers,):
        raise GenerateError(f"widths: traced widths of shape {traced.shape} for "
                            f"{config.n_layers} layers; pass shape ({config.n_layers},)")
    return None, traced


def check_prompts(prompts, config: ModelConfig, max_new_tokens: int,
                  max_len: Optional[int]) -> list[list[int]]:
    """Prompts as lists of ints, after the checks every decoder shares (one-line errors)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise GenerateError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise GenerateError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerateError(f"prompt {i} is empty: a prompt needs at least one token "
                                "(the start id)")
        if max_len is not None and len(p) > max_len:
            raise GenerateError(f"prompt {i} has {len(p)} tokens, longer than the model's "
                                f"context of {max_len} tokens (shorten it)")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise GenerateError(f"prompt {i}: token id {bad[0]} outside the vocabulary "
                                f"[0, {config.vocab_size})")
    return prompts


def token_budgets(prompts, max_new_tokens: int, max_len: Optional[int]) -> list[int]:
    """Tokens each prompt may add: the model reads the prompt and every new token but the
    last, so with a context of max_len a prompt of n tokens may add max_len - n + 1."""
    return [max_new_tokens if max_len is None else min(max_new_tokens, max_len - len(p) + 1)
            for p in prompts]


def pad_prompts(prompts, rows: Sequence[int], batch_size: int, length: int):
    """The prompts `rows` right-padded into a batch: tokens [B, length] int32, lengths [B]
    and each row's prompt index [B] uint32 (its sampling key). Padding rows hold one
    token (never read) and index 0."""
    tokens_BT = np.zeros((batch_size, length), np.int32)
    lengths_B = np.ones(batch_size, np.int32)
    for b, i in enumerate(rows):
        tokens_BT[b, :len(prompts[i])] = prompts[i]
        lengths_B[b] = len(prompts[i])
    indices_B = np.array(list(rows) + [0] * (batch_size - len(rows)), np.uint32)
    return tokens_BT, lengths_B, indices_B


def take_tokens(i: int, tokens: Sequence[int], outputs: list, budget: int, stop_set,
                stop_fn: Optional[Callable[[int, list], bool]],
                on_tokens: Optional[Callable[[int, list], None]]) -> bool:
    """Appends prompt i's decoded `tokens` to outputs[i] one by one, stopping in order at
    a stop id (dropped), the budget, or the caller's stop_fn; streams what it kept to
    on_tokens. Returns whether the row is done. Plain and speculative decoding share it,
    so both stop at exactly the same token."""
    kept, done = [], False
    for t in tokens:
        if t in stop_set:
            done = True
            break
        outputs[i].append(t)
        kept.append(t)
        if len(outputs[i]) >= budget or (stop_fn is not None and stop_fn(i, list(outputs[i]))):
            done = True
            break
    if kept and on_tokens is not None:
        on_tokens(i, kept)
    return done


def sample_step(row_keys_B, step, logits_BV, sampling: SamplingConfig):
    """Token `step` of every row: drawn with the row's key folded with the step (new token
    n of prompt i uses fold_in(fold_in(key(seed), i), n), whatever the batching)."""
    keys_B = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys_B)
    return sample_rows(keys_B, logits_BV, sampling)


class Decoder:
    """The compiled prefill and decode-chunk functions of one model config; `generate`
    keeps one per config (`decoder_for`), a SubmodelScorer its own."""

    def __init__(self, config: ModelConfig, chunk_steps: int = DEFAULT_CHUNK_STEPS,
                 rows_sharding=None):
        if chunk_steps < 1:
            raise GenerateError(f"chunk_steps must be >= 1, got {chunk_steps}")
        self.config = kv_cache.decoding_form({}, config)[1]  # Unrolled layers.
        self.chunk_steps = chunk_steps
        self._rows_sharding = rows_sharding
        self._prefill = jax.jit(self._prefill_impl,
                                static_argnames=("static_widths", "sampling", "cache_len"))
        self._decode = jax.jit(self._decode_impl,
                               static_argnames=("static_widths", "sampling", "steps"),
                               donate_argnames=("cache",))

    def compiled_count(self) -> int:
        """Compiled variants so far (the jitted functions' cache sizes)."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def _prefill_impl(self, params, tokens_BT, lengths_B, row_keys_B, traced_widths, *,
                      static_widths, sampling, cache_len):
        widths = static_widths if traced_widths is None else traced_widths
        B = tokens_BT.shape[0]
        cache = kv_cache.init_cache(self.config, B, cache_len)
        logits_BTV, cache = kv_cache.prefill(params, self.config, cache, tokens_BT, lengths_B,
                                             widths)
        last_BV = logits_BTV[jnp.arange(B), lengths_B - 1]
        return sample_step(row_keys_B, 0, last_BV, sampling), cache

    def _decode_impl(self, params, cache, next_B, row_keys_B, step, traced_widths, *,
                     static_widths, sampling, steps):
        """`steps` tokens per row: feed the last sampled token, sample the next. Returns
        (tokens [B, steps], cache, the last token)."""
        widths = static_widths if traced_widths is None else traced_widths

        def body(carry, i):
            cache, next_B = carry
            logits_B1V, cache = kv_cache.extend(params, self.config, cache, next_B[:, None],
                                                widths)
            next_B = sample_step(row_keys_B, step + i, logits_B1V[:, 0], sampling)
            return (cache, next_B), next_B

        (cache, next_B), tokens_SB = jax.lax.scan(body, (cache, next_B), jnp.arange(steps))
        return tokens_SB.T, cache, next_B

    def _put(self, array):
        if self._rows_sharding is None:
            return jnp.asarray(array)
        return jax.device_put(array, self._rows_sharding)

    def generate(self, params, prompts: Sequence[Sequence[int]], *, widths=None,
                 max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 seed: int = 0, stop_ids: Sequence[int] = (),
                 stop_fn: Optional[Callable[[int, list], bool]] = None,
                 on_tokens: Optional[Callable[[int, list], None]] = None,
                 batch_size: Optional[int] = None, max_len: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
        """See the module docstring and `generate`."""
        prompts = check_prompts(prompts, self.config, max_new_tokens, max_len)
        static_widths, traced_widths = split_widths(widths, self.config)
        if batch_size is not None and batch_size < 1:
            raise GenerateError(f"batch_size must be >= 1, got {batch_size}")
        params = kv_cache.decoding_form(params, self.config)[0]
        B = batch_size or len(prompts)
        stop_set = {int(t) for t in stop_ids}
        base_key = jax.random.key(seed)
        budgets = token_budgets(prompts, max_new_tokens, max_len)
        outputs: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), B):
            rows = order[start:start + B]
            T = cache_buckets(max_len, max(len(prompts[i]) for i in rows))
            S = cache_buckets(max_len, max(len(prompts[i]) + budgets[i] - 1 for i in rows))
            tokens_BT, lengths_B, indices_B = pad_prompts(prompts, rows, B, T)
            row_keys_B = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices_B)
            done = [b >= len(rows) for b in range(B)]

            def accept(tokens_BN):
                for b, i in enumerate(rows):
                    if not done[b]:
                        done[b] = take_tokens(i, tokens_BN[b].tolist(), outputs, budgets[i],
                                              stop_set, stop_fn, on_tokens)

            row_keys_B = self._put(row_keys_B)
            next_B, cache = self._prefill(
                params, self._put(tokens_BT), self._put(lengths_B), row_keys_B, traced_widths,
                static_widths=static_widths, sampling=sampling, cache_len=S)
            accept(np.asarray(next_B)[:, None])
            step = 1
            while not all(done):
                tokens_BN, cache, next_B = self._decode(
                    params, cache, next_B, row_keys_B, step, traced_widths,
                    static_widths=static_widths, sampling=sampling, steps=self.chunk_steps)
                accept(np.asarray(tokens_BN))
                step += self.chunk_steps
            if progress:
                progress(len(rows))
        return outputs


@functools.lru_cache(maxsize=16)
def _cached_decoder(config: ModelConfig, chunk_steps: int) -> Decoder:
    return Decoder(config, chunk_steps)


def decoder_for(config: ModelConfig, chunk_steps: int = DEFAULT_CHUNK_STEPS) -> Decoder:
    """The Decoder `generate` uses for `config` (kept, so repeated calls reuse compiles)."""
    return _cached_decoder(config, chunk_steps)  # Positional: one cache key per pair.


def generate(params, config: ModelConfig, prompts: Sequence[Sequence[int]], *, widths=None,
             max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_ids: Sequence[int] = (), stop_fn: Optional[Callable[[int, list], bool]] = None,
             on_tokens: Optional[Callable[[int, list], None]] = None,
             batch_size: Optional[int] = None, max_len: Optional[int] = None,
             chunk_steps: int = DEFAULT_CHUNK_STEPS) -> list[list[int]]:
    """Each prompt's new tokens (prompts: token-id lists that include the start id).

    widths: None (full model), a tuple of per-layer ints (sliced kernels) or an int32 [L]
    array (masked FFNs: one compile for every width vector). A stop id ends a row and is
    not included; `stop_fn(row, new_tokens) -> bool` (the caller's text-level stop) is
    checked after every token; `on_tokens(row, token_ids)` streams the tokens as they are
    accepted. `max_len`: the model's context (the run's seq_len); prompts longer than it
    are a ValueError. `batch_size`: rows per compiled batch (default: all prompts at once).
    """
    return decoder_for(config, chunk_steps).generate(
        params, prompts, widths=widths, max_new_tokens=max_new_tokens, sampling=sampling,
        seed=seed, stop_ids=stop_ids, stop_fn=stop_fn, on_tokens=on_tokens,
        batch_size=batch_size, max_len=max_len)
