"""Scanned layers (ModelConfig.scan_layers) against the unrolled model on the same
parameters (converted with matlm.model.layout.stack_layers): logits and gradients of every
call form, train steps in both objective modes, and the layout conversions."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.model import MatLM, ModelConfig, ModelConfigError, init_params, logical_axes
from matlm.model.layout import convert_layer_form, ffn_to_contiguous, stack_layers, unstack_layers
from matlm.model.reference import dense_forward, slice_params
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import init_state, make_train_step, state_shardings

# 4 layers so that scans of several layers, single-layer groups and both together occur;
# query blocks of 5 over T = 12 cross the packed-document boundaries of `_batch`.
UNROLLED = ModelConfig(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                       d_ff=64, attention_query_block=5)
SCANNED = dataclasses.replace(UNROLLED, scan_layers=True)
S, M, L, XL = UNROLLED.granularities.widths
# Float32 reassociation only (a scan body compiles separately from the unrolled graph).
TOL = dict(rtol=1e-5, atol=1e-6)


def _batch(B=2, T=12, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, UNROLLED.vocab_size)
    segments = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * T])
    positions = jnp.array([list(range(5)) * 2 + [0, 1], list(range(T))])
    return tokens, segments, positions


def _close(got, want, tol=TOL):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol),
                 got, want)


CALL_FORMS = {
    "full": dict(widths=None),
    "uniform_S": dict(widths=(S,) * 4),
    # Runs of equal widths (a scanned group of 2 between single layers) and all-distinct.
    "mixnmatch_grouped": dict(widths=(M, XL, XL, S)),
    "mixnmatch_distinct": dict(widths=(S, M, L, XL)),
    "traced": dict(widths=jnp.array([M, XL, S, L], jnp.int32)),
    # S/M/L/XL: layer 0 shared and split, then one scan over 4 streams; plus Mix'n'Match
    # vectors sharing their first two layers (a 2-layer group of one stream).
    "joint_uniform": dict(joint_widths=[(w,) * 4 for w in (S, M, L, XL)]),
    "joint_mixnmatch": dict(joint_widths=[(M, M, S, S), (M, M, XL, L), (M, M, S, S)]),
}


# Every form without remat; under remat, a scanned group (traced, joint) and single-layer
# calls next to a group (mixnmatch_grouped), with both checkpointing policies.
CASES = [(form, "none") for form in sorted(CALL_FORMS)] + [
    ("joint_uniform", "dots_saveable"), ("traced", "full"), ("mixnmatch_grouped", "full")]


@pytest.mark.parametrize("form,remat", CASES)
def test_scanned_equals_unrolled_logits_and_gradients(form, remat):
    unrolled = dataclasses.replace(UNROLLED, remat_policy=remat)
    scanned = dataclasses.replace(SCANNED, remat_policy=remat)
    params = init_params(unrolled, jax.random.key(0))
    tokens, segments, positions = _batch()
    kwargs = CALL_FORMS[form]

    def loss(config, p):
        out = MatLM(config).apply({"params": p}, tokens, segments, positions, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        # Different weights per submodel so a swapped output would show.
        return sum((i + 1) * jnp.mean(jax.nn.log_softmax(o)[..., :3]) for i, o in enumerate(outs)), out

    (v_want, out_want), g_want = jax.jit(jax.value_and_grad(
        lambda p: loss(unrolled, p), has_aux=True))(params)
    (v_got, out_got), g_got = jax.jit(jax.value_and_grad(
        lambda p: loss(scanned, p), has_aux=True))(stack_layers(params))
    _close(out_got, out_want)
    _close(v_got, v_want)
    _close(unstack_layers(g_got), g_want)
    assert set(g_got) == {"embedding", "final_norm", "layers"}


def test_scanned_compiles_one_body_per_group():
    """The scan really is a scan: the jaxpr of uniform widths holds one scan over all
    layers and no per-layer copies; S/M/L/XL joint holds one scan over layers 1..L-1."""
    params = stack_layers(init_params(UNROLLED, jax.random.key(0)))
    tokens, _, _ = _batch()

    def scans(**kwargs):
        jaxpr = jax.make_jaxpr(lambda p: MatLM(SCANNED).apply({"params": p}, tokens, **kwargs))(params)
        return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]

    assert scans(widths=(M,) * 4) == [4]
    assert scans(**CALL_FORMS["joint_uniform"]) == [3]
    assert scans(**CALL_FORMS["mixnmatch_grouped"]) == [2]
    assert scans(**CALL_FORMS["mixnmatch_distinct"]) == []


def test_scanned_model_equals_the_dense_oracle():
    """The oracle takes either layer form, and the scanned model's own (vmapped) init
    gives a working model: compared with the dense model on sliced weights."""
    params = init_params(SCANNED, jax.random.key(3))
    tokens, segments, positions = _batch()
    widths = (M, XL, XL, S)
    got = jax.jit(lambda p: MatLM(SCANNED).apply({"params": p}, tokens, segments, positions,
                                                 widths=widths))(params)
    want = jax.jit(lambda p: dense_forward(SCANNED, slice_params(p, widths), tokens, segments,
                                           positions))(params)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Independent draws per layer (vmapped init over L rngs), not one layer repeated.
    wq = np.asarray(params["layers"]["attn"]["wq"])
    assert not np.allclose(wq[0], wq[1])


def test_stacked_parameters_carry_the_layers_axis():
    axes = logical_axes(SCANNED)
    assert tuple(axes["layers"]["ffn"]["wo"]) == ("layers", "mlp", "embed")
    assert tuple(axes["layers"]["attn_norm"]["scale"]) == ("layers", "norm")
    shapes = jax.eval_shape(lambda: init_params(SCANNED, jax.random.key(0)))
    assert shapes["layers"]["attn"]["wq"].shape == (4, 32, 4, 8)


def test_layout_round_trip_and_checkpoint_conversion():
    params = init_params(UNROLLED, jax.random.key(0))
    stacked = stack_layers(params)
    assert stacked["layers"]["ffn"]["wo"].shape == (4, 64, 32)
    _close(unstack_layers(stacked), params, dict(rtol=0, atol=0))
    assert unstack_layers(params) is params  # Unrolled stays as it is.
    # A whole train state (parameters and Adam moments) converts both ways.
    optimizer = make_optimizer(TrainConfig(steps=3, seq_len=12, global_batch_size=2))
    state = {"params": params, "opt_state": optimizer.init(params)}
    as_scanned = convert_layer_form(state, SCANNED)
    assert jax.tree.structure(as_scanned["opt_state"]) == jax.tree.structure(
        optimizer.init(stacked))
    _close(convert_layer_form(as_scanned, UNROLLED), state, dict(rtol=0, atol=0))
    # Shard-local nesting reorders stacked kernels like unrolled ones.
    nested = dataclasses.replace(UNROLLED, ffn_nest_blocks=4)
    nested_params = init_params(nested, jax.random.key(1))
    _close(ffn_to_contiguous(stack_layers(nested_params), 4),
           stack_layers(ffn_to_contiguous(nested_params, 4)), dict(rtol=0, atol=0))


def test_layout_errors_name_the_problem():
    params = init_params(UNROLLED, jax.random.key(0))
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(stack_layers(params))
    with pytest.raises(ValueError, match="n_layers=3"):
        convert_layer_form(params, dataclasses.replace(SCANNED, n_layers=3))
    del params["layer_2"]
    with pytest.raises(ValueError, match=r"layer_0 .. layer_\(L-1\)"):
        stack_layers(params)
    with pytest.raises(ModelConfigError, match="scan_layers=False"):
        dataclasses.replace(SCANNED, layer_d_ff=(64, 32, 64, 64))
    tokens, _, _ = _batch()
    scanned_params = stack_layers(init_params(UNROLLED, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        MatLM(SCANNED).apply({"params": scanned_params}, tokens, widths=jnp.array([S, M, L]))


# ---- Train steps: scanned = unrolled for 3 steps, both objective modes. ----
TRAIN_MODEL = dataclasses.replace(UNROLLED, remat_policy="dots_saveable")
TRAIN = TrainConfig(steps=3, seq_len=12, global_batch_size=4, learning_rate=1e-2,
                    warmup_steps=1)


def _synthetic_batch(seed, B=4, T=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, UNROLLED.vocab_size, (B, T + 1)).astype(np.int32)
    segments = np.ones((B, T), np.int32)
    segments[:, T // 2:] = 2
    positions = np.tile(np.concatenate([np.arange(T // 2)] * 2), (B, 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions, "loss_mask": np.ones((B, T), np.float32)}


def _train(model, train, state, mesh):
    optimizer = make_optimizer(train)
    step = make_train_step(model, build_objective(model, train), optimizer,
                           learning_rate_schedule(train), mesh, donate=False)
    metrics = []
    for i in range(3):
        state, m = step(state, mesh_lib.global_batch(_synthetic_batch(i), mesh))
        metrics.append(jax.device_get(m))
    return state, metrics


@pytest.mark.parametrize("mode,mesh_shape", [("all", (2, 2, 2)), ("sample", (1, 1, 1))])
def test_scanned_train_steps_equal_unrolled(mode, mesh_shape):
    train = dataclasses.replace(TRAIN, granularity_mode=mode, sample_k=2)
    scanned_model = dataclasses.replace(TRAIN_MODEL, scan_layers=True)
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = mesh_lib.make_mesh(mesh_shape, devices=devices)
    optimizer = make_optimizer(train)
    state = init_state(TRAIN_MODEL, optimizer, mesh, seed=0)
    # The same starting point in the scanned form, placed by the scanned shardings.
    scanned_state = jax.device_put(convert_layer_form(state, scanned_model),
                                   state_shardings(scanned_model, optimizer, mesh))
    if mesh_shape != (1, 1, 1):  # The stacked kernels really are sharded (over fsdp).
        wi = scanned_state.params["layers"]["ffn"]["wi_gate"]
        assert wi.sharding.spec[0] is None and wi.addressable_shards[0].data.shape[1] < 32
    want_state, want = _train(TRAIN_MODEL, train, state, mesh)
    got_state, got = _train(scanned_model, train, scanned_state, mesh)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["trained"], w["trained"])
        _close(g["ce"], w["ce"])
        _close(g["loss"], w["loss"])
        _close(g["grad_norm"], w["grad_norm"])
    _close(unstack_layers(got_state.params), want_state.params)
    assert want[0]["loss"] != want[-1]["loss"]  # It trained.
