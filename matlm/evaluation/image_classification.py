"""`matlm eval` for a MatViT: top-1 / top-5, loss and consistency of any set of submodels
on a split of labelled images, in one pass over the data.

Each batch is read once and every submodel classifies it, so a TFDS split is streamed
once, however many submodels are evaluated. The masked path (default) passes each width
vector as a traced array: one compile serves every granularity and Mix'n'Match vector.
`masked=False` slices kernels per submodel (fewer FLOPs, one compile each), as
`matlm eval --sliced` does for text.

The result has the shape `matlm.evaluation.runner.run` returns for text tasks (one task
of kind `image_classification`, primary metric top1), so `report` writes the same
results.json, results.md and accuracy-vs-parameters plot, and `matlm search` ranks by it.
Consistency is `answer_agreement`: the fraction of images whose predicted class is the
reference submodel's (XL by default), the paper's consistency for MatViT.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from matlm.evaluation.submodels import Submodel
from matlm.evaluation.task_metrics import IMAGE_CLASSIFICATION
from matlm.model import build_model

TOP_K = 5


def task_name(dataset: str, split: str) -> str:
    return f"{dataset}:{split}"


class ImageClassifier:
    """`logits(params, images, widths)` -> [B, K] of any submodel: widths traced (masked,
    one compile for every vector) or static (sliced, a compile per vector). Keep one
    instance to reuse its compiled functions (`matlm search` scores many candidates)."""

    def __init__(self, config, masked: bool = True):
        model = build_model(config)
        self.masked = masked
        if masked:
            self._fn = jax.jit(lambda params, images, widths_L: model.apply(
                {"params": params}, images, widths=widths_L))
        else:
            self._fn = jax.jit(lambda params, images, widths: model.apply(
                {"params": params}, images, widths=list(widths)), static_argnums=2)

    def logits(self, params, images, widths) -> np.ndarray:
        widths = jnp.asarray(widths, jnp.int32) if self.masked else tuple(int(w) for w in widths)
        return np.asarray(jax.device_get(self._fn(params, images, widths)))

    def compiled_count(self) -> int:
        return self._fn._cache_size()


def classification_counts(logits_BK: np.ndarray, labels_B: np.ndarray, mask_B: np.ndarray,
                          reference_pred_B: np.ndarray) -> dict:
    """Sums over the real (mask 1) examples of one batch: CE, top-1 and top-k hits,
    agreement with the reference predictions, and the count."""
    real = mask_B > 0
    logits_BK, labels_B = logits_BK[real].astype(np.float64), labels_B[real]
    log_probs_BK = logits_BK - logits_BK.max(-1, keepdims=True)
    log_probs_BK -= np.log(np.exp(log_probs_BK).sum(-1, keepdims=True))
    k = min(TOP_K, logits_BK.shape[-1])
    # Ties rank the lower class first (argsort of the negation is stable).
    top_BK = np.argsort(-logits_BK, axis=-1, kind="stable")[:, :k]
    return {"loss": -log_probs_BK[np.arange(len(labels_B)), labels_B].sum(),
            "top1": float((top_BK[:, 0] == labels_B).sum()),
            "top5": float((top_BK == labels_B[:, None]).any(-1).sum()),
            "answer_agreement": float((top_BK[:, 0] == reference_pred_B[real]).sum()),
            "count": float(real.sum())}


def evaluate(config, params, batches: Iterable[dict], submodels: Sequence[Submodel],
             reference: str, *, task: str, masked: bool = True, progress: bool = True,
             max_examples: int | None = None, total: int | None = None,
             classifier: ImageClassifier | None = None) -> dict:
    """Evaluates `submodels` on `batches` (dicts of images, labels, mask); the result as
    `runner.run`'s (see the module docstring). `max_examples`: stop after that many real
    images (the first ones of the split's fixed eval order). `classifier`: reuse one
    (and its compiled functions); else one is built for `masked`."""
    classifier = classifier or ImageClassifier(config, masked)
    by_name = {s.name: s for s in submodels}
    order = [reference, *[s.name for s in submodels if s.name != reference]]
    sums = {name: {} for name in order}
    seen = 0
    bar = tqdm(total=max_examples or total, disable=not progress, unit="img",
               desc=f"{task} × {len(submodels)} submodels", dynamic_ncols=True)
    for batch in batches:
        mask_B = np.asarray(batch["mask"], np.float32).copy()
        if max_examples is not None:  # Keep only the first `max_examples` real images.
            room = max_examples - seen
            mask_B[np.cumsum(mask_B > 0) > room] = 0.0
        if not mask_B.any():
            break
        images = jnp.asarray(batch["images"])
        labels_B = np.asarray(batch["labels"])
        reference_pred_B = None
        for name in order:  # The reference first: the others are compared with it.
            logits_BK = classifier.logits(params, images, by_name[name].widths)
            if reference_pred_B is None:
                reference_pred_B = logits_BK.argmax(-1)
            for key, value in classification_counts(logits_BK, labels_B, mask_B,
                                                    reference_pred_B).items():
                sums[name][key] = sums[name].get(key, 0.0) + value
        real = int(mask_B.sum())
        seen += real
        bar.update(real)
    bar.close()
    if not seen:
        from matlm.evaluation.errors import EmptySplitError
        raise EmptySplitError(f"{task} has no images to evaluate")
    per_model = {name: {key: sums[name][key] / sums[name]["count"]
                        for key in ("loss", "top1", "top5", "answer_agreement")}
                 | {"examples": int(sums[name]["count"])}
                 for name in (s.name for s in submodels)}
    return {
        "tasks": {task: {"kind": IMAGE_CLASSIFICATION, "metric": "top1",
                         "metrics": per_model}},
        "groups": {},
        "submodels": {s.name: {"widths": list(s.widths), "params": s.params,
                               "non_embedding_params": s.non_embedding_params}
                      for s in submodels},
        "reference": reference,
        "options": {"num_shots": 0, "masked": classifier.masked,
                    "max_examples": max_examples},
        "compiled_functions": classifier.compiled_count(),
    }
