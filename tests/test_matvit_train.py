"""The MatFormer objective and the train/eval steps on the ViT family, against explicit
references: every granularity run alone with a hand-written softmax CE (joint mode, masked
examples), the same granularity choice as the LM in sampled and sandwich modes,
distillation against an explicit stop-gradient-teacher KL, a few real training steps on
mnist_5k, and one device against a (2, 2, 2) mesh."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.data.images import make_image_batch_iterator
from matlm.model import ModelConfig, build_model, init_params
from matlm.model.vit_config import ViTConfig
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig
from matlm.training.objective import build_objective, joint_loss
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import (batch_sharding_of, init_state, make_eval_step,
                                       make_train_step)

# 28×28×1 images (mnist_5k's) in 7×7 patches: 16 patch tokens and a class token.
VIT = ViTConfig(image_size=28, patch_size=7, num_channels=1, num_classes=10, d_model=32,
                n_layers=2, n_heads=4, d_ff=64, ffn_nest_blocks=2, width_alignment=4,
                activation="gelu")
TRAIN = TrainConfig(steps=10, seq_len=VIT.num_tokens, global_batch_size=8,
                    learning_rate=3e-3, warmup_steps=2)
# An LM with the same granularity names: the granularity choice must not depend on the family.
LM = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, d_ff=256,
                 ffn_nest_blocks=8, width_alignment=8)


def _params(seed=0):
    """Parameters moved off their init: the classifier starts at zero, which would make
    every granularity's logits 0 and the body's gradient 0."""
    params = init_params(VIT, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), params)


def _batch(seed=0, B=8):
    rng = np.random.default_rng(seed)
    mask = np.ones((B,), np.float32)
    mask[-2:] = 0  # Padding examples count in no mean.
    return {"images": jnp.asarray(rng.normal(size=(B, *VIT.image_shape)).astype(np.float32)),
            "labels": jnp.asarray(rng.integers(0, VIT.num_classes, (B,)).astype(np.int32)),
            "mask": jnp.asarray(mask)}


def _alone(params, batch, name, temperature=1.0):
    """One granularity run by itself: its logits, CE and top-1 per example, explicitly."""
    model = build_model(VIT)
    logits = model.apply({"params": params}, batch["images"],
                         widths=VIT.granularities.uniform(name))
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce_B = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
    hit_B = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return logits, ce_B, hit_B


def _mean(x_B, batch):
    return (x_B * batch["mask"]).sum() / batch["mask"].sum()


def _oracle(params, batch, objective, concrete):
    """Σ λ_slot · loss of the granularities `concrete` (slot order), each run alone: CE
    + z-loss, and with distillation the students' (1 − α)·CE + α·T²·KL to the largest one
    trained, whose logits are under stop_gradient."""
    alpha, temperature = objective.distill_weight, objective.distill_temperature
    runs = [_alone(params, batch, objective.names[i]) for i in concrete]
    teacher = concrete.index(max(concrete))
    teacher_logp = jax.nn.log_softmax(jax.lax.stop_gradient(runs[teacher][0]) / temperature)
    total, ce, kl, acc = 0.0, [], [], []
    for slot, (logits, ce_B, hit_B) in enumerate(runs):
        logz_B = jax.nn.logsumexp(logits, axis=-1)
        kl_B = (jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(
            logits / temperature))).sum(-1)
        kl_s = _mean(kl_B, batch) if slot != teacher and alpha else 0.0
        ce_s = _mean(ce_B, batch)
        fit = ce_s if slot == teacher or not alpha else (
            (1 - alpha) * ce_s + alpha * temperature ** 2 * kl_s)
        total += objective.weights[slot] * (fit + objective.z_loss * _mean(logz_B ** 2, batch))
        ce.append(ce_s), kl.append(kl_s), acc.append(_mean(hit_B, batch))
    return total, (jnp.stack(ce), jnp.stack(kl), jnp.stack(acc))


def _check_against_oracle(objective, step, params, batch):
    indices = objective.indices(step)
    concrete = [int(i) for i in np.asarray(indices)]
    model = build_model(VIT)
    (total, (ce_G, kl_G, acc_G)), grads = jax.jit(jax.value_and_grad(
        lambda p: joint_loss(model, objective, p, batch, objective.indices(step)),
        has_aux=True))(params)
    (want, (ce, kl, acc)), want_grads = jax.value_and_grad(
        lambda p: _oracle(p, batch, objective, concrete), has_aux=True)(params)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ce_G)[concrete], ce, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kl_G)[concrete], kl, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(acc_G)[concrete], acc, rtol=1e-6)
    untrained = np.ones(len(objective.names), bool)
    untrained[concrete] = False
    assert not np.asarray(ce_G)[untrained].any() and not np.asarray(acc_G)[untrained].any()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 grads, want_grads)
    return concrete, np.asarray(kl_G)


def test_joint_loss_and_gradients_equal_granularities_one_by_one():
    train = dataclasses.replace(TRAIN, granularity_weights=(0.1, 0.2, 0.3, 0.4), z_loss=1e-3)
    objective = build_objective(VIT, train)
    concrete, kl = _check_against_oracle(objective, 0, _params(), _batch())
    assert concrete == [0, 1, 2, 3] and not kl.any()  # No distillation: no KL.


@pytest.mark.parametrize("kwargs", [
    dict(granularity_mode="sample", sample_k=2, granularity_weights=(0.3, 0.7)),
    dict(granularity_mode="sandwich", sample_k=3, granularity_weights="paper_table6"),
], ids=["sample", "sandwich"])
def test_sampled_modes_pick_the_lms_granularities(kwargs):
    train = dataclasses.replace(TRAIN, **kwargs)
    objective = build_objective(VIT, train)
    lm_objective = build_objective(LM, train)
    for step in range(6):
        np.testing.assert_array_equal(objective.indices(step), lm_objective.indices(step))
    params, batch = _params(), _batch()
    for step in (0, 3):
        concrete, _ = _check_against_oracle(objective, step, params, batch)
        if kwargs["granularity_mode"] == "sandwich":
            assert concrete[0] == 0 and concrete[-1] == 3


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(granularity_mode="sample", sample_k=2, granularity_weights=(0.3, 0.7)),  # Traced teacher.
    dict(granularity_mode="sandwich", sample_k=3, granularity_weights="paper_table6"),
], ids=["all", "sample", "sandwich"])
def test_distillation_equals_an_explicit_stop_gradient_teacher_kl(kwargs):
    train = dataclasses.replace(TRAIN, distill_weight=0.4, distill_temperature=2.0,
                                z_loss=1e-3, **kwargs)
    objective = build_objective(VIT, train)
    concrete, kl = _check_against_oracle(objective, 3, _params(), _batch())
    teacher = max(concrete)
    assert kl[teacher] == 0 and (kl[[i for i in concrete if i != teacher]] > 0).all()


def _run(mesh, batches, train=TRAIN):
    optimizer = make_optimizer(train)
    state = init_state(VIT, optimizer, mesh, seed=0)
    step = make_train_step(VIT, build_objective(VIT, train), optimizer,
                           learning_rate_schedule(train), mesh)
    sharding = batch_sharding_of(VIT, mesh)
    history = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, sharding))
        history.append(jax.device_get(metrics))
    return state, history


def test_training_on_mnist_lowers_the_loss_and_eval_reports_top1():
    train = dataclasses.replace(TRAIN, steps=30, global_batch_size=32, learning_rate=1e-2)
    it = make_image_batch_iterator("mnist_5k", "train", global_batch_size=32, seed=0)
    batches = [next(it) for _ in range(30)]
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state, history = _run(mesh, batches, train)
    ce = np.array([m["ce"] for m in history])  # [steps, g]
    assert set(history[0]) >= {"loss", "ce", "kl", "acc", "trained", "grad_norm"}
    assert np.isfinite(ce).all()
    assert (ce[-5:].mean(0) < 0.8 * ce[:2].mean(0)).all(), ce
    assert history[-1]["acc"].min() > 0.3  # 10 classes: chance is 0.1.

    # The eval step: summed CE and top-1 hits per submodel over real examples only.
    widths_by_name = {n: VIT.granularities.uniform(n) for n in ("S", "XL")}
    batch = dict(batches[0])
    batch["mask"] = batch["mask"].copy()
    batch["mask"][-5:] = 0
    got = jax.device_get(make_eval_step(VIT, widths_by_name, mesh)(
        state.params, jax.device_put(batch, batch_sharding_of(VIT, mesh))))
    batch = jax.tree.map(jnp.asarray, batch)
    for name in widths_by_name:
        _, ce_B, hit_B = _alone(state.params, batch, name)
        (ce_sum, count), (hits, count1) = got[name], got[f"{name}/top1"]
        assert float(count) == float(count1) == 27
        np.testing.assert_allclose(ce_sum / count, _mean(ce_B, batch), rtol=1e-5)
        np.testing.assert_allclose(hits / count, _mean(hit_B, batch), rtol=1e-6)


def test_one_device_equals_a_2x2x2_mesh():
    batches = [jax.device_get(_batch(seed)) for seed in range(2)]
    _, one = _run(mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1]), batches)
    _, eight = _run(mesh_lib.make_mesh((2, 2, 2)), batches)
    for a, b in zip(one, eight):
        for key in ("loss", "ce", "acc", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=2e-4, err_msg=key)


def test_train_flops_are_the_images_counted_per_token():
    """MFU counts FLOPs per token × tokens per step; a ViT's tokens are its images'
    (num_tokens each), so per token × num_tokens is the per-image count."""
    from matlm.model.counting import joint_forward_flops_per_image, train_flops_per_image
    joint = build_objective(VIT, TRAIN)
    assert joint.train_flops_per_token(VIT, VIT.num_tokens) * VIT.num_tokens == pytest.approx(
        3 * joint_forward_flops_per_image(VIT, joint.widths))
    sampled = build_objective(VIT, dataclasses.replace(TRAIN, granularity_mode="sample",
                                                       sample_k=2))
    got = sampled.train_flops_per_token(VIT, VIT.num_tokens, trained=[1, 0, 0, 1])
    assert got * VIT.num_tokens == pytest.approx(
        train_flops_per_image(VIT, sampled.widths[0]) + train_flops_per_image(VIT, sampled.widths[3]))


@pytest.mark.parametrize("distill", [0.0, 0.4])
def test_mixup_batches_train_on_the_soft_target_cross_entropy(distill):
    """With mixup keys the loss is the CE against the mixed one-hot targets, w·e_y +
    (1 − w)·e_y', written here as a soft-target CE (and weight 1 is the plain batch)."""
    train = dataclasses.replace(TRAIN, distill_weight=distill)
    objective = build_objective(VIT, train)
    params, batch = _params(), _batch()
    rng = np.random.default_rng(3)
    weight_B = rng.uniform(0.5, 1.0, 8).astype(np.float32)
    partner_B = rng.integers(0, VIT.num_classes, 8).astype(np.int32)
    mixed = dict(batch, mixup_labels=jnp.asarray(partner_B), mixup_weight=jnp.asarray(weight_B))
    indices = objective.indices(0)
    _, (ce_G, *_) = joint_loss(build_model(VIT), objective, params, mixed, indices)
    mask = np.asarray(batch["mask"])
    for g, name in enumerate(objective.names):
        logits, _, _ = _alone(params, batch, name)
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        target_BK = (weight_B[:, None] * np.eye(VIT.num_classes)[np.asarray(batch["labels"])]
                     + (1 - weight_B)[:, None] * np.eye(VIT.num_classes)[partner_B])
        ce = (-(target_BK * logp).sum(-1) * mask).sum() / mask.sum()
        np.testing.assert_allclose(np.asarray(ce_G)[g], ce, rtol=1e-5)
    ones = dict(batch, mixup_labels=jnp.asarray(partner_B), mixup_weight=jnp.ones(8))
    plain = joint_loss(build_model(VIT), objective, params, batch, indices)[0]
    np.testing.assert_allclose(joint_loss(build_model(VIT), objective, params, ones,
                                          indices)[0], plain, rtol=1e-6)


def test_the_sigmoid_loss_is_scenics_multilabel_loss_in_training_and_eval():
    """classification_loss='sigmoid' (scenic's MatViT ImageNet recipe): per example the
    sigmoid cross entropy summed over the classes against the (mixup-mixed) one-hot target
    (optax's elementwise loss is the reference), the joint loss and its gradients those of
    the granularities run alone, the eval step the same loss; head_bias_init sets the
    classifier's starting logits; z-loss and distillation, which need a softmax, refused."""
    import optax
    from matlm.training.config import TrainConfigError
    prior = -float(np.log(VIT.num_classes))
    sig = dataclasses.replace(VIT, classification_loss="sigmoid", head_bias_init=prior)
    model = build_model(sig)
    initial = init_params(sig, jax.random.key(0))
    np.testing.assert_array_equal(initial["head_bias"], np.full(VIT.num_classes, prior,
                                                                np.float32))
    batch = _batch()
    np.testing.assert_allclose(model.apply({"params": initial}, batch["images"]), prior)

    objective = build_objective(sig, dataclasses.replace(TRAIN, granularity_weights=(
        0.1, 0.2, 0.3, 0.4)))
    params = _params()
    rng = np.random.default_rng(3)
    weight_B = rng.uniform(0.5, 1.0, 8).astype(np.float32)
    partner_B = rng.integers(0, VIT.num_classes, 8).astype(np.int32)
    mixed = dict(batch, mixup_labels=jnp.asarray(partner_B), mixup_weight=jnp.asarray(weight_B))
    eye = np.eye(VIT.num_classes, dtype=np.float32)
    target_BK = jnp.asarray(weight_B[:, None] * eye[np.asarray(batch["labels"])]
                            + (1 - weight_B)[:, None] * eye[partner_B])

    def reference(p):
        losses = []
        for name in objective.names:
            logits = model.apply({"params": p}, batch["images"],
                                 widths=VIT.granularities.uniform(name))
            losses.append(_mean(optax.sigmoid_binary_cross_entropy(logits, target_BK).sum(-1),
                                batch))
        return sum(w * l for w, l in zip(objective.weights, losses)), jnp.stack(losses)

    (total, (ce_G, _, _)), grads = jax.value_and_grad(
        lambda p: joint_loss(model, objective, p, mixed, objective.indices(0)),
        has_aux=True)(params)
    (want, want_G), want_grads = jax.value_and_grad(reference, has_aux=True)(params)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(ce_G, want_G, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 grads, want_grads)

    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    got = jax.device_get(make_eval_step(sig, {"M": VIT.granularities.uniform("M")}, mesh)(
        params, jax.device_put(jax.device_get(batch), batch_sharding_of(sig, mesh))))
    logits = model.apply({"params": params}, batch["images"], widths=VIT.granularities.uniform("M"))
    one_hot_BK = jnp.asarray(eye[np.asarray(batch["labels"])])
    loss_sum, count = got["M"]
    np.testing.assert_allclose(loss_sum / count, _mean(optax.sigmoid_binary_cross_entropy(
        logits, one_hot_BK).sum(-1), batch), rtol=1e-5)

    for field, value in (("distill_weight", 0.4), ("z_loss", 1e-4)):
        with pytest.raises(TrainConfigError, match=f"TrainConfig.{field}={value} needs a softmax"):
            build_objective(sig, dataclasses.replace(TRAIN, **{field: value}))
