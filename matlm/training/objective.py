"""The MatFormer objective: which granularities a step trains, and their weighted loss.

Loss = Σ_i λ_i · L_i over the granularities trained this step, with L_i = CE_i for the
largest one trained (the teacher) and, with in-place distillation (α = distill_weight > 0),
L_i = (1 − α)·CE_i + α·T²·KL(p_teacher,T ‖ p_i,T) for the others, the teacher's
distribution under stop_gradient (docs/objective.md). The choice of granularities is a
pure function of (seed, step) computed inside the compiled step, so every host agrees
without communicating; `lax.switch` over the g static-width branches keeps a single
compiled step when granularities are sampled ("sample") or sandwiched ("sandwich": the
smallest and the largest every step, `sample_k − 2` of the others drawn).

`model` is whatever the config's family builds (matlm.model.families; the train step
asks the registry): the granularity choice, the weights and the joint pass are the
body's. What a granularity's output is and how it becomes a loss is the family's loss
head (`loss_head`): the LM's (`LMLossHead`: `hidden_loss`, `distill_token_terms`,
next-token CE over the vocabulary) is here, the ViT's (class CE, top-1) in
matlm.training.vit_objective.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matlm.model import ModelConfig
from matlm.model.counting import (forward_flops_per_image, joint_forward_flops_per_image,
                                  joint_train_flops_per_token, train_flops_per_token)
from matlm.model.head import head_logits, head_table
from matlm.model.vit_config import ViTConfig
from matlm.training.config import WEIGHT_PRESETS, TrainConfig, TrainConfigError
from matlm.training.cross_entropy import token_losses
from matlm.training.vit_objective import ViTLossHead

# The MatFormer paper's Table 6: S/M/L/XL sampling probabilities that gave XL 2.829 vs the
# baseline's 2.840 with S still ahead of its baseline; matlm also uses them as loss weights.
PAPER_TABLE6 = (0.17, 0.20, 0.22, 0.41)


def preset_weights(name: str, n: int) -> tuple[float, ...]:
    """Weights of a named preset for a ladder of `n` nested items, smallest first.

    uniform: 1/n each (a mean). paper_table6: the paper's four values for n = 4; for other
    n, those values read as a curve over the ladder (smallest at 0, largest at 1),
    interpolated at n evenly spaced points and renormalised to sum to 1."""
    if name == "uniform":
        return (1.0 / n,) * n
    if name == "paper_table6":
        if n == len(PAPER_TABLE6):
            return PAPER_TABLE6
        if n == 1:
            return (1.0,)
        curve = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(PAPER_TABLE6)),
                          PAPER_TABLE6)
        return tuple(float(w) for w in curve / curve.sum())
    raise TrainConfigError(f"unknown weight preset {name!r}; known: {', '.join(WEIGHT_PRESETS)}")


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
    distill_weight: float = 0.0  # α; 0: plain CE for every granularity (no teacher).
    distill_temperature: float = 1.0  # T of both distributions in the KL.

    @property
    def slots(self) -> int:
        """How many granularities each step trains."""
        return len(self.names) if self.mode == "all" else self.sample_k

    @property
    def distills(self) -> bool:
        return self.distill_weight > 0

    def train_flops_per_token(self, model_config: ModelConfig, seq_len: int,
                              trained=None) -> float:
        """Training FLOPs per token executed by a step (3 × forward, as MFU counts them):
        mode "all" runs one joint pass over shared streams; sampled granularities run one
        after another — those flagged in `trained` ([g] booleans, a step's metrics), or
        without it the expectation over the sampling distribution.

        A ViT's tokens are its images' (`num_tokens` each, class token included; `seq_len`
        is not used): its per-image counts divided by `num_tokens`, so that FLOPs per step
        are this × images × num_tokens as for the LM's tokens."""
        if isinstance(model_config, ViTConfig):
            joint_fn, one_fn = _vit_joint_train_flops_per_token, _vit_train_flops_per_token
        else:
            joint_fn, one_fn = joint_train_flops_per_token, train_flops_per_token
        if self.mode == "all":
            return joint_fn(model_config, seq_len, self.widths)
        # The KL adds elementwise work on logits the step computes anyway (no matmul), so
        # it is not counted, like the softmax of the CE.
        per_granularity = np.array([one_fn(model_config, seq_len, w)
                                    for w in self.widths], dtype=np.float64)
        if trained is not None:
            return float(per_granularity[np.asarray(trained) > 0].sum())
        g = len(self.names)
        probs = np.asarray(self.probabilities or (1.0 / g,) * g, np.float64)
        if self.mode == "sandwich":  # The two ends always; k − 2 of the middle drawn.
            middle = probs[1:-1] / probs[1:-1].sum() if g > 2 else probs[:0]
            return float(per_granularity[0] + per_granularity[-1]
                         + (self.sample_k - 2) * (middle * per_granularity[1:-1]).sum())
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
        if self.mode == "sandwich":
            # Slots in nesting order: the smallest, k − 2 drawn from the middle (with the
            # middle's probabilities renormalised), the largest.
            drawn = jnp.zeros((0,), jnp.int32)
            if self.sample_k > 2:
                drawn = jax.random.choice(key, g - 2, (self.sample_k - 2,), replace=False,
                                          p=probs[1:-1] / probs[1:-1].sum()) + 1
            return jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                    jnp.sort(drawn).astype(jnp.int32),
                                    jnp.full((1,), g - 1, jnp.int32)])
        return jax.random.choice(key, g, (self.sample_k,), replace=False, p=probs).astype(jnp.int32)

    def teacher_slot(self, indices):
        """The slot of the largest granularity trained this step: static in modes "all"
        and "sandwich" (the last slot), traced in "sample" mode."""
        return self.slots - 1 if self.mode != "sample" else jnp.argmax(indices)


def _vit_train_flops_per_token(config: ViTConfig, seq_len: int, widths) -> float:
    del seq_len  # An image's token count is the config's.
    return 3 * forward_flops_per_image(config, widths) / config.num_tokens


def _vit_joint_train_flops_per_token(config: ViTConfig, seq_len: int, widths_S) -> float:
    del seq_len
    return 3 * joint_forward_flops_per_image(config, widths_S) / config.num_tokens


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
    if mode != "all" and k > len(names):
        raise TrainConfigError(f"sample_k={k} exceeds the {len(names)} trainable granularities")
    slots = len(names) if mode == "all" else k
    if train_config.distill_weight > 0 and slots < 2:
        raise TrainConfigError(
            f"TrainConfig.distill_weight={train_config.distill_weight} needs at least two "
            f"granularities trained per step (a teacher and a student); this objective trains "
            f"{slots} ({mode} mode{', sample_k=1' if mode != 'all' else ''})")
    if getattr(model_config, "classification_loss", "softmax") == "sigmoid":
        for field in ("distill_weight", "z_loss"):
            if getattr(train_config, field) > 0:
                raise TrainConfigError(
                    f"TrainConfig.{field}={getattr(train_config, field)} needs a softmax "
                    "over the classes (distillation's KL, z-loss's log Z); "
                    "ViTConfig.classification_loss='sigmoid' has none: set it to 0, or use "
                    "classification_loss='softmax'")
    weights = train_config.granularity_weights or "uniform"
    if isinstance(weights, str):
        if mode == "sample" and weights != "uniform":
            raise TrainConfigError(
                f"TrainConfig.granularity_weights={weights!r} weighs granularities by size; "
                "sampled slots have none (mode 'sample'): give numbers, or sample with "
                f"TrainConfig.sample_probabilities={weights!r}")
        weights = preset_weights(weights, slots)
    if len(weights) != slots or any(w < 0 for w in weights):
        what = f"{len(names)} granularities {names}" if mode == "all" else f"sample_k={k} slots"
        raise TrainConfigError(
            f"granularity_weights {tuple(weights)} do not match the {what}: give {slots} "
            "non-negative weights")
    probs = train_config.sample_probabilities
    if isinstance(probs, str):
        probs = preset_weights(probs, len(names))
    if mode != "all" and probs:
        if len(probs) != len(names) or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
            raise TrainConfigError(
                f"sample_probabilities {probs} must be {len(names)} non-negative numbers "
                f"summing to 1 (one per granularity {names})")
        drawn, draws = (probs[1:-1], k - 2) if mode == "sandwich" else (probs, k)
        if sum(p > 0 for p in drawn) < draws:
            raise TrainConfigError(f"sample_probabilities {probs} give fewer than {draws} "
                                   f"{'middle ' if mode == 'sandwich' else ''}granularities "
                                   "a chance")
    return Objective(names=names, widths=tuple(spec.uniform(n) for n in names),
                     weights=tuple(float(w) for w in weights), mode=mode, sample_k=k,
                     probabilities=tuple(float(p) for p in probs),
                     z_loss=train_config.z_loss, seed=train_config.seed,
                     loss_chunk=train_config.loss_chunk_size,
                     distill_weight=train_config.distill_weight,
                     distill_temperature=train_config.distill_temperature)


def chunked_token_losses(config: ModelConfig, table, hidden_BTD, targets_BT, chunk: int):
    """`token_losses(head_logits(hidden), targets)`, holding the float32 logits of only
    `chunk` positions at a time, in the forward pass and in the backward pass.

    Every granularity's [B, T, V] logits at once are what made the joint loss the largest
    buffer of a step (4 × 32k tokens × 32k vocab × 4 bytes = 16 GiB per chip for the 78M
    recipe). The chunks run one after another, recomputed in the backward pass
    (`_map_sequence_chunks`). `chunk` 0 or ≥ T: one plain pass.
    """
    T = hidden_BTD.shape[1]
    if not chunk or chunk >= T:
        return token_losses(head_logits(config, table, hidden_BTD), targets_BT)

    def one_chunk(table, hidden_BcD, targets_Bc):
        return token_losses(head_logits(config, table, hidden_BcD), targets_Bc)

    return _map_sequence_chunks(one_chunk, table, hidden_BTD, targets_BT, chunk)


def _map_sequence_chunks(fn, table, hidden_xTD, targets_BT, chunk: int):
    """`fn(table, hidden, targets)` over chunks of `chunk` sequence positions, one after
    another (`lax.map`), each under `jax.checkpoint` so the backward pass recomputes a
    chunk's logits from its hidden states instead of keeping them. `hidden_xTD` may have
    leading axes before [.., T, D] (slots); every output of `fn` has the chunk's positions
    last and comes back with T there. A last partial chunk is padded (its padding is
    sliced off)."""
    T = targets_BT.shape[-1]
    C = -(-T // chunk)
    pad = C * chunk - T

    def split(x, axis: int):  # [.., T, ..] → [C, .., chunk, ..]: chunks lead for lax.map.
        if pad:
            x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
        x = x.reshape(*x.shape[:axis], C, chunk, *x.shape[axis + 1:])
        return jnp.moveaxis(x, axis, 0)

    # Rows stay on their batch shards: only the sequence axis is split.
    outs = jax.lax.map(lambda xs: jax.checkpoint(fn)(table, *xs),
                       (split(hidden_xTD, hidden_xTD.ndim - 2), split(targets_BT, 1)))
    unchunk = lambda y_Cxc: jnp.moveaxis(y_Cxc, 0, -2).reshape(
        *y_Cxc.shape[1:-1], C * chunk)[..., :T]
    return tuple(unchunk(y) for y in outs)


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


def distill_token_terms(config: ModelConfig, table, hidden_SBTD, targets_BT, teacher,
                        temperature: float, chunk: int):
    """For every slot s of stacked final-normed hidden states: CE, log-partition and
    KL(p_teacher,T ‖ p_s,T) per position, [S, B, T] float32 each.

    The teacher's distribution is the slot `teacher` (an int, or a traced scalar in mode
    "sample") under stop_gradient, and its own KL is 0: the KL sends gradient into the
    students' logits only. The teacher's probabilities are formed once per chunk and the
    slots' logits one slot after another, as the plain CE does. A chunk holds a slot's
    [B, c, V] logits *and* the teacher's, so it covers `chunk // 2` positions: the step's
    temporaries then match the plain CE's chunks of `chunk` (full-size chunks measured
    +24 %). Chunks run under `jax.checkpoint` as in `chunked_token_losses`; `chunk` 0 or
    a half covering T: one pass.
    """
    S, T = hidden_SBTD.shape[0], hidden_SBTD.shape[2]
    chunk = max(1, chunk // 2) if chunk else 0

    def terms(table, hidden_SBcD, targets_Bc):
        slot_logits = lambda s: head_logits(config, table, hidden_SBcD[s])
        # A static teacher's logits are its own slot's (XLA computes them once); a traced
        # one costs one more head matmul, forward only: no gradient flows back through it.
        teacher_logits_BcV = jax.lax.stop_gradient(slot_logits(teacher))
        teacher_logp_BcV = jax.nn.log_softmax(teacher_logits_BcV / temperature, axis=-1)
        teacher_p_BcV = jnp.exp(teacher_logp_BcV)
        neg_entropy_Bc = jnp.sum(teacher_p_BcV * teacher_logp_BcV, axis=-1)
        ce_S, logz_S, kl_S = [], [], []
        for s in range(S):
            logits_BcV = slot_logits(s)
            ce_Bc, logz_Bc = token_losses(logits_BcV, targets_Bc)
            # KL_s = Σ_v p_t·log p_t − Σ_v p_t·z_s/T + logsumexp(z_s/T), using Σ_v p_t = 1:
            # no log-probabilities of the student are formed (T = 1 reuses the CE's
            # log-partition).
            logz_T_Bc = (logz_Bc if temperature == 1.0
                         else jax.nn.logsumexp(logits_BcV / temperature, axis=-1))
            cross_Bc = jnp.einsum("bcv,bcv->bc", teacher_p_BcV, logits_BcV) / temperature
            kl_Bc = neg_entropy_Bc - cross_Bc + logz_T_Bc
            # The teacher's KL to itself is 0 up to float noise, which would send it a
            # tiny gradient through its own logits: zeroed, so it gets exactly none.
            kl_S.append(jnp.where(s == teacher, 0.0, kl_Bc))
            ce_S.append(ce_Bc), logz_S.append(logz_Bc)
        return jnp.stack(ce_S), jnp.stack(logz_S), jnp.stack(kl_S)

    if not chunk or chunk >= T:
        return terms(table, hidden_SBTD, targets_BT)
    return _map_sequence_chunks(terms, table, hidden_SBTD, targets_BT, chunk)


def distilled_losses(objective: Objective, config: ModelConfig, params, hidden_S, batch,
                     teacher):
    """Per slot of hidden states `hidden_S` (a list of [B, T, D]): (loss, mean CE, mean KL),
    [S] each. The teacher slot's loss is its CE (its KL, 0, is reported as 0); a student's
    is (1 − α)·CE + α·T²·KL. z-loss is added to every slot unscaled by α: it regularises
    the log-partition, not the fit to a target."""
    alpha, temperature = objective.distill_weight, objective.distill_temperature
    ce_SBT, logz_SBT, kl_SBT = distill_token_terms(
        config, head_table(config, params), jnp.stack(hidden_S), batch["targets"], teacher,
        temperature, objective.loss_chunk)
    mask_BT = batch["loss_mask"]
    mean = lambda x_SBT: (x_SBT * mask_BT).sum((1, 2)) / jnp.maximum(mask_BT.sum(), 1.0)
    student_S = (jnp.arange(len(hidden_S)) != teacher).astype(jnp.float32)
    ce_S, kl_S = mean(ce_SBT), mean(kl_SBT)  # The teacher's KL is 0 already.
    loss_S = ((1 - alpha * student_S) * ce_S + alpha * temperature ** 2 * kl_S
              + objective.z_loss * mean(jnp.square(logz_SBT)))
    return loss_S, ce_S, kl_S


def submodel_hidden(model: nn.Module, params, batch, widths):
    """Final-normed hidden states [B, T, D] of one submodel on a batch."""
    return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                       batch["positions"], widths=widths, return_hidden=True)


def granularity_loss(model: nn.Module, params, batch, widths, z_loss: float, chunk: int = 0):
    """(loss for optimisation, mean CE) of one submodel on a batch, over masked tokens."""
    hidden = submodel_hidden(model, params, batch, widths)
    return hidden_loss(model.config, params, hidden, batch, z_loss, chunk)


class LMLossHead:
    """The LM family's loss head: next-token CE of the vocabulary head over hidden
    states, in sequence chunks; a granularity's "output" is its final-normed hidden
    states [B, T, D] (the logits are formed chunk by chunk inside the loss)."""

    metrics = ("ce", "kl")  # Per-granularity metrics a step reports, in this order.

    @staticmethod
    def submodel_output(model, params, batch, widths):
        return submodel_hidden(model, params, batch, widths)

    @staticmethod
    def joint_outputs(model, objective, params, batch) -> list:
        return _joint_hidden(model, objective, params, batch)

    @staticmethod
    def loss(model, objective, params, hidden, batch):
        loss, ce = hidden_loss(model.config, params, hidden, batch, objective.z_loss,
                               objective.loss_chunk)
        return loss, {"ce": ce}

    @staticmethod
    def distilled_losses(model, objective, params, hidden_S, batch, teacher):
        loss_S, ce_S, kl_S = distilled_losses(objective, model.config, params, hidden_S, batch,
                                              teacher)
        return loss_S, {"ce": ce_S, "kl": kl_S}


def loss_head(config):
    """The loss head of `config`'s family (matlm.model.families): how a batch and a
    submodel's output become its loss and per-granularity metrics. The objective (which
    granularities, their weights, the joint pass, distillation's α and T) is shared."""
    from matlm.model.families import family_of
    family = family_of(config)
    if family.name == "vit":
        return ViTLossHead
    if family.tokens:  # Next-token batches (inputs, targets, loss_mask): the LM's head.
        return LMLossHead
    raise TrainConfigError(f"model family {family.name!r} has no loss head "
                           "(matlm.training.objective.loss_head)")


def joint_loss(model: nn.Module, objective: Objective, params, batch, indices):
    """Σ λ · loss over this step's granularities; also the family's per-granularity
    metrics (`loss_head(...).metrics`: the CE and the distillation KL of each granularity,
    and the ViT's top-1 accuracy; [g] each, zero where not trained; KL zero for the
    teacher), as a tuple in that order."""
    head = loss_head(model.config)
    g = len(objective.names)
    per_G = {name: jnp.zeros((g,), jnp.float32) for name in head.metrics}
    static = all(isinstance(widths, (tuple, list)) for widths in objective.widths)
    if objective.distills:
        if objective.mode == "all" and static:
            out_S = head.joint_outputs(model, objective, params, batch)
        elif objective.mode == "all":  # Traced (masked) widths: one submodel after another.
            out_S = [head.submodel_output(model, params, batch, w) for w in objective.widths]
        else:
            branches = [(lambda p, b, w=w: head.submodel_output(model, p, b, w))
                        for w in objective.widths]
            out_S = [jax.lax.switch(indices[slot], branches, params, batch)
                     for slot in range(objective.slots)]
        loss_S, metrics_S = head.distilled_losses(model, objective, params, out_S, batch,
                                                  objective.teacher_slot(indices))
        total = jnp.dot(jnp.asarray(objective.weights, jnp.float32), loss_S)
        for name, value_S in metrics_S.items():
            per_G[name] = per_G[name].at[indices].set(value_S)
        return total, tuple(per_G.values())
    total = 0.0
    if objective.mode == "all":
        if static:
            losses = [head.loss(model, objective, params, out, batch)
                      for out in head.joint_outputs(model, objective, params, batch)]
        else:  # Traced (masked) widths: one submodel after another.
            losses = [head.loss(model, objective, params,
                                head.submodel_output(model, params, batch, widths), batch)
                      for widths in objective.widths]
        for i, (loss, metrics) in enumerate(losses):
            total += objective.weights[i] * loss
            for name, value in metrics.items():
                per_G[name] = per_G[name].at[i].set(value)
        return total, tuple(per_G.values())
    branches = [
        (lambda p, b, w=w: head.loss(model, objective, p, head.submodel_output(model, p, b, w),
                                     b))
        for w in objective.widths]
    for slot in range(objective.slots):
        loss, metrics = jax.lax.switch(indices[slot], branches, params, batch)
        total += objective.weights[slot] * loss
        for name, value in metrics.items():
            per_G[name] = per_G[name].at[indices[slot]].set(value)
    return total, tuple(per_G.values())


def _joint_hidden(model: nn.Module, objective: Objective, params, batch) -> list:
    """Every granularity's hidden states from one pass over shared residual streams:
    layers whose input is the same for several granularities (at least layer 0) run once
    (matlm.model.streams)."""
    return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                       batch["positions"], joint_widths=objective.widths, return_hidden=True)
