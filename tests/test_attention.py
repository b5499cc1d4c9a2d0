"""Attention implementations against independent references: a naive full-softmax
oracle, jax.nn.dot_product_attention's XLA path with an explicit mask, and the blocked XLA
path for the fused kernels (splash in Pallas interpret mode and through its compiled TPU
lowering; cuDNN on a GPU where there is one)."""
import dataclasses
import os
import re

# Compiling for a TPU topology loads libtpu, which by default allows one process per
# machine; tests may share the machine with other JAX processes that loaded it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from matlm.model import attention as attn  # noqa: E402
from matlm.model.config import ModelConfig, ModelConfigError  # noqa: E402


def _qkv(B, T, H, K, E, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, E)) * E ** -0.5  # attend() takes q pre-scaled.
    k = jax.random.normal(kk, (B, T, K, E))
    v = jax.random.normal(kv, (B, T, K, E))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _segments(B, T):
    """Row 0: two packed documents then padding (id 0); other rows one document each.
    The boundaries fall inside query blocks and splash tiles on purpose."""
    first = [1] * (T * 3 // 8) + [2] * (T // 2) + [0] * (T - T * 3 // 8 - T // 2)
    return jnp.array([first] + [[r + 3] * T for r in range(B - 1)], jnp.int32)


def naive_attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, causal=True):
    """The definition, written independently of matlm: full [B, H, T, T] scores, KV head
    h // G for query head h, a boolean (causal &) same-document mask, one softmax."""
    B, T, H, E = q_BTHE.shape
    K = k_BTKE.shape[2]
    kv_head_H = np.arange(H) // (H // K)
    k_BTHE, v_BTHE = k_BTKE[:, :, kv_head_H], v_BTKE[:, :, kv_head_H]
    scores_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE, k_BTHE,
                             precision=jax.lax.Precision.HIGHEST)
    pos = np.arange(T)
    allowed_BTS = (pos[:, None] >= pos[None, :] if causal else True) & (
        segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    scores_BHTS = jnp.where(allowed_BTS[:, None], scores_BHTS, -jnp.inf)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    return jnp.einsum("bhts,bshe->bthe", probs_BHTS, v_BTHE,
                      precision=jax.lax.Precision.HIGHEST)


def _loss_and_grads(fn, q, k, v):
    """A scalar of the output (random projection, so every output element matters) and
    its gradients with respect to q, k and v."""
    w = jax.random.normal(jax.random.key(99), q.shape, jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_same(got, want, tol):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    np.testing.assert_allclose(loss_g, loss_w, rtol=tol, atol=tol)
    for name, g, w in zip("qkv", grads_g, grads_w):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol, err_msg=f"d/d{name}")


def _attend(config, seg):
    return lambda q, k, v: attn.attend(q, k, v, attn.make_attention_mask(seg, config), config)


# ---- the xla path (CPU and oracle) ---------------------------------------------------------

@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block", [5, 0], ids=["blocked", "one_block"])
def test_xla_matches_naive_softmax(heads, block):
    H, K = heads
    B, T, E = 3, 16, 8
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, attention_impl="xla",
                         attention_query_block=block)
    q, k, v = _qkv(B, T, H, K, E)
    seg = _segments(B, T)
    out = _attend(config, seg)(q, k, v)
    np.testing.assert_allclose(out, naive_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)
    _assert_same(_loss_and_grads(_attend(config, seg), q, k, v),
                 _loss_and_grads(lambda q, k, v: naive_attention(q, k, v, seg), q, k, v), 1e-4)


def test_xla_matches_jax_dot_product_attention():
    B, T, H, K, E = 2, 12, 4, 2, 8
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, attention_impl="xla",
                         attention_query_block=5)
    q, k, v = _qkv(B, T, H, K, E, seed=3)
    seg = _segments(B, T)
    same_doc_B1TT = (seg[:, :, None] == seg[:, None, :])[:, None]
    ref = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=same_doc_B1TT, is_causal=True, scale=1.0, implementation="xla")
    _assert_same(_loss_and_grads(_attend(config, seg), q, k, v), _loss_and_grads(ref, q, k, v), 1e-4)


@pytest.mark.parametrize("block", [5, 0], ids=["blocked", "one_block"])
def test_bidirectional_mask_matches_naive_softmax(block):
    """causal=False (an encoder): every query sees its whole segment, future included;
    the query blocking of the causal path does not cut keys off."""
    B, T, H, K, E = 3, 16, 4, 2, 8
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, attention_impl="xla",
                         attention_query_block=block)
    q, k, v = _qkv(B, T, H, K, E, seed=11)
    seg = _segments(B, T)
    mask = attn.make_attention_mask(seg, config, causal=False)
    assert mask.kind == "bidirectional+segments"
    out = attn.attend(q, k, v, mask, config)
    np.testing.assert_allclose(out, naive_attention(q, k, v, seg, causal=False),
                               rtol=1e-5, atol=1e-5)
    # The oracle can tell the two kinds apart.
    assert not np.allclose(out, naive_attention(q, k, v, seg), atol=1e-3)


def test_cached_decoding_goes_through_attend():
    """A decode mask (T new queries over S cache slots) takes attend's grouped path: the
    last queries of a sequence, over a cache holding it, equal full causal attention's
    last rows; cache slots past the queries' positions (stale) are never read."""
    B, T, H, K, E, S = 2, 12, 4, 2, 8, 16
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, attention_impl="xla")
    q, k, v = _qkv(B, T, H, K, E, seed=13)
    full = attn.attend(q, k, v, attn.make_attention_mask(jnp.ones((B, T), jnp.int32), config),
                       config)
    stale = jax.random.normal(jax.random.key(14), (B, S - T, K, E))
    k_S, v_S = (jnp.concatenate([a, stale], axis=1) for a in (k, v))
    positions_BT = jnp.broadcast_to(jnp.arange(T - 3, T), (B, 3))
    mask = attn.decode_mask(positions_BT, S)
    assert mask.kind == "causal+cache"
    out = attn.attend(q[:, T - 3:], k_S, v_S, mask, config)
    np.testing.assert_allclose(out, full[:, T - 3:], rtol=1e-5, atol=1e-5)


def test_splash_shards_by_the_rules_it_is_given():
    """splash's shard_map splits batch and heads as the rules in force say, not as the
    default table does."""
    from matlm.sharding import DEFAULT_RULES, activation_sharding, current_rules
    mesh = jax.sharding.AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
    assert attn.splash_shard_axes(mesh, DEFAULT_RULES, 4, 4) == (("data",), ("tensor",))
    swapped = dict(DEFAULT_RULES, activation_batch="tensor", activation_heads="data")
    assert attn.splash_shard_axes(mesh, tuple(swapped.items()), 4, 4) == (("tensor",), ("data",))
    assert current_rules() == DEFAULT_RULES
    with activation_sharding(jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor")),
                             tuple(swapped.items())):
        assert dict(current_rules())["activation_heads"] == "data"


def test_oracle_detects_a_leak_across_documents():
    """The comparison can fail: a mask that lets row 0's second document see the first
    differs from the oracle."""
    B, T, H, E = 1, 16, 2, 8
    config = ModelConfig(d_model=H * E, n_heads=H, attention_impl="xla")
    q, k, v = _qkv(B, T, H, H, E)
    seg = _segments(B, T)
    leaky = attn.AttentionMask(seg, attn.attention_bias(jnp.ones_like(seg)))
    out = attn.attend(q, k, v, leaky, config)
    assert not np.allclose(out, naive_attention(q, k, v, seg), atol=1e-3)


# ---- choosing an implementation ------------------------------------------------------------

def test_auto_resolves_per_platform():
    f32, bf16 = ModelConfig(), ModelConfig(compute_dtype="bfloat16")
    assert attn.resolve_impl(f32) == "xla"  # This CPU.
    assert attn.resolve_impl(f32, "tpu") == "splash"
    # A length splash cannot tile (not a multiple of 128) falls back to XLA under "auto".
    assert attn.resolve_impl(f32, "tpu", seq_len=2048) == "splash"
    assert attn.resolve_impl(f32, "tpu", seq_len=32) == "xla"
    assert attn.resolve_impl(bf16, "gpu") == "cudnn"
    assert attn.resolve_impl(f32, "gpu") == "xla"  # cuDNN's fused kernel needs 16 bits.
    assert attn.resolve_impl(ModelConfig(attention_impl="xla"), "tpu") == "xla"


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention_impl="flash"), "attention_impl must be one of 'auto', .*, got 'flash'"),
    (dict(attention_impl="cudnn"), "set compute_dtype='bfloat16'"),
])
def test_bad_attention_config_is_rejected(kwargs, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("impl, message", [("splash", "Pallas TPU kernel"),
                                           ("cudnn", "needs an NVIDIA GPU")])
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="wrong-platform errors on CPU")
def test_fused_kernel_on_the_wrong_platform_is_a_clear_error(impl, message):
    from matlm.model import MatLM, init_params
    config = ModelConfig(attention_impl=impl, compute_dtype="bfloat16")
    params = init_params(dataclasses.replace(config, attention_impl="xla"), jax.random.key(0))
    with pytest.raises(ModelConfigError, match=message):
        MatLM(config).apply({"params": params}, jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize("T", [768, 200, 64])
def test_splash_sequence_length_must_tile(T):
    with pytest.raises(ModelConfigError, match=f"must divide the sequence length T={T}"):
        attn.check_splash_seq_len(T)


# ---- splash (Pallas TPU) -------------------------------------------------------------------

def test_splash_interpret_matches_xla():
    """The real kernel code, run by the Pallas interpreter: two 128-tiles, so causal tile
    skipping, a document boundary inside a tile, GQA and the batch vmap are all exercised."""
    B, T, H, K, E = 2, 256, 2, 1, 32
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, attention_impl="xla")
    q, k, v = _qkv(B, T, H, K, E, seed=5)
    seg = _segments(B, T)
    splash = lambda q, k, v: attn.splash_attention(q, k, v, seg, block=128, interpret=True)
    _assert_same(_loss_and_grads(splash, q, k, v), _loss_and_grads(_attend(config, seg), q, k, v),
                 1e-4)


def _tpu_mesh(topology, shape):
    pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    return jax.make_mesh(shape, ("data", "fsdp", "tensor"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_splash_compiles_for_a_tpu_topology_under_shard_map():
    """'auto' under a TPU mesh picks splash; its forward and backward kernels lower and
    compile for v5e, sharded over batch (data) and heads (tensor)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = _tpu_mesh("v5e:2x2", (2, 1, 2))
    B, T, H, K, E = 4, 1024, 4, 2, 128
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, compute_dtype="bfloat16")

    def loss(q, k, v, seg):
        out = attn.attend(q, k, v, attn.make_attention_mask(seg, config), config)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    shaped = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    with jax.set_mesh(mesh):
        assert attn.resolve_impl(config) == "splash"
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            shaped((B, T, H, E), jnp.bfloat16), shaped((B, T, K, E), jnp.bfloat16),
            shaped((B, T, K, E), jnp.bfloat16), shaped((B, T), jnp.int32))
    hlo = lowered.as_text()
    assert hlo.count("tpu_custom_call") == 3, "expected the forward, dq and dkv kernels"
    assert "tensor<2x2x1024x128xbf16>" in hlo, "each shard should run 2 rows × 2 heads"
    memory = lowered.compile().memory_analysis()
    assert memory.temp_size_in_bytes < B * H * T * T * 4 // 4, \
        "a fused kernel holds no [B, H, T, T] score blocks"


def test_matlm_lowers_with_splash_for_a_tpu_topology():
    """The whole model under a TPU mesh: 'auto' gives every layer the splash kernels
    (forward, dq, dkv) and no [B, T, T] bias is built."""
    from matlm.model import MatLM
    from matlm.model import abstract_params
    mesh = _tpu_mesh("v5e:2x2", (2, 1, 2))
    config = ModelConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=2, d_ff=512,
                         compute_dtype="bfloat16")
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          jax.tree.map(lambda p: p.value if hasattr(p, "value") else p,
                                       abstract_params(config),
                                       is_leaf=lambda p: hasattr(p, "value")))
    B, T = 2, 512

    def loss(params, tokens, segments):
        logits = MatLM(config).apply({"params": params}, tokens, segments)
        return jnp.mean(logits ** 2)

    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(params, tokens, tokens).as_text()
    kernels = set(re.findall(r"kernel_name = \"?(splash_\w+)", hlo))
    assert kernels == {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
                       "splash_mha_dkv_segmented_no_residuals"}, kernels
    # Both layers share the kernels' functions; each runs them in its own shard_map region,
    # one forward and one backward.
    assert hlo.count("sdy.manual_computation") == 2 * config.n_layers
    assert f"tensor<{B}x{T}x{T}xf32>" not in hlo, "the xla path's bias was built"


# ---- cuDNN (GPU) ---------------------------------------------------------------------------

def test_cudnn_rejects_float32_inputs_clearly():
    q, k, v = _qkv(1, 16, 2, 2, 8)
    with pytest.raises(ModelConfigError, match="needs bfloat16/float16 inputs"):
        attn.cudnn_attention(q, k, v, jnp.ones((1, 16), jnp.int32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_xla_on_gpu():
    B, T, H, K, E = 2, 256, 4, 2, 64
    q, k, v = _qkv(B, T, H, K, E, seed=7, dtype=jnp.bfloat16)
    seg = _segments(B, T)
    config = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, compute_dtype="bfloat16")
    assert attn.resolve_impl(config) == "cudnn"
    xla = ModelConfig(d_model=H * E, n_heads=H, n_kv_heads=K, attention_impl="xla")
    up = lambda a: a.astype(jnp.float32)
    # bfloat16 kernel against the float32 oracle on the same (rounded) inputs.
    got = _loss_and_grads(_attend(config, seg), q, k, v)
    want = _loss_and_grads(lambda q, k, v: _attend(xla, seg)(up(q), up(k), up(v)), q, k, v)
    # bfloat16 gradients of magnitude ~30 are 0.125 apart: an element-wise tolerance is
    # meaningless for the small elements, so the error is measured against the largest
    # value (the XLA path in bfloat16 is off by 0.004 of it on H100; cuDNN by 0.008).
    assert _error_relative_to_max(got, want) <= BF16_TOLERANCE
    # The criterion does catch a kernel that ignores document boundaries.
    unmasked = _loss_and_grads(_attend(config, jnp.ones_like(seg)), q, k, v)
    assert _error_relative_to_max(unmasked, want) > BF16_TOLERANCE


BF16_TOLERANCE = 2.0 ** -6  # About 2-4 bfloat16 ulps (8 significant bits) of the largest value.


def _error_relative_to_max(got, want) -> float:
    """max |got - want| / max |want| over the loss and each gradient: the worst."""
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    pairs = [(loss_g, loss_w)] + list(zip(grads_g, grads_w))
    return max(float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32)))
                     / np.max(np.abs(np.asarray(w, np.float32)))) for g, w in pairs)
