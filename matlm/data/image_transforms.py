"""Training and eval transforms of decoded images for the TFDS image sets: the random draws
of a step, crop boxes (Inception-style random resized crop, centre crop), pad-and-crop,
flip, a small RandAugment and mixup pairing. Numpy only; resizing is the caller's
(`matlm.data.tfds_images` uses TensorFlow on the host CPU).

Every random number of a step is drawn for the whole *global* batch from generators
seeded with `[seed, SeedStream.IMAGE_ORDER, AUGMENT_SUBSTREAM, step, part]`, and an example
uses the row of its position in the global batch: the same example is augmented the same
way whatever the number of hosts and after any resume. The draws do not depend on the
images (a crop is a function of uniform numbers and the image's own size), so a host
draws them without seeing other hosts' images. Geometry, mixup and RandAugment each have
their own generator (`part`), so turning one on does not change the others' draws.

RandAugment (Cubuk et al. 2019) here is a small set of ops on uint8 pixels, each applied
at strength `magnitude / 10` of its maximum (magnitude 10 is the paper's usual "full"
strength; the config allows up to 30, which saturates the ops that have limits):

| op | at strength s |
| --- | --- |
| identity | nothing |
| autocontrast | each channel stretched to 0..255 (no strength) |
| equalize | histogram equalisation of each channel (no strength) |
| posterize | keep 8 - round(4 s) bits (at least 1) |
| solarize | invert pixels >= 256 - 256 s |
| brightness | blend with black by 1 ± 0.9 s |
| contrast | blend with the mean grey by 1 ± 0.9 s |
| color | blend with the greyscale image by 1 ± 0.9 s |
| translate_x, translate_y | shift by ± 0.45 s of the side, zeros in |

Rotation and shear are left out: they need an interpolating warp per image.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from matlm.data.errors import DataError
from matlm.data.seed_streams import SeedStream

# Sub-streams of SeedStream.IMAGE_ORDER used by the TFDS image pipeline (0 and 1 are the
# offline pipeline's order and augmentation, matlm.data.image_augment).
ORDER_SUBSTREAM = 2
AUGMENT_SUBSTREAM = 3
_GEOMETRY, _MIXUP, _RANDAUGMENT = 0, 1, 2  # The `part` of a step's generators.

CROP_ATTEMPTS = 10  # Inception crop: tries before falling back to the centre crop.
CROP_SCALE = (0.08, 1.0)
CROP_LOG_RATIO = (np.log(3 / 4), np.log(4 / 3))
RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "posterize", "solarize",
                   "brightness", "contrast", "color", "translate_x", "translate_y")


@dataclasses.dataclass(frozen=True)
class TrainAugmentation:
    random_resized_crop: bool = True  # Else: centre crop, then pad (side // 8) and crop.
    horizontal_flip: bool = True
    mixup_alpha: float = 0.0          # 0: off.
    randaugment_layers: int = 0       # 0: off.
    randaugment_magnitude: int = 10

    def __post_init__(self):
        if not self.mixup_alpha >= 0:
            raise DataError(f"mixup_alpha must be >= 0, got {self.mixup_alpha!r}")
        if self.randaugment_layers < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise DataError(f"randaugment_layers must be >= 0 and randaugment_magnitude in "
                            f"[0, 30], got {self.randaugment_layers}, "
                            f"{self.randaugment_magnitude}")


@dataclasses.dataclass(frozen=True)
class StepDraws:
    """The random numbers of one step's global batch (B rows)."""
    crop_uniforms: np.ndarray   # float64 [B, CROP_ATTEMPTS, 4]: scale, log-ratio, y, x
    pad_offsets: np.ndarray     # float64 [B, 2] in [0, 1): row, column of the pad crop
    flips: np.ndarray           # bool [B]
    mixup_weights: np.ndarray   # float32 [B]: the weight of a row's own image and label
    ra_ops: np.ndarray          # int64 [B, layers]: indices into RANDAUGMENT_OPS
    ra_signs: np.ndarray        # bool [B, layers]: True: the op's negative direction


def draws(seed: int, step: int, global_batch_size: int,
          augmentation: TrainAugmentation) -> StepDraws:
    B = global_batch_size

    def rng(part):
        return np.random.default_rng([seed, SeedStream.IMAGE_ORDER, AUGMENT_SUBSTREAM, step,
                                      part])
    geometry = rng(_GEOMETRY)
    crop = geometry.random((B, CROP_ATTEMPTS, 4))
    pad = geometry.random((B, 2))
    flips = geometry.random(B) < 0.5
    if not augmentation.horizontal_flip:
        flips[:] = False
    alpha = augmentation.mixup_alpha
    weights = (rng(_MIXUP).beta(alpha, alpha, B).astype(np.float32) if alpha > 0
               else np.ones(B, np.float32))
    ra = rng(_RANDAUGMENT)
    layers = augmentation.randaugment_layers
    ops = ra.integers(0, len(RANDAUGMENT_OPS), (B, layers))
    signs = ra.random((B, layers)) < 0.5
    return StepDraws(crop, pad, flips, weights, ops, signs)


def mixup_partners(positions: np.ndarray, global_batch_size: int) -> np.ndarray:
    """The global-batch position each position mixes with: pairs (2i, 2i+1), so a host
    with an even share holds both images of its pairs; with an odd B the last row mixes
    with itself. The global order is a random permutation, so the pairs are random."""
    partners = positions ^ 1
    return np.where(partners < global_batch_size, partners, positions)


def centre_crop_box(height: int, width: int, out_shape: tuple[int, int],
                    crop_ratio: float) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): the centred region with the output's aspect
    that, resized to `out_shape`, equals resizing the shorter side to side / crop_ratio
    and cropping the centre (ImageNet's usual 0.875; 1.0 keeps the whole short side)."""
    H, W = out_shape
    scale = min(height / H, width / W) * crop_ratio
    ch, cw = max(1, min(height, round(H * scale))), max(1, min(width, round(W * scale)))
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def random_crop_box(height: int, width: int, uniforms: np.ndarray,
                    ) -> tuple[int, int, int, int] | None:
    """Inception-style crop (area fraction in CROP_SCALE, log aspect ratio uniform in
    CROP_LOG_RATIO, position uniform) from `uniforms` [CROP_ATTEMPTS, 4]; None if no
    attempt fits (the caller falls back to the centre crop)."""
    area = height * width
    for scale_u, ratio_u, y_u, x_u in uniforms:
        target = area * (CROP_SCALE[0] + scale_u * (CROP_SCALE[1] - CROP_SCALE[0]))
        ratio = np.exp(CROP_LOG_RATIO[0] + ratio_u * (CROP_LOG_RATIO[1] - CROP_LOG_RATIO[0]))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(y_u * (height - ch + 1)), int(x_u * (width - cw + 1)), ch, cw
    return None


def pad_and_crop(image_HWC: np.ndarray, offsets_u: np.ndarray) -> np.ndarray:
    """Zero-pads side // 8 pixels on each side and crops back at the drawn offset."""
    H, W = image_HWC.shape[:2]
    p = max(H, W) // 8
    if not p:
        return image_HWC
    padded = np.pad(image_HWC, ((p, p), (p, p), (0, 0)))
    r, c = (np.minimum(offsets_u * (2 * p + 1), 2 * p)).astype(int)
    return padded[r:r + H, c:c + W]


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    out = other + factor * (image.astype(np.float32) - other)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _equalize(channel: np.ndarray) -> np.ndarray:
    hist = np.bincount(channel.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    nonzero = hist[hist > 0]
    if len(nonzero) <= 1:
        return channel
    lut = np.clip(np.round((cdf - cdf.min()) * 255.0 / max(cdf[-1] - cdf.min(), 1)), 0, 255)
    return lut.astype(np.uint8)[channel]


def apply_op(image_HWC: np.ndarray, op: str, strength: float, negative: bool) -> np.ndarray:
    """One RandAugment op on uint8 pixels (see the module docstring)."""
    signed = -strength if negative else strength
    if op == "identity":
        return image_HWC
    if op == "autocontrast":
        lo = image_HWC.min(axis=(0, 1), keepdims=True).astype(np.float32)
        hi = image_HWC.max(axis=(0, 1), keepdims=True).astype(np.float32)
        span = np.where(hi > lo, hi - lo, 1.0)
        out = np.where(hi > lo, (image_HWC - lo) * 255.0 / span, image_HWC)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    if op == "equalize":
        return np.stack([_equalize(image_HWC[..., c]) for c in range(image_HWC.shape[-1])], -1)
    if op == "posterize":
        bits = int(np.clip(8 - round(4 * strength), 1, 8))
        return image_HWC & np.uint8((0xFF << (8 - bits)) & 0xFF)
    if op == "solarize":
        threshold = 256 - 256 * min(strength, 1.0)
        return np.where(image_HWC >= threshold, 255 - image_HWC, image_HWC).astype(np.uint8)
    if op == "brightness":
        return _blend(image_HWC, 0.0, max(1 + 0.9 * signed, 0.0))
    if op == "contrast":
        grey = (image_HWC.astype(np.float32) @ _grey_weights(image_HWC)).mean()
        return _blend(image_HWC, grey, max(1 + 0.9 * signed, 0.0))
    if op == "color":
        grey = (image_HWC.astype(np.float32) @ _grey_weights(image_HWC))[..., None]
        return _blend(image_HWC, grey, max(1 + 0.9 * signed, 0.0))
    if op in ("translate_x", "translate_y"):
        axis = 1 if op == "translate_x" else 0
        shift = int(round(min(0.45 * signed, 1.0) * image_HWC.shape[axis]))
        out = np.zeros_like(image_HWC)
        n = image_HWC.shape[axis] - abs(shift)
        if n > 0:
            src = [slice(None)] * 3
            dst = [slice(None)] * 3
            src[axis] = slice(max(-shift, 0), max(-shift, 0) + n)
            dst[axis] = slice(max(shift, 0), max(shift, 0) + n)
            out[tuple(dst)] = image_HWC[tuple(src)]
        return out
    raise DataError(f"unknown RandAugment op {op!r}; known: {RANDAUGMENT_OPS}")


def _grey_weights(image_HWC: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma weights for RGB; equal weights for other channel counts."""
    C = image_HWC.shape[-1]
    if C == 3:
        return np.asarray([0.299, 0.587, 0.114], np.float32)
    return np.full(C, 1.0 / C, np.float32)


def randaugment(image_HWC: np.ndarray, ops: np.ndarray, signs: np.ndarray,
                magnitude: int) -> np.ndarray:
    """The drawn ops of one example, in order, at strength magnitude / 10."""
    for op, negative in zip(ops, signs):
        image_HWC = apply_op(image_HWC, RANDAUGMENT_OPS[int(op)], magnitude / 10.0,
                             bool(negative))
    return image_HWC
