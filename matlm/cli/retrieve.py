"""`matlm retrieve`: image retrieval with a MatViT's submodels (the paper's Table 8 /
Figure 6 experiments) on the run's own images.

    matlm retrieve --model_dir=runs/matvit_default
    matlm retrieve --model_dir=runs/matvit_default --widths=mixnmatch:4 --shortlist=S \
        --shortlist_k=5,20,100 --index=faiss-hnsw

The database is the run's train split, the queries its eval split (flags change both).
Every submodel encodes both in one joint pass per batch; then, per query encoder:
- 1-NN accuracy with the same submodel encoding database and queries;
- **adaptive**: the database encoded once by `--database_encoder` (XL), the queries by
  each submodel: whether the nested submodels share XL's metric space;
- a **cascade**: shortlist the top-k by `--shortlist`'s embeddings, re-rank them with
  XL's, with the query cost (encoder FLOPs + search dot products).
Search is exact in JAX (`matlm.retrieval.exact`) or a FAISS index (`--index`, the
`.[retrieval]` extra). Writes retrieval.json, retrieval.md and retrieval.png to --output
(default MODEL_DIR/retrieval/STEP), which must be new or empty.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from matlm.cli import flags
from matlm.cli.embed import image_batches, open_image_run
from matlm.config_checks import Check, check_flags

PARENTS = [flags.model_dir(), flags.step(),
           flags.output("results dir (default MODEL_DIR/retrieval/STEP); must be new or empty"),
           flags.no_plots(), flags.no_progress()]
INDEXES = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
FLAG_CHECKS = {"step": Check(int, ge=0), "batch_size": Check(int, ge=1),
               "max_database": Check(int, ge=1), "max_queries": Check(int, ge=1)}


def add_arguments(parser) -> None:
    parser.add_argument("--database_split", default=None,
                        help="the split encoded as the database (default: the run's train split)")
    parser.add_argument("--query_split", default=None,
                        help="the split of the queries (default: the run's eval split)")
    parser.add_argument("--granularities", default=None,
                        help="comma-separated granularity names (default: all)")
    parser.add_argument("--widths", action="append", default=[],
                        help="a query encoder to add, as for matlm eval: one width per layer "
                             "(S,XL,M,L) or mixnmatch:N[:SEED] (repeatable)")
    parser.add_argument("--database_encoder", default=None,
                        help="the submodel that encodes the database for adaptive retrieval "
                             "(default: the largest granularity, XL)")
    parser.add_argument("--shortlist", default=None,
                        help="the cascade's shortlisting submodel (default: the smallest "
                             "granularity)")
    parser.add_argument("--shortlist_k", default="1,5,20,100",
                        help="comma-separated shortlist sizes of the cascade")
    parser.add_argument("--metric", default="cosine", choices=("cosine", "l2"))
    parser.add_argument("--index", default="exact", choices=INDEXES,
                        help="exact search in JAX, or a FAISS index (pip install -e "
                             "'.[retrieval]')")
    parser.add_argument("--batch_size", type=int, default=250, help="images per batch")
    parser.add_argument("--max_database", type=int, default=None,
                        help="only the first N database images")
    parser.add_argument("--max_queries", type=int, default=None,
                        help="only the first N query images")


def _shortlist_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ValueError(f"--shortlist_k={text!r}: give comma-separated sizes >= 1, e.g. 5,20")
    return ks


def search_fn(index: str, metric: str):
    """(database [N, D], queries [Q, D]) -> database index [Q] of each query's nearest."""
    if index == "exact":
        from matlm.retrieval.exact import nearest_neighbors
        return lambda db, q: nearest_neighbors(db, q, 1, metric)[0][:, 0]
    from matlm.retrieval.ann import approximate_nearest_neighbors
    kind = index.split("-", 1)[1]
    return lambda db, q: approximate_nearest_neighbors(db, q, 1, metric, kind=kind)[0][:, 0]


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    flags.refuse_gin_bindings("matlm retrieve", gin_bindings)
    ks = _shortlist_ks(args.shortlist_k)
    if args.index != "exact":
        from matlm.retrieval.ann import import_faiss
        import_faiss()  # Missing extra: one line now, before any work.
    import numpy as np
    from tabulate import tabulate

    from matlm.evaluation.submodels import resolve_submodels
    from matlm.model.counting import forward_flops_per_image
    import matlm.model_dir as model_dir_lib
    from matlm.model_dir import storage
    from matlm.retrieval.embed import embed_images
    from matlm.retrieval.evaluate import cascade_sweep

    start = time.time()
    model_dir, run_config = open_image_run(args.model_dir, "retrieve")
    config, data_config = run_config.model, run_config.data
    spec = config.granularities
    names = [n.strip() for n in args.granularities.split(",")] if args.granularities else None
    database_encoder = args.database_encoder or spec.names[-1]
    submodels, _ = resolve_submodels(config, names, args.widths, reference=database_encoder)
    by_name = {s.name: s for s in submodels}
    shortlist = args.shortlist or spec.names[0]
    if shortlist not in by_name:
        try:
            extra, _ = resolve_submodels(config, [], [shortlist], reference=database_encoder)
        except ValueError as e:
            raise ValueError(f"--shortlist={shortlist!r}: {e}") from None
        submodels += [s for s in extra if s.name not in by_name]
        by_name = {s.name: s for s in submodels}
    if max(ks) > (args.max_database or float("inf")):
        raise ValueError(f"--shortlist_k={max(ks)} exceeds --max_database={args.max_database}")
    step = model_dir.resolve_step(args.step)
    output = flags.new_output_dir(model_dir, args.output,
                                  model_dir.path / "retrieval" / str(step))
    database_split = args.database_split or data_config.train_split
    query_split = args.query_split or data_config.eval_split
    widths = {s.name: s.widths for s in submodels}
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    encode = lambda split, limit: embed_images(
        config, loaded.params,
        image_batches(data_config, config, split, args.batch_size, limit), widths,
        progress=not args.no_progress)
    database = encode(database_split, args.max_database)
    queries = encode(query_split, args.max_queries)
    if max(ks) > database.num_images:
        raise ValueError(f"--shortlist_k={max(ks)} exceeds the {database.num_images} database "
                         "images")
    search = search_fn(args.index, args.metric)
    flops = {s.name: forward_flops_per_image(config, s.widths) for s in submodels}
    accuracy = lambda db, q: float(np.mean(database.labels[search(db, q)] == queries.labels))
    rows = [{"query_encoder": s.name, "widths": list(s.widths), "params": s.params,
             "query_gflops": flops[s.name] / 1e9,
             "same_encoder_1nn": accuracy(database.vectors[s.name], queries.vectors[s.name]),
             "adaptive_1nn": accuracy(database.vectors[database_encoder],
                                      queries.vectors[s.name])}
            for s in submodels]
    cascade = cascade_sweep(
        database.vectors[shortlist], queries.vectors[shortlist],
        database.vectors[database_encoder], queries.vectors[database_encoder],
        database.labels, queries.labels, ks, metric=args.metric,
        query_encoder_flops=flops[shortlist] + flops[database_encoder],
        small_name=shortlist, large_name=database_encoder)
    result = {"checkpoint": str(args.model_dir), "step": step, "dataset": data_config.dataset,
              "database_split": database_split, "query_split": query_split,
              "database_images": database.num_images, "query_images": queries.num_images,
              "database_encoder": database_encoder, "metric": args.metric,
              "index": args.index, "retrieval": rows, "cascade": cascade,
              "embed_images_per_second": (database.num_images + queries.num_images)
              / max(database.seconds + queries.seconds, 1e-9)}
    table = tabulate(
        [[r["query_encoder"], f"{r['params']:,}", f"{r['query_gflops']:.4g}",
          f"{100 * r['same_encoder_1nn']:.2f}", f"{100 * r['adaptive_1nn']:.2f}"] for r in rows],
        headers=["query encoder", "params", "GFLOPs/query", "1-NN % (same encoder)",
                 f"1-NN % ({database_encoder} database)"],
        tablefmt="github", disable_numparse=True)
    cascade_table = tabulate(
        [[c["shortlist_k"], f"{100 * c['accuracy']:.2f}", f"{c['query_gflops']:.4g}"]
         for c in cascade],
        headers=[f"shortlist k ({shortlist}, re-ranked by {database_encoder})", "1-NN %",
                 "GFLOPs/query"], tablefmt="github", disable_numparse=True)
    text = (f"# Retrieval with {args.model_dir} (step {step})\n\n"
            f"{database.num_images} database images ({data_config.dataset}:{database_split}), "
            f"{queries.num_images} queries ({query_split}), {args.metric} similarity, "
            f"{args.index} search.\n\n{table}\n\nCascade:\n\n{cascade_table}\n")
    with storage.staged_dir(output) as local:  # On a bucket: written here, then uploaded.
        (local / "retrieval.json").write_text(json.dumps(result, indent=2) + "\n")
        (local / "retrieval.md").write_text(text)
        written = ["retrieval.json", "retrieval.md"]
        if not args.no_plots:
            _plot(rows, cascade, database_encoder, local / "retrieval.png")
            written.append("retrieval.png")
    print(text)
    print(f"embedded at {result['embed_images_per_second']:.0f} images/s; wrote "
          f"{', '.join(written)} to {output} in {time.time() - start:.0f}s")
    return 0


def _plot(rows, cascade, database_encoder: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["query_gflops"] for r in rows]
    ax.plot(x, [100 * r["same_encoder_1nn"] for r in rows], "o", label="same encoder")
    ax.plot(x, [100 * r["adaptive_1nn"] for r in rows], "s",
            label=f"adaptive ({database_encoder} database)")
    for r in rows:
        ax.annotate(r["query_encoder"], (r["query_gflops"], 100 * r["adaptive_1nn"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([c["query_gflops"] for c in cascade], [100 * c["accuracy"] for c in cascade],
            "^-", label="cascade")
    ax.set_xlabel("GFLOPs per query")
    ax.set_ylabel("1-NN accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
