"""`matlm embed`: the pooled embedding of any MatViT submodels for a split of images.

    matlm embed --model_dir=runs/matvit_default --split=train
    matlm embed --model_dir=runs/matvit_default --split=validation --widths=S,XL \
        --widths=mixnmatch:4 --output=val.parquet

One joint pass per batch encodes every submodel named (granularities, width vectors,
Mix'n'Match presets, as `matlm eval --widths`); padding is dropped, rows follow the
split's fixed order. Output (default MODEL_DIR/embeddings/STEP/<split>.npz):
- `.npz`: `vectors/<submodel>` float32 [N, D], `labels` int32 [N] and a JSON `meta`
  (`matlm.retrieval.embed.load_embeddings` reads it);
- `.parquet`: one row per image: `label`, and one list<float32> column per submodel.
An existing file is never overwritten. Throughput (images/s) is printed.
"""
from __future__ import annotations

import time
from pathlib import Path

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

PARENTS = [flags.model_dir(), flags.step(),
           flags.output("the embeddings file, .npz or .parquet (default "
                        "MODEL_DIR/embeddings/STEP/<split>.npz); must not exist"),
           flags.no_progress()]
FORMATS = (".npz", ".parquet")
FLAG_CHECKS = {"step": Check(int, ge=0), "batch_size": Check(int, ge=1),
               "max_examples": Check(int, ge=1)}


def add_arguments(parser) -> None:
    parser.add_argument("--split", default=None,
                        help="the image split (default: the run's train split, the database "
                             "of retrieval)")
    parser.add_argument("--granularities", default=None,
                        help="comma-separated granularity names (default: all)")
    parser.add_argument("--widths", action="append", default=[],
                        help="a submodel to add, as for matlm eval: a granularity name, one "
                             "width per layer (S,XL,M,L) or mixnmatch:N[:SEED] (repeatable)")
    parser.add_argument("--batch_size", type=int, default=250, help="images per batch")
    parser.add_argument("--max_examples", type=int, default=None,
                        help="embed only the first N images of the split's order")


def open_image_run(model_dir_flag: str, command: str):
    """(model dir, run config) of a MatViT checkpoint; a one-line error for a text one."""
    import matlm.model_dir as model_dir_lib
    from matlm.model import family_of
    model_dir, run_config = model_dir_lib.open_run(model_dir_flag)
    if family_of(run_config.model).tokens:
        raise ValueError(f"{model_dir_flag} holds a "
                         f"{family_of(run_config.model).name!r} model; {command} needs a MatViT "
                         "(an image encoder) checkpoint")
    return model_dir, run_config


def image_batches(data_config, config, split: str, batch_size: int, max_examples=None):
    """One pass over `split` in its fixed order, cut to `max_examples` real images."""
    batches = data_config.eval_iterator(config.image_shape, batch_size, split=split)
    if max_examples is None:
        return batches

    def cut():
        seen = 0
        for batch in batches:
            if seen >= max_examples:
                return
            mask = batch["mask"].copy()
            mask[(mask > 0).cumsum() > max_examples - seen] = 0.0
            seen += int(mask.sum())
            yield dict(batch, mask=mask)
    return cut()


def write_embeddings(path: Path, embeddings) -> None:
    from matlm.retrieval.embed import save_embeddings
    if path.suffix == ".npz":
        save_embeddings(path, embeddings)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    from matlm.fileio import write_atomically
    columns = {"label": pa.array(embeddings.labels)}
    for name, vectors in embeddings.vectors.items():
        columns[name] = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1)), vectors.shape[1])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    write_atomically(path, sink.getvalue().to_pybytes())


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    flags.refuse_gin_bindings("matlm embed", gin_bindings)
    from matlm.evaluation.submodels import resolve_submodels
    import matlm.model_dir as model_dir_lib
    from matlm.model_dir import storage
    from matlm.retrieval.embed import embed_images

    start = time.time()
    model_dir, run_config = open_image_run(args.model_dir, "embed")
    config, data_config = run_config.model, run_config.data
    split = args.split or data_config.train_split
    names = [n.strip() for n in args.granularities.split(",")] if args.granularities else None
    submodels, _ = resolve_submodels(config, names, args.widths)
    step = model_dir.resolve_step(args.step)
    output = flags.default_output(model_dir, args.output,
                                 model_dir.path / "embeddings" / str(step) / f"{split}.npz")
    if output.suffix not in FORMATS:
        raise ValueError(f"--output={str(output)!r} must end in "
                         f"{' or '.join(FORMATS)}")
    if output.exists():
        raise ValueError(f"{output} exists; give a new --output "
                         "(nothing is overwritten)")
    batches = image_batches(data_config, config, split, args.batch_size, args.max_examples)
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    embeddings = embed_images(config, loaded.params, batches,
                              {s.name: s.widths for s in submodels},
                              progress=not args.no_progress)
    with storage.staged_file(output) as local:  # On a bucket: written here, then uploaded.
        write_embeddings(local, embeddings)
    dims = next(iter(embeddings.vectors.values())).shape[1]
    print(f"{embeddings.num_images} images of {data_config.dataset}:{split} x "
          f"{len(submodels)} submodels ({', '.join(s.name for s in submodels)}), "
          f"{dims} dims, {embeddings.images_per_second:.0f} images/s "
          f"(one joint pass per batch, compile included); wrote {output} in "
          f"{time.time() - start:.0f}s")
    return 0
