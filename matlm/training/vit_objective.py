"""The MatViT family's loss head: the classification loss of each granularity's class logits
against the batch's labels, weighted by the batch's `mask`, plus its top-1 accuracy. The
loss is `ViTConfig.classification_loss`'s: softmax cross entropy, or scenic's multi-label
sigmoid cross entropy summed over the classes (its MatViT ImageNet recipe's); the metric
named "ce" is that loss (z-loss and distillation need the softmax one: `build_objective`).

The objective around it (which granularities a step trains, their weights, the joint pass
over shared streams, sampled and sandwich modes) is `matlm.training.objective`'s, shared
with the LM. Distillation has the LM's semantics per example instead of per token: a
student's loss is (1 − α)·CE + α·T²·KL(p_teacher,T ‖ p_student,T), the teacher (the largest
granularity trained) under stop_gradient with loss CE and KL reported as 0; z-loss is
added to every slot unscaled by α.

Batches are `matlm.data.images`': images [B, H, W, C] float32, labels [B] int32, mask [B]
float32 (0 for the padding that ends an evaluation pass). With mixup
(`matlm.data.tfds_images`) a batch also has `mixup_labels` [B] int32 and `mixup_weight`
[B] float32: an image is w·x + (1 − w)·x', and its CE is w·CE(label) + (1 − w)·CE(label'),
the soft-target CE of the mixed one-hot labels (CE is linear in the target). Accuracy is
counted against `labels`, the label of the larger share when w ≥ 1/2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from matlm.training.cross_entropy import token_losses


def example_mean(x_B, mask_B):
    """Mean of a per-example value over the batch's real (mask 1) examples."""
    return (x_B * mask_B).sum(-1) / jnp.maximum(mask_B.sum(), 1.0)


def sigmoid_losses(logits_BK, labels_B):
    """Σ over classes of the sigmoid cross entropy against one-hot `labels_B` [..., B]:
    −Σ_k [t_k log σ(x_k) + (1 − t_k) log(1 − σ(x_k))] = Σ_k softplus(x_k) − x_label
    (log(1 − σ(x)) = −softplus(x), log σ(x) = x − softplus(x)), with no one-hot built."""
    label_logit_B = jnp.take_along_axis(logits_BK, labels_B[..., None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.softplus(logits_BK), axis=-1) - label_logit_B


def classification_losses(config, logits_BK, batch):
    """(loss [..., B] against the batch's labels, mixed with the mixup partner's when the
    batch has one; log Z [..., B] for z-loss, None for the sigmoid loss). Both losses are
    linear in the target, so a mixed target's loss is the mix of the two labels' losses."""
    shape = logits_BK.shape[:-1]  # [B], or [S, B] for stacked slots.
    sigmoid = config.classification_loss == "sigmoid"

    def loss(labels_B):
        labels_B = jnp.broadcast_to(labels_B, shape)
        return (sigmoid_losses(logits_BK, labels_B), None) if sigmoid else \
            token_losses(logits_BK, labels_B)
    loss_B, logz_B = loss(batch["labels"])
    if "mixup_labels" in batch:
        weight_B = batch["mixup_weight"]
        loss_B = weight_B * loss_B + (1.0 - weight_B) * loss(batch["mixup_labels"])[0]
    return loss_B, logz_B


def top1_correct(logits_BK, labels_B):
    """1.0 where the highest logit is the label's, per example."""
    return (jnp.argmax(logits_BK, axis=-1) == labels_B).astype(jnp.float32)


class ViTLossHead:
    """A granularity's output is its class logits [B, num_classes] (float32)."""

    metrics = ("ce", "kl", "acc")  # Per-granularity metrics a step reports, in this order.

    @staticmethod
    def submodel_output(model, params, batch, widths):
        return model.apply({"params": params}, batch["images"], widths=widths)

    @staticmethod
    def joint_outputs(model, objective, params, batch) -> list:
        """Every granularity's logits from one pass over shared residual streams."""
        return list(model.apply({"params": params}, batch["images"],
                                joint_widths=objective.widths))

    @staticmethod
    def loss(model, objective, params, logits_BK, batch):
        """(loss + z-loss, {ce: the loss, acc}) over the batch's real examples."""
        del params
        mask_B = batch["mask"]
        ce_B, logz_B = classification_losses(model.config, logits_BK, batch)
        ce = example_mean(ce_B, mask_B)
        loss = ce if logz_B is None else \
            ce + objective.z_loss * example_mean(jnp.square(logz_B), mask_B)
        return loss, {"ce": ce, "acc": example_mean(top1_correct(logits_BK, batch["labels"]),
                                                    mask_B)}

    @staticmethod
    def distilled_losses(model, objective, params, logits_S, batch, teacher):
        """Per slot of class logits `logits_S` (a list of [B, K]): (loss [S], {ce, kl, acc}
        [S] each). `teacher`: the teacher's slot, an int or a traced scalar ("sample")."""
        del params
        alpha, temperature = objective.distill_weight, objective.distill_temperature
        logits_SBK = jnp.stack(logits_S)
        mask_B, labels_B = batch["mask"], batch["labels"]
        ce_SB, logz_SB = classification_losses(model.config, logits_SBK, batch)
        teacher_logp_BK = jax.nn.log_softmax(
            jax.lax.stop_gradient(logits_SBK[teacher]) / temperature, axis=-1)
        student_logp_SBK = jax.nn.log_softmax(logits_SBK / temperature, axis=-1)
        kl_SB = jnp.sum(jnp.exp(teacher_logp_BK) * (teacher_logp_BK - student_logp_SBK), -1)
        slots_S = jnp.arange(len(logits_S))
        # The teacher's KL to itself is 0 up to float noise, which would send it a tiny
        # gradient through its own logits: zeroed, so it gets exactly none.
        kl_SB = jnp.where((slots_S == teacher)[:, None], 0.0, kl_SB)
        student_S = (slots_S != teacher).astype(jnp.float32)
        ce_S, kl_S = example_mean(ce_SB, mask_B), example_mean(kl_SB, mask_B)
        loss_S = ((1 - alpha * student_S) * ce_S + alpha * temperature ** 2 * kl_S
                  + objective.z_loss * example_mean(jnp.square(logz_SB), mask_B))
        acc_S = example_mean(top1_correct(logits_SBK, labels_B[None]), mask_B)
        return loss_S, {"ce": ce_S, "kl": kl_S, "acc": acc_S}
