"""Content checksums of checkpoints: a fingerprint per array, recorded when a checkpoint is
written and compared when it is restored.

Orbax/TensorStore catch a truncated or missing file, but not bytes changed in place: the
zstd frames Orbax writes carry no content checksum, so a flipped byte decodes silently into
wrong weights. Each array's fingerprint is therefore computed on the device from its values:

- the array is bitcast to unsigned words of its width (4-byte types → uint32; 2-byte types
  such as bf16 → uint16 widened to uint32; 1-byte types and bool → uint8 widened; 8-byte
  types → two uint32 words) and flattened (row-major index i);
- word 1 = Σ bits·(2i+1) mod 2³²: uint32 arithmetic wraps, so the sum is exact whatever the
  sharding or reduction order, and an odd multiplier makes any single-bit flip change it;
- word 2 = Σ mix(bits ⊕ mix(i)) mod 2³² with the murmur3 finaliser as `mix`: an independent
  nonlinear word, so a change of several bytes that cancels in word 1 is still caught
  (a random corruption passes both with probability about 2⁻⁶⁴).

Both are sums of per-element terms, so one jitted call reduces each sharded array where
it lives (no gather; works multi-host) and only 8 bytes per array come back to the host.
The data pipeline's JSON item is checked by the sha256 of its canonical JSON.

`VERIFY` switches verification off (tests use it to show that the checksums are what
catches a corruption); checksums are always recorded.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

VERIFY = True
VERSION = 1  # Recorded with the checksums; bump if the fingerprint ever changes.

CHECKSUMS_KEY = "checksums"
DATA_KEY = "data_sha256"
VERSION_KEY = "checksum_version"


class IntegrityError(ValueError):
    """A restored checkpoint whose contents do not match the checksums written with it."""


def _words(x) -> jax.Array:
    """`x` as uint32 words (see the module docstring), same leading shape."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    dtype = jnp.dtype(x.dtype)
    if dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if dtype.itemsize == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    if dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if dtype.itemsize in (4, 8):
        # An 8-byte element becomes a trailing axis of two words (row-major: consecutive).
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"no checksum for arrays of dtype {dtype}")


def _mix(h):
    # murmur3's 32-bit finaliser: every input bit affects every output bit.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_fingerprint(x) -> jax.Array:
    bits = _words(jnp.asarray(x))
    # Row-major flat index of each word, built by iota in the array's own shape so that
    # XLA generates each shard's indices in place instead of reshaping a sharded array.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    odd = index * jnp.uint32(2) + jnp.uint32(1)
    word1 = jnp.sum(bits * odd, dtype=jnp.uint32)
    word2 = jnp.sum(_mix(bits ^ _mix(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
    return jnp.stack([word1, word2])


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def _to_host(x) -> np.ndarray:
    # A full reduction comes back replicated; on several hosts it is not fully addressable
    # (device_get would refuse it), but every local shard holds the whole value.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(jax.device_get(x))


def leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def fingerprints(items: Mapping[str, Any]) -> dict[str, str]:
    """{"params/layer_0/ffn/wi_gate": "0123abcd89ef4567", ...} for every array leaf of
    each named tree in `items` (e.g. {"params": ..., "opt_state": ...}); one jitted
    dispatch over all of them, then 8 bytes per array to the host."""
    items = {name: tree for name, tree in items.items() if tree is not None}
    leaves = jax.tree_util.tree_flatten_with_path(items)[0]
    if not leaves:
        return {}
    words = _fingerprint_tree([leaf for _, leaf in leaves])
    return {leaf_name(path): "".join(f"{int(w):08x}" for w in _to_host(fp))
            for (path, _), fp in zip(leaves, words)}


def data_checksum(data_state) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a JSON item."""
    text = json.dumps(data_state, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def record(meta: dict, items: Mapping[str, Any], data_state=None) -> dict:
    """`meta` plus the checksums of `items` (and of `data_state` when given)."""
    recorded = {**meta, VERSION_KEY: VERSION, CHECKSUMS_KEY: fingerprints(items)}
    if data_state is not None:
        recorded[DATA_KEY] = data_checksum(data_state)
    return recorded


def has_checksums(meta) -> bool:
    return isinstance(meta, Mapping) and CHECKSUMS_KEY in meta


def mismatches(meta: Mapping, items: Mapping[str, Any], data_state=None) -> list[str]:
    """Names of the restored arrays (and "data") whose contents differ from the checksums
    in `meta`; [] when all match. Only what was restored is compared (e.g. params alone)."""
    expected = meta[CHECKSUMS_KEY]
    if meta.get(VERSION_KEY, VERSION) != VERSION:
        raise IntegrityError(f"checksums of version {meta.get(VERSION_KEY)!r}; this matlm "
                             f"computes version {VERSION}")
    actual = fingerprints(items)
    bad = [name for name, fp in actual.items() if expected.get(name) != fp]
    if data_state is not None and DATA_KEY in meta and data_checksum(data_state) != meta[DATA_KEY]:
        bad.append("data")
    return bad


def describe(bad: list[str], checked: int, shown: int = 3) -> str:
    """"2 of 31 items do not match their checksums: params/a, params/b" (items: arrays
    and the data item)."""
    names = ", ".join(bad[:shown]) + (f", … ({len(bad) - shown} more)" if len(bad) > shown else "")
    return f"{len(bad)} of {checked} items do not match their checksums: {names}"


def verify(meta, items: Mapping[str, Any], data_state=None,
           force: bool = False) -> Optional[IntegrityError]:
    """None when `items` match the checksums in `meta` (or verification is off and not
    `force`d); else an IntegrityError describing the mismatches, or checksums of another
    version. Raises nothing for a checkpoint without checksums: callers check
    `has_checksums` first to warn about it."""
    if not (VERIFY or force) or not has_checksums(meta):
        return None
    try:
        bad = mismatches(meta, items, data_state)
    except IntegrityError as e:  # Checksums this matlm cannot compare.
        return e
    if not bad:
        return None
    checked = len(jax.tree.leaves({k: v for k, v in items.items() if v is not None}))
    checked += int(data_state is not None and DATA_KEY in meta)
    return IntegrityError(describe(bad, checked))
