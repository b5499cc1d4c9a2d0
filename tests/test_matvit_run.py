"""MatViT end to end through `train()` and `matlm eval`, on the offline digits (sklearn's
8×8 `digits`: the smallest real set, so a run takes seconds): learning, exact resume
(bit for bit against a continuous run), the run config typed as an image run, eval
metrics against a per-submodel numpy reference, and bad input refused before any write."""
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from matlm.data.errors import DataError
from matlm.data.image_config import ImageDataConfig
from matlm.data.images import make_image_batch_iterator
from matlm.evaluation import image_classification
from matlm.evaluation.submodels import resolve_submodels
from matlm.model import build_model, init_params
from matlm.model.vit_config import ViTConfig
from matlm.model_dir import ModelDir, load_checkpoint_for_inference
from matlm.training.config import TrainConfig
from matlm.training.trainer import train

# digits: 8×8×1, 10 classes, 1,439 / 179 / 179 images (train / validation / test).
VIT = ViTConfig(image_size=8, patch_size=4, num_channels=1, num_classes=10, d_model=32,
                n_layers=2, n_heads=4, d_ff=64, ffn_nest_blocks=2, width_alignment=4,
                activation="gelu")
DATA = ImageDataConfig(dataset="digits", crop_padding=1)
TRAIN = TrainConfig(steps=8, global_batch_size=16, learning_rate=3e-3, warmup_steps=2,
                    log_every=1, eval_every=4, eval_batches=2, checkpoint_every=4,
                    mesh_shape=(1, 1, 1))


def run(tmp, data=DATA, model=VIT, stop_at=None, **train_kw):
    return train(model, data, dataclasses.replace(TRAIN, **train_kw), tmp,
                 show_progress=False, stop_at=stop_at)


def metrics_rows(model_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(model_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_device")
def test_matvit_learns_and_logs_accuracy(tmp_path):
    result = run(tmp_path, steps=40, eval_every=40, eval_batches=0, learning_rate=1e-2)
    (_, first), (last_step, last) = result.eval_history[0], result.eval_history[-1]
    assert last_step == 40
    for name in ("S", "XL"):  # 40 steps of 16 images: a clear start, from chance.
        assert last[name] < first[name] - 0.25, (name, first[name], last[name])
        assert last[f"{name}/top1"] > 0.2, (name, last)  # Chance is 0.1 (and step 0's).
    rows = metrics_rows(tmp_path)
    logged = [r for r in rows if "train/loss" in r][-1]
    assert {"train/S/top1", "train/XL/top1", "perf/mfu", "perf/tokens_per_s"} <= set(logged)
    evals = [r for r in rows if "eval/XL/loss" in r][-1]
    assert "eval/XL/top1" in evals and "eval/XL/perplexity" not in evals
    # The run config is an image run's, typed back as such.
    saved = ModelDir(tmp_path).run_config()
    assert saved.model == VIT and saved.data == DATA and saved.unknown_fields == ()
    assert not (tmp_path / "vocab.model").exists()


@pytest.mark.usefixtures("one_device")
def test_matvit_resume_equals_a_continuous_run_bitwise(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    continuous = run(straight)
    stopped = run(split, stop_at=4)
    assert stopped.interrupted and stopped.final_step == 4
    resumed = run(split)
    assert resumed.final_step == 8
    assert [resumed.eval_history[i] for i in (0, -1)] == continuous.eval_history[::2]
    losses = lambda d: {r["step"]: r["train/loss"] for r in metrics_rows(d) if "train/loss" in r}
    assert losses(split) == losses(straight)
    a = load_checkpoint_for_inference(straight).params
    b = load_checkpoint_for_inference(split).params
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_resume_with_another_image_set_or_batch_is_refused():
    from matlm.model_dir import CheckpointError
    from matlm.training.trainer import check_data_state_matches
    state = DATA.train_iterator(VIT.image_shape, 16).state
    check_data_state_matches(state, DATA, TRAIN, tokens=False)  # The same: fine.
    with pytest.raises(CheckpointError, match="dataset: checkpoint 'digits', now 'mnist_5k'"):
        check_data_state_matches(state, dataclasses.replace(DATA, dataset="mnist_5k"), TRAIN,
                                 tokens=False)
    with pytest.raises(CheckpointError, match="global_batch_size: checkpoint 16, now 32"):
        check_data_state_matches(state, DATA, dataclasses.replace(TRAIN, global_batch_size=32),
                                 tokens=False)


@pytest.mark.parametrize("data, message", [
    (ImageDataConfig(dataset="mnist_5k"), r"shape \(28, 28, 1\) but the model reads \(8, 8, 1\)"),
    (ImageDataConfig(dataset="no_such_set"), "no_such_set"),
])
@pytest.mark.usefixtures("one_device")
def test_bad_image_data_is_refused_before_any_write(tmp_path, data, message):
    with pytest.raises(DataError, match=message):
        run(tmp_path / "run", data=data)
    assert not (tmp_path / "run").exists()


def test_image_eval_matches_a_per_submodel_numpy_reference():
    """Masked (one compile) and sliced evaluation against each submodel run alone, with
    top-1/top-5/CE/agreement computed here in numpy; max_examples cuts the split."""
    params = _random_params(0)
    submodels, reference = resolve_submodels(VIT, ["S", "XL"], ["S,XL"])
    batches = lambda: make_image_batch_iterator("digits", "validation", 64, 0, shuffle=False,
                                                repeat=False)
    masked = image_classification.evaluate(VIT, params, batches(), submodels, reference,
                                           task="digits:validation", progress=False,
                                           max_examples=150)
    sliced = image_classification.evaluate(VIT, params, batches(), submodels, reference,
                                           task="digits:validation", progress=False,
                                           max_examples=150, masked=False)
    images = np.concatenate([b["images"] for b in batches()])[:150]
    labels = np.concatenate([b["labels"] for b in batches()])[:150]
    model = build_model(VIT)
    logits = {s.name: np.asarray(model.apply({"params": params}, images, widths=list(s.widths)),
                                 np.float64) for s in submodels}
    for s in submodels:
        got = masked["tasks"]["digits:validation"]["metrics"][s.name]
        z = logits[s.name]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ranked = np.argsort(-z, axis=-1)
        assert got["examples"] == 150
        np.testing.assert_allclose(got["loss"], -logp[np.arange(150), labels].mean(), rtol=1e-5)
        assert got["top1"] == pytest.approx((ranked[:, 0] == labels).mean())
        assert got["top5"] == pytest.approx((ranked[:, :5] == labels[:, None]).any(-1).mean())
        agree = (ranked[:, 0] == logits[reference].argmax(-1)).mean()
        assert got["answer_agreement"] == pytest.approx(agree)
        other = sliced["tasks"]["digits:validation"]["metrics"][s.name]
        assert other["top1"] == got["top1"] and other["top5"] == got["top5"]
        np.testing.assert_allclose(other["loss"], got["loss"], rtol=1e-5)
    assert masked["compiled_functions"] == 1 and sliced["compiled_functions"] == 3


def _random_params(seed=0):
    """Parameters moved off their init (the classifier starts at zero)."""
    params = init_params(VIT, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape, np.float32), params)


def test_extracted_matvit_is_the_parent_submodel():
    from matlm.submodels.extract import extract_submodel, model_gin
    params = _random_params()
    images = next(make_image_batch_iterator("digits", "validation", 32, 0))["images"]
    widths = (16, 64)  # A Mix'n'Match vector: M in layer 0, XL in layer 1.
    sub_params, sub_config = extract_submodel(params, VIT, widths)
    assert isinstance(sub_config, ViTConfig) and sub_config.ffn_dims == widths
    parent = build_model(VIT).apply({"params": params}, images, widths=list(widths))
    child = build_model(sub_config).apply({"params": sub_params}, images)
    np.testing.assert_allclose(child, parent, rtol=1e-5, atol=1e-5)
    assert "ViTConfig.image_size = 8" in model_gin(sub_config)


def test_image_search_scores_candidates_as_eval_does_with_one_compile():
    from matlm.model.counting import forward_flops_per_image
    from matlm.submodels import search as S
    params = _random_params(1)
    batches = list(DATA.eval_iterator(VIT.image_shape, 64, shuffle=True))[:2]
    evaluator = S.ImageEvaluator(batches, VIT, params, "top1", task="t")
    vectors = [(8, 8), (64, 64), (8, 64), (16, 32)]  # S, XL and two Mix'n'Match.
    scores = evaluator(vectors)
    submodels, _ = resolve_submodels(VIT, [], [",".join(map(str, v)) for v in vectors])
    expected = image_classification.evaluate(VIT, params, batches, submodels, submodels[0].name,
                                             task="t", progress=False, masked=False)
    assert len(submodels) == len(vectors)
    assert scores == [expected["tasks"]["t"]["metrics"][s.name]["top1"] for s in submodels]
    assert evaluator.compiled_count() == 1
    # FLOP budgets of a ViT count per image.
    budget = S.Budget("flops", 1e9, 0)
    assert budget.cost(VIT, (8, 32)) == forward_flops_per_image(VIT, (8, 32))
    # The shuffled sample mixes the classes (the split itself is sorted by class).
    assert len(np.unique(batches[0]["labels"])) == VIT.num_classes


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A MatViT trained 6 steps on digits over every device (the commands below read it)."""
    path = tmp_path_factory.mktemp("matvit") / "run"
    train(VIT, DATA, dataclasses.replace(TRAIN, steps=6, eval_every=0, checkpoint_every=6,
                                         mesh_shape=(-1, 1, 1)),
          path, show_progress=False, check_memory=False)
    return path


def test_eval_embed_and_retrieve_commands_agree_with_numpy(trained_dir, tmp_path, capsys):
    from matlm.cli.main import main as matlm_main
    from matlm.retrieval.embed import load_embeddings
    flags = [f"--model_dir={trained_dir}", "--no_progress"]
    # matlm eval: every granularity and a Mix'n'Match vector, top-1/top-5 and a plot.
    assert matlm_main(["eval", *flags, "--widths=S,XL", f"--output={tmp_path / 'eval'}"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    metrics = results["tasks"]["digits:validation"]["metrics"]
    assert set(metrics) == {"S", "M", "L", "XL", "S,XL"}
    assert all(0 <= m["top1"] <= m["top5"] <= 1 for m in metrics.values())
    assert metrics["XL"]["answer_agreement"] == 1.0
    assert (tmp_path / "eval" / "average_accuracy_vs_params.png").is_file()
    # matlm embed: .npz and .parquet hold the same embeddings; nothing is overwritten.
    npz, parquet = tmp_path / "db.npz", tmp_path / "db.parquet"
    for path in (npz, parquet):
        assert matlm_main(["embed", *flags, "--granularities=S,XL", f"--output={path}"]) == 0
    assert "images/s" in capsys.readouterr().out
    saved = load_embeddings(npz)
    import pyarrow.parquet as pq
    table = pq.read_table(parquet)
    np.testing.assert_array_equal(table["label"].to_numpy(), saved.labels)
    np.testing.assert_array_equal(np.stack(table["XL"].to_numpy(zero_copy_only=False)),
                                  saved.vectors["XL"])
    assert len(saved.labels) == 1439  # digits' train split, padding dropped.
    assert matlm_main(["embed", *flags, f"--output={npz}"]) == 2
    # matlm retrieve: 1-NN (same encoder, adaptive) against numpy brute force on them.
    assert matlm_main(["embed", *flags, "--granularities=S,XL", "--split=validation",
                       f"--output={tmp_path / 'q.npz'}"]) == 0
    queries = load_embeddings(tmp_path / "q.npz")
    out = tmp_path / "retrieval"
    assert matlm_main(["retrieve", *flags, "--granularities=S,XL", "--shortlist_k=1,10",
                       f"--output={out}", "--no_plots"]) == 0
    result = json.loads((out / "retrieval.json").read_text())

    def one_nn(db, q):
        db = db / np.linalg.norm(db, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        return float(np.mean(saved.labels[np.argmax(q @ db.T, axis=1)] == queries.labels))
    rows = {r["query_encoder"]: r for r in result["retrieval"]}
    for name in ("S", "XL"):
        assert rows[name]["same_encoder_1nn"] == pytest.approx(
            one_nn(saved.vectors[name], queries.vectors[name]))
        assert rows[name]["adaptive_1nn"] == pytest.approx(
            one_nn(saved.vectors["XL"], queries.vectors[name]))
    # A shortlist of 1 is S's own 1-NN; the cascade's cost counts both encoders.
    assert result["cascade"][0]["accuracy"] == pytest.approx(rows["S"]["same_encoder_1nn"])
    assert result["cascade"][0]["query_gflops"] > rows["XL"]["query_gflops"]
    assert matlm_main(["retrieve", *flags, f"--output={out}"]) == 2  # Not empty: refused.


def test_embed_and_retrieve_on_a_bucket_write_there_what_they_write_locally(
        trained_dir, bucket, tmp_path, capsys):
    """The run copied to a bucket (fake-gcs-server, tests/conftest.py): embed and retrieve
    without --output write into it (embeddings/<step>/, retrieval/<step>/) the same results
    as from the local dir."""
    from matlm.cli.main import main as matlm_main
    from matlm.model_dir import ModelDir, storage
    from matlm.retrieval.embed import load_embeddings
    url = f"{bucket}/run"
    storage.upload_tree(trained_dir, url)
    step = ModelDir(url).checkpoint_steps()[-1]
    embed = ["embed", "--no_progress", "--granularities=S,XL", "--max_examples=64"]
    assert matlm_main([*embed, f"--model_dir={trained_dir}", f"--output={tmp_path / 'db.npz'}"]) == 0
    assert matlm_main([*embed, f"--model_dir={url}"]) == 0
    on_bucket = ModelDir(url).path / "embeddings" / str(step) / "train.npz"
    assert f"wrote {on_bucket}" in capsys.readouterr().out
    (tmp_path / "from_bucket.npz").write_bytes(on_bucket.read_bytes())
    a, b = (load_embeddings(tmp_path / n) for n in ("db.npz", "from_bucket.npz"))
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.vectors["XL"], b.vectors["XL"])
    retrieve = ["retrieve", "--no_progress", "--no_plots", "--granularities=S,XL",
                "--max_database=64", "--max_queries=32", "--shortlist_k=1,4"]
    assert matlm_main([*retrieve, f"--model_dir={trained_dir}",
                       f"--output={tmp_path / 'retrieval'}"]) == 0
    assert matlm_main([*retrieve, f"--model_dir={url}"]) == 0
    local = json.loads((tmp_path / "retrieval" / "retrieval.json").read_text())
    remote = json.loads((ModelDir(url).path / "retrieval" / str(step) / "retrieval.json")
                        .read_text())
    for result in (local, remote):
        result.pop("checkpoint"), result.pop("embed_images_per_second")
    assert local == remote
    assert matlm_main([*retrieve, f"--model_dir={url}"]) == 2  # Not empty: refused.
