"""The image pipeline: order as a pure function of (seed, step), host-count independence,
exact resume, epochs, augmentation, the offline sets and their one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from matlm.data import image_augment, image_sets, images
from matlm.data.errors import BatchSizeError, DataError, StateError, UnknownSplitError

N = 37  # Examples in the synthetic split: coprime with the batch sizes, so epochs straddle batches.


def _synthetic(split):
    """Distinct 6x6 images whose label is their row: a batch's labels name its examples."""
    if split == "test":
        return image_sets.make_split(np.zeros((2, 6, 6, 1), np.uint8), np.zeros(2, np.int32),
                                     np.zeros(2, np.int8), "test", 1, 255, "synthetic")
    rng = np.random.default_rng(123)
    pixels = rng.integers(0, 256, size=(N, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(N, dtype=np.int32)
    assignment = np.full(N, image_sets.SPLITS.index(split), np.int8)
    return image_sets.make_split(pixels, labels, assignment, split, N, 255, "synthetic")


image_sets.register_image_source("synthetic", _synthetic)


def _it(**kw):
    args = dict(dataset="synthetic", split="train", global_batch_size=4, seed=7)
    args.update(kw)
    return images.make_image_batch_iterator(**args)


def _global_batch(step, num_hosts, **kw):
    """The global batch of `step`, concatenated from every host's slice."""
    parts = [_it(host_index=h, num_hosts=num_hosts, **kw).batch(step) for h in range(num_hosts)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_format():
    batch = next(_it(global_batch_size=8))
    assert set(batch) == {"images", "labels", "mask"}
    assert batch["images"].shape == (8, 6, 6, 3) and batch["images"].dtype == np.float32
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
    np.testing.assert_array_equal(batch["mask"], np.ones(8, np.float32))


def test_order_is_a_pure_function_of_seed_and_step():
    a, b = _it(), _it()
    for _ in range(3):
        next(a)  # Moving one iterator does not change what a step holds.
    _assert_batches_equal(a.batch(11), b.batch(11))
    _assert_batches_equal(next(a), b.batch(3))
    assert not np.array_equal(_it(seed=8).batch(11)["labels"], b.batch(11)["labels"])
    assert not np.array_equal(b.batch(11)["labels"], b.batch(12)["labels"])


@pytest.mark.parametrize("num_hosts", [2, 4])
@pytest.mark.parametrize("augment", [False, True])
def test_global_batch_does_not_depend_on_the_number_of_hosts(num_hosts, augment):
    kw = dict(global_batch_size=8, crop_padding=2 if augment else 0, horizontal_flip=augment)
    for step in (0, 4, 9):  # Step 4 straddles the end of the first epoch (37 examples).
        _assert_batches_equal(_global_batch(step, num_hosts, **kw), _global_batch(step, 1, **kw))


def test_resume_from_a_saved_state_equals_a_continuous_run():
    continuous = _it(crop_padding=1, horizontal_flip=True)
    expected = [next(continuous) for _ in range(20)]
    first = _it(crop_padding=1, horizontal_flip=True)
    for _ in range(6):
        next(first)
    state = json.loads(json.dumps(first.state))  # As a checkpoint stores it.
    resumed = images.restore_image_batch_iterator(state)
    for want in expected[6:]:
        _assert_batches_equal(next(resumed), want)
    # On two hosts the restored slices make the same global batches.
    hosts = [images.restore_image_batch_iterator(state, host_index=h, num_hosts=2)
             for h in range(2)]
    for want in expected[6:10]:
        got = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([g["images"] for g in got]),
                                      want["images"])
    # set_state on a matching iterator, and a start_step, land on the same step.
    other = _it(crop_padding=1, horizontal_flip=True)
    other.set_state(state)
    _assert_batches_equal(next(other), expected[6])
    _assert_batches_equal(next(_it(crop_padding=1, horizontal_flip=True, start_step=6)),
                          expected[6])


def test_every_example_appears_once_per_epoch_and_epochs_reshuffle():
    it = _it(global_batch_size=4)
    labels = np.concatenate([next(it)["labels"] for _ in range(-(-3 * N // 4))])
    epochs = [labels[e * N:(e + 1) * N] for e in range(3)]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
    assert not np.array_equal(epochs[0], epochs[1])
    unshuffled = _it(shuffle=False, global_batch_size=4)
    np.testing.assert_array_equal(
        np.concatenate([next(unshuffled)["labels"] for _ in range(10)])[:N], np.arange(N))


def test_one_epoch_pass_pads_the_last_batch_and_counts_every_example():
    it = _it(repeat=False, shuffle=False, global_batch_size=8, num_hosts=2, host_index=1,
             pad_to_num_batches=6)
    batches = list(it)
    assert len(batches) == 6 == it.num_batches
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    # Host 1 holds examples 4..7 of each batch of 8: four full batches, then 36 alone.
    assert mask.sum() == 4 * 4 + 1
    np.testing.assert_array_equal(labels[mask == 1], [k for k in range(N) if k % 8 >= 4])
    padding = np.concatenate([b["images"] for b in batches])[mask == 0]
    assert padding.size and not padding.any()
    with pytest.raises(DataError, match="pad_to_num_batches"):
        _it(repeat=False, global_batch_size=8, pad_to_num_batches=4)


def test_augmentation_is_deterministic_and_shape_preserving():
    plain = _it(global_batch_size=8).batch(3)
    flipped = _it(global_batch_size=8, horizontal_flip=True).batch(3)
    _, flips = image_augment.draws(7, 3, 8, image_augment.Augmentation(horizontal_flip=True))
    assert 0 < flips.sum() < 8  # This seed flips some and keeps some.
    np.testing.assert_array_equal(flipped["images"][flips], plain["images"][flips][:, :, ::-1])
    np.testing.assert_array_equal(flipped["images"][~flips], plain["images"][~flips])
    np.testing.assert_array_equal(flipped["labels"], plain["labels"])
    cropped = _it(global_batch_size=8, crop_padding=2).batch(3)
    assert cropped["images"].shape == plain["images"].shape
    assert cropped["images"].dtype == np.float32
    assert not np.array_equal(cropped["images"], plain["images"])
    _assert_batches_equal(cropped, _it(global_batch_size=8, crop_padding=2).batch(3))


def test_crop_is_a_window_of_the_zero_padded_image():
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 256, size=(5, 4, 4, 2), dtype=np.uint8)
    offsets = np.array([[0, 0], [4, 4], [2, 2], [1, 3], [3, 0]])
    flips = np.array([False, False, False, True, False])
    out = image_augment.augment(raw, offsets, flips, padding=2)
    assert out.shape == raw.shape and out.dtype == raw.dtype
    np.testing.assert_array_equal(out[2], raw[2])  # Offset (2, 2): the original image.
    np.testing.assert_array_equal(out[0][2:, 2:], raw[0][:2, :2])
    assert not out[0][:2].any() and not out[0][:, :2].any()
    np.testing.assert_array_equal(out[1][:2, :2], raw[1][2:, 2:])
    padded = np.pad(raw[3], ((2, 2), (2, 2), (0, 0)))
    np.testing.assert_array_equal(out[3], padded[1:5, 3:7][:, ::-1])


def test_offline_sets_have_fixed_stratified_splits():
    for name, want in {"mnist_5k": ((28, 28, 1), (4000, 500, 500)),
                       "digits": ((8, 8, 1), (1439, 179, 179))}.items():
        splits = [image_sets.load_split(name, s) for s in image_sets.SPLITS]
        assert [len(s) for s in splits] == list(want[1]), name
        for s in splits:
            assert s.image_shape == want[0] and s.images.dtype == np.uint8
            assert set(np.unique(s.labels)) == set(range(10))
        train = splits[0].normalise(splits[0].images)
        assert abs(train.mean()) < 1e-4 and abs(train.std() - 1) < 1e-4
    labels = image_sets.load_split("mnist_5k", "validation").labels
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 50))
    # The split is a function of the set alone: row -> split is fixed, all splits disjoint.
    _, all_labels, assignment = image_sets._read_set("mnist_5k")
    np.testing.assert_array_equal(assignment, image_sets.split_of_rows("mnist_5k", all_labels))
    batch = images.make_image_batch_iterator("mnist_5k", "train", 16, seed=0).batch(0)
    assert batch["images"].shape == (16, 28, 28, 1)


def test_check_patch_size():
    image_sets.check_patch_size(28, 7)
    image_sets.check_patch_size((8, 8, 1), 2)
    image_sets.check_patch_size((32, 16), 16)
    for image_size, patch in [(28, 5), ((8, 8, 1), 3), ((32, 24), 16), (28, 0), (28, 2.0)]:
        with pytest.raises(image_sets.PatchSizeError) as err:
            image_sets.check_patch_size(image_size, patch)
        assert "\n" not in str(err.value) and "patch" in str(err.value)


@pytest.mark.parametrize("make, error, words", [
    (lambda: images.make_image_batch_iterator("cifar11", "train", 8, 0),
     image_sets.UnknownImageSetError, "unknown image set 'cifar11'"),
    (lambda: image_sets.load_split("mnist_5k", "dev"), UnknownSplitError, "unknown image split"),
    (lambda: _it(split="test"), image_sets.EmptySplitError, "split 'test' has no images"),
    (lambda: _it(global_batch_size=6, num_hosts=4), BatchSizeError, "divisible"),
    (lambda: _it(global_batch_size=0), BatchSizeError, "positive"),
    (lambda: _it(seed=-1), DataError, "seed"),
    (lambda: _it(crop_padding=-1), DataError, "crop_padding"),
    (lambda: images.restore_image_batch_iterator({"version": 1, "step": 0}), StateError,
     "version"),
])
def test_bad_input_gives_one_line_errors(make, error, words):
    with pytest.raises(error) as err:
        make()
    assert isinstance(err.value, ValueError)  # The CLI prints a ValueError as one line, exit 2.
    assert "\n" not in str(err.value) and words in str(err.value)


def test_a_saved_state_of_another_pipeline_is_refused():
    state = _it(seed=1).state
    with pytest.raises(StateError, match="seed"):
        _it(seed=2).set_state(state)


def test_a_missing_package_names_the_pip_requirement(monkeypatch):
    missing = image_sets.ImageSet("matlm_no_such_package", "x.csv.gz", "nope==1.0",
                                  (8, 8, 1), 16, 10)
    monkeypatch.setitem(image_sets.IMAGE_SETS, "missing", missing)
    with pytest.raises(image_sets.ImageSetNotInstalledError, match="pip install 'nope==1.0'"):
        image_sets.load_split("missing", "train")


def test_image_modules_import_without_tensorflow():
    """images, image_sets and image_augment need numpy alone (matlm.data's __init__ imports
    TensorFlow, so the package is stood in for here by a bare one)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, types; pkg = types.ModuleType('matlm.data'); "
            f"pkg.__path__ = [{os.path.join(root, 'matlm', 'data')!r}]; "
            "sys.modules['matlm.data'] = pkg; "
            "import matlm.data.images as m; "
            "m.make_image_batch_iterator('digits', 'train', 4, 0).batch(0); "
            "bad = [n for n in ('tensorflow', 'seqio', 'jax') if n in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
