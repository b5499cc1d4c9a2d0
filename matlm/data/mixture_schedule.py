"""Which task serves each row of a mixture: a seeded schedule of fixed blocks of rows.

The same schedule (and seed key) serves in-memory mixtures (`matlm.data.pipeline`) and
mixtures with streamed components (`matlm.data.stream_mixture`), so the rates hold exactly
per block and a global row's (task, index) is computed directly, whatever the host count.
"""
from __future__ import annotations

import collections

import numpy as np

from matlm.data.errors import DataError
from matlm.data.seed_streams import SeedStream

MIX_BLOCK_ROWS = 4096  # Rows per mixture schedule block: rates are exact per block.


class MixtureSchedule:
    """Which task, and which of its rows, the host's k-th mixture row comes from.

    Rows come in blocks of `block` rows; task t owns `counts[t]` slots of every block
    (rates apportioned by largest remainder), at seeded positions. Task t's row index
    for a slot is `block_index * counts[t] + (slots of t before it in the block)`.
    """

    def __init__(self, rates: list[float], seed_key: tuple[int, ...], block: int | None = None):
        # MIX_BLOCK_ROWS is read now, not bound as a default, so a test can use small blocks.
        block = MIX_BLOCK_ROWS if block is None else block
        shares = np.asarray(rates, np.float64) / np.sum(rates) * block
        counts = np.floor(shares).astype(np.int64)
        remainder_order = np.argsort(-(shares - counts), kind="stable")
        counts[remainder_order[:block - counts.sum()]] += 1
        if np.any(counts == 0):
            raise DataError(f"mixture rates {rates} give a task no rows in a block of "
                            f"{block}; raise its rate")
        self.counts, self.block, self.seed_key = counts, block, seed_key
        self._blocks: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            rng = np.random.default_rng([*self.seed_key, SeedStream.MIX_ORDER, b])
            slots = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
            rank = np.zeros_like(slots)
            for t in range(len(self.counts)):
                rank[slots == t] = np.arange(self.counts[t])
            self._blocks[b] = (slots, rank)
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        task = np.empty_like(k)
        index = np.empty_like(k)
        blocks = k // self.block
        for b in np.unique(blocks):
            where = blocks == b
            slots, rank = self._block(int(b))
            offset = k[where] % self.block
            task[where] = slots[offset]
            index[where] = b * self.counts[slots[offset]] + rank[offset]
        return task, index
