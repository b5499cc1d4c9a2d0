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
import numpy as np

from matlm.model import MatLM, ModelConfig
from matlm.model.counting import joint_train_flops_per_token, train_flops_per_token
from matlm.model.head import head_logits, head_table
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
    loss_chunk: int = 0  # Sequence positions per cross-entropy chunk; 0: all at once.

    @property
    def slots(self) -> int:
        """How many granularities each step trains."""
        return len(self.names) if self.mode == "all" else self.sample_k

    def train_flops_per_token(self, model_config: ModelConfig, seq_len: int,
                              trained=None) -> float:
        """Training FLOPs per token executed by a step (3 × forward, as MFU counts them):
        mode "all" runs one joint pass over shared streams; sampled granularities run one
        after another — those flagged in `trained` ([g] booleans, a step's metrics), or
        without it the expectation over the sampling distribution."""
        if self.mode == "all":
            return joint_train_flops_per_token(model_config, seq_len, self.widths)
        per_granularity = np.array([train_flops_per_token(model_config, seq_len, w)
                                    for w in self.widths], dtype=np.float64)
        if trained is not None:
            return float(per_granularity[np.asarray(trained) > 0].sum())
        g = len(self.names)
        probs = np.asarray(self.probabilities or (1.0 / g,) * g, np.float64)
        # Without replacement the k draws' marginals are not p each; for the FLOP estimate
        # of a compile report the k × mean is close enough and exact for uniform draws.
        return float(self.sample_k * (probs * per_granularity).sum())

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
                     z_loss=train_config.z_loss, seed=train_config.seed,
                     loss_chunk=train_config.loss_chunk_size)


def token_losses(logits_BTV, targets_BT):
    """Cross entropy per position and log-partition (for z-loss), in float32."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT - target_logit_BT, logz_BT


def chunked_token_losses(config: ModelConfig, table, hidden_BTD, targets_BT, chunk: int):
    """`token_losses(head_logits(hidden), targets)`, holding the float32 logits of only
    `chunk` positions at a time, in the forward pass and in the backward pass.

    Every granularity's [B, T, V] logits at once are what made the joint loss the largest
    buffer of a step (4 × 32k tokens × 32k vocab × 4 bytes = 16 GiB per chip for the 78M
    recipe). Chunks of the sequence run one after another (`lax.map`), each under
    `jax.checkpoint`, so the backward pass recomputes a chunk's logits from its [B, c, D]
    hidden states instead of keeping them. A last partial chunk is padded (its padding is
    sliced off). `chunk` 0 or ≥ T: one plain pass.
    """
    B, T, D = hidden_BTD.shape
    if not chunk or chunk >= T:
        return token_losses(head_logits(config, table, hidden_BTD), targets_BT)
    C = -(-T // chunk)
    pad = C * chunk - T
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    # Chunks lead so lax.map runs over them; rows stay on their batch shards.
    hidden_CBcD = hidden_BTD.reshape(B, C, chunk, D).swapaxes(0, 1)
    targets_CBc = targets_BT.reshape(B, C, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(table, hidden_BcD, targets_Bc):
        return token_losses(head_logits(config, table, hidden_BcD), targets_Bc)

    ce_CBc, logz_CBc = jax.lax.map(lambda xs: one_chunk(table, *xs), (hidden_CBcD, targets_CBc))
    unchunk = lambda x_CBc: x_CBc.swapaxes(0, 1).reshape(B, C * chunk)[:, :T]
    return unchunk(ce_CBc), unchunk(logz_CBc)


def masked_loss(ce_BT, logz_BT, batch, z_loss: float):
    """(loss for optimisation, mean CE) over the batch's masked tokens."""
    mask_BT = batch["loss_mask"]
    denom = jnp.maximum(mask_BT.sum(), 1.0)
    ce = (ce_BT * mask_BT).sum() / denom
    return ce + z_loss * (jnp.square(logz_BT) * mask_BT).sum() / denom, ce


def logits_loss(logits, batch, z_loss: float):
    """(loss for optimisation, mean CE) of logits [B, T, V] over the batch's masked tokens."""
    return masked_loss(*token_losses(logits, batch["targets"]), batch, z_loss)


def hidden_loss(config: ModelConfig, params, hidden_BTD, batch, z_loss: float, chunk: int):
    """`logits_loss` of the head's logits of final-normed hidden states, computed in
    sequence chunks of `chunk` positions (0: at once)."""
    ce_BT, logz_BT = chunked_token_losses(config, head_table(config, params), hidden_BTD,
                                          batch["targets"], chunk)
    return masked_loss(ce_BT, logz_BT, batch, z_loss)


def granularity_loss(model: MatLM, params, batch, widths, z_loss: float, chunk: int = 0):
    """(loss for optimisation, mean CE) of one submodel on a batch, over masked tokens."""
    hidden = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                         batch["positions"], widths=widths, return_hidden=True)
    return hidden_loss(model.config, params, hidden, batch, z_loss, chunk)


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
            hidden_G = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                   batch["positions"], joint_widths=objective.widths,
                                   return_hidden=True)
            losses = [hidden_loss(model.config, params, hidden, batch, objective.z_loss,
                                  objective.loss_chunk) for hidden in hidden_G]
        else:  # Traced (masked) widths: one submodel after another.
            losses = [granularity_loss(model, params, batch, widths, objective.z_loss,
                                       objective.loss_chunk)
                      for widths in objective.widths]
        for i, (loss, ce) in enumerate(losses):
            total += objective.weights[i] * loss
            ce_G = ce_G.at[i].set(ce)
        return total, ce_G
    branches = [
        (lambda p, b, w=w: granularity_loss(model, p, b, w, objective.z_loss,
                                            objective.loss_chunk))
        for w in objective.widths]
    for slot in range(objective.sample_k):
        loss, ce = jax.lax.switch(indices[slot], branches, params, batch)
        total += objective.weights[slot] * loss
        ce_G = ce_G.at[indices[slot]].set(ce)
    return total, ce_G
