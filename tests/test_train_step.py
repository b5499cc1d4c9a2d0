"""The jitted train step across meshes, shard-local nesting, the objective, bad input."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from matlm.model import MatLM, ModelConfig, init_params
from matlm.model.layout import logical_to_physical
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig, TrainConfigError
from matlm.training.objective import build_objective, granularity_loss, joint_loss
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import init_state, make_eval_step, make_train_step

# Every shardable dim divisible by 8, so each mesh below really shards.
MODEL = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, d_ff=256,
                    ffn_nest_blocks=8, width_alignment=8)
TRAIN = TrainConfig(steps=10, seq_len=16, global_batch_size=8, learning_rate=1e-2,
                    warmup_steps=2)


def synthetic_batch(seed=0, B=8, T=16, vocab=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
    segments = np.ones((B, T), np.int32)
    segments[:, T // 2:] = 2  # Two packed documents per row.
    positions = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": np.tile(positions, (B, 1)).astype(np.int32),
            "loss_mask": np.ones((B, T), np.float32)}


def run_steps(mesh_shape, steps=3, devices=None, train=TRAIN, model=MODEL):
    mesh = mesh_lib.make_mesh(mesh_shape, devices=devices)
    optimizer = make_optimizer(train)
    state = init_state(model, optimizer, mesh, seed=0)
    step = make_train_step(model, build_objective(model, train), optimizer,
                           learning_rate_schedule(train), mesh, train.microbatches)
    losses = []
    for i in range(steps):
        state, metrics = step(state, mesh_lib.global_batch(synthetic_batch(i), mesh))
        losses.append(jax.device_get(metrics["ce"]))
    return np.array(losses), state


def test_eight_fake_devices_are_available():
    assert jax.device_count() == 8, "conftest sets XLA_FLAGS before JAX starts"


@pytest.fixture(scope="module")
def one_device_run():
    return run_steps((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8), (1, 8, 1)])
def test_sharded_meshes_match_one_device(mesh_shape, one_device_run):
    reference, ref_state = one_device_run
    losses, state = run_steps(mesh_shape)
    np.testing.assert_allclose(losses, reference, rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-4, atol=1e-5),
                 state.params, ref_state.params)
    assert reference[0].min() != reference[-1].min()  # It trained.


def test_parameters_really_are_sharded():
    _, state = run_steps((1, 2, 4), steps=1)
    wi = state.params["layer_0"]["ffn"]["wi_gate"]  # [embed→fsdp, mlp→tensor]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (64 // 2, 256 // 4)
    mu = state.opt_state[1][0].mu["layer_0"]["ffn"]["wi_gate"]  # Adam moment: same sharding.
    assert mu.sharding.spec == wi.sharding.spec


@pytest.mark.parametrize("blocks, spread", [(8, True), (1, False)])
def test_every_granularity_spreads_over_all_tensor_shards(blocks, spread):
    """With shard-local nesting, each tensor shard holds width/T units of every
    granularity; with one plain prefix, S lives on the first shard only."""
    model = dataclasses.replace(MODEL, ffn_nest_blocks=blocks)
    mesh = mesh_lib.make_mesh((1, 1, 8))
    state = init_state(model, make_optimizer(TRAIN), mesh, seed=0)
    wi = state.params["layer_0"]["ffn"]["wi_up"]
    shard_cols = {}
    for shard in wi.addressable_shards:  # Which stored columns each device holds.
        cols = shard.index[1]
        shard_cols[shard.device.id] = set(range(cols.start or 0, cols.stop or wi.shape[1]))
    assert len(shard_cols) == 8
    perm = logical_to_physical(model.d_ff, blocks)
    for name, width in model.granularities.by_name.items():
        used = set(perm[:width].tolist())  # Stored columns granularity `name` uses.
        per_shard = sorted(len(used & cols) for cols in shard_cols.values())
        if spread:
            assert per_shard == [width // 8] * 8, (name, per_shard)
        elif width < model.d_ff:
            assert per_shard[0] == 0, (name, per_shard)  # Some shard holds none of it.


def test_gradient_accumulation_matches_one_big_batch(one_device_run):
    one, _ = one_device_run
    accumulated, _ = run_steps((1, 1, 1), devices=jax.devices()[:1],
                               train=dataclasses.replace(TRAIN, microbatches=4))
    np.testing.assert_allclose(accumulated, one, rtol=1e-5, atol=1e-5)


def test_sampled_granularities_follow_seed_and_step():
    train = dataclasses.replace(TRAIN, granularity_mode="sample", sample_k=2,
                                sample_probabilities=(0.4, 0.3, 0.2, 0.1))
    objective = build_objective(MODEL, train)
    picks = np.array([np.asarray(objective.indices(s)) for s in range(2000)])
    assert all(len(set(p)) == 2 for p in picks)  # k distinct granularities per step.
    jitted = jax.jit(objective.indices)
    np.testing.assert_array_equal(picks[:50], [np.asarray(jitted(s)) for s in range(50)])
    counts = np.bincount(picks[:, 0], minlength=4) / len(picks)
    np.testing.assert_allclose(counts, [0.4, 0.3, 0.2, 0.1], atol=0.04)  # First draw ~ p.
    other_seed = build_objective(MODEL, dataclasses.replace(train, seed=1))
    assert any((np.asarray(other_seed.indices(s)) != picks[s]).any() for s in range(20))
    # Another process with another device count computes the same choices.
    code = ("import jax, numpy as np, dataclasses\n"
            "from tests.test_train_step import MODEL, TRAIN\n"
            "from matlm.training.objective import build_objective\n"
            "t = dataclasses.replace(TRAIN, granularity_mode='sample', sample_k=2,"
            " sample_probabilities=(0.4, 0.3, 0.2, 0.1))\n"
            "o = build_objective(MODEL, t)\n"
            "print(jax.device_count(), [np.asarray(o.indices(s)).tolist() for s in range(50)])")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=3",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"3 {picks[:50].tolist()}"


def test_sampled_step_trains_exactly_the_sampled_granularities():
    train = dataclasses.replace(TRAIN, granularity_mode="sample", sample_k=1)
    objective = build_objective(MODEL, train)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer = make_optimizer(train)
    state = init_state(MODEL, optimizer, mesh, seed=0)
    step = make_train_step(MODEL, objective, optimizer, learning_rate_schedule(train), mesh)
    for i in range(6):
        expected = np.zeros(4)
        expected[np.asarray(objective.indices(i))] = 1
        state, metrics = step(state, mesh_lib.global_batch(synthetic_batch(i), mesh))
        np.testing.assert_array_equal(jax.device_get(metrics["trained"]), expected)
        assert (jax.device_get(metrics["ce"]) > 0).sum() == 1


def test_joint_loss_over_shared_streams_equals_granularities_one_by_one():
    # Training all granularities runs one pass sharing layer 0 (matlm.model.streams); it
    # must optimise exactly Σ λ_i · loss_i of the submodels run separately.
    train = dataclasses.replace(TRAIN, granularity_weights=(0.1, 0.2, 0.3, 0.4), z_loss=1e-3)
    objective = build_objective(MODEL, train)
    params = init_params(MODEL, jax.random.key(0))
    batch = jax.tree.map(jax.numpy.asarray, synthetic_batch(0))
    model = MatLM(MODEL)
    indices = objective.indices(0)

    def separate(params):
        parts = [granularity_loss(model, params, batch, w, objective.z_loss)
                 for w in objective.widths]
        total = sum(lam * loss for lam, (loss, _) in zip(objective.weights, parts))
        return total, jax.numpy.stack([ce for _, ce in parts])

    (total, (ce, kl)), grads = jax.value_and_grad(
        lambda p: joint_loss(model, objective, p, batch, indices), has_aux=True)(params)
    assert not np.asarray(kl).any()  # No distillation: no KL.
    (want_total, want_ce), want_grads = jax.value_and_grad(separate, has_aux=True)(params)
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, want_grads)


def test_eval_step_equals_each_submodel_alone():
    spec = MODEL.granularities
    widths_by_name = {**{n: spec.uniform(n) for n in spec.names}, "mix": (64, 256)}
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params = init_params(MODEL, jax.random.key(0))
    batch = synthetic_batch(0)
    batch["loss_mask"][:, -3:] = 0  # Masked tokens count in neither sum nor count.
    got = make_eval_step(MODEL, widths_by_name, mesh)(params, mesh_lib.global_batch(batch, mesh))
    device_batch = jax.tree.map(jax.numpy.asarray, batch)
    for name, widths in widths_by_name.items():
        _, ce = granularity_loss(MatLM(MODEL), params, device_batch, widths, 0.0)
        total, count = got[name]
        assert float(count) == batch["loss_mask"].sum()
        np.testing.assert_allclose(float(total) / float(count), float(ce), rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(granularity_weights=(1.0, 1.0)), "do not match the 4 granularities"),
    (dict(granularities=("S", "XXL")), "'XXL'"),
    (dict(granularity_mode="sample", sample_k=5), "sample_k=5 exceeds"),
    (dict(granularity_mode="sample", sample_probabilities=(0.5, 0.5)), "must be 4"),
    (dict(granularity_mode="sample", sample_k=2, granularity_weights=(1.0,)),
     "sample_k=2 slots"),
])
def test_objective_errors_name_the_problem(kwargs, message):
    with pytest.raises(TrainConfigError, match=message):
        build_objective(MODEL, dataclasses.replace(TRAIN, **kwargs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=10, microbatches=3), "not divisible by microbatches"),
    (dict(seq_len=1), "TrainConfig.seq_len must be an integer >= 2, got 1"),
    (dict(mesh_shape=(-1, -1, 1)), "at most one -1"),
    (dict(decay="step"), "TrainConfig.decay must be one of 'cosine', 'linear', 'constant', got 'step'"),
])
def test_train_config_errors(kwargs, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**kwargs)


def test_mesh_errors():
    with pytest.raises(mesh_lib.MeshError, match=r"does not divide the 8 available devices"):
        mesh_lib.make_mesh((3, 1, 1))
    with pytest.raises(mesh_lib.MeshError, match="uses 4 devices but 8 are available"):
        mesh_lib.make_mesh((2, 2, 1))
    mesh = mesh_lib.make_mesh((4, 2, 1))
    with pytest.raises(mesh_lib.MeshError, match=r"not divisible by data×fsdp = 8"):
        mesh_lib.check_batch_fits(mesh, global_batch_size=12, microbatches=1)


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    from matlm.model_dir import RunCheckpointer
    from matlm.training.train_step import abstract_state
    _, state = run_steps((8, 1, 1), steps=2)
    checkpointer = RunCheckpointer(tmp_path, keep=2)
    checkpointer.save(2, state, {"step": 2}, {"step": 2})
    checkpointer.wait()
    other_mesh = mesh_lib.make_mesh((1, 2, 4))
    target = abstract_state(MODEL, make_optimizer(TRAIN), other_mesh)
    params, opt_state, data_state, meta, step = RunCheckpointer(tmp_path).restore_latest(target)
    assert step == 2 and data_state == {"step": 2}
    wi = params["layer_0"]["ffn"]["wi_gate"]
    assert wi.sharding.mesh.shape == other_mesh.shape
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (state.params, state.opt_state), (params, opt_state))


def test_the_train_step_builds_the_family_the_registry_names():
    """A family registered by its config class alone reaches the jitted train step: here a
    bidirectional variant of the LM (a subclass that only flips the mask), whose step
    runs and trains something other than the causal LM would."""
    from matlm.model import MatLM, build_model, families

    @dataclasses.dataclass(frozen=True)
    class BidiConfig(ModelConfig):
        pass

    class BidiLM(MatLM):
        causal = False

    families.register_family("test_bidi", BidiConfig, BidiLM, families.get_family("lm").example_inputs)
    try:
        bidi = BidiConfig(**{f.name: getattr(MODEL, f.name) for f in dataclasses.fields(MODEL)})
        assert type(build_model(bidi)) is BidiLM
        causal_ce, _ = run_steps((1, 1, 1), steps=1, devices=jax.devices()[:1])
        bidi_ce, _ = run_steps((1, 1, 1), steps=1, devices=jax.devices()[:1], model=bidi)
        assert np.isfinite(bidi_ce).all() and not np.allclose(bidi_ce, causal_ce)
    finally:
        del families._FAMILIES["test_bidi"]
