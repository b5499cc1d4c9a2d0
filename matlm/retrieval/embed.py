"""Embeddings of a MatViT's nested submodels, from one joint pass per batch.

    result = embed_images(model_config, params, batches,
                          {"S": "S", "XL": "XL", "mix": ["S", "XL", ...]})
    result.vectors["S"]        # float32 [N, D]: the pooled, final-normed embeddings
    result.labels              # int32 [N]
    result.images_per_second   # throughput of the whole pass (compile included)

Every submodel of a MatViT shares the patch embedding, attention and final norm, so all
of them are computed in one forward pass over shared residual streams
(`MatViT(..., joint_widths=...)`): a stream splits only where submodels' widths differ,
which is cheaper than one pass per submodel. The width vectors are static, so the pass is
jitted once; batches are padded to the first batch's size so the last (short) one does
not compile again. Rows with mask 0 (the padding that ends a one-epoch
`make_image_batch_iterator(..., shuffle=False, repeat=False)`) are dropped.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from matlm.fileio import write_atomically
from matlm.model import build_model, family_of

FILE_VERSION = "embeddings-1"


@dataclasses.dataclass
class Embeddings:
    """The embeddings of one pass over a split: `vectors[name]` float32 [N, D] per
    submodel (rows in the iterator's order, padding dropped), `labels` int32 [N]."""
    vectors: dict[str, np.ndarray]
    labels: np.ndarray
    widths: dict[str, tuple[int, ...]]  # The resolved per-layer width vector of each name.
    num_images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


def resolve_widths_by_name(model_config, widths_by_name: Mapping[str, Any]
                           ) -> dict[str, tuple[int, ...]]:
    """Each name's per-layer width vector; a value may be a granularity name ("S"), a
    width, "S,M,..." or a per-layer list (`ModelConfig.resolve_widths`)."""
    if not widths_by_name:
        raise ValueError("widths_by_name is empty: name at least one submodel, e.g. "
                         '{"XL": "XL"}')
    return {str(name): tuple(int(w) for w in model_config.resolve_widths(value))
            for name, value in widths_by_name.items()}


def make_embed_fn(model_config, widths: list[tuple[int, ...]], mesh=None):
    """`embed(params, images_BHWC) -> tuple of [B, D] float32`, one per width vector,
    jitted once (static widths). With a mesh, traced under it (activation constraints)."""
    model = build_model(model_config)

    def embed(params, images_BHWC):
        return model.apply({"params": params}, images_BHWC, joint_widths=widths,
                           return_embedding=True)

    if mesh is None:
        return jax.jit(embed)
    from matlm.training.train_step import batch_sharding_of, traced_in_mesh
    return jax.jit(traced_in_mesh(embed, mesh),
                   in_shardings=(None, batch_sharding_of(model_config, mesh)))


def _check_batch(batch, image_shape) -> None:
    missing = {"images", "labels", "mask"} - set(batch)
    if missing:
        raise ValueError(f"batch lacks {sorted(missing)}: expected images [b, H, W, C], "
                         "labels [b] and mask [b] (matlm.data.images)")
    if tuple(np.shape(batch["images"])[1:]) != tuple(image_shape):
        raise ValueError(f"images of shape {np.shape(batch['images'])} for a MatViT of "
                         f"[b, {', '.join(map(str, image_shape))}] inputs")


def _check_divides(batch_size: int, mesh) -> None:
    if mesh is None:
        return
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"batches of {batch_size} images do not split over the mesh's "
                         f"{shards} batch shards (data × fsdp); use a multiple of {shards}")


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def embed_images(model_config, params, batches: Iterable[dict],
                 widths_by_name: Mapping[str, Any], mesh=None, progress: bool = True,
                 total_batches: int | None = None) -> Embeddings:
    """Embeddings [N, D] of every submodel in `widths_by_name` for the images of
    `batches` (dicts of images [b, H, W, C], labels [b], mask [b]), from one joint pass
    per batch; rows with mask 0 are dropped. `mesh`: shard each batch's rows over the
    mesh's batch axes (single process; `params` already placed); None: one device.
    `progress`: a tqdm bar (its total from `total_batches` or `len(batches)`)."""
    if family_of(model_config).name != "vit":
        raise ValueError(f"embed_images needs a MatViT config (family 'vit'), got "
                         f"{type(model_config).__name__}")
    if mesh is not None and jax.process_count() > 1:
        raise NotImplementedError("embed_images with a mesh runs in one process; on several "
                                  "hosts embed each host's share without a mesh")
    widths = resolve_widths_by_name(model_config, widths_by_name)
    names = list(widths)
    embed = make_embed_fn(model_config, [widths[n] for n in names], mesh)
    if total_batches is None and hasattr(batches, "__len__"):
        total_batches = len(batches)
    if total_batches is None:  # An epoch of matlm.data.images' iterator knows its length.
        total_batches = getattr(batches, "num_batches", None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_batches, desc="embed", unit="batch", leave=False)

    vectors: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels, batch_size, start, num_images = [], None, time.perf_counter(), 0

    def collect(outputs, keep, b):
        for name, out_BD in zip(names, outputs):
            vectors[name].append(np.asarray(out_BD, np.float32)[:b][keep])

    pending = None  # The previous batch's outputs, read after the next one is dispatched.
    try:
        for batch in batches:
            _check_batch(batch, model_config.image_shape)
            images = np.asarray(batch["images"], np.float32)
            keep = np.asarray(batch["mask"]) > 0
            if batch_size is None:
                batch_size = len(images)  # Shorter batches pad up to it: one compile.
                _check_divides(batch_size, mesh)
            outputs = embed(params, _pad_to(images, max(batch_size, len(images))))
            if pending is not None:
                collect(*pending)
            pending = (outputs, keep, len(images))
            labels.append(np.asarray(batch["labels"], np.int32)[keep])
            num_images += int(keep.sum())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(images=num_images)
        if pending is not None:
            collect(*pending)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    if not labels:
        raise ValueError("batches yielded no batch: nothing to embed")
    result = Embeddings(vectors={n: np.concatenate(v) for n, v in vectors.items()},
                        labels=np.concatenate(labels), widths=widths, num_images=num_images,
                        seconds=seconds)
    if progress:
        print(f"embedded {num_images} images × {len(names)} submodels in {seconds:.1f}s "
              f"({result.images_per_second:.1f} images/s, compile included)")
    return result


def save_embeddings(path, embeddings: Embeddings) -> None:
    """One .npz file (written atomically): `vectors/<name>` [N, D], `labels` [N], and a
    JSON `meta` (version, width vectors, count, seconds). `load_embeddings` reads it."""
    meta = {"version": FILE_VERSION, "names": list(embeddings.vectors),
            "widths": {n: list(w) for n, w in embeddings.widths.items()},
            "num_images": embeddings.num_images, "seconds": embeddings.seconds}
    buffer = io.BytesIO()
    np.savez(buffer, labels=embeddings.labels, meta=np.array(json.dumps(meta)),
             **{f"vectors/{n}": v for n, v in embeddings.vectors.items()})
    write_atomically(path, buffer.getvalue())


def load_embeddings(path) -> Embeddings:
    """The `Embeddings` that `save_embeddings` wrote; a one-line error for another file."""
    with np.load(path, allow_pickle=False) as data:
        if "meta" not in data.files:
            raise ValueError(f"{path} is not an embeddings file (no meta; written by "
                             "matlm.retrieval.embed.save_embeddings?)")
        meta = json.loads(str(data["meta"]))
        if meta.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: embeddings file version {meta.get('version')!r}, "
                             f"expected {FILE_VERSION!r}")
        return Embeddings(vectors={n: data[f"vectors/{n}"] for n in meta["names"]},
                          labels=data["labels"],
                          widths={n: tuple(w) for n, w in meta["widths"].items()},
                          num_images=int(meta["num_images"]), seconds=float(meta["seconds"]))
