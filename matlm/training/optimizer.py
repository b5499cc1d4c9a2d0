"""AdamW with warmup + decay, global-norm clipping, and no weight decay on norm scales."""
from __future__ import annotations

import jax
import optax

from matlm.training.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    peak, warmup = config.learning_rate, min(config.warmup_steps, config.steps)
    end = peak * config.end_learning_rate_fraction
    decay_steps = max(config.steps - warmup, 1)
    if config.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0)
    elif config.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params):
    """True for parameters that get weight decay: everything but norm scales (and biases,
    should a model have them)."""
    def decays(path, _):
        last = getattr(path[-1], "key", str(path[-1]))
        return last not in ("scale", "bias")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.clip_grad_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask),
    )
