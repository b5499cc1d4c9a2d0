"""matlm.retrieval against independent references: exact k-NN against a numpy brute force
(both metrics, several k, blocks that do not divide N or Q, ties), the experiments
against hand-written numpy loops, embed_images against one model.apply per submodel, and
FAISS's flat index against the exact search (skipped without faiss)."""
import jax
import numpy as np
import pytest

from matlm.model import build_model, init_params
from matlm.model.vit_config import ViTConfig
from matlm.retrieval import (adaptive_retrieval, cascade, embed_images, load_embeddings,
                             nearest_neighbors, one_nn_accuracy, save_embeddings)
from matlm.retrieval.evaluate import vote


def _brute_force(db_ND, q_QD, k, metric):
    """(indices, scores) by float64 numpy: full score matrix, stable sort on -score, so
    ties go to the lower index."""
    db, q = db_ND.astype(np.float64), q_QD.astype(np.float64)
    if metric == "cosine":
        db = db / np.linalg.norm(db, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        scores = q @ db.T
    else:
        scores = -((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def _data(N, Q, D, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, D)).astype(np.float32),
            rng.standard_normal((Q, D)).astype(np.float32))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("k,query_block,database_block", [(1, 7, 13), (5, 64, 40), (12, 3, 100)])
def test_exact_knn_equals_numpy_brute_force(metric, k, query_block, database_block):
    db, q = _data(101, 23, 8)  # Blocks of 7/13, 3/40... divide neither N nor Q.
    index, scores = nearest_neighbors(db, q, k, metric, query_block=query_block,
                                      database_block=database_block)
    want_index, want_scores = _brute_force(db, q, k, metric)
    assert index.shape == (23, k) and scores.shape == (23, k)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ties_go_to_the_lower_index_across_database_blocks(metric):
    db, q = _data(30, 6, 4, seed=1)
    # Rows 3, 17 and 28 are identical (different database blocks of 8), and the queries
    # are that row: three exactly equal best scores.
    db[17] = db[28] = db[3]
    q[:] = db[3]
    for database_block in (8, 30, 5):
        index, scores = nearest_neighbors(db, q, 4, metric, query_block=4,
                                          database_block=database_block)
        np.testing.assert_array_equal(index[:, :3], np.tile([3, 17, 28], (6, 1)))
        assert np.all(scores[:, 0] == scores[:, 2])
    # Equal scores from distinct vectors: cosine ties for scaled copies.
    if metric == "cosine":
        db[9] = 2.0 * db[3]
        index, _ = nearest_neighbors(db, q[:1], 4, metric, database_block=7)
        np.testing.assert_array_equal(index[0], [3, 9, 17, 28])


def test_bad_search_input_is_refused_in_one_line():
    db, q = _data(10, 3, 4)
    for call, message in [(lambda: nearest_neighbors(db, q, 11), "exceeds"),
                          (lambda: nearest_neighbors(db, q, 0), "positive"),
                          (lambda: nearest_neighbors(db, q[:, :3], 1), "D=4"),
                          (lambda: nearest_neighbors(db, q, 1, "dot"), "metric")]:
        with pytest.raises(ValueError, match=message):
            call()


def _numpy_knn_accuracy(db, db_labels, q, q_labels, k, metric):
    index, _ = _brute_force(db, q, k, metric)
    correct = 0
    for i in range(len(q)):  # A majority vote written out; ties to the nearest-first label.
        labels = list(db_labels[index[i]])
        counts = {lab: labels.count(lab) for lab in labels}
        best = max(counts.values())
        predicted = next(lab for lab in labels if counts[lab] == best)
        correct += predicted == q_labels[i]
    return correct / len(q)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("k", [1, 4])
def test_knn_accuracy_equals_a_numpy_reference(metric, k):
    db, q = _data(60, 40, 6, seed=2)
    rng = np.random.default_rng(3)
    db_labels, q_labels = rng.integers(0, 3, 60), rng.integers(0, 3, 40)
    got = one_nn_accuracy(db, db_labels, q, q_labels, metric, k=k)
    assert got == _numpy_knn_accuracy(db, db_labels, q, q_labels, k, metric)
    assert 0.0 < got < 1.0  # Random labels: a test that can tell right from wrong.


def test_vote_breaks_ties_by_the_nearest_label():
    np.testing.assert_array_equal(vote(np.array([[2, 1, 1, 2], [0, 1, 2, 3], [5, 4, 4, 4]])),
                                  [2, 0, 4])


def _encoders(N, Q, D, names=("S", "M", "XL"), seed=4):
    """Embeddings where smaller encoders are noisier versions of the XL one."""
    rng = np.random.default_rng(seed)
    base_db, base_q = rng.standard_normal((N, D)), rng.standard_normal((Q, D))
    base_q[: Q // 2] = base_db[: Q // 2] + 0.5 * rng.standard_normal((Q // 2, D))
    db, q = {}, {}
    for noise, name in zip((0.8, 0.4, 0.0), names):
        db[name] = (base_db + noise * rng.standard_normal((N, D))).astype(np.float32)
        q[name] = (base_q + noise * rng.standard_normal((Q, D))).astype(np.float32)
    labels_db = rng.integers(0, 4, N)
    labels_q = rng.integers(0, 4, Q)
    labels_q[: Q // 2] = labels_db[: Q // 2]
    return db, q, labels_db, labels_q


def _numpy_1nn(db, q, metric):
    return _brute_force(db, q, 1, metric)[0][:, 0]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_adaptive_retrieval_equals_hand_computed_rows(metric):
    db, q, ldb, lq = _encoders(50, 30, 5)
    rows = adaptive_retrieval(db, q, ldb, lq, database_encoder="XL", metric=metric,
                              query_flops_by_name={"S": 1e9, "M": 2e9, "XL": 4e9})
    assert [r["query_encoder"] for r in rows] == ["S", "M", "XL"]
    for row in rows:
        name = row["query_encoder"]
        same = np.mean(ldb[_numpy_1nn(db[name], q[name], metric)] == lq)
        adaptive = np.mean(ldb[_numpy_1nn(db["XL"], q[name], metric)] == lq)
        assert row["same_encoder_accuracy"] == same
        assert row["adaptive_accuracy"] == adaptive
    assert rows[-1]["adaptive_accuracy"] == rows[-1]["same_encoder_accuracy"]
    assert [r["query_gflops"] for r in rows] == [1.0, 2.0, 4.0]
    # The small encoder is noisier: a wrong wiring (swapped encoders) would show.
    assert rows[0]["same_encoder_accuracy"] != rows[0]["adaptive_accuracy"] or \
        rows[0]["adaptive_accuracy"] != rows[-1]["adaptive_accuracy"]
    with pytest.raises(ValueError, match="database_encoder"):
        adaptive_retrieval(db, q, ldb, lq, database_encoder="L")


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cascade_equals_a_numpy_shortlist_then_rerank(metric):
    db, q, ldb, lq = _encoders(40, 25, 6, seed=5)
    small_db, small_q, large_db, large_q = db["S"], q["S"], db["XL"], q["XL"]
    N = len(ldb)
    xl = np.mean(ldb[_numpy_1nn(large_db, large_q, metric)] == lq)
    small = np.mean(ldb[_numpy_1nn(small_db, small_q, metric)] == lq)
    assert xl != small  # Else the two endpoint checks below could not tell them apart.
    for k in (1, 3, 10, N):
        shortlist, _ = _brute_force(small_db, small_q, k, metric)
        predicted = []
        for i in range(len(lq)):
            candidates = shortlist[i]
            scores = [_brute_force(large_db[c:c + 1], large_q[i:i + 1], 1, metric)[1][0, 0]
                      for c in candidates]
            # Highest large score, ties to the lower database index.
            best = max(range(k), key=lambda j: (scores[j], -candidates[j]))
            predicted.append(candidates[best])
        want = np.mean(ldb[np.array(predicted)] == lq)
        row = cascade(small_db, small_q, large_db, large_q, ldb, lq, k, metric=metric,
                      query_encoder_flops=3e9)
        assert row["accuracy"] == want, k
        assert row["query_gflops"] == pytest.approx(3.0 + (2 * N * 6 + 2 * k * 6) / 1e9)
        if k == N:
            assert row["accuracy"] == xl
        if k == 1:
            assert row["accuracy"] == small
    with pytest.raises(ValueError, match="shortlist_k"):
        cascade(small_db, small_q, large_db, large_q, ldb, lq, N + 1)


# ---- embeddings of a tiny MatViT ------------------------------------------------------

TINY = ViTConfig(image_size=8, patch_size=4, num_channels=1, num_classes=3, d_model=16,
                 n_layers=2, n_heads=2, d_ff=32, activation="gelu")


def _tiny_params():
    params = init_params(TINY, jax.random.key(0))
    rng = np.random.default_rng(0)  # Off the init values (zero class token, unit norms).
    return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), params)


def _batches(sizes_and_valid, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for size, valid in sizes_and_valid:
        images = rng.standard_normal((size, *TINY.image_shape)).astype(np.float32)
        images[valid:] = 0.0
        labels = rng.integers(0, 3, size).astype(np.int32)
        labels[valid:] = 0
        mask = (np.arange(size) < valid).astype(np.float32)
        batches.append({"images": images, "labels": labels, "mask": mask})
    return batches


WIDTHS = {"S": "S", "XL": "XL", "mix": ["S", "XL"], "also_S": (4, 4)}


def _separate_passes(params, batches):
    model = build_model(TINY)
    want = {}
    for name, spec in WIDTHS.items():
        widths = TINY.resolve_widths(spec)
        want[name] = np.concatenate([
            np.asarray(model.apply({"params": params}, b["images"], widths=widths,
                                   return_embedding=True))[b["mask"] > 0] for b in batches])
    return want


@pytest.mark.parametrize("use_mesh", [False, True])
def test_embed_images_equals_one_apply_per_submodel_and_drops_padding(use_mesh):
    params = _tiny_params()
    # A full batch, then the padded end of an epoch (3 real rows of 4), then a short one.
    batches = _batches([(4, 4), (4, 3), (2, 2)])
    mesh = None
    if use_mesh:
        from matlm.training.mesh import make_mesh, replicated
        mesh = make_mesh((2, 1, 1), devices=jax.devices()[:2])
        params = jax.device_put(params, replicated(mesh))
    result = embed_images(TINY, params, iter(batches), WIDTHS, mesh=mesh, progress=False)
    want = _separate_passes(params, batches)
    assert result.num_images == 9 and result.images_per_second > 0
    np.testing.assert_array_equal(result.labels,
                                  np.concatenate([b["labels"][b["mask"] > 0] for b in batches]))
    assert result.labels.dtype == np.int32
    assert set(result.vectors) == set(WIDTHS)
    for name in WIDTHS:
        got = result.vectors[name]
        assert got.shape == (9, TINY.d_model) and got.dtype == np.float32
        np.testing.assert_allclose(got, want[name], rtol=2e-5, atol=2e-5, err_msg=name)
    assert result.widths["mix"] == (4, 32)
    assert np.abs(result.vectors["S"] - result.vectors["XL"]).max() > 1e-3


def test_saved_embeddings_load_back_equal(tmp_path):
    from matlm.retrieval.embed import Embeddings
    rng = np.random.default_rng(7)
    saved = Embeddings(vectors={"S": rng.standard_normal((5, 3)).astype(np.float32),
                                "mix": rng.standard_normal((5, 3)).astype(np.float32)},
                       labels=np.arange(5, dtype=np.int32), widths={"S": (4, 4), "mix": (4, 32)},
                       num_images=5, seconds=0.5)
    save_embeddings(tmp_path / "e.npz", saved)
    loaded = load_embeddings(tmp_path / "e.npz")
    assert list(loaded.vectors) == ["S", "mix"] and loaded.widths == saved.widths
    for name in saved.vectors:
        np.testing.assert_array_equal(loaded.vectors[name], saved.vectors[name])
    np.testing.assert_array_equal(loaded.labels, saved.labels)
    assert loaded.labels.dtype == np.int32 and loaded.images_per_second == 10.0
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an embeddings file"):
        load_embeddings(tmp_path / "other.npz")


def test_embed_images_refuses_bad_input_before_work():
    params = _tiny_params()
    with pytest.raises(ValueError, match="empty"):
        embed_images(TINY, params, iter(_batches([(2, 2)])), {}, progress=False)
    with pytest.raises(Exception, match="unknown granularity"):
        embed_images(TINY, params, iter(_batches([(2, 2)])), {"x": "XXL"}, progress=False)
    bad = _batches([(2, 2)])
    bad[0]["images"] = bad[0]["images"][:, :4]
    with pytest.raises(ValueError, match="images of shape"):
        embed_images(TINY, params, iter(bad), {"S": "S"}, progress=False)
    from matlm.training.mesh import make_mesh
    with pytest.raises(ValueError, match="multiple of 2"):
        embed_images(TINY, params, iter(_batches([(3, 3)])), {"S": "S"}, progress=False,
                     mesh=make_mesh((2, 1, 1), devices=jax.devices()[:2]))


# ---- FAISS ------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_flat_index_equals_the_exact_search(metric):
    pytest.importorskip("faiss")
    from matlm.retrieval.ann import approximate_nearest_neighbors
    db, q = _data(300, 20, 16, seed=6)
    want_index, want_scores = nearest_neighbors(db, q, 5, metric)
    index, scores = approximate_nearest_neighbors(db, q, 5, metric, kind="flat")
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    # The approximate kinds on an easy, small set: near-perfect recall.
    for kind in ("ivf", "hnsw"):
        index, _ = approximate_nearest_neighbors(db, q, 5, metric, kind=kind, nprobe=64)
        recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(index, want_index)])
        assert recall >= 0.9, kind


def test_missing_faiss_is_a_one_line_install_hint(monkeypatch):
    import builtins
    from matlm.retrieval import ann
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[retrieval\]"'):
        ann.build_index(np.ones((3, 2), np.float32))


def test_embed_images_reads_an_epoch_of_the_image_pipeline_in_order():
    # The offline digits set (8×8×1) through matlm.data.images, as `matlm embed` will
    # read it: one ordered epoch whose last batch is padded with mask-0 rows.
    from matlm.data.images import make_image_batch_iterator
    batches = make_image_batch_iterator("digits", "test", global_batch_size=64, seed=0,
                                        shuffle=False, repeat=False)
    split = batches.split
    assert len(split) % 64, "the test needs a padded last batch"
    result = embed_images(TINY, _tiny_params(), batches, {"S": "S", "XL": "XL"}, progress=True)
    assert result.num_images == len(split)
    np.testing.assert_array_equal(result.labels, split.labels)
    model = build_model(TINY)
    first = model.apply({"params": _tiny_params()}, split.normalise(split.images[:3]),
                        widths=TINY.resolve_widths("S"), return_embedding=True)
    np.testing.assert_allclose(result.vectors["S"][:3], first, rtol=2e-5, atol=2e-5)
