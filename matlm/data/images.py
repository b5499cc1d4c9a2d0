"""Per-host batches of an image classification split: each host's share of a global
batch that is a pure function of (seed, step), whatever the number of hosts.

    it = make_image_batch_iterator("mnist_5k", "train", global_batch_size=128, seed=0,
                                   host_index=jax.process_index(),
                                   num_hosts=jax.process_count())
    batch = next(it)          # dict of numpy arrays, 128 // num_hosts examples
    saved = it.state          # small JSON-serialisable dict, identical on every host
    it = restore_image_batch_iterator(saved, host_index=..., num_hosts=...)  # any count

Batch features (b = global_batch_size // num_hosts):
    images  float32 [b, H, W, C]  pixels normalised with the train split's mean and std
    labels  int32   [b]           class ids in [0, num_classes)
    mask    float32 [b]           1 for a real example, 0 for the padding that ends a
                                  one-epoch (repeat=False) pass; always 1 when training

The order mirrors the text pipeline (`matlm.data.pipeline`): the global k-th example is
position `k mod N` of epoch `k div N` (N examples in the split), each epoch a fresh
permutation seeded with `[seed, SeedStream.IMAGE_ORDER, 0, epoch]`; the global batch of
step s is examples [s*B, (s+1)*B), and host h of H materialises [s*B + h*b, s*B + (h+1)*b).
So every example appears exactly once per epoch, a job resumed on another number of hosts
sees the same data, and resuming at step s costs one permutation, not s batches.
Augmentation (`matlm.data.image_augment`) is drawn per global batch from the same seed,
so it is host-count-independent too.

This module is numpy only: no TensorFlow, no seqio. The offline sets and their fixed
splits are in `matlm.data.image_sets`.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import numpy as np

from matlm.data import image_augment, image_sets, iterator_state
from matlm.data.seed_streams import SeedStream

STATE_VERSION = "image-1"
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImagePipelineConfig:
    dataset: str
    split: str
    global_batch_size: int
    seed: int
    num_hosts: int = 1
    shuffle: bool = True
    repeat: bool = True
    crop_padding: int = 0
    horizontal_flip: bool = False

    @property
    def augmentation(self) -> image_augment.Augmentation:
        return image_augment.Augmentation(self.crop_padding, self.horizontal_flip)

    def validate(self, host_index: int) -> None:
        iterator_state.check_host_layout(host_index, self.num_hosts, self.global_batch_size,
                                         self.seed)
        self.augmentation  # Validates crop_padding.


class ImageBatchIterator(iterator_state.StepIterator):
    """Iterator of per-host image batches; `state` saves it,
    `restore_image_batch_iterator` rebuilds it. `batch(step)` is random access (pure)."""

    STATE_VERSION = STATE_VERSION
    PIPELINE = "image pipeline"

    def __init__(self, config: ImagePipelineConfig, host_index: int = 0, start_step: int = 0,
                 pad_to_num_batches: int | None = None):
        config.validate(host_index)
        self.config, self.host_index = config, host_index
        self.per_host_batch_size = config.global_batch_size // config.num_hosts
        self.split = image_sets.image_split(config.dataset, config.split)
        if len(self.split) == 0:
            raise image_sets.EmptySplitError(
                f"image set {config.dataset!r} split {config.split!r} has no images")
        self._orders: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        # One epoch in global batches: the same count on every host.
        self.num_batches = iterator_state.one_epoch_batches(
            len(self.split), config.global_batch_size, config.repeat, pad_to_num_batches)
        self.step = start_step

    @property
    def num_examples(self) -> int:
        return len(self.split)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.split.image_shape

    @property
    def num_classes(self) -> int:
        return self.split.num_classes

    def order(self, epoch: int) -> np.ndarray:
        """The split's row indices in the order of `epoch` (the last two are cached)."""
        if epoch not in self._orders:
            n = len(self.split)
            self._orders[epoch] = (
                np.random.default_rng([self.config.seed, SeedStream.IMAGE_ORDER,
                                       image_augment.ORDER_SUBSTREAM, epoch]).permutation(n)
                if self.config.shuffle else np.arange(n))
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def rows(self, k: np.ndarray) -> np.ndarray:
        """The split rows of global example indices `k`."""
        n = len(self.split)
        out = np.empty(len(k), np.int64)
        epochs = k // n
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.order(int(epoch))[k[where] % n]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        b, B = self.per_host_batch_size, self.config.global_batch_size
        # This host's share of the global batch: examples [s*B + h*b, s*B + (h+1)*b).
        k = step * B + self.host_index * b + np.arange(b, dtype=np.int64)
        valid = np.ones(b, bool) if self.config.repeat else k < len(self.split)
        raw = np.zeros((b, *self.split.image_shape), self.split.images.dtype)
        labels = np.zeros(b, np.int32)
        rows = self.rows(k[valid])
        raw[valid], labels[valid] = self.split.images[rows], self.split.labels[rows]
        augmentation = self.config.augmentation
        if augmentation.enabled:
            offsets, flips = image_augment.draws(self.config.seed, step, B, augmentation)
            mine = slice(self.host_index * b, (self.host_index + 1) * b)
            raw = image_augment.augment(raw, offsets[mine], flips[mine],
                                        augmentation.crop_padding)
        images = self.split.normalise(raw)
        images[~valid] = 0.0  # Padding is all zeros, label 0, mask 0.
        return {"images": images, "labels": labels, "mask": valid.astype(np.float32)}



def make_image_batch_iterator(dataset: str, split: str, global_batch_size: int, seed: int,
                              host_index: int = 0, num_hosts: int = 1, start_step: int = 0,
                              shuffle: bool = True, repeat: bool = True,
                              pad_to_num_batches: int | None = None, crop_padding: int = 0,
                              horizontal_flip: bool = False) -> ImageBatchIterator:
    """Batches of `dataset`'s `split` for this host (see the module docstring)."""
    config = ImagePipelineConfig(dataset=dataset, split=split,
                                 global_batch_size=global_batch_size, seed=seed,
                                 num_hosts=num_hosts, shuffle=shuffle, repeat=repeat,
                                 crop_padding=crop_padding, horizontal_flip=horizontal_flip)
    _LOG.info("image pipeline %s host %d/%d from step %d", config, host_index, num_hosts,
              start_step)
    return ImageBatchIterator(config, host_index=host_index, start_step=start_step,
                              pad_to_num_batches=pad_to_num_batches)


def restore_image_batch_iterator(state: dict[str, Any], host_index: int = 0,
                                 num_hosts: int = 1) -> ImageBatchIterator:
    """Rebuilds the iterator a saved `state` came from, positioned at its step, for this
    job's hosts (more or fewer than the saving job's: the same global batches)."""
    config = iterator_state.config_from_state(state, ImagePipelineConfig, STATE_VERSION,
                                              ImageBatchIterator.PIPELINE, num_hosts)
    return ImageBatchIterator(config, host_index=host_index, start_step=int(state["step"]))
