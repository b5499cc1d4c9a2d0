"""Exact k-nearest-neighbour search in JAX, with bounded memory.

    indices_QK, scores_QK = nearest_neighbors(database_ND, queries_QD, k=10, metric="cosine")

The database is scanned in blocks of `database_block` rows for each block of
`query_block` queries, keeping a running top-k per query, so at most
query_block × (database_block + k) scores exist at a time whatever N and Q are: a 1M-row
database and 100k queries never materialise a [Q, N] matrix. One jitted function per
(block shapes, k, metric): the last blocks are padded to full size (padded database rows
score -inf, padded queries are dropped), so a run compiles once.

Scores are "higher is nearer": the cosine similarity (rows L2-normalised, then dotted),
or the *negative squared* L2 distance (so one top-k serves both metrics; report
`-scores` as squared distances). Ties go to the lower database index, deterministically:
`jax.lax.top_k` prefers the lower position among equal values, and the running merge
puts the kept candidates (all from earlier, lower-indexed blocks) before the new block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("cosine", "l2")


def check_search_inputs(database_ND, queries_QD, k: int, metric: str) -> None:
    """One-line ValueErrors for bad input, before any work (shared with the FAISS path)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if np.ndim(database_ND) != 2 or np.ndim(queries_QD) != 2:
        raise ValueError(f"database [N, D] and queries [Q, D] must be 2-D, got shapes "
                         f"{np.shape(database_ND)} and {np.shape(queries_QD)}")
    if np.shape(database_ND)[1] != np.shape(queries_QD)[1]:
        raise ValueError(f"database has D={np.shape(database_ND)[1]} but queries have "
                         f"D={np.shape(queries_QD)[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > np.shape(database_ND)[0]:
        raise ValueError(f"k={k} exceeds the database's {np.shape(database_ND)[0]} rows")


def normalize_rows(x_ND, eps: float = 1e-12):
    """Rows scaled to unit L2 norm (zero rows stay zero); numpy or jax arrays."""
    xp = jnp if isinstance(x_ND, jax.Array) else np
    norm_N1 = xp.sqrt(xp.sum(x_ND * x_ND, axis=1, keepdims=True))
    return x_ND / xp.maximum(norm_N1, eps)


def _balanced(block: int, n: int) -> int:
    """The smallest block size that splits n rows into as many blocks as `block` would:
    100k rows in blocks of 65536 become 2 × 50000, not 2 × 65536 with 31k of padding."""
    num_blocks = -(-max(n, 1) // block)
    return -(-max(n, 1) // num_blocks)


def _pad_rows(x_ND: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(x_ND) % multiple
    return np.concatenate([x_ND, np.zeros((extra, x_ND.shape[1]), x_ND.dtype)]) if extra else x_ND


@functools.partial(jax.jit, static_argnames=("k", "metric", "database_block", "n_valid"))
def _search_query_block(database_BND, queries_QD, *, k: int, metric: str,
                        database_block: int, n_valid: int):
    """Top-k (indices [Q, k] int32, scores [Q, k]) of one query block over the database
    stored as blocks [num_blocks, database_block, D]; rows >= n_valid are padding."""
    Q = queries_QD.shape[0]
    q_sq_Q = jnp.sum(queries_QD * queries_QD, axis=1)

    def step(carry, block):
        best_scores_QK, best_index_QK = carry
        start, db_ND = block
        # HIGHEST: the default TPU/GPU matmul precision (bf16 passes) would reorder
        # near-ties against the float32 references.
        scores_QN = jnp.dot(queries_QD, db_ND.T, precision=jax.lax.Precision.HIGHEST)
        if metric == "l2":  # -|q - x|² = 2 q·x - |q|² - |x|²
            scores_QN = 2.0 * scores_QN - q_sq_Q[:, None] - jnp.sum(db_ND * db_ND, axis=1)[None]
        index_N = start + jnp.arange(database_block, dtype=jnp.int32)
        scores_QN = jnp.where(index_N[None] < n_valid, scores_QN, -jnp.inf)  # Padding rows.
        # Kept candidates first: they come from earlier blocks (lower indices), so top_k's
        # lower-position preference breaks ties by lower database index.
        merged_scores = jnp.concatenate([best_scores_QK, scores_QN], axis=1)
        top_scores_QK, where_QK = jax.lax.top_k(merged_scores, k)
        # Positions back to database indices without a [Q, k + block] index matrix.
        kept_QK = jnp.take_along_axis(best_index_QK, jnp.minimum(where_QK, k - 1), axis=1)
        top_index_QK = jnp.where(where_QK < k, kept_QK, start + where_QK - k)
        return (top_scores_QK, top_index_QK.astype(jnp.int32)), None

    num_blocks = database_BND.shape[0]
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * database_block
    init = (jnp.full((Q, k), -jnp.inf, queries_QD.dtype),
            jnp.full((Q, k), jnp.iinfo(jnp.int32).max, jnp.int32))
    (scores_QK, index_QK), _ = jax.lax.scan(step, init, (starts, database_BND))
    return index_QK, scores_QK


def nearest_neighbors(database_ND, queries_QD, k: int, metric: str = "cosine",
                      query_block: int = 1024, database_block: int = 65536):
    """The k nearest database rows of every query, exactly.

    Returns (indices [Q, k] int64 numpy, scores [Q, k] float32 numpy), nearest first:
    cosine similarities, or negative squared L2 distances for metric="l2". Ties go to
    the lower database index. Memory: query_block × (database_block + k) scores at a time
    (blocks larger than Q or N shrink to them)."""
    check_search_inputs(database_ND, queries_QD, k, metric)
    if query_block < 1 or database_block < 1:
        raise ValueError(f"query_block and database_block must be positive, got "
                         f"{query_block} and {database_block}")
    database_ND = np.asarray(database_ND, np.float32)
    queries_QD = np.asarray(queries_QD, np.float32)
    if metric == "cosine":
        database_ND, queries_QD = normalize_rows(database_ND), normalize_rows(queries_QD)
    N, Q = len(database_ND), len(queries_QD)
    database_block, query_block = _balanced(database_block, N), _balanced(query_block, Q)
    padded_ND = _pad_rows(database_ND, database_block)
    database_BND = jnp.asarray(padded_ND.reshape(-1, database_block, padded_ND.shape[1]))
    queries_QD = _pad_rows(queries_QD, query_block)
    indices, scores = [], []
    for start in range(0, Q, query_block):
        index_QK, scores_QK = _search_query_block(
            database_BND, jnp.asarray(queries_QD[start:start + query_block]), k=k,
            metric=metric, database_block=database_block, n_valid=N)
        indices.append(np.asarray(index_QK))
        scores.append(np.asarray(scores_QK))
    if not indices:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return (np.concatenate(indices)[:Q].astype(np.int64),
            np.concatenate(scores)[:Q].astype(np.float32))
