"""The MatViT retrieval experiments (MatFormer paper, Table 8 / Figure 6), on embeddings.

Everything here takes numpy embeddings (`matlm.retrieval.embed.embed_images` makes them),
so the experiments are testable without a model:

- `one_nn_accuracy`: k-NN classification accuracy of queries against a labelled database
  (k=1: the label of the nearest row; k>1: majority vote).
- `adaptive_retrieval`: per submodel, (a) "same encoder": it encodes the database and the
  queries; (b) "adaptive": the database is encoded once by the big `database_encoder`,
  queries by each submodel. (b) close to (a) means the nested submodels share one metric
  space, so a deployment can encode queries with whatever submodel its budget allows
  without re-encoding the database.
- `cascade`: shortlist with a small submodel's embeddings, re-rank the shortlist with the
  large ones; accuracy and per-query cost.

Results are lists of flat dicts (tabulate- and JSON-ready).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from matlm.retrieval.exact import METRICS, nearest_neighbors, normalize_rows


def _check_labelled(name: str, x_ND, labels_N) -> None:
    if np.ndim(x_ND) != 2:
        raise ValueError(f"{name} embeddings must be [N, D], got shape {np.shape(x_ND)}")
    if np.shape(labels_N) != (np.shape(x_ND)[0],):
        raise ValueError(f"{name}: {np.shape(x_ND)[0]} embeddings but labels of shape "
                         f"{np.shape(labels_N)}")


def vote(neighbor_labels_QK: np.ndarray) -> np.ndarray:
    """[Q] majority label of each row of neighbour labels (nearest first); a tie goes to
    the tied label whose first vote is nearest (k=1: the nearest label)."""
    same_QKK = neighbor_labels_QK[:, :, None] == neighbor_labels_QK[:, None, :]
    votes_QK = same_QKK.sum(axis=2)  # How many neighbours share position j's label.
    # argmax takes the first (nearest) position among those with the most votes.
    best_Q = np.argmax(votes_QK, axis=1)
    return neighbor_labels_QK[np.arange(len(best_Q)), best_Q]


def one_nn_accuracy(db_ND, db_labels, queries_QD, query_labels, metric: str = "cosine",
                    k: int = 1) -> float:
    """The fraction of queries whose k-NN vote (k=1: nearest database row, ties to the
    lower index) carries their label."""
    _check_labelled("database", db_ND, db_labels)
    _check_labelled("query", queries_QD, query_labels)
    index_QK, _ = nearest_neighbors(db_ND, queries_QD, k, metric)
    predicted_Q = vote(np.asarray(db_labels)[index_QK])
    return float(np.mean(predicted_Q == np.asarray(query_labels)))


def adaptive_retrieval(db_by_name: Mapping[str, np.ndarray],
                       queries_by_name: Mapping[str, np.ndarray], db_labels, query_labels,
                       database_encoder: str = "XL", metric: str = "cosine", k: int = 1,
                       query_flops_by_name: Mapping[str, float] | None = None) -> list[dict]:
    """One row per query encoder (the names of `queries_by_name`, in order):
    `same_encoder_accuracy` (database and queries by that submodel; None when
    `db_by_name` lacks it) and `adaptive_accuracy` (database by `database_encoder`),
    plus `query_gflops` when `query_flops_by_name` is given."""
    if database_encoder not in db_by_name:
        raise ValueError(f"database_encoder {database_encoder!r} has no database embeddings; "
                         f"have {sorted(db_by_name)}")
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    rows = []
    for name, queries_QD in queries_by_name.items():
        same = (one_nn_accuracy(db_by_name[name], db_labels, queries_QD, query_labels,
                                metric, k) if name in db_by_name else None)
        row = {"query_encoder": name, "database_encoder": database_encoder, "metric": metric,
               "k": k, "same_encoder_accuracy": same,
               "adaptive_accuracy": one_nn_accuracy(db_by_name[database_encoder], db_labels,
                                                    queries_QD, query_labels, metric, k)}
        if query_flops_by_name is not None and name in query_flops_by_name:
            row["query_gflops"] = query_flops_by_name[name] / 1e9
        rows.append(row)
    return rows


def _scores(q_QD: np.ndarray, candidates_QKD: np.ndarray, metric: str) -> np.ndarray:
    """[Q, K] scores of each query against its own candidates (exact's convention)."""
    dots_QK = np.einsum("qd,qkd->qk", q_QD, candidates_QKD)
    if metric == "cosine":
        return dots_QK  # Both sides already normalised.
    return 2 * dots_QK - np.sum(q_QD * q_QD, 1)[:, None] - np.sum(candidates_QKD ** 2, 2)


def cascade_predictions(db_small, q_small, db_large, q_large, shortlist_k: int,
                        metric: str = "cosine", query_block: int = 1024) -> np.ndarray:
    """[Q] database index each query retrieves: the top-`shortlist_k` rows by the small
    embeddings, re-ranked by the large ones (ties to the lower database index)."""
    shortlist_QK, _ = nearest_neighbors(db_small, q_small, shortlist_k, metric)
    db_large = np.asarray(db_large, np.float32)
    q_large = np.asarray(q_large, np.float32)
    if metric == "cosine":
        db_large, q_large = normalize_rows(db_large), normalize_rows(q_large)
    best_Q = np.empty(len(q_large), np.int64)
    # Query blocks bound the gathered candidates to query_block × shortlist_k × D floats.
    for start in range(0, len(q_large), query_block):
        index_QK = shortlist_QK[start:start + query_block]
        scores_QK = _scores(q_large[start:start + query_block], db_large[index_QK], metric)
        # Lexicographic: the highest score, then the lowest database index.
        order_QK = np.lexsort((index_QK, -scores_QK), axis=1)
        best_Q[start:start + query_block] = np.take_along_axis(index_QK, order_QK[:, :1], 1)[:, 0]
    return best_Q


def cascade(db_small, q_small, db_large, q_large, db_labels, query_labels, shortlist_k: int,
            metric: str = "cosine", query_encoder_flops: float | None = None,
            small_name: str = "small", large_name: str = "large") -> dict:
    """Accuracy of the shortlist-then-re-rank cascade, and its per-query cost.

    Cost per query: `query_encoder_flops` (the caller's count for encoding a query with
    both submodels: the sum of the two, or a joint pass, matlm.model.counting) plus the
    search's dot products, 2·N·D for the shortlist and 2·shortlist_k·D for the re-rank.
    A MatViT's submodels share d_model, so D is the same in both stages: the cascade
    saves no search FLOPs over a large-only search; its cost is in the encoders."""
    for name, x_ND in (("db_small", db_small), ("db_large", db_large)):
        _check_labelled(name, x_ND, db_labels)
    for name, x_QD in (("q_small", q_small), ("q_large", q_large)):
        _check_labelled(name, x_QD, query_labels)
    N = len(db_labels)
    if isinstance(shortlist_k, bool) or not 1 <= int(shortlist_k) <= N:
        raise ValueError(f"shortlist_k must be in [1, {N}] (the database size), "
                         f"got {shortlist_k!r}")
    best_Q = cascade_predictions(db_small, q_small, db_large, q_large, int(shortlist_k), metric)
    accuracy = float(np.mean(np.asarray(db_labels)[best_Q] == np.asarray(query_labels)))
    D_small, D_large = np.shape(db_small)[1], np.shape(db_large)[1]
    search_flops = 2.0 * N * D_small + 2.0 * shortlist_k * D_large
    row = {"shortlist": small_name, "rerank": large_name, "shortlist_k": int(shortlist_k),
           "metric": metric, "accuracy": accuracy, "search_mflops": search_flops / 1e6}
    if query_encoder_flops is not None:
        row["query_gflops"] = (query_encoder_flops + search_flops) / 1e9
    return row


def cascade_sweep(db_small, q_small, db_large, q_large, db_labels, query_labels,
                  shortlist_ks: Sequence[int], **options) -> list[dict]:
    """`cascade` rows for several shortlist sizes."""
    return [cascade(db_small, q_small, db_large, q_large, db_labels, query_labels, k, **options)
            for k in shortlist_ks]
