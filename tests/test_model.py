"""The nested model against independent references: a dense oracle, the masked path,
gradients, and the jaxpr's own matmul count."""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.model import MatLM, ModelConfig, init_params, param_count
from matlm.model.counting import forward_flops_per_token, joint_forward_flops_per_token
from matlm.model.layout import ffn_to_contiguous
from matlm.model.reference import dense_forward, slice_params
from matlm.model.streams import stream_plan

# Causal query blocks of 5 over T = 12 (blocks 5, 5, 2) cross the packed-document
# boundaries of `_batch`; one variant runs attention as a single [T, T] block.
BASE = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff=64,
                   attention_query_block=5)
VARIANTS = {
    "swiglu_mha_tied": BASE,
    "gelu_gqa_untied": dataclasses.replace(BASE, activation="gelu", n_kv_heads=2,
                                           tie_embeddings=False),
    "geglu_mqa": dataclasses.replace(BASE, activation="geglu", n_kv_heads=1),
    # Shard-local nesting: 4 blocks, each with its own nested prefix.
    "swiglu_4_nest_blocks": dataclasses.replace(BASE, ffn_nest_blocks=4),
    "swiglu_one_attention_block": dataclasses.replace(BASE, attention_query_block=0),
    # Position encodings other than RoPE (ModelConfig.position_encoding).
    "learned_positions": dataclasses.replace(BASE, position_encoding="learned", max_positions=16),
    "no_positions": dataclasses.replace(BASE, position_encoding="none"),
}


def _batch(config, B=2, T=12, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, config.vocab_size)
    # Two packed documents and trailing padding in row 0; one document in row 1.
    segments = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * T])
    positions = jnp.array([list(range(5)) * 2 + [0, 1], list(range(T))])
    return tokens, segments, positions


def _width_vectors(config):
    spec = config.granularities
    mixed = tuple(spec.widths[i % len(spec.widths)] for i in range(config.n_layers))
    return [spec.uniform(n) for n in spec.names] + [mixed, (24, 8, 64)]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sliced_forward_equals_dense_model_with_sliced_weights(name):
    config = VARIANTS[name]
    params = init_params(config, jax.random.key(0))
    tokens, segments, positions = _batch(config)
    for widths in _width_vectors(config):
        got = MatLM(config).apply({"params": params}, tokens, segments, positions, widths=widths)
        # The oracle knows nothing of nesting blocks: reorder units into nesting order,
        # then take plain prefixes.
        contiguous = ffn_to_contiguous(params, config.ffn_nest_blocks)
        want = dense_forward(config, slice_params(contiguous, widths), tokens, segments,
                             positions)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(widths))


def test_different_widths_give_different_logits():
    # Guards the oracle test against a model that ignores `widths`.
    params = init_params(BASE, jax.random.key(0))
    tokens, _, _ = _batch(BASE)
    s = MatLM(BASE).apply({"params": params}, tokens, widths=BASE.granularities.uniform("S"))
    xl = MatLM(BASE).apply({"params": params}, tokens, widths=BASE.granularities.uniform("XL"))
    assert float(jnp.abs(s - xl).max()) > 1e-3


def test_masked_path_equals_sliced_path_through_one_compiled_function():
    config = VARIANTS["gelu_gqa_untied"]
    params = init_params(config, jax.random.key(0))
    tokens, segments, positions = _batch(config)
    traces = []

    @jax.jit
    def masked(params, widths_L):
        traces.append(1)  # Runs only when jit traces, i.e. compiles.
        return MatLM(config).apply({"params": params}, tokens, segments, positions,
                                   widths=widths_L)

    vectors = _width_vectors(config)
    for widths in vectors:
        got = masked(params, jnp.asarray(widths, jnp.int32))
        want = MatLM(config).apply({"params": params}, tokens, segments, positions,
                                   widths=widths)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(widths))
    assert len(traces) == 1, f"{len(vectors)} width vectors compiled {len(traces)} times"


@pytest.mark.parametrize("blocks", [1, 4])
@pytest.mark.parametrize("path", ["sliced", "masked"])
def test_gradients_vanish_exactly_beyond_the_width(path, blocks):
    config = dataclasses.replace(BASE, ffn_nest_blocks=blocks)
    params = init_params(config, jax.random.key(0))
    tokens, segments, positions = _batch(config)
    widths = (16, 32, 8)
    arg = widths if path == "sliced" else jnp.asarray(widths)

    def loss(params):
        logits = MatLM(config).apply({"params": params}, tokens, segments, positions, widths=arg)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = ffn_to_contiguous(jax.grad(loss)(params), blocks)  # Units in nesting order.
    for i, m in enumerate(widths):
        ffn = grads[f"layer_{i}"]["ffn"]
        for name, g in ffn.items():
            g = np.asarray(g if name == "wo" else g.T)  # → [d_ff, d_model]
            assert np.all(g[m:] == 0), f"layer {i} {name}: non-zero gradient beyond {m}"
            assert np.all(np.abs(g[:m]).sum(axis=1) > 0), f"layer {i} {name}: dead unit inside {m}"


def test_segments_do_not_attend_across_documents():
    params = init_params(BASE, jax.random.key(0))
    tokens, segments, positions = _batch(BASE)
    changed = tokens.at[0, :5].set((tokens[0, :5] + 1) % BASE.vocab_size)  # Edit document 1.
    apply = lambda t: MatLM(BASE).apply({"params": params}, t, segments, positions)
    a, b = apply(tokens), apply(changed)
    np.testing.assert_array_equal(a[0, 5:10], b[0, 5:10])  # Document 2 unaffected.
    assert float(jnp.abs(a[0, :5] - b[0, :5]).max()) > 0


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_does_not_change_values_or_gradients(policy):
    params = init_params(BASE, jax.random.key(0))
    tokens, segments, positions = _batch(BASE)

    def loss(config, params):
        logits = MatLM(config).apply({"params": params}, tokens, segments, positions,
                                     widths=(16, 64, 8))
        return jnp.mean(logits ** 2)

    remat = dataclasses.replace(BASE, remat_policy=policy)
    v0, g0 = jax.value_and_grad(lambda p: loss(BASE, p))(params)
    v1, g1 = jax.value_and_grad(lambda p: loss(remat, p))(params)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bfloat16_compute_stays_close_to_float32():
    params = init_params(BASE, jax.random.key(0))
    tokens, segments, positions = _batch(BASE)
    bf16 = dataclasses.replace(BASE, compute_dtype="bfloat16")
    a = MatLM(BASE).apply({"params": params}, tokens, segments, positions)
    b = MatLM(bf16).apply({"params": params}, tokens, segments, positions)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.1)


def _dot_flops(jaxpr) -> int:
    """Matmul FLOPs of a jaxpr, counted from its dot_general equations (sub-jaxprs too)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = int(np.prod([lhs_shape[d] for d in lhs_contract]))
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * contracted
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _dot_flops(sub)
    return total


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_counts_match_the_real_parameter_tree_and_executed_matmuls(name):
    config = VARIANTS[name]
    T = 12
    tokens = jnp.zeros((1, T), jnp.int32)
    for widths in _width_vectors(config):
        # A model *built* at these widths (an extracted dense submodel).
        built = dataclasses.replace(config, layer_d_ff=widths)
        shapes = jax.eval_shape(lambda: init_params(built, jax.random.key(0)))
        assert sum(x.size for x in jax.tree.leaves(shapes)) == param_count(config, widths)
        # The nested model run at those widths executes exactly the counted matmuls.
        params = init_params(config, jax.random.key(0))
        jaxpr = jax.make_jaxpr(
            lambda p: MatLM(config).apply({"params": p}, tokens, widths=widths))(params)
        # Float only because blocked attention averages keys per token: equal to rounding.
        assert _dot_flops(jaxpr.jaxpr) == pytest.approx(
            T * forward_flops_per_token(config, T, widths), rel=1e-12)


def _joint_vectors(config):
    """Uniform granularities, Mix'n'Match vectors sharing their first layer(s) with them
    and with each other, and a duplicate."""
    spec = config.granularities
    s, xl = spec.uniform("S"), spec.uniform("XL")
    shares_one = (s[0],) + xl[1:]
    shares_two = s[:2] + xl[2:]
    return [spec.uniform(n) for n in spec.names] + [shares_one, shares_two, s]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_joint_pass_equals_each_submodel_alone(name):
    config = VARIANTS[name]
    params = init_params(config, jax.random.key(0))
    tokens, segments, positions = _batch(config)
    vectors = _joint_vectors(config)
    joint = MatLM(config).apply({"params": params}, tokens, segments, positions,
                                joint_widths=vectors)
    assert len(joint) == len(vectors)
    for widths, got in zip(vectors, joint):
        want = MatLM(config).apply({"params": params}, tokens, segments, positions,
                                   widths=widths)
        # Shared FFN hidden units are summed segment by segment: float32 reassociation.
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(widths))


@pytest.mark.parametrize("policy", ["none", "full"])
def test_joint_pass_gradients_equal_separate_passes(policy):
    config = dataclasses.replace(VARIANTS["gelu_gqa_untied"], remat_policy=policy)
    params = init_params(config, jax.random.key(0))
    tokens, segments, positions = _batch(config)
    vectors = _joint_vectors(config)
    weights = jnp.arange(1.0, len(vectors) + 1)  # Distinct λ: each cotangent counts.

    def objective(logits):
        return sum(w * jnp.mean(jax.nn.log_softmax(l)[..., 0]) for w, l in zip(weights, logits))

    joint = jax.grad(lambda p: objective(MatLM(config).apply(
        {"params": p}, tokens, segments, positions, joint_widths=vectors)))(params)
    separate = jax.grad(lambda p: objective([MatLM(config).apply(
        {"params": p}, tokens, segments, positions, widths=w) for w in vectors]))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 joint, separate)


@pytest.mark.parametrize("name", ["swiglu_mha_tied", "swiglu_4_nest_blocks", "gelu_gqa_untied"])
def test_joint_counts_match_executed_matmuls(name):
    config = VARIANTS[name]
    T = 12
    tokens = jnp.zeros((1, T), jnp.int32)
    params = init_params(config, jax.random.key(0))
    vectors = _joint_vectors(config)
    jaxpr = jax.make_jaxpr(lambda p: MatLM(config).apply(
        {"params": p}, tokens, joint_widths=vectors))(params)
    counted = T * joint_forward_flops_per_token(config, T, vectors)
    assert _dot_flops(jaxpr.jaxpr) == pytest.approx(counted, rel=1e-12)
    separate = T * sum(forward_flops_per_token(config, T, w) for w in vectors)
    assert counted < separate  # Sharing saves work, and the count shows it.


def test_stream_plan():
    # Uniform granularities: one stream into layer 0 (four widths), then four streams.
    layers, final = stream_plan([(1, 1, 1), (2, 2, 2), (4, 4, 4)])
    assert layers[0] == (((0, 1, 2), (1, 2, 4)),)
    assert layers[1] == (((0,), (1,)), ((1,), (2,)), ((2,), (4,)))
    assert final == ((0,), (1,), (2,))
    # Vectors agreeing on layers 0-1 share those layers whole; duplicates share a stream.
    layers, final = stream_plan([(1, 1, 1), (1, 1, 4), (1, 1, 1)])
    assert layers[0] == layers[1] == (((0, 1, 2), (1,)),)
    assert layers[2] == (((0, 1, 2), (1, 4)),)
    assert final == ((0, 2), (1,))
    with pytest.raises(ValueError, match="at least one"):
        stream_plan([])
    with pytest.raises(ValueError, match="different lengths"):
        stream_plan([(1, 2), (1, 2, 3)])


def test_joint_widths_refuse_a_wrong_layer_count():
    params = init_params(BASE, jax.random.key(0))
    tokens, _, _ = _batch(BASE)
    with pytest.raises(ValueError, match="2 widths for 3 layers"):
        MatLM(BASE).apply({"params": params}, tokens, joint_widths=[(8, 8), (16, 16)])


def _digest(x) -> str:
    import hashlib
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


@pytest.mark.skipif(jax.default_backend() != "cpu" or jax.__version__ != "0.10.2",
                    reason="digests recorded on CPU with the pinned jax 0.10.2's compiler "
                           "(0.11.2 rounds the logits ~2 ulp differently; docs/gpu.md)")
def test_rope_model_is_bit_identical_to_before_the_position_encoding_choice():
    """Logits and a training loss of the default (RoPE) model, digested bit for bit as
    they were before attention masks, position encodings and the body/family split were
    reworked: every existing checkpoint computes exactly what it did."""
    from matlm.model.layout import stack_layers
    from matlm.training.objective import Objective, joint_loss
    config = ModelConfig(attention_query_block=5)
    assert config.position_encoding == "rope"
    params = init_params(config, jax.random.key(0))
    B, T = 2, 12
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 256)
    segments = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [3] * T], jnp.int32)
    positions = jnp.array([list(range(5)) * 2 + [0, 0], list(range(T))], jnp.int32)
    logits = MatLM(config).apply({"params": params}, tokens, segments, positions)
    assert _digest(logits) == "884b52654a05547f84bf552284385b66c7bdbdb4bf8565b6511767997f497bd1"
    scanned = dataclasses.replace(config, scan_layers=True)
    logits = MatLM(scanned).apply({"params": stack_layers(params)}, tokens, segments, positions)
    assert _digest(logits) == "6650240fd0c2b10f1c07d328ea6a8add5bcb70e4eebfd92de5f397d48526779b"
    widths = tuple(config.resolve_widths(n) for n in config.granularity_names)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, 1), segment_ids=segments,
                 positions=positions, loss_mask=(segments > 0).astype(jnp.float32))
    objective = Objective(names=config.granularity_names, widths=widths, weights=(0.25,) * 4,
                          distill_weight=0.3, z_loss=1e-4)
    loss, _ = joint_loss(MatLM(config), objective, params, batch, jnp.arange(4))
    assert float(loss).hex() == "0x1.45812c0000000p+2"


@pytest.mark.parametrize("encoding", ["learned", "none"])
def test_other_position_encodings_train_a_step(encoding):
    """learned and none build (learned: a position table, no RoPE), train one step with
    the real objective and optimizer, and lower the loss on the batch they trained on."""
    import optax
    from matlm.training.objective import Objective, joint_loss
    config = dataclasses.replace(BASE, position_encoding=encoding, max_positions=16)
    params = init_params(config, jax.random.key(0))
    assert ("position_embedding" in params) == (encoding == "learned")
    tokens, segments, positions = _batch(config)
    batch = dict(inputs=tokens, targets=jnp.roll(tokens, -1, 1), segment_ids=segments,
                 positions=positions, loss_mask=(segments > 0).astype(jnp.float32))
    widths = tuple(config.resolve_widths(n) for n in config.granularity_names)
    objective = Objective(names=config.granularity_names, widths=widths, weights=(0.25,) * 4)
    loss_fn = lambda p: joint_loss(MatLM(config), objective, p, batch, jnp.arange(4))[0]
    optimizer = optax.adam(1e-2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    if encoding == "learned":  # Positions are seen: the table learns.
        assert float(jnp.abs(grads["position_embedding"][:5]).sum()) > 0
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert float(loss_fn(optax.apply_updates(params, updates))) < float(loss)


def test_learned_positions_refuse_a_sequence_past_the_table():
    config = dataclasses.replace(BASE, position_encoding="learned", max_positions=8)
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="exceed the learned position table"):
        MatLM(config).apply({"params": params}, jnp.zeros((1, 12), jnp.int32))
