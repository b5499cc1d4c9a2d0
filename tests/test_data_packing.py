"""Packing: segments, positions, shifted inputs, and no token lost or duplicated."""
import numpy as np
import pytest

from matlm.data import packing


def _docs(lengths):
    # Token values encode (document, offset) so every token is unique and traceable.
    return [np.arange(n, dtype=np.int32) + 1000 * (d + 1) for d, n in enumerate(lengths)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_token_once_segments_and_positions(shuffle):
    lengths = [1, 5, 17, 3, 40, 2, 9, 9, 30]
    docs = _docs(lengths)
    store = packing.TokenStore.from_documents(docs)
    layout = packing.EpochLayout(store, 8, np.random.default_rng(3) if shuffle else None)
    rows = layout.rows(np.arange(layout.num_rows))
    features = packing.model_features(rows, start_id=7)
    mask = features["loss_mask"] > 0
    # No token lost or duplicated: the real targets are exactly the corpus tokens.
    np.testing.assert_array_equal(np.sort(features["targets"][mask]),
                                  np.sort(np.concatenate(docs)))
    assert mask.sum() == sum(lengths)
    assert (~mask).sum() == layout.num_rows * 8 - sum(lengths)  # Only the stream end pads.
    for r in range(layout.num_rows):
        seg, pos, tgt, inp = (features[k][r] for k in ("segment_ids", "positions", "targets",
                                                        "inputs"))
        assert seg[0] == 1 or seg[0] == 0
        for s in set(seg[seg > 0].tolist()):
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1)  # A segment is contiguous.
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # Restart at 0.
            doc = tgt[where] // 1000
            assert np.all(doc == doc[0])  # One document per segment.
            assert np.all(np.diff(tgt[where]) == 1)  # In order.
            # Shifted inputs: start id, then the previous token of the same segment only.
            assert inp[where[0]] == 7
            np.testing.assert_array_equal(inp[where[1:]], tgt[where[:-1]])
        assert np.all(np.diff(seg[seg > 0]) >= 0)
        assert np.all(inp[seg == 0] == 0) and np.all(pos[seg == 0] == 0)


def test_rows_are_random_access():
    store = packing.TokenStore.from_documents(_docs([7, 30, 4, 11]))
    layout = packing.EpochLayout(store, 6, np.random.default_rng(0))
    all_rows = layout.rows(np.arange(layout.num_rows))
    some = layout.rows(np.array([3, 0, 5]))
    for k in all_rows:
        np.testing.assert_array_equal(some[k], all_rows[k][[3, 0, 5]])
