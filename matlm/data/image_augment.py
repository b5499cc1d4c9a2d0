"""Training augmentation of raw images: a random crop after zero padding, and a random
horizontal flip, each a pure function of (seed, step, position in the global batch).

The draws of a step are made for the whole global batch from one generator seeded with
`[seed, SeedStream.IMAGE_ORDER, AUGMENT_SUBSTREAM, step]`, and each host keeps the rows
of its slice, so an example is augmented the same way whatever the number of hosts and
after any resume. Off by default for the offline sets: they are digits, and a flipped 2
is no 2.

Augmentation works on raw pixels (before normalisation), so padding is raw 0, the
background of both offline sets.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from matlm.data.errors import DataError
from matlm.data.seed_streams import SeedStream

# Sub-streams of SeedStream.IMAGE_ORDER: an epoch's example order, a step's augmentation.
ORDER_SUBSTREAM = 0
AUGMENT_SUBSTREAM = 1


@dataclasses.dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 0          # Pixels of zeros on each side before a random crop.
    horizontal_flip: bool = False  # Flip each image left-right with probability 1/2.

    def __post_init__(self):
        if not isinstance(self.crop_padding, (int, np.integer)) or self.crop_padding < 0:
            raise DataError(f"crop_padding must be an integer >= 0, got {self.crop_padding!r}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip


def draws(seed: int, step: int, global_batch_size: int, augmentation: Augmentation
          ) -> tuple[np.ndarray, np.ndarray]:
    """Crop offsets [B, 2] (row, column, in [0, 2 * padding]) and flips [B] (bool) of
    every example of the global batch of `step`."""
    rng = np.random.default_rng([seed, SeedStream.IMAGE_ORDER, AUGMENT_SUBSTREAM, step])
    # Both are always drawn, so turning one on does not change the other's draws.
    offsets = rng.integers(0, 2 * augmentation.crop_padding + 1, size=(global_batch_size, 2))
    flips = rng.random(global_batch_size) < 0.5
    if not augmentation.horizontal_flip:
        flips[:] = False
    return offsets, flips


def augment(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
            padding: int) -> np.ndarray:
    """`images` [b, H, W, C] cropped back to H x W from zero padding at `offsets`, and
    flipped where `flips`; same shape and dtype."""
    out = images
    if padding:
        h, w = images.shape[1:3]
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        out = np.stack([padded[i, r:r + h, c:c + w] for i, (r, c) in enumerate(offsets)])
    if flips.any():
        out = out.copy() if out is images else out
        out[flips] = out[flips][:, :, ::-1]
    return out
