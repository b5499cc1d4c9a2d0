"""The MatFormer objective: which granularities a step trains, and their weighted loss.

Loss = Σ_i λ_i · CE_i over the granularities trained this step. The choice is a pure
function of (seed, step) computed inside the compiled step, so every host agrees
without communicating; `lax.switch` over the g static-width branches keeps a single
compiled step when granularities are sampled.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from matlm.model import MatLM, ModelConfig
from matlm.training.config import TrainConfig, TrainConfigError


@dataclasses.dataclass(frozen=True)
class Objective:
    names: tuple[str, ...]  # Trainable granularities, in nesting order.
    widths: tuple[tuple[int, ...], ...]  # Static width vector of each.
    weights: tuple[float, ...]  # λ per granularity ("all") or per sampled slot ("sample").
    mode: str = "all"
    sample_k: int = 1
    probabilities: tuple[float, ...] = ()
    z_loss: float = 0.0
    seed: int = 0

    @property
    def slots(self) -> int:
        """How many granularities each step trains."""
        return len(self.names) if self.mode == "all" else self.sample_k

    def indices(self, step) -> jax.Array:
        """The granularities (indices into `names`) trained at `step`: [slots] int32.

        Works on a traced or a concrete step; the same (seed, step) gives the same
        answer on every host and every run.
        """
        g = len(self.names)
        if self.mode == "all":
            return jnp.arange(g, dtype=jnp.int32)
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        probs = jnp.asarray(self.probabilities or (1.0 / g,) * g, jnp.float32)
        return jax.random.choice(key, g, (self.sample_k,), replace=False, p=probs).astype(jnp.int32)


def build_objective(model_config: ModelConfig, train_config: TrainConfig) -> Objective:
    """Validates the objective's knobs against the model's granularities."""
    spec = model_config.granularities
    names = train_config.granularities or spec.names
    unknown = [n for n in names if n not in spec.by_name]
    if unknown:
        raise TrainConfigError(f"TrainConfig.granularities {unknown} are not granularities of "
                               f"the model ({', '.join(spec.names)})")
    names = tuple(n for n in spec.names if n in names)  # Nesting order, no duplicates.
    mode, k = train_config.granularity_mode, train_config.sample_k
    if mode == "sample" and k > len(names):
        raise TrainConfigError(f"sample_k={k} exceeds the {len(names)} trainable granularities")
    slots = len(names) if mode == "all" else k
    weights = train_config.granularity_weights or (1.0 / slots,) * slots
    if len(weights) != slots or any(w < 0 for w in weights):
        what = f"{len(names)} granularities {names}" if mode == "all" else f"sample_k={k} slots"
        raise TrainConfigError(
            f"granularity_weights {tuple(weights)} do not match the {what}: give {slots} "
            "non-negative weights")
    probs = train_config.sample_probabilities
    if mode == "sample" and probs:
        if len(probs) != len(names) or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise TrainConfigError(
                f"sample_probabilities {probs} must be {len(names)} non-negative numbers "
                f"summing to 1 (one per granularity {names})")
        if sum(p > 0 for p in probs) < k:
            raise TrainConfigError(f"sample_probabilities {probs} give fewer than sample_k={k} "
                                   "granularities a chance")
    return Objective(names=names, widths=tuple(spec.uniform(n) for n in names),
                     weights=tuple(float(w) for w in weights), mode=mode, sample_k=k,
                     probabilities=tuple(float(p) for p in probs),
                     z_loss=train_config.z_loss, seed=train_config.seed)


def token_losses(logits_BTV, targets_BT):
    """Cross entropy per position and log-partition (for z-loss), in float32."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT - target_logit_BT, logz_BT


def granularity_loss(model: MatLM, params, batch, widths, z_loss: float):
    """(loss for optimisation, mean CE) of one submodel on a batch, over masked tokens."""
    logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                         batch["positions"], widths=widths)
    return logits_loss(logits, batch, z_loss)


def logits_loss(logits, batch, z_loss: float):
    """(loss for optimisation, mean CE) of logits [B, T, V] over the batch's masked tokens."""
    ce_BT, logz_BT = token_losses(logits, batch["targets"])
    mask_BT = batch["loss_mask"]
    denom = jnp.maximum(mask_BT.sum(), 1.0)
    ce = (ce_BT * mask_BT).sum() / denom
    return ce + z_loss * (jnp.square(logz_BT) * mask_BT).sum() / denom, ce


def joint_loss(model: MatLM, objective: Objective, params, batch, indices):
    """Σ λ · loss over this step's granularities; also the CE of each granularity ([g],
    zero where not trained)."""
    g = len(objective.names)
    ce_G = jnp.zeros((g,), jnp.float32)
    total = 0.0
    if objective.mode == "all":
        if all(isinstance(widths, (tuple, list)) for widths in objective.widths):
            # One pass over shared residual streams: layers whose input is the same for
            # several granularities (at least layer 0) run once (matlm.model.streams).
            logits_G = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                   batch["positions"], joint_widths=objective.widths)
            losses = [logits_loss(logits, batch, objective.z_loss) for logits in logits_G]
        else:  # Traced (masked) widths: one submodel after another.
            losses = [granularity_loss(model, params, batch, widths, objective.z_loss)
                      for widths in objective.widths]
        for i, (loss, ce) in enumerate(losses):
            total += objective.weights[i] * loss
            ce_G = ce_G.at[i].set(ce)
        return total, ce_G
    branches = [
        (lambda p, b, w=w: granularity_loss(model, p, b, w, objective.z_loss))
        for w in objective.widths]
    for slot in range(objective.sample_k):
        loss, ce = jax.lax.switch(indices[slot], branches, params, batch)
        total += objective.weights[slot] * loss
        ce_G = ce_G.at[indices[slot]].set(ce)
    return total, ce_G
