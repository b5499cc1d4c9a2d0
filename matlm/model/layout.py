"""FFN unit layout: where each nested hidden unit lives in the stored kernels.

With `ffn_nest_blocks = N`, a layer's d_ff hidden units are stored as N equal blocks and
granularity m uses the first m/N units *of each block*. In nesting ("logical") order,
unit u lives at physical index (u mod N)·(d_ff/N) + u div N, so that the first m logical
units are exactly the units granularity m uses, and every tensor shard (holding whole
blocks) gets an equal share of every granularity.
"""
from __future__ import annotations

import numpy as np


def logical_to_physical(d_ff: int, nest_blocks: int) -> np.ndarray:
    """perm[u] = the stored index of the u-th unit in nesting order."""
    u = np.arange(d_ff)
    return (u % nest_blocks) * (d_ff // nest_blocks) + u // nest_blocks


def ffn_to_contiguous(params, nest_blocks: int):
    """Reorders every layer's FFN kernels into nesting order (a plain prefix layout,
    `ffn_nest_blocks = 1`), e.g. to export or to compare with a dense model."""
    if nest_blocks == 1:
        return params
    out = dict(params)
    for name, layer in params.items():
        if not name.startswith("layer_"):
            continue
        ffn = {}
        for kernel, w in layer["ffn"].items():
            axis = 0 if kernel == "wo" else 1
            perm = logical_to_physical(w.shape[axis], nest_blocks)
            ffn[kernel] = np.take(np.asarray(w), perm, axis=axis)
        out[name] = {**layer, "ffn": ffn}
    return out
