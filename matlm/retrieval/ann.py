"""Nearest neighbours with FAISS (optional): exact flat, IVF and HNSW indexes on the CPU.

    index = build_index(database_ND, metric="cosine", kind="hnsw")
    indices_QK, scores_QK = search(index, queries_QD, k=10)
    # or in one call, the same signature as matlm.retrieval.exact.nearest_neighbors:
    indices_QK, scores_QK = approximate_nearest_neighbors(database_ND, queries_QD, 10)

For databases too big for a brute-force scan per query batch. Scores follow
`exact.nearest_neighbors`' convention (higher is nearer: cosine similarity, or the
negative squared L2 distance), so the two are interchangeable. FAISS is imported
lazily: matlm does not need it unless an index is built (`pip install -e ".[retrieval]"`).
"""
from __future__ import annotations

import numpy as np

from matlm.retrieval.exact import check_search_inputs, normalize_rows

INDEX_KINDS = ("flat", "ivf", "hnsw")


def import_faiss():
    """The faiss module, or a one-line ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"approximate retrieval needs FAISS, which is not installed ({err}); "
                          'run: pip install -e ".[retrieval]"  (faiss-cpu)') from None
    return faiss


class Index:
    """A FAISS index and the metric its scores mean (cosine rows are normalised on the way in)."""

    def __init__(self, faiss_index, metric: str, kind: str, keep_alive=(),
                 cosine_by_l2: bool = False):
        self.faiss_index, self.metric, self.kind = faiss_index, metric, kind
        # HNSW searches cosine as L2 on unit rows (the same ranking, |a-b|² = 2 - 2 cos):
        # its graph construction assumes a distance, which inner product is not in general.
        self.cosine_by_l2 = cosine_by_l2
        # FAISS holds raw pointers to sub-indexes (IVF's quantizer): they must outlive it.
        self._keep_alive = tuple(keep_alive)

    @property
    def size(self) -> int:
        return int(self.faiss_index.ntotal)

    def set_search_effort(self, nprobe: int | None = None, ef_search: int | None = None):
        """More effort, better recall: IVF lists probed (`nprobe`), HNSW's `efSearch`."""
        if nprobe is not None and self.kind == "ivf":
            self.faiss_index.nprobe = int(nprobe)
        if ef_search is not None and self.kind == "hnsw":
            self.faiss_index.hnsw.efSearch = int(ef_search)


def build_index(database_ND, metric: str = "cosine", kind: str = "flat", nlist: int | None = None,
                nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64, seed: int = 0) -> Index:
    """A FAISS index over the database rows.

    kind: "flat" (exact), "ivf" (inverted lists over `nlist` k-means centroids, default
    ≈4·√N, `nprobe` searched), "hnsw" (a graph with `hnsw_m` links, `ef_search` candidates).
    Cosine uses inner product on L2-normalised rows (HNSW: L2 on them, the same ranking);
    "l2" squared Euclidean distance."""
    check_search_inputs(database_ND, np.zeros((1, np.shape(database_ND)[1])), 1, metric)
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {INDEX_KINDS}")
    faiss = import_faiss()
    x_ND = np.ascontiguousarray(database_ND, np.float32)
    if metric == "cosine":
        x_ND = np.ascontiguousarray(normalize_rows(x_ND))
    N, D = x_ND.shape
    keep_alive = []
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        index = (faiss.IndexFlatIP(D) if metric == "cosine" else faiss.IndexFlatL2(D))
    elif kind == "ivf":
        # ≈4·√N lists; FAISS's k-means wants at least 39 training points per list.
        nlist = nlist or max(1, min(N // 39, int(4 * np.sqrt(N))))
        quantizer = faiss.IndexFlatIP(D) if metric == "cosine" else faiss.IndexFlatL2(D)
        keep_alive.append(quantizer)
        index = faiss.IndexIVFFlat(quantizer, D, nlist, faiss_metric)
        index.cp.seed = seed  # Deterministic k-means.
        index.train(x_ND)
        index.nprobe = nprobe
    else:
        index = faiss.IndexHNSWFlat(D, hnsw_m, faiss.METRIC_L2)
        index.hnsw.efSearch = ef_search
    index.add(x_ND)
    return Index(index, metric, kind, keep_alive,
                 cosine_by_l2=kind == "hnsw" and metric == "cosine")


def search(index: Index, queries_QD, k: int):
    """(indices [Q, k] int64, scores [Q, k] float32), nearest first, as `exact`'s.
    A slot FAISS could not fill (IVF probing fewer than k rows) has index -1, score -inf."""
    if np.ndim(queries_QD) != 2 or np.shape(queries_QD)[1] != index.faiss_index.d:
        raise ValueError(f"queries of shape {np.shape(queries_QD)} for an index of "
                         f"D={index.faiss_index.d}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= index.size:
        raise ValueError(f"k must be an integer in [1, {index.size}], got {k!r}")
    q_QD = np.ascontiguousarray(queries_QD, np.float32)
    if index.metric == "cosine":
        q_QD = np.ascontiguousarray(normalize_rows(q_QD))
    scores_QK, indices_QK = index.faiss_index.search(q_QD, int(k))
    scores_QK = scores_QK.astype(np.float32)
    if index.cosine_by_l2:
        scores_QK = 1.0 - 0.5 * scores_QK
    elif index.metric == "l2":
        scores_QK = -scores_QK  # FAISS returns squared distances; ours are "higher is nearer".
    scores_QK[indices_QK < 0] = -np.inf
    return indices_QK.astype(np.int64), scores_QK


def approximate_nearest_neighbors(database_ND, queries_QD, k: int, metric: str = "cosine",
                                  kind: str = "hnsw", **index_options):
    """Builds a `kind` index over the database and searches it: `exact.nearest_neighbors`'
    signature and outputs (approximate unless kind="flat")."""
    check_search_inputs(database_ND, queries_QD, k, metric)
    return search(build_index(database_ND, metric, kind, **index_options), queries_QD, k)
