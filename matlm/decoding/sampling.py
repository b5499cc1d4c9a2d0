"""From logits to the next token: greedy, temperature, top-k and top-p (nucleus).

One definition of the *distribution* a decoding setting samples from
(`token_probs`), because speculative decoding must accept and resample against exactly
the distributions plain decoding samples from: its guarantee (the output distribution is
the target's) holds for the processed distributions, not the raw softmax.

Greedy (`temperature == 0`) is the one-hot distribution on the argmax, so the speculative
acceptance rule reduces to "accept while the draft's token is the target's argmax".
Ties break towards the lowest token id, as `jnp.argmax` does.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class SamplingError(ValueError):
    """A decoding setting out of range (a ValueError: the CLI prints it as one line)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax).
    top_k: int = 0  # Keep the k most likely tokens; 0: all.
    top_p: float = 1.0  # Keep the smallest set of tokens whose probability reaches p.

    def __post_init__(self):
        if not (self.temperature >= 0.0):  # Also rejects NaN.
            raise SamplingError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_logits(logits_BV, config: SamplingConfig):
    """float32 logits after temperature, top-k and top-p; removed tokens are -inf.
    Not for greedy (temperature 0): see `token_probs`."""
    logits_BV = logits_BV.astype(jnp.float32) / config.temperature
    V = logits_BV.shape[-1]
    if 0 < config.top_k < V:
        kth_B1 = jax.lax.top_k(logits_BV, config.top_k)[0][..., -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if config.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token is kept while the mass of the tokens strictly more likely than it is
        # below p: the most likely token always survives.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_BV = before_BV < config.top_p
        cutoff_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def token_probs(logits_BV, config: SamplingConfig):
    """The next-token distribution [..., V] (float32) that `config` samples from."""
    if config.greedy:
        return jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1],
                              dtype=jnp.float32)
    return jax.nn.softmax(processed_logits(logits_BV, config), axis=-1)


def sample(key, logits_BV, config: SamplingConfig):
    """One token per row, int32 [...]: the argmax when greedy (key unused), else a draw
    from `token_probs`."""
    if config.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed_logits(logits_BV, config), axis=-1
                                  ).astype(jnp.int32)


def sample_rows(keys_B, logits_BV, config: SamplingConfig):
    """One token per row [B], each row drawn with its own key (so a row's tokens do not
    depend on which other rows share its batch)."""
    return jax.vmap(lambda key, logits_V: sample(key, logits_V, config))(keys_B, logits_BV)
