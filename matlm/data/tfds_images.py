"""Per-host batches of a prepared TFDS image classification set (imagenet2012, cifar10,
cifar100) at scale: the contract of `matlm.data.images` (a global batch that is a pure
function of (seed, step) for any number of hosts, every example once per epoch, an exact
resume from a step-only state) with bounded memory and nothing downloaded.

    it = make_tfds_image_batch_iterator("imagenet2012", "train", 1024, seed=0,
        image_shape=(224, 224, 3), data_dir="gs://bucket/tensorflow_datasets",
        host_index=jax.process_index(), num_hosts=jax.process_count())

**Order: random access, one full permutation per epoch.** The set is read with
`tfds.data_sources` (ArrayRecord's random access): the global k-th example is row
`perm_e[k mod N]` of the split, `perm_e` a seeded permutation of all N rows for epoch
`e = k div N` (`[seed, SeedStream.IMAGE_ORDER, 2, epoch]`), exactly the offline
pipeline's order. Host h of H reads only the rows of its slice
`[s*B + h*b, s*B + (h+1)*b)` (plus, with mixup and an odd b, the few partners on another
host): each image is read once per epoch over all hosts, the permutation is 4 bytes a row
(5 MB for ImageNet's 1.28 M; the last two epochs are cached), and a resume costs one
permutation. Shuffle quality: a uniform random permutation of the whole split every
epoch, the best there is; a batch holds B independent random examples. Blocks of
consecutive TFRecord records were the alternative: TFRecord has no index, so every block
read skips through its shard (several times the bytes) and a coarse block order
correlates batches across epochs. So a set prepared only as TFRecord is refused with the
one-line `tfds convert_format` command that adds ArrayRecord shards next to it.

**Per example** (threads; TensorFlow on the host CPU only, `matlm.data.tf_setup`): decode,
then for eval the centre crop (shorter side / 0.875 for ImageNet, the whole short side
for CIFAR) resized to `image_shape`; for training an Inception random resized crop (or,
with `random_resized_crop=False`, the eval crop then pad side // 8 and random crop),
horizontal flip, optional RandAugment, then mixup within the global batch. All draws are
`matlm.data.image_transforms` (a pure function of (seed, step, position)). Pixels are
normalised with the set's standard per-channel mean and std.

Batch features (b = global_batch_size // num_hosts): `images` float32 [b, H, W, C],
`labels` int32 [b], `mask` float32 [b] (0 for the padding of a one-epoch pass); with mixup
`mixup_labels` int32 [b] (the partner's label) and `mixup_weight` float32 [b] (the weight
of `labels`, the partner's is 1 - it).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Any

import numpy as np

from matlm.data import image_transforms, iterator_state, tf_setup  # noqa: F401 (tf first)
from matlm.data.errors import DataError, UnknownSplitError
from matlm.data.image_sets import EmptySplitError, UnknownImageSetError
from matlm.data.seed_streams import SeedStream
from matlm.messages import first_line

STATE_VERSION = "tfds-image-1"
_LOG = logging.getLogger(__name__)
_THREADS = min(8, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class SetStats:
    mean: tuple[float, float, float]  # Per channel, of pixels scaled to [0, 1].
    std: tuple[float, float, float]
    eval_crop_ratio: float            # Centre crop: shorter side / ratio, then crop.


# The usual figures of each set's train split.
TFDS_IMAGE_STATS = {
    "imagenet2012": SetStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875),
    "cifar10": SetStats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 1.0),
    "cifar100": SetStats((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 1.0),
}


@dataclasses.dataclass(frozen=True)
class TfdsImageConfig:
    dataset: str
    split: str
    global_batch_size: int
    seed: int
    image_shape: tuple[int, int, int]
    data_dir: str | None = None
    num_hosts: int = 1
    shuffle: bool = True
    repeat: bool = True
    train_augmentation: bool = False
    random_resized_crop: bool = True
    horizontal_flip: bool = True
    mixup_alpha: float = 0.0
    randaugment_layers: int = 0
    randaugment_magnitude: int = 10

    @property
    def augmentation(self) -> image_transforms.TrainAugmentation:
        return image_transforms.TrainAugmentation(
            self.random_resized_crop, self.horizontal_flip, float(self.mixup_alpha),
            self.randaugment_layers, self.randaugment_magnitude)

    def validate(self, host_index: int) -> None:
        if self.dataset not in TFDS_IMAGE_STATS:
            raise UnknownImageSetError(f"unknown TFDS image set {self.dataset!r}; known: "
                                       f"{', '.join(TFDS_IMAGE_STATS)}")
        iterator_state.check_host_layout(host_index, self.num_hosts, self.global_batch_size,
                                         self.seed)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise DataError(f"image_shape must be (height, width, channels) >= 1, got "
                            f"{self.image_shape}")
        self.augmentation  # Validates mixup and RandAugment.


def _where(data_dir: str | None) -> str:
    if data_dir:
        return data_dir
    if os.environ.get("TFDS_DATA_DIR"):
        return f"{os.environ['TFDS_DATA_DIR']} ($TFDS_DATA_DIR)"
    return "TFDS's default data dir (~/tensorflow_datasets; $TFDS_DATA_DIR is not set)"


@functools.lru_cache(maxsize=8)
def _builder(dataset: str, data_dir: str | None):
    """The prepared set's read-only builder (metadata from its own files, nothing
    downloaded); cached per process, so a restore or an eval iterator reads the metadata
    once (a set converted while the process runs is seen after `_builder.cache_clear()`)."""
    from tensorflow_datasets.core import read_only_builder
    try:
        builder = read_only_builder.builder_from_files(dataset, data_dir=data_dir)
    except Exception as e:  # Not there, unreadable dataset_info.json, ...
        raise DataError(
            f"TFDS image set {dataset!r} is not prepared in {_where(data_dir)} "
            f"({first_line(e)}): prepare it with `tfds build {dataset} --data_dir=DIR "
            "--file_format=array_record` where downloads are allowed (imagenet2012 needs "
            "its manual download), then set ImageDataConfig.data_dir; matlm downloads "
            "nothing") from None
    return builder


class TfdsImageSource:
    """One split of a prepared set: random access to (encoded image, label) rows."""

    def __init__(self, dataset: str, split: str, data_dir: str | None,
                 image_shape: tuple[int, int, int]):
        import tensorflow_datasets as tfds
        builder = _builder(dataset, data_dir)
        info = builder.info
        base = split.split("[")[0]
        if base not in info.splits:
            raise UnknownSplitError(f"TFDS image set {dataset!r} in {_where(data_dir)} has "
                                    f"no split {base!r}; it has {sorted(info.splits)}")
        from tensorflow_datasets.core import file_adapters
        formats = info.available_file_formats()  # The main one and any converted copies.
        if not formats & set(file_adapters.FileFormat.with_random_access()):
            raise DataError(
                f"TFDS image set {dataset!r} in {_where(data_dir)} is prepared as "
                f"{sorted(f.value for f in formats)}, and random access needs array_record: "
                f"convert it once with `tfds convert_format --dataset_version_dir="
                f"{builder.data_dir} --out_file_format=array_record` (it imports apache-beam)")
        if "image" not in info.features or "label" not in info.features:
            raise DataError(f"TFDS set {dataset!r} has features {sorted(info.features)}, "
                            "not 'image' and 'label'")
        channels = info.features["image"].shape[-1]
        if channels is not None and channels != image_shape[2]:
            raise DataError(f"TFDS image set {dataset!r} has {channels}-channel images but "
                            f"image_shape {tuple(image_shape)} asks for {image_shape[2]} "
                            "(ViTConfig.num_channels)")
        try:
            n = info.splits[split].num_examples  # From the metadata: also for a slice.
        except Exception as e:  # A malformed slice.
            raise DataError(f"TFDS image set {dataset!r} has no split {split!r}: "
                            f"{first_line(e)}") from None
        if n == 0:
            raise EmptySplitError(f"TFDS image set {dataset!r} split {split!r} in "
                                  f"{_where(data_dir)} has no examples")
        try:
            self.rows = builder.as_data_source(
                split, decoders={"image": tfds.decode.SkipDecoding()})
            n = len(self.rows)
        except Exception as e:  # A missing shard, ...
            raise DataError(f"TFDS image set {dataset!r} split {split!r} cannot be read "
                            f"from {_where(data_dir)}: {first_line(e)}") from None
        self.num_examples = n
        self.num_classes = int(info.features["label"].num_classes)
        self.channels = image_shape[2]

    def read(self, rows: np.ndarray) -> list[tuple[bytes, int]]:
        examples = self.rows.__getitems__([int(r) for r in rows])
        return [(ex["image"], int(ex["label"])) for ex in examples]


def _resize(image_HWC: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    if image_HWC.shape[:2] == tuple(out_hw):
        return image_HWC
    import tensorflow as tf
    resized = tf.image.resize(image_HWC, out_hw, method="bilinear", antialias=True).numpy()
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def _decode_crop(encoded: bytes, channels: int, box_of) -> np.ndarray:
    """uint8 pixels of the box `box_of(height, width)` of an encoded image. Decoded whole,
    then cropped: `decode_and_crop_jpeg` gave slightly different pixels at the box's edge
    and was no faster on ImageNet-sized JPEGs here (0.9-1.1 vs 0.8 ms an image)."""
    import tensorflow as tf
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False).numpy()
    top, left, ch, cw = box_of(*image.shape[:2])
    return image[top:top + ch, left:left + cw]


class TfdsImageBatchIterator(iterator_state.StepIterator):
    """Iterator of per-host batches (see the module docstring); `state` saves it,
    `restore_tfds_image_batch_iterator` rebuilds it; `batch(step)` is random access."""

    STATE_VERSION = STATE_VERSION
    PIPELINE = "TFDS image pipeline"

    def __init__(self, config: TfdsImageConfig, host_index: int = 0, start_step: int = 0,
                 pad_to_num_batches: int | None = None):
        config.validate(host_index)
        self.config, self.host_index = config, host_index
        self.per_host_batch_size = config.global_batch_size // config.num_hosts
        self.source = TfdsImageSource(config.dataset, config.split, config.data_dir,
                                      config.image_shape)
        self.stats = TFDS_IMAGE_STATS[config.dataset]
        self._orders: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        self.num_batches = iterator_state.one_epoch_batches(
            self.num_examples, config.global_batch_size, config.repeat, pad_to_num_batches)
        self.step = start_step
        self._pool = concurrent.futures.ThreadPoolExecutor(_THREADS)

    @property
    def num_examples(self) -> int:
        return self.source.num_examples

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config.image_shape)

    def order(self, epoch: int) -> np.ndarray:
        """The split's rows in the order of `epoch` (int32; the last two are cached)."""
        if epoch not in self._orders:
            n = self.num_examples
            self._orders[epoch] = (
                np.random.default_rng([self.config.seed, SeedStream.IMAGE_ORDER,
                                       image_transforms.ORDER_SUBSTREAM, epoch])
                .permutation(n).astype(np.int32) if self.config.shuffle
                else np.arange(n, dtype=np.int32))
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def rows(self, k: np.ndarray) -> np.ndarray:
        n = self.num_examples
        out = np.empty(len(k), np.int64)
        epochs = k // n
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.order(int(epoch))[k[where] % n]
        return out

    def _process(self, encoded: bytes, position: int, draws) -> np.ndarray:
        """One example's uint8 pixels of image_shape (the train transform when `draws`)."""
        H, W, C = self.config.image_shape

        def box_of(h: int, w: int) -> tuple[int, int, int, int]:
            box = None
            if draws is not None and self.config.random_resized_crop:
                box = image_transforms.random_crop_box(h, w, draws.crop_uniforms[position])
            return box or image_transforms.centre_crop_box(h, w, (H, W),
                                                           self.stats.eval_crop_ratio)
        image = _resize(_decode_crop(encoded, C, box_of), (H, W))
        if draws is None:
            return image
        if not self.config.random_resized_crop:
            image = image_transforms.pad_and_crop(image, draws.pad_offsets[position])
        if draws.flips[position]:
            image = image[:, ::-1]
        if self.config.randaugment_layers:
            image = image_transforms.randaugment(
                image, draws.ra_ops[position], draws.ra_signs[position],
                self.config.randaugment_magnitude)
        return np.ascontiguousarray(image)

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """float32 (pixel / 255 - mean) / std per channel, as one multiply-add."""
        C = raw.shape[-1]
        std = np.resize(np.asarray(self.stats.std, np.float64), C)
        mean = np.resize(np.asarray(self.stats.mean, np.float64), C)
        scale, offset = (1 / (255 * std)).astype(np.float32), (-mean / std).astype(np.float32)
        out = np.multiply(raw, scale, dtype=np.float32)
        out += offset
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        config = self.config
        b, B = self.per_host_batch_size, config.global_batch_size
        mine = self.host_index * b + np.arange(b, dtype=np.int64)  # Global-batch positions.
        train = config.train_augmentation
        mixup = train and config.mixup_alpha > 0
        draws = (image_transforms.draws(config.seed, step, B, config.augmentation)
                 if train else None)
        partners = image_transforms.mixup_partners(mine, B) if mixup else mine
        needed = np.union1d(mine, partners)  # Mixup partners on another host are read too.
        k = step * B + needed
        valid = np.ones(len(k), bool) if config.repeat else k < self.num_examples
        # Padding is all zeros, label 0, mask 0.
        images = np.zeros((len(k), *config.image_shape), np.float32)
        labels = np.zeros(len(k), np.int32)
        where = np.flatnonzero(valid)
        examples = self.source.read(self.rows(k[where]))

        def one(i: int, encoded: bytes) -> None:  # In a thread: TF and numpy drop the GIL.
            images[i] = self.normalise(self._process(encoded, int(needed[i]), draws))
        list(self._pool.map(one, where, [encoded for encoded, _ in examples]))
        labels[where] = [label for _, label in examples]
        index = {int(p): i for i, p in enumerate(needed)}
        # Without partners from other hosts `needed` is `mine` (both sorted): no copy.
        own = (slice(None) if len(needed) == b else
               np.asarray([index[int(p)] for p in mine]))
        out = {"images": images[own], "labels": labels[own],
               "mask": valid[own].astype(np.float32)}
        if mixup:
            other = np.asarray([index[int(p)] for p in partners])
            weight = draws.mixup_weights[mine]
            out["images"] = (weight[:, None, None, None] * images[own]
                             + (1 - weight[:, None, None, None]) * images[other])
            out["mixup_labels"] = labels[other]
            out["mixup_weight"] = weight
        return out



def make_tfds_image_batch_iterator(
        dataset: str, split: str, global_batch_size: int, seed: int, *,
        image_shape: tuple[int, int, int], data_dir: str | None = None, host_index: int = 0,
        num_hosts: int = 1, start_step: int = 0, shuffle: bool = True, repeat: bool = True,
        pad_to_num_batches: int | None = None, train_augmentation: bool = False,
        random_resized_crop: bool = True, horizontal_flip: bool = True,
        mixup_alpha: float = 0.0, randaugment_layers: int = 0,
        randaugment_magnitude: int = 10) -> TfdsImageBatchIterator:
    """Batches of a prepared TFDS image set's `split` for this host (module docstring)."""
    config = TfdsImageConfig(
        dataset=dataset, split=split, global_batch_size=global_batch_size, seed=seed,
        image_shape=tuple(int(v) for v in image_shape), data_dir=data_dir,
        num_hosts=num_hosts, shuffle=shuffle, repeat=repeat,
        train_augmentation=train_augmentation, random_resized_crop=random_resized_crop,
        horizontal_flip=horizontal_flip, mixup_alpha=float(mixup_alpha),
        randaugment_layers=randaugment_layers, randaugment_magnitude=randaugment_magnitude)
    _LOG.info("TFDS image pipeline %s host %d/%d from step %d", config, host_index, num_hosts,
              start_step)
    return TfdsImageBatchIterator(config, host_index=host_index, start_step=start_step,
                                  pad_to_num_batches=pad_to_num_batches)


def restore_tfds_image_batch_iterator(state: dict[str, Any], host_index: int = 0,
                                      num_hosts: int = 1) -> TfdsImageBatchIterator:
    """Rebuilds the iterator a saved `state` came from, at its step, for this job's hosts
    (any number: the same global batches)."""
    config = iterator_state.config_from_state(state, TfdsImageConfig, STATE_VERSION,
                                              TfdsImageBatchIterator.PIPELINE, num_hosts)
    return TfdsImageBatchIterator(config, host_index=host_index, start_step=int(state["step"]))
