"""Packing tokenised documents into fixed-length rows, addressable by row index (numpy).

A `TokenStore` holds one host's documents, tokenised and EOS-terminated, back to back.
An `EpochLayout` fixes, for one epoch, a document order and a row order (both seeded
permutations). The documents, in that order, form one token stream; row `r` is the
stream's slice `[r * L, (r + 1) * L)`. So:
- no token is lost or duplicated within an epoch: rows tile the stream, and only the
  last row of the stream is padded;
- any row can be built directly from its index (O(rows) setup per epoch, O(L log D) per
  row), which is what makes resuming at step N immediate;
- a document cut by a row boundary continues in another row as a new segment whose
  positions restart at 0 (segments never attend across each other).

Model features of a row (`model_features`), next-token prediction with T5-style shifted
inputs: `targets` are the row's tokens; `inputs[j]` is the previous token of the same
segment, or `start_id` at a segment's first position. Every stream token is a target
exactly once, with `loss_mask = 1`; padding has segment 0, loss_mask 0.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenStore:
    tokens: np.ndarray      # int32 [num_tokens]: documents back to back, each ending in EOS.
    doc_starts: np.ndarray  # int64 [num_docs + 1]: document d is tokens[starts[d]:starts[d+1]].

    @classmethod
    def from_documents(cls, docs: Sequence[np.ndarray]) -> "TokenStore":
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = (np.concatenate(docs).astype(np.int32) if len(docs)
                  else np.zeros([0], np.int32))
        return cls(tokens=tokens, doc_starts=starts)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_starts[-1])

    def num_rows(self, seq_len: int) -> int:
        return -(-self.num_tokens // seq_len)


class EpochLayout:
    """Document order and row order of one epoch of a store (seeded by `rng`)."""

    def __init__(self, store: TokenStore, seq_len: int, rng: np.random.Generator | None):
        self.store, self.seq_len = store, seq_len
        lengths = np.diff(store.doc_starts)
        self.doc_order = (rng.permutation(store.num_docs) if rng is not None
                          else np.arange(store.num_docs))
        # End offset, in this epoch's stream, of the i-th document of the order.
        self.stream_ends = np.cumsum(lengths[self.doc_order])
        num_rows = store.num_rows(seq_len)
        self.row_order = rng.permutation(num_rows) if rng is not None else np.arange(num_rows)

    @property
    def num_rows(self) -> int:
        return len(self.row_order)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """targets/segment_ids/positions [len(indices), L] of the epoch's rows `indices`."""
        L = self.seq_len
        stream_rows = self.row_order[np.asarray(indices, dtype=np.int64)]
        stream_pos = stream_rows[:, None] * L + np.arange(L)[None, :]           # [B, L]
        valid = stream_pos < self.store.num_tokens
        order_idx = np.searchsorted(self.stream_ends, stream_pos, side="right")  # [B, L]
        order_idx = np.minimum(order_idx, self.store.num_docs - 1)
        doc = self.doc_order[order_idx]
        doc_stream_start = self.stream_ends[order_idx] - np.diff(self.store.doc_starts)[doc]
        offset_in_doc = stream_pos - doc_stream_start
        tokens = np.where(valid, self.store.tokens[np.where(
            valid, self.store.doc_starts[doc] + offset_in_doc, 0)], 0)
        # Segments: 1 for the row's first document, +1 at each new document.
        segment_ids = (order_idx - order_idx[:, :1] + 1) * valid
        # Positions restart at 0 per segment, including a document continued from elsewhere.
        positions = np.where(order_idx == order_idx[:, :1],
                             offset_in_doc - offset_in_doc[:, :1], offset_in_doc) * valid
        return {"targets": tokens.astype(np.int32),
                "segment_ids": segment_ids.astype(np.int32),
                "positions": positions.astype(np.int32)}


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    zeros = np.zeros([num_rows, seq_len], np.int32)
    return {"targets": zeros, "segment_ids": zeros.copy(), "positions": zeros.copy()}


def model_features(rows: dict[str, np.ndarray], start_id: int) -> dict[str, np.ndarray]:
    """inputs/targets/segment_ids/positions (int32) and loss_mask (float32) of packed rows."""
    targets, segment_ids = rows["targets"], rows["segment_ids"]
    inputs = np.empty_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    inputs[:, 0] = start_id
    segment_start = rows["positions"] == 0
    inputs = np.where(segment_start & (segment_ids > 0), start_id, inputs)
    inputs = np.where(segment_ids > 0, inputs, 0).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": rows["positions"], "loss_mask": (segment_ids > 0).astype(np.float32)}
