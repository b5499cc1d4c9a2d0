"""Shared residual streams: the plan of a joint forward pass over several submodels.

Submodels whose FFN widths agree on layers 0..i-1 feed layer i the same input, so one
residual stream carries them all until their widths part:
- the layer's attention runs once per stream (every submodel has the full attention);
- its FFN runs once per stream at the widest width wanted there, in segments between the
  distinct widths, and the output for width w is the sum of the segments below w — the
  units [0, w) are exactly the narrower submodel's FFN;
- after the layer the stream splits, one per distinct width.
The uniform S/M/L/XL granularities share layer 0 this way (the embedding output is the
same for all); Mix'n'Match submodels that agree on their first layers share them whole.
The model (`MatLM(..., joint_widths=...)`) and the FLOP counter
(`counting.joint_forward_flops_per_token`) both follow this one plan.
"""
from __future__ import annotations

from typing import Sequence

# One layer: for each stream entering it, (submodels it carries, distinct widths
# ascending). Streams leave the layer in the same order, each split by width.
LayerPlan = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


def stream_plan(widths_per_submodel: Sequence[Sequence[int]]
                ) -> tuple[tuple[LayerPlan, ...], tuple[tuple[int, ...], ...]]:
    """(per-layer plan, submodels carried by each final stream) for static width vectors.

    Submodels are indices into `widths_per_submodel`. Identical width vectors end in the
    same final stream (they are the same submodel).
    """
    vectors = [tuple(int(w) for w in ws) for ws in widths_per_submodel]
    if not vectors:
        raise ValueError("a joint forward pass needs at least one width vector")
    if len({len(v) for v in vectors}) != 1:
        raise ValueError(f"width vectors of different lengths: {vectors}")
    streams: list[tuple[int, ...]] = [tuple(range(len(vectors)))]
    layers = []
    for layer in range(len(vectors[0])):
        plan, split = [], []
        for members in streams:
            widths = tuple(sorted({vectors[m][layer] for m in members}))
            plan.append((members, widths))
            split.extend(tuple(m for m in members if vectors[m][layer] == w) for w in widths)
        layers.append(tuple(plan))
        streams = split
    return tuple(layers), tuple(streams)
