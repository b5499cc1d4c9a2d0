"""Length buckets: the padded lengths that jitted functions are compiled for.

Rows (prompts, scoring rows, KV caches) are padded up to a bucket so that one compiled
function serves every length in it: powers of two from `MIN_BUCKET`, the list ending at
the model's context exactly when there is one. Scoring (`matlm.evaluation.scoring`) and
decoding (`matlm.decoding.generate`) both use these, so a prompt of a given length lands
in the same bucket whichever of them runs it. Pure Python: no JAX, no TensorFlow.
"""
from __future__ import annotations

from typing import Optional, Sequence

MIN_BUCKET = 32  # Shorter rows still pad to 32: fewer compiles for a little padding.


def bucket_lengths(max_len: int, min_len: int = MIN_BUCKET) -> list[int]:
    """Powers of two from `min_len`, ending at `max_len` exactly."""
    lengths, n = [], min(min_len, max_len)
    while n < max_len:
        lengths.append(n)
        n *= 2
    return lengths + [max_len]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`; ValueError past the largest."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def cache_buckets(max_len: Optional[int], needed: int) -> int:
    """The bucket (prompt length or cache length) that holds `needed` positions: from
    `bucket_lengths(max_len)` when the context is bounded, else the next power of two (at
    least MIN_BUCKET)."""
    if max_len is not None:
        return bucket_for(needed, bucket_lengths(max_len, MIN_BUCKET))
    return max(MIN_BUCKET, 1 << (needed - 1).bit_length())
