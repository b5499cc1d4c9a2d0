"""MatViT: the MatFormer vision encoder (Flax Linen), the "vit" family.

A thin family on the shared body, as MatLM is: patch embedding (+ class token and
positions) -> the nested stack (matlm.model.nested_stack) under a *bidirectional* mask ->
final norm -> pooling (the class token or the mean of the patches) -> a linear
classifier. Every width form of the body works unchanged (`widths=None`, static per-layer
ints, a traced [L] array, `joint_widths`; unrolled or scanned layers; remat), so the
granularities and Mix'n'Match submodels are MatLM's (scenic's projects/matvit is the
reference model; docs/model_families.md says where this one differs).

Parameters: `patch_kernel` [P·P·C, D] and `patch_bias` [D] (a stride-P convolution
written as one matmul; a conv kernel [P, P, C, D] reshapes to it row-major),
`cls_token` [D] (cls pooling), `position_embedding` [num_tokens, D] (learned positions),
the body's `layer_{i}` / `layers` and `final_norm`, and `head_kernel` [D, classes] and
`head_bias` [classes] (the kernel zero-initialised, as ViT's classifier; the bias at
`ViTConfig.head_bias_init`, 0 unless a recipe sets it).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matlm.model.attention import make_attention_mask
from matlm.model.layers import RMSNorm, _dense_init, _param
from matlm.model.nested_stack import outputs_per_submodel, run_stack
from matlm.model.vit_config import ViTConfig
from matlm.sharding import constrain


def patchify(config: ViTConfig, images_BHWC):
    """[B, N, P·P·C] patches in row-major grid order, each flattened (row, column, channel)."""
    B = images_BHWC.shape[0]
    G, P, C = config.grid_size, config.patch_size, config.num_channels
    x = images_BHWC.reshape(B, G, P, G, P, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, G * G, P * P * C)


def sincos_positions(config: ViTConfig) -> np.ndarray:
    """[num_patches, D] fixed 2-D position features (MAE's): the first half of each row
    encodes the patch's grid row, the second half its column, each as sin then cos of
    D/4 frequencies 10000^(-k / (D/4)). Computed in numpy: a constant of the trace."""
    G, quarter = config.grid_size, config.d_model // 4
    omega_F = 1.0 / 10_000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(G), np.arange(G), indexing="ij")

    def encode(coord):
        angle_NF = coord.reshape(-1, 1).astype(np.float64) * omega_F
        return np.concatenate([np.sin(angle_NF), np.cos(angle_NF)], axis=1)
    return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


class MatViT(nn.Module):
    config: ViTConfig
    # An encoder: every token sees every other (the mask carries it to every kernel).
    causal: ClassVar[bool] = False

    @nn.compact
    def __call__(self, images_BHWC, widths: Sequence[int] | jax.Array | None = None,
                 joint_widths: Sequence[Sequence[int]] | None = None,
                 return_embedding: bool = False):
        """float32 class logits [B, num_classes] of images [B, H, W, C]; with
        `joint_widths` (static width vectors of several submodels), a tuple of them, one
        per submodel, over shared residual streams (matlm.model.streams). `widths` as
        MatLM's. `return_embedding`: the pooled, final-normed embedding [B, D] (float32)
        instead of logits: the representation retrieval compares."""
        cfg = self.config
        if tuple(images_BHWC.shape[1:]) != cfg.image_shape:
            raise ValueError(f"images of shape {tuple(images_BHWC.shape)} for a MatViT of "
                             f"[B, {', '.join(map(str, cfg.image_shape))}] inputs "
                             "(ViTConfig.image_size, num_channels)")
        x_BTD = self._embed(images_BHWC)
        x_BTD = constrain(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
        B, T = x_BTD.shape[:2]
        # No packing or padding: one segment per image, so every token sees every token.
        mask = make_attention_mask(jnp.ones((B, T), jnp.int32), cfg, causal=self.causal)
        streams, final_members = run_stack(self, cfg, x_BTD, None, mask, widths, joint_widths)

        final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
        head_DK = _param(self, "head_kernel", (cfg.d_model, cfg.num_classes),
                         ("embed", None), nn.initializers.zeros)
        bias_K = _param(self, "head_bias", (cfg.num_classes,), (None,),
                        nn.initializers.constant(cfg.head_bias_init))

        def head(x_BTD):
            embedding_BD = self._pool(final_norm(x_BTD).astype(jnp.float32))
            if return_embedding:
                return embedding_BD
            return embedding_BD @ head_DK + bias_K  # Small: float32, whatever the compute dtype.

        return outputs_per_submodel(streams, final_members, len(joint_widths or ()), head)

    def _embed(self, images_BHWC):
        """Tokens [B, T, D]: projected patches, the class token in front (cls pooling),
        plus positions."""
        cfg = self.config
        dtype = jnp.dtype(cfg.compute_dtype)
        D = cfg.d_model
        kernel = _param(self, "patch_kernel", (cfg.patch_dim, D), (None, "embed"),
                        _dense_init(cfg.patch_dim))
        bias = _param(self, "patch_bias", (D,), ("embed",), nn.initializers.zeros)
        patches_BNX = patchify(cfg, images_BHWC.astype(dtype))
        B, N = patches_BNX.shape[:2]
        # One 2-D matmul over flattened patches (XLA:CPU's fast form, as the body's).
        x_BND = (patches_BNX.reshape(B * N, cfg.patch_dim) @ kernel.astype(dtype)
                 + bias.astype(dtype)).reshape(B, N, D)
        if cfg.position_encoding == "sincos":  # Patches only; the class token has none.
            x_BND = x_BND + jnp.asarray(sincos_positions(cfg), dtype)
        if cfg.pooling == "cls":
            cls_D = _param(self, "cls_token", (D,), ("embed",), nn.initializers.zeros)
            x_BND = jnp.concatenate([jnp.broadcast_to(cls_D.astype(dtype), (B, 1, D)), x_BND],
                                    axis=1)
        if cfg.position_encoding == "learned":  # Every token, the class token included.
            position_TD = _param(self, "position_embedding", (cfg.num_tokens, D),
                                 ("length", "embed"), nn.initializers.normal(stddev=0.02))
            x_BND = x_BND + position_TD.astype(dtype)
        return x_BND

    def _pool(self, x_BTD):
        """[B, D]: the class token's state, or the mean over the patch tokens."""
        if self.config.pooling == "cls":
            return x_BTD[:, 0]
        return jnp.mean(x_BTD, axis=1)
