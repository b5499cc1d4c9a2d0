"""The TFDS image pipeline (matlm.data.tfds_images) on a tiny prepared set written by the
real TFDS writer and named like cifar10 (50 train / 7 test 12x12x3 images, 3 classes):
every example once per epoch, one global batch for 1, 2 and 4 hosts, exact resume (also
on another host count) at bounded cost, augmentation and mixup against numpy references,
the padded eval pass and one-line errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from matlm.data import image_transforms, tfds_images
from matlm.data.errors import DataError, UnknownSplitError
from matlm.data.image_sets import EmptySplitError, UnknownImageSetError

N_TRAIN, N_TEST, SIDE = 50, 7, 12
SHAPE = (SIDE, SIDE, 3)


def _pixels(split, i):
    """Channel 1 is 5 * (example index): it names the example; 0 and 2 are noise."""
    rng = np.random.default_rng([0 if split == "train" else 1, i])
    image = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    image[..., 1] = 5 * i
    return image


def _build(data_dir, file_format):
    import tensorflow_datasets as tfds

    class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "cifar10"
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=SHAPE),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            del dl_manager  # Nothing is downloaded.
            return {"train": self._generate_examples("train", N_TRAIN),
                    "test": self._generate_examples("test", N_TEST)}

        def _generate_examples(self, split, n):
            for i in range(n):
                yield f"{split}-{i}", {"image": _pixels(split, i), "label": i % 3}

    Cifar10(data_dir=data_dir, file_format=file_format).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=3))
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp("tfds_images")), "array_record")


def _it(data_dir, **kw):
    args = dict(dataset="cifar10", split="train", global_batch_size=8, seed=3,
                image_shape=SHAPE, data_dir=data_dir)
    args.update(kw)
    return tfds_images.make_tfds_image_batch_iterator(**args)


TRAIN = dict(train_augmentation=True, random_resized_crop=True, horizontal_flip=True,
             randaugment_layers=2, randaugment_magnitude=9, mixup_alpha=0.4)


def _raw(images):
    """Normalised float images back to uint8 pixels (the cifar10 statistics)."""
    stats = tfds_images.TFDS_IMAGE_STATS["cifar10"]
    raw = images * np.asarray(stats.std, np.float32) + np.asarray(stats.mean, np.float32)
    return np.round(raw * 255).astype(np.int64)


def _ids(batch):
    return _raw(batch["images"])[..., 1].mean(axis=(1, 2)) / 5


def _global(data_dir, step, hosts, **kw):
    parts = [_it(data_dir, host_index=h, num_hosts=hosts, **kw).batch(step)
             for h in range(hosts)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_every_example_once_per_epoch_and_epochs_reshuffle(data_dir):
    it = _it(data_dir, global_batch_size=5)
    batches = [next(it) for _ in range(3 * N_TRAIN // 5)]
    assert set(batches[0]) == {"images", "labels", "mask"}
    assert batches[0]["images"].dtype == np.float32 and batches[0]["images"].shape == (5, *SHAPE)
    ids = np.concatenate([_ids(b) for b in batches])
    np.testing.assert_array_equal(ids, np.round(ids))  # Unaugmented: pixels intact.
    ids = ids.astype(int)
    labels = np.concatenate([b["labels"] for b in batches])
    np.testing.assert_array_equal(labels, ids % 3)
    epochs = ids.reshape(3, N_TRAIN)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N_TRAIN))
    assert not np.array_equal(epochs[0], epochs[1])
    # The pixels are the ones the writer stored (row 1 of epoch 0 is a real example).
    np.testing.assert_array_equal(_raw(batches[0]["images"])[1], _pixels("train", ids[1]))
    assert it.num_batches is None and it.num_classes == 3 and it.num_examples == N_TRAIN


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "train_aug"])
def test_global_batch_does_not_depend_on_the_number_of_hosts(data_dir, augment):
    kw = dict(global_batch_size=12, **(TRAIN if augment else {}))
    for step in (0, 4):  # Step 4 straddles the end of the first epoch (50 examples).
        one = _global(data_dir, step, 1, **kw)
        for hosts in (2, 4):  # b = 6, 3: with b = 3 some mixup partners are on other hosts.
            _assert_equal(_global(data_dir, step, hosts, **kw), one)


def test_resume_equals_a_continuous_run_at_bounded_cost(data_dir, monkeypatch):
    continuous = _it(data_dir, **TRAIN)
    expected = [next(continuous) for _ in range(9)]
    first = _it(data_dir, **TRAIN)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.state))  # As a checkpoint stores it.
    assert state["version"] == "tfds-image-1" and state["step"] == 5
    reads = []
    original = tfds_images.TfdsImageSource.read
    monkeypatch.setattr(tfds_images.TfdsImageSource, "read",
                        lambda self, rows: reads.append(len(rows)) or original(self, rows))
    resumed = tfds_images.restore_tfds_image_batch_iterator(state)
    _assert_equal(next(resumed), expected[5])
    assert reads == [8]  # The resumed step's rows only, not the five before.
    hosts = [tfds_images.restore_tfds_image_batch_iterator(state, h, 2) for h in range(2)]
    for want in expected[5:]:
        got = [next(h) for h in hosts]
        _assert_equal({k: np.concatenate([g[k] for g in got]) for k in want}, want)
    other = _it(data_dir, **TRAIN)
    other.set_state(state)
    _assert_equal(next(other), expected[5])
    with pytest.raises(DataError, match="does not match"):
        _it(data_dir, **{**TRAIN, "seed": 4}).set_state(state)


def test_flip_and_pad_crop_match_a_numpy_reference(data_dir):
    kw = dict(train_augmentation=True, random_resized_crop=False, horizontal_flip=True)
    plain, aug = _it(data_dir), _it(data_dir, **kw)
    for step in (0, 3):
        raw = _raw(plain.batch(step)["images"])
        got = _raw(aug.batch(step)["images"])
        d = image_transforms.draws(3, step, 8, aug.config.augmentation)
        assert 0 < d.flips.sum() < 8 or step == 3
        p = SIDE // 8
        for i in range(8):
            padded = np.pad(raw[i], ((p, p), (p, p), (0, 0)), constant_values=0)
            r, c = np.floor(d.pad_offsets[i] * (2 * p + 1)).astype(int)
            want = padded[r:r + SIDE, c:c + SIDE]
            want = want[:, ::-1] if d.flips[i] else want
            np.testing.assert_array_equal(got[i], want, err_msg=f"step {step} row {i}")
    _assert_equal(aug.batch(3), _it(data_dir, **kw).batch(3))  # Deterministic.
    assert not np.array_equal(aug.batch(3)["images"], _it(data_dir, **kw, seed=4).batch(3)["images"])


def test_mixup_pairs_within_the_global_batch(data_dir):
    unmixed = _it(data_dir, **{**TRAIN, "mixup_alpha": 0.0}).batch(2)
    mixed = _it(data_dir, **TRAIN).batch(2)
    w = mixed["mixup_weight"]
    assert mixed["mixup_labels"].dtype == np.int32 and w.dtype == np.float32
    assert np.all((w >= 0) & (w <= 1)) and len(np.unique(w)) > 1
    partner = np.arange(8) ^ 1
    np.testing.assert_array_equal(mixed["labels"], unmixed["labels"])
    np.testing.assert_array_equal(mixed["mixup_labels"], unmixed["labels"][partner])
    want = (w[:, None, None, None] * unmixed["images"]
            + (1 - w[:, None, None, None]) * unmixed["images"][partner])
    np.testing.assert_allclose(mixed["images"], want, rtol=1e-6, atol=1e-6)


def _stored_ids(data_dir, split):
    """The split's example ids in TFDS's stored order, read by TFDS itself (the reference)."""
    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory(f"{data_dir}/cifar10/3.0.2")
    return [int(ex["image"][0, 0, 1]) // 5 for ex in builder.as_data_source(split=split)]


def test_eval_pass_covers_the_split_once_with_a_padding_mask(data_dir):
    order = _stored_ids(data_dir, "test")
    assert sorted(order) == list(range(N_TEST))
    hosts = [_it(data_dir, split="test", global_batch_size=4, num_hosts=2, host_index=h,
                 shuffle=False, repeat=False, pad_to_num_batches=3) for h in range(2)]
    per_host = [list(h) for h in hosts]
    assert [len(p) for p in per_host] == [3, 3] and hosts[0].num_batches == 3
    merged = [{k: np.concatenate([per_host[0][s][k], per_host[1][s][k]]) for k in
               per_host[0][s]} for s in range(3)]
    mask = np.concatenate([m["mask"] for m in merged])
    np.testing.assert_array_equal(mask, (np.arange(12) < N_TEST).astype(np.float32))
    ids = np.concatenate([_ids(m) for m in merged])
    np.testing.assert_array_equal(ids[:N_TEST], order)
    images = np.concatenate([m["images"] for m in merged])
    assert not images[N_TEST:].any()
    # Eval resizes with the centre crop: a 6x6 model input sees the whole (square) image.
    small = next(_it(data_dir, split="test", shuffle=False, repeat=False,
                     image_shape=(6, 6, 3)))
    assert small["images"].shape == (8, 6, 6, 3)
    np.testing.assert_allclose(_ids(small)[:N_TEST], order, atol=0.25)


def test_crop_boxes():
    # ImageNet eval: shorter side 375 -> 256, centre 224 crop: 328 original pixels.
    assert image_transforms.centre_crop_box(500, 375, (224, 224), 0.875) == (86, 23, 328, 328)
    assert image_transforms.centre_crop_box(32, 32, (32, 32), 1.0) == (0, 0, 32, 32)
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(20, 400, 2)
        box = image_transforms.random_crop_box(h, w, rng.random((10, 4)))
        if box is None:
            continue
        top, left, ch, cw = box
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
        assert 0.08 * h * w * 0.8 <= ch * cw <= h * w
        assert 3 / 4 * 0.8 <= cw / ch <= 4 / 3 * 1.25


def test_randaugment_ops_against_formulas():
    image = np.random.default_rng(1).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    op = image_transforms.apply_op
    np.testing.assert_array_equal(op(image, "solarize", 0.5, False),
                                  np.where(image >= 128, 255 - image, image))
    np.testing.assert_array_equal(op(image, "posterize", 1.0, False), image & 0xF0)
    np.testing.assert_array_equal(op(image, "brightness", 0.5, True),
                                  np.round(image * 0.55).astype(np.uint8))
    shifted = op(image, "translate_x", 1.0, False)  # 0.45 * 5 -> 2 columns right.
    np.testing.assert_array_equal(shifted[:, 2:], image[:, :3])
    assert not shifted[:, :2].any()
    for name in image_transforms.RANDAUGMENT_OPS:
        out = op(image, name, 1.0, False)
        assert out.shape == image.shape and out.dtype == np.uint8


def test_bad_input_is_one_clear_error(data_dir, tmp_path):
    def check(error, match, **kw):
        with pytest.raises(error, match=match) as info:
            _it(kw.pop("data_dir", data_dir), **kw)
        assert "\n" not in str(info.value)

    check(DataError, r"'cifar100' is not prepared in .*nothing.*tfds build",
          dataset="cifar100", data_dir=str(tmp_path / "nothing"))
    check(UnknownSplitError, r"no split 'validation'; it has \['test', 'train'\]",
          split="validation")
    check(EmptySplitError, "has no examples", split="train[50:]")
    check(DataError, "3-channel images but image_shape", image_shape=(12, 12, 1))
    check(UnknownImageSetError, "unknown TFDS image set 'mnist'", dataset="mnist")
    check(DataError, "divisible", num_hosts=3)
    tfrecord = _build(str(tmp_path / "tfrecord"), "tfrecord")
    check(DataError, r"prepared as \['tfrecord'\].*tfds convert_format", data_dir=tfrecord)
    # What `tfds convert_format` leaves (ArrayRecord shards beside the TFRecord ones, listed
    # in dataset_info.json) is read, in the same order as a set prepared as ArrayRecord.
    version_dir = Path(tfrecord) / "cifar10" / "3.0.2"
    for shard in (Path(data_dir) / "cifar10" / "3.0.2").glob("*.array_record-*"):
        shutil.copy(shard, version_dir)
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["alternativeFileFormats"] = ["array_record"]
    info_path.write_text(json.dumps(info))
    tfds_images._builder.cache_clear()  # The process caches each set's metadata.
    _assert_equal(_it(tfrecord, **TRAIN).batch(3), _it(data_dir, **TRAIN).batch(3))


@pytest.mark.usefixtures("one_device")
def test_a_matvit_trains_and_resumes_bitwise_on_a_tfds_set_with_mixup(data_dir, tmp_path):
    """The TFDS pipeline end to end through ImageDataConfig and train(): RandAugment and
    mixup batches (the loss head's soft-target CE), an eval pass on the test split, and a
    job stopped at step 2 and resumed equals an uninterrupted one, bit for bit."""
    import jax
    from matlm.data.image_config import ImageDataConfig
    from matlm.model.vit_config import ViTConfig
    from matlm.model_dir import load_checkpoint_for_inference
    from matlm.training.config import TrainConfig
    from matlm.training.trainer import train

    vit = ViTConfig(image_size=SIDE, patch_size=4, num_channels=3, num_classes=3, d_model=16,
                    n_layers=1, n_heads=2, d_ff=32, ffn_nest_blocks=2, width_alignment=4,
                    granularity_names=("S", "XL"))
    data = ImageDataConfig(dataset="cifar10", data_dir=data_dir, eval_split="test",
                           mixup_alpha=0.4, randaugment_layers=1)
    config = TrainConfig(steps=4, global_batch_size=8, learning_rate=3e-3, warmup_steps=1,
                         log_every=1, eval_every=2, checkpoint_every=2, mesh_shape=(1, 1, 1))
    run = lambda path, **kw: train(vit, data, config, path, show_progress=False, **kw)
    straight = run(tmp_path / "straight")
    assert run(tmp_path / "split", stop_at=2).interrupted
    resumed = run(tmp_path / "split")
    assert resumed.eval_history[-1] == straight.eval_history[-1]
    assert "XL/top1" in straight.eval_history[-1][1]
    a = load_checkpoint_for_inference(tmp_path / "straight").params
    b = load_checkpoint_for_inference(tmp_path / "split").params
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))
