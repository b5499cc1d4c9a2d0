"""`ImageDataConfig`: the data knobs of an image run (the MatViT family), bound in gin.

    ImageDataConfig.dataset = "mnist_5k"      # an offline set (matlm.data.image_sets)
    ImageDataConfig.dataset = "cifar10"       # or a TFDS set from a prepared data_dir
    ImageDataConfig.data_dir = "gs://bucket/tensorflow_datasets"

It plays the part `DataConfig` plays for text: the trainer asks it for the train and eval
iterators and resumes them from their saved state. The offline sets are numpy only (no
TensorFlow); the TFDS sets (`matlm.data.tfds_images`) import TensorFlow when first used.
After `matlm.gin_config.parse_gin(...)`, call `image_data_config_from_gin()`.
"""
from __future__ import annotations

import dataclasses

try:
    import gin
except ModuleNotFoundError:  # A core-only machine (the GPU image): no gin, no gin runs.
    gin = None

from matlm.config_checks import check_fields, checked
from matlm.data import image_sets
from matlm.data.errors import DataError

DEFAULT_IMAGE_SET = "mnist_5k"
# TFDS image classification sets read from a prepared `data_dir` (matlm.data.tfds_images).
TFDS_IMAGE_SETS = ("imagenet2012", "cifar10", "cifar100")


class ImageDataConfigError(DataError):
    """An ImageDataConfig field of the wrong type or range."""


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    dataset: str = checked(DEFAULT_IMAGE_SET, str)
    train_split: str = checked("train", str)
    eval_split: str = checked("validation", str)
    seed: int = checked(0, int, ge=0)
    # TFDS sets only: the prepared TFDS data directory (local or gs://); None: TFDS's default.
    data_dir: str | None = checked(None, str, optional=True)
    # Training augmentation. Offline sets: pad-and-crop and flip (matlm.data.image_augment).
    crop_padding: int = checked(0, int, ge=0)
    horizontal_flip: bool = checked(False, bool)
    # TFDS sets: Inception-style random resized crop (else a centre crop), mixup, RandAugment.
    random_resized_crop: bool = checked(True, bool)
    mixup_alpha: float = checked(0.0, float, ge=0)  # 0: off.
    randaugment_layers: int = checked(0, int, ge=0)  # 0: off.
    randaugment_magnitude: int = checked(10, int, ge=0, le=30)

    def __post_init__(self):
        check_fields(self, ImageDataConfigError)

    @property
    def is_tfds(self) -> bool:
        return self.dataset in TFDS_IMAGE_SETS

    # The names the trainer and run_config.json share with DataConfig.
    @property
    def task(self) -> str:
        return self.dataset

    @property
    def eval_task(self) -> str:
        return self.dataset

    def vocabulary(self):
        """Images have no vocabulary."""
        return None

    def check(self, image_shape: tuple[int, int, int], patch_size: int) -> None:
        """Fails (DataError, one line) on an unknown set or images the model cannot read,
        before any compile."""
        image_sets.check_patch_size(image_shape[0], patch_size)
        if self.is_tfds:
            return  # Resized to the model's image_size by the TFDS pipeline.
        image_sets.check_image_set(self.dataset)
        split = image_sets.image_split(self.dataset, self.train_split)
        if tuple(split.image_shape) != tuple(image_shape):
            raise DataError(
                f"image set {self.dataset!r} has images of shape {tuple(split.image_shape)} "
                f"but the model reads {tuple(image_shape)} (ViTConfig.image_size, "
                "num_channels): bind the ViTConfig to the data")

    def _iterator(self, split: str, image_shape, global_batch_size: int, host_index: int,
                  num_hosts: int, train: bool, start_step: int = 0,
                  pad_to_num_batches: int | None = None, shuffle: bool | None = None):
        shuffle = train if shuffle is None else shuffle
        if self.is_tfds:
            from matlm.data import tfds_images  # TensorFlow enters here.
            return tfds_images.make_tfds_image_batch_iterator(
                self.dataset, split, global_batch_size, self.seed, image_shape=image_shape,
                data_dir=self.data_dir, host_index=host_index, num_hosts=num_hosts,
                start_step=start_step, shuffle=shuffle, repeat=train,
                pad_to_num_batches=pad_to_num_batches, train_augmentation=train,
                random_resized_crop=self.random_resized_crop, horizontal_flip=True,
                mixup_alpha=self.mixup_alpha, randaugment_layers=self.randaugment_layers,
                randaugment_magnitude=self.randaugment_magnitude)
        from matlm.data.images import make_image_batch_iterator
        return make_image_batch_iterator(
            self.dataset, split, global_batch_size, self.seed, host_index=host_index,
            num_hosts=num_hosts, start_step=start_step, shuffle=shuffle, repeat=train,
            pad_to_num_batches=pad_to_num_batches,
            crop_padding=self.crop_padding if train else 0,
            horizontal_flip=self.horizontal_flip and train)

    def train_iterator(self, image_shape, global_batch_size: int, host_index: int = 0,
                       num_hosts: int = 1, start_step: int = 0):
        return self._iterator(self.train_split, image_shape, global_batch_size, host_index,
                              num_hosts, train=True, start_step=start_step)

    def eval_iterator(self, image_shape, global_batch_size: int, host_index: int = 0,
                      num_hosts: int = 1, split: str | None = None,
                      pad_to_num_batches: int | None = None, shuffle: bool = False):
        """One pass over the eval split (or `split`) without augmentation, the last batch
        padded (mask 0): in the split's order, or with `shuffle` in a fixed (seeded)
        order, so that its first batches are a fair sample (a split may be sorted by
        class, as mnist_5k's are)."""
        return self._iterator(split or self.eval_split, image_shape, global_batch_size,
                              host_index, num_hosts, train=False,
                              pad_to_num_batches=pad_to_num_batches, shuffle=shuffle)


def restore_image_iterator(state: dict, host_index: int = 0, num_hosts: int = 1):
    """Rebuilds a saved image iterator (offline or TFDS, by its state's version)."""
    from matlm.data import images
    if state.get("version") == images.STATE_VERSION:
        return images.restore_image_batch_iterator(state, host_index, num_hosts)
    from matlm.data import tfds_images
    return tfds_images.restore_tfds_image_batch_iterator(state, host_index, num_hosts)


# Registered where gin is installed (`matlm.data` imports this module for the numpy image
# side, which a machine without gin still uses).
_GinImageDataConfig = (gin.external_configurable(ImageDataConfig, module="matlm")
                       if gin is not None else None)


def image_data_config_from_gin() -> ImageDataConfig:
    from matlm.gin_config import config_from_gin
    return config_from_gin(ImageDataConfig, _GinImageDataConfig)
