"""Nearest-neighbour search: exact JAX (matlm.retrieval.exact) vs numpy brute force vs
FAISS (flat, IVF, HNSW; matlm.retrieval.ann) on synthetic clustered embeddings.

    python scripts/benchmark_retrieval.py                      # N=10k,100k × D=128,768
    python scripts/benchmark_retrieval.py --sizes 10000 --dims 128 --queries 500

Per configuration: the time to search one batch of `--queries` queries (best of
`--repeats`, after a warm-up call that compiles JAX and builds FAISS indexes; index
build time reported apart), and recall@k of each method against the exact top-k
(the set overlap |approx ∩ exact| / k, averaged over queries). The data is a mixture of
Gaussians of low intrinsic dimension (`clustered`, like learned embeddings; isotropic
high-dimensional noise makes every neighbour nearly equidistant, and no ANN index can
find "the" top-k there); the metric is cosine. Prints a table (tabulate) and optionally writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from tabulate import tabulate

import jax

from matlm.retrieval.exact import nearest_neighbors, normalize_rows


def clustered(n: int, d: int, clusters: int, latent_dim: int, seed: int) -> np.ndarray:
    """[n, d] float32: a mixture of `clusters` Gaussians in a `latent_dim`-dimensional
    space, mapped to d dimensions by a fixed random matrix (the same for every call with
    this d), plus a little isotropic noise. Low intrinsic dimension, as learned
    embeddings have; with latent_dim=d it is the hard case of high-dimensional noise,
    where every neighbour is nearly as far as any other."""
    mix = np.random.default_rng([0, d, latent_dim, clusters])  # Shared: db and queries.
    centers_CL = 2.0 * mix.standard_normal((clusters, latent_dim))
    project_LD = mix.standard_normal((latent_dim, d)) / np.sqrt(latent_dim)
    rng = np.random.default_rng(seed)
    z_NL = centers_CL[rng.integers(0, clusters, n)] + rng.standard_normal((n, latent_dim))
    return (z_NL @ project_LD + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def numpy_brute_force(db_ND, q_QD, k, block=8192):
    """Cosine top-k by numpy: normalised dots per database block, argpartition, merge."""
    db_ND, q_QD = normalize_rows(db_ND), normalize_rows(q_QD)
    best_s = np.full((len(q_QD), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q_QD), 0), np.int64)
    for start in range(0, len(db_ND), block):
        s_QN = q_QD @ db_ND[start:start + block].T
        s = np.concatenate([best_s, s_QN], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + s_QN.shape[1]),
                                                    s_QN.shape)], 1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


def timed(fn, repeats):
    fn()  # Warm-up: compiles JAX, touches memory.
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def recall(got_QK, want_QK):
    k = want_QK.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got_QK, want_QK)]))


def run(n, d, args):
    db_ND = clustered(n, d, args.clusters, args.latent_dim, seed=1)
    q_QD = clustered(args.queries, d, args.clusters, args.latent_dim, seed=2)
    k, rows = args.k, []
    exact_QK, _ = nearest_neighbors(db_ND, q_QD, k)

    def add(method, seconds, got_QK, build_s=0.0):
        rows.append({"N": n, "D": d, "method": method, "build_s": round(build_s, 2),
                     "ms_per_batch": round(1e3 * seconds, 1),
                     "queries_per_s": round(len(q_QD) / seconds),
                     f"recall@{k}": round(recall(got_QK, exact_QK), 4)})

    add("exact JAX", timed(lambda: nearest_neighbors(db_ND, q_QD, k), args.repeats), exact_QK)
    add("numpy brute force", timed(lambda: numpy_brute_force(db_ND, q_QD, k), args.repeats),
        numpy_brute_force(db_ND, q_QD, k)[0])
    try:
        from matlm.retrieval import ann
        ann.import_faiss()
    except ImportError as err:
        print(f"skipping FAISS: {err}")
        return rows
    for kind, options in (("flat", {}), ("ivf", {"nprobe": args.nprobe}),
                          ("hnsw", {"ef_search": args.ef_search})):
        start = time.perf_counter()
        index = ann.build_index(db_ND, "cosine", kind, **options)
        build_s = time.perf_counter() - start
        label = {"flat": "FAISS flat", "ivf": f"FAISS IVF (nprobe={args.nprobe})",
                 "hnsw": f"FAISS HNSW (ef={args.ef_search})"}[kind]
        add(label, timed(lambda: ann.search(index, q_QD, k), args.repeats),
            ann.search(index, q_QD, k)[0], build_s)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 768])
    parser.add_argument("--queries", type=int, default=1000, help="queries per batch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--latent_dim", type=int, default=16,
                        help="intrinsic dimension of the synthetic embeddings")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef_search", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        for d in args.dims:
            rows += run(n, d, args)
            print(tabulate(rows[-5:], headers="keys"), flush=True)
    print(f"\n{args.queries} cosine queries per batch, k={args.k}, latent_dim="
          f"{args.latent_dim}, {args.clusters} clusters; JAX on "
          f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
