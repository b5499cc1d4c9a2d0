"""The objective's options (issue 24): weight presets, in-place distillation (KL to the
largest trained granularity under stop_gradient) and the sandwich rule, each against an
independent reference: numpy for the KL and its gradient, submodels run one by one on
full logits for the combined loss, the pre-distillation joint loss for α = 0."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.model import MatLM, init_params
from matlm.model.head import head_table
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfigError
from matlm.training.objective import (build_objective, distill_token_terms, joint_loss,
                                      preset_weights)
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import make_train_step
from tests.test_train_step import MODEL, TRAIN, run_steps, synthetic_batch

DISTILL = dataclasses.replace(TRAIN, distill_weight=0.4, distill_temperature=2.0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [0, 8, 12])  # One pass; chunks of 2; of 3 with padding.
def test_kl_and_its_gradient_equal_numpy(chunk):
    """CE, log-partition, KL(p_teacher,T ‖ p_s,T) per position and d(Σ KL)/d hidden equal
    numpy's, for a traced teacher slot; the teacher's own hidden states get no gradient."""
    S, B, T, D, V, temperature = 4, 2, 8, MODEL.d_model, MODEL.vocab_size, 1.7
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(S, B, T, D)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    table = init_params(MODEL, jax.random.key(1))["embedding"]
    teacher = 2

    def kl_sum(h, teacher):
        ce, logz, kl = distill_token_terms(MODEL, table, h, targets, teacher, temperature,
                                           chunk)
        return kl.sum(), (ce, logz, kl)

    (_, (ce, logz, kl)), grad = jax.jit(jax.value_and_grad(kl_sum, has_aux=True))(
        hidden, jnp.int32(teacher))
    W = np.asarray(table, np.float64) * D ** -0.5  # The tied head: logits = h · Eᵀ / √D.
    logits = hidden.astype(np.float64) @ W.T
    logp = _log_softmax(logits)
    logp_T = _log_softmax(logits / temperature)
    want_kl = (np.exp(logp_T[teacher]) * (logp_T[teacher] - logp_T)).sum(-1)
    np.testing.assert_allclose(ce, -np.take_along_axis(logp, targets[None, ..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logz, np.log(np.exp(logits).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4, atol=1e-6)
    assert (want_kl[np.arange(S) != teacher] > 1e-3).all()  # Real students, real KL.
    # d KL / d student logits = (q_s,T − p_teacher,T) / T; through the head: · W.
    want_grad = ((np.exp(logp_T) - np.exp(logp_T[teacher])) / temperature) @ W
    want_grad[teacher] = 0.0  # Stop-gradient: the teacher's distribution is a constant.
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert not np.asarray(grad[teacher]).any()  # Exactly zero, not just small.


def _oracle_loss(model, objective, params, batch, indices):
    """Σ λ · loss from each trained submodel's own full [B, T, V] logits (no shared
    streams, no chunks, no stacking); the largest trained granularity teaches."""
    alpha, temperature = objective.distill_weight, objective.distill_temperature
    mask = batch["loss_mask"]
    mean = lambda x: (x * mask).sum() / mask.sum()
    logits = [model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                          batch["positions"], widths=objective.widths[i])
              for i in indices]
    teacher = int(np.argmax(indices))
    teacher_logp = jax.lax.stop_gradient(jax.nn.log_softmax(logits[teacher] / temperature))
    total, ces = 0.0, []
    for slot, slot_logits in enumerate(logits):
        logp = jax.nn.log_softmax(slot_logits)
        ce = mean(-jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0])
        kl = mean((jnp.exp(teacher_logp) * (teacher_logp - jax.nn.log_softmax(
            slot_logits / temperature))).sum(-1))
        z = mean(jnp.square(jax.nn.logsumexp(slot_logits, -1)))
        a = 0.0 if slot == teacher else alpha
        total += objective.weights[slot] * ((1 - a) * ce + a * temperature ** 2 * kl
                                            + objective.z_loss * z)
        ces.append(ce)
    return total, jnp.stack(ces)


@pytest.mark.parametrize("kwargs", [
    dict(granularity_weights="paper_table6", z_loss=1e-3, loss_chunk_size=4),  # Shared streams.
    dict(granularity_mode="sample", sample_k=2, granularity_weights=(0.3, 0.7)),  # Traced teacher.
    dict(granularity_mode="sandwich", sample_k=3, granularity_weights="paper_table6"),
], ids=["all", "sample", "sandwich"])
def test_combined_loss_and_gradients_equal_submodels_one_by_one(kwargs):
    objective = build_objective(MODEL, dataclasses.replace(DISTILL, **kwargs))
    params = init_params(MODEL, jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(0))
    batch["loss_mask"] = batch["loss_mask"].at[:, -3:].set(0.0)
    model = MatLM(MODEL)
    step = 3
    indices = objective.indices(step)
    (total, (ce_G, kl_G)), grads = jax.jit(jax.value_and_grad(
        lambda p: joint_loss(model, objective, p, batch, objective.indices(step)),
        has_aux=True))(params)
    concrete = [int(i) for i in np.asarray(indices)]
    (want, want_ce), want_grads = jax.value_and_grad(
        lambda p: _oracle_loss(model, objective, p, batch, concrete), has_aux=True)(params)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ce_G)[concrete], want_ce, rtol=1e-5)
    trained = np.zeros(4, bool)
    trained[concrete] = True
    assert not np.asarray(ce_G)[~trained].any()
    # The KL is reported for the students only; the teacher (largest trained) has none.
    kl = np.asarray(kl_G)
    assert kl[max(concrete)] == 0 and (kl[[i for i in concrete if i != max(concrete)]] > 0).all()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 grads, want_grads)


def _joint_loss_before_distillation(model, objective, params, batch):
    """The objective as it was before distillation existed (mode "all", static widths):
    Σ λ_i · loss_i over one shared-stream pass, summed in granularity order."""
    from matlm.training.objective import hidden_loss
    hidden_G = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["positions"], joint_widths=objective.widths,
                           return_hidden=True)
    total = 0.0
    for weight, hidden in zip(objective.weights, hidden_G):
        loss, _ = hidden_loss(model.config, params, hidden, batch, objective.z_loss,
                              objective.loss_chunk)
        total += weight * loss
    return total


def test_distill_weight_zero_is_the_step_without_distillation_bit_for_bit():
    train = dataclasses.replace(TRAIN, distill_weight=0.0, distill_temperature=3.0,
                                granularity_weights=(0.1, 0.2, 0.3, 0.4))
    objective = build_objective(MODEL, train)
    params = init_params(MODEL, jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(0))
    model = MatLM(MODEL)
    got, got_grads = jax.jit(jax.value_and_grad(
        lambda p: joint_loss(model, objective, p, batch, objective.indices(0))[0]))(params)
    want, want_grads = jax.jit(jax.value_and_grad(
        lambda p: _joint_loss_before_distillation(model, objective, p, batch)))(params)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 got_grads, want_grads)


def test_distillation_with_accumulation_and_meshes_matches_one_device_one_batch():
    one, _ = run_steps((1, 1, 1), steps=2, devices=jax.devices()[:1], train=DISTILL)
    accumulated, _ = run_steps((1, 1, 1), steps=2, devices=jax.devices()[:1],
                               train=dataclasses.replace(DISTILL, microbatches=2))
    sharded, _ = run_steps((2, 2, 2), steps=2, train=DISTILL)
    np.testing.assert_allclose(accumulated, one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)


def test_sandwich_draws_always_hold_the_largest_and_smallest_on_every_host():
    train = dataclasses.replace(TRAIN, granularity_mode="sandwich", sample_k=3,
                                sample_probabilities=(0.1, 0.6, 0.2, 0.1))
    objective = build_objective(MODEL, train)
    picks = np.array([np.asarray(objective.indices(s)) for s in range(1000)])
    assert picks.shape == (1000, 3)
    assert (picks[:, 0] == 0).all() and (picks[:, -1] == 3).all()
    assert set(picks[:, 1]) == {1, 2}  # The middle is drawn, not fixed...
    np.testing.assert_allclose((picks[:, 1] == 1).mean(), 0.75, atol=0.05)  # ...∝ 0.6 : 0.2.
    jitted = jax.jit(objective.indices)
    np.testing.assert_array_equal(picks[:30], [np.asarray(jitted(s)) for s in range(30)])
    # Another process with another device count draws the same.
    code = ("import jax, numpy as np, dataclasses\n"
            "from tests.test_train_step import MODEL, TRAIN\n"
            "from matlm.training.objective import build_objective\n"
            "t = dataclasses.replace(TRAIN, granularity_mode='sandwich', sample_k=3,"
            " sample_probabilities=(0.1, 0.6, 0.2, 0.1))\n"
            "o = build_objective(MODEL, t)\n"
            "print(jax.device_count(), [np.asarray(o.indices(s)).tolist() for s in range(30)])")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"3 {picks[:30].tolist()}"
    # Two granularities per step: just the ends.
    ends = build_objective(MODEL, dataclasses.replace(train, sample_k=2))
    assert [np.asarray(ends.indices(s)).tolist() for s in range(3)] == [[0, 3]] * 3


def test_presets_resolve_for_any_count_and_in_every_mode():
    assert preset_weights("paper_table6", 4) == (0.17, 0.20, 0.22, 0.41)
    for n in (1, 2, 3, 5, 8):
        for name in ("uniform", "paper_table6"):
            w = np.array(preset_weights(name, n))
            assert len(w) == n and abs(w.sum() - 1) < 1e-9 and (w > 0).all()
        # Larger granularities never weigh less (the paper's curve rises).
        assert (np.diff(preset_weights("paper_table6", n)) >= 0).all()
    assert build_objective(MODEL, dataclasses.replace(
        TRAIN, granularity_weights="paper_table6")).weights == (0.17, 0.20, 0.22, 0.41)
    sandwich = build_objective(MODEL, dataclasses.replace(
        TRAIN, granularity_mode="sandwich", sample_k=3, granularity_weights="uniform"))
    assert sandwich.weights == (1 / 3,) * 3
    sampled = build_objective(MODEL, dataclasses.replace(
        TRAIN, granularity_mode="sample", sample_k=2, sample_probabilities="paper_table6"))
    assert sampled.probabilities == (0.17, 0.20, 0.22, 0.41)


@pytest.mark.parametrize("kwargs, message", [
    (dict(distill_weight=0.5, granularities=("XL",)), "distill_weight=0.5 needs at least two"),
    (dict(distill_weight=0.5, granularity_mode="sample", sample_k=1), "needs at least two"),
    (dict(granularity_mode="sample", sample_k=2, granularity_weights="paper_table6"),
     "sample_probabilities='paper_table6'"),
    (dict(granularity_mode="sandwich", sample_k=5), "sample_k=5 exceeds"),
])
def test_objective_refuses_what_cannot_distill_or_sandwich(kwargs, message):
    # The bindings' own range checks, one line each through `matlm train`: test_bad_input.
    with pytest.raises(TrainConfigError, match=message):
        build_objective(MODEL, dataclasses.replace(TRAIN, **kwargs))


def test_distillation_keeps_the_compiled_steps_temporaries_within_ten_percent():
    """The KL runs in the CE's sequence chunks with the same logits bytes per chunk, so the
    step's temporaries barely move; without chunking they would grow with the vocabulary."""
    model = dataclasses.replace(MODEL, vocab_size=4096)
    train = dataclasses.replace(TRAIN, seq_len=64, global_batch_size=8, loss_chunk_size=16)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    batch = jax.tree.map(jnp.asarray, synthetic_batch(0, B=8, T=64, vocab=4096))

    def temporaries(train):
        from matlm.training.train_step import abstract_state
        optimizer = make_optimizer(train)
        step = make_train_step(model, build_objective(model, train), optimizer,
                               learning_rate_schedule(train), mesh)
        state = abstract_state(model, optimizer, mesh)
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

    plain = temporaries(train)
    distilled = temporaries(dataclasses.replace(train, distill_weight=0.5))
    unchunked = temporaries(dataclasses.replace(train, distill_weight=0.5, loss_chunk_size=0))
    assert distilled <= 1.10 * plain, (distilled, plain)
    assert unchunked > 1.5 * plain, (unchunked, plain)  # The chunking is what holds it.


def test_a_distilled_step_reports_and_logs_each_students_kl():
    from types import SimpleNamespace
    from matlm.training.hooks import LogMetrics
    from matlm.training.train_step import init_state
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(DISTILL)
    state = init_state(MODEL, optimizer, mesh, seed=0)
    step = make_train_step(MODEL, build_objective(MODEL, DISTILL), optimizer,
                           learning_rate_schedule(DISTILL), mesh)
    _, metrics = step(state, mesh_lib.global_batch(synthetic_batch(0), mesh))
    metrics = jax.device_get(metrics)
    kl = np.asarray(metrics["kl"])
    assert kl[3] == 0 and (kl[:3] > 0).all()
    assert kl[0] > kl[2]  # At initialisation the narrowest differs most from XL.
    written = {}
    writer = SimpleNamespace(write=lambda step, scalars: written.update(scalars))
    hook = LogMetrics(writer, log_every=1, names=MODEL.granularities.names, tokens_per_step=1,
                      flops_of=lambda m: 1.0, peak_flops_total=1.0)
    trainer = SimpleNamespace(loop_started=0.0, stall_seconds=0.0, last_step=1)
    hook(SimpleNamespace(metrics=metrics, trainer=trainer, step=1, fetched_at=1.0))
    assert {k: written[k] for k in written if k.endswith("/kl")} == pytest.approx(
        {f"train/{n}/kl": float(v) for n, v in zip(("S", "M", "L"), kl[:3])})
