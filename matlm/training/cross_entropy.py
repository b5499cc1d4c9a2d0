"""Softmax cross entropy, the primitive every family's loss head shares (the LM's per
position over the vocabulary, the ViT's per image over its classes)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits_BTV, targets_BT):
    """Cross entropy per position and log-partition (for z-loss), in float32."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT - target_logit_BT, logz_BT
