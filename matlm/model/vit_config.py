"""The MatViT family's config: the shared nested-Transformer body plus what an image
classifier adds (`ViTConfig(BodyConfig)`, docs/model_families.md).

The fields are flat, like the LM's (`ViTConfig.d_model = 768` in gin, one flat model dict
in run_config.json). The image is square, `image_size` pixels a side, cut into
(image_size / patch_size)² patches of patch_size² · num_channels values each; those are
the encoder's tokens, with a class token in front when `pooling="cls"`.
"""
from __future__ import annotations

import dataclasses

from matlm.config_checks import checked
from matlm.model.config import BodyConfig, ModelConfigError

# How the encoder's tokens become one embedding: the class token's final state (ViT's
# "token" classifier) or the mean over the patch tokens (global average pooling).
POOLINGS = ("cls", "gap")
# Learned: a [num_tokens, d_model] table (class token included), ViT's default.
# sincos: fixed 2-D sine/cosine features of each patch's row and column (MAE, MoCo v3);
# the class token gets none. Nothing to learn, and any grid size has one.
VIT_POSITION_ENCODINGS = ("learned", "sincos")
# The classifier's loss: softmax cross entropy over the classes, or scenic's multi-label
# loss (its "vit_multilabel_classification", which its MatViT ImageNet recipe trains):
# one sigmoid cross entropy per class, summed over the classes, against the one-hot
# (or mixup-mixed) labels.
CLASSIFICATION_LOSSES = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class ViTConfig(BodyConfig):
    """The MatViT family: a bidirectional encoder over image patches with a classifier.

    Its attention is bidirectional (the mask says so, matlm.model.attention), so the
    body's `attention_query_block` (causal query blocks) does not apply."""

    image_size: int = checked(32, int, ge=1)  # Pixels per side (square images).
    patch_size: int = checked(4, int, ge=1)  # Pixels per patch side.
    num_channels: int = checked(3, int, ge=1)
    num_classes: int = checked(10, int, ge=1)
    pooling: str = checked("cls", str, choices=POOLINGS)
    position_encoding: str = checked("learned", str, choices=VIT_POSITION_ENCODINGS)
    classification_loss: str = checked("softmax", str, choices=CLASSIFICATION_LOSSES)
    # The classifier bias's initial value, every class: scenic's recipe starts a sigmoid
    # classifier at -6.9 ≈ -log(1000), each class's prior probability on ImageNet.
    head_bias_init: float = checked(0.0, float)

    def _check_family(self):
        if self.image_size % self.patch_size:
            raise ModelConfigError(
                f"ViTConfig.image_size={self.image_size} is not divisible by "
                f"ViTConfig.patch_size={self.patch_size}; patches must tile the image")
        if self.position_encoding == "sincos" and self.d_model % 4:
            raise ModelConfigError(
                f"position_encoding='sincos' needs d_model divisible by 4 (sin and cos of "
                f"rows and columns), got d_model={self.d_model}; use 'learned'")

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch: the patch projection's input width."""
        return self.patch_size ** 2 * self.num_channels

    @property
    def num_tokens(self) -> int:
        """The encoder's sequence length: the patches, and the class token with cls pooling."""
        return self.num_patches + (self.pooling == "cls")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[H, W, C] of one input image."""
        return (self.image_size, self.image_size, self.num_channels)
