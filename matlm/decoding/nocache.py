"""Greedy decoding without a cache: a full forward pass over the whole sequence per new
token (O(T²) work). The reference the KV-cache decoder is tested against and the
no-cache baseline of the decode benchmark; it was `matlm eval`'s decoder before the
cache (SubmodelScorer.generate).

Rows are right-padded into a [B, L] buffer, L the bucket of the longest prompt plus
`max_new_tokens` (the same buckets as matlm.decoding.generate), and a `fori_loop`
writes token n of row b at position lengths_B[b] + n, reading the logits at the
position before it: one compile per (batch, L, widths form, max_new_tokens).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matlm.decoding.generate import (cache_buckets, check_prompts, pad_prompts, split_widths,
                                     token_budgets)
from matlm.model.config import ModelConfig
from matlm.model.families import build_model


@functools.partial(jax.jit, static_argnames=("config", "static_widths", "max_new_tokens"))
def _greedy(params, tokens_BL, lengths_B, traced_widths, *, config, static_widths,
            max_new_tokens):
    widths = static_widths if traced_widths is None else traced_widths
    model = build_model(config)
    rows_B = jnp.arange(tokens_BL.shape[0])

    def step(_, carry):  # No KV cache: a full forward per token.
        tokens_BL, cur_B = carry
        logits_BLV = model.apply({"params": params}, tokens_BL, widths=widths)
        next_B = jnp.argmax(logits_BLV[rows_B, cur_B - 1], axis=-1).astype(jnp.int32)
        return tokens_BL.at[rows_B, cur_B].set(next_B), cur_B + 1

    tokens_BL, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens_BL, lengths_B))
    return tokens_BL


def compiled_count() -> int:
    return _greedy._cache_size()


def generate_no_cache(params, config: ModelConfig, prompts: Sequence[Sequence[int]], *,
                      widths=None, max_new_tokens: int, stop_ids: Sequence[int] = (),
                      batch_size: Optional[int] = None, max_len: Optional[int] = None
                      ) -> list[list[int]]:
    """Greedy continuations (see matlm.decoding.generate.generate for the arguments and
    the stop/context rules; greedy only, no callbacks): every row decodes max_new_tokens
    steps and is cut at its first stop id afterwards."""
    prompts = check_prompts(prompts, config, max_new_tokens, max_len)
    static_widths, traced_widths = split_widths(widths, config)
    B = batch_size or len(prompts)
    stops = {int(t) for t in stop_ids}
    budgets = token_budgets(prompts, max_new_tokens, max_len)  # generate's context rule.
    outputs: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), B):
        rows = order[start:start + B]
        longest = max(len(prompts[i]) for i in rows)
        # Room for every new token, past max_len if need be: causal attention keeps the
        # logits read (positions < max_len) independent of the later positions.
        L = cache_buckets(None, longest + max_new_tokens)
        tokens_BL, lengths_B, _ = pad_prompts(prompts, rows, B, L)
        tokens_BL = np.asarray(_greedy(params, tokens_BL, lengths_B, traced_widths,
                                       config=config, static_widths=static_widths,
                                       max_new_tokens=max_new_tokens))
        for b, i in enumerate(rows):
            n = len(prompts[i])
            new = tokens_BL[b, n:n + budgets[i]].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            outputs[i] = new[:cut]
    return outputs
