"""Chunked cross entropy equals the plain loss; activation sharding constraints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from matlm.model import ModelConfig
from matlm.model.head import head_logits
from matlm.sharding import activation_sharding, constrain
from matlm.training import mesh as mesh_lib
from matlm.training.objective import chunked_token_losses, token_losses


def _inputs(tie, B=2, T=12, D=16, V=40, seed=0):
    config = ModelConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, d_ff=32,
                         tie_embeddings=tie)
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(V, D) if tie else (D, V)).astype(np.float32)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    weights = rng.uniform(size=(2, B, T)).astype(np.float32)  # Distinct CE / logz cotangents.
    return config, jnp.asarray(table), jnp.asarray(hidden), jnp.asarray(targets), weights


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [0, 4, 5, 12, 64])  # 5: padded last chunk; ≥ T: one pass.
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(tie, chunk):
    config, table, hidden, targets, (w_ce, w_z) = _inputs(tie)

    def objective(losses_fn):
        def f(table, hidden):
            ce, logz = losses_fn(table, hidden)
            return (ce * w_ce).sum() + (jnp.square(logz) * w_z).sum(), (ce, logz)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    plain = objective(lambda t, h: token_losses(head_logits(config, t, h), targets))
    chunked = objective(lambda t, h: chunked_token_losses(config, t, h, targets, chunk))
    (loss_p, (ce_p, z_p)), grads_p = plain(table, hidden)
    (loss_c, (ce_c, z_c)), grads_c = chunked(table, hidden)
    np.testing.assert_allclose(ce_c, ce_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(z_c, z_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_c, loss_p, rtol=1e-5)
    for g_c, g_p in zip(grads_c, grads_p):
        np.testing.assert_allclose(g_c, g_p, rtol=1e-4, atol=1e-5)


def test_chunked_cross_entropy_never_holds_the_whole_logits():
    """The compiled backward pass of a chunked loss needs a fraction of the plain one's
    temporary memory: [B, T, V] float32 logits (and their gradient) are never whole."""
    config, table, hidden, targets, _ = _inputs(True, B=4, T=256, D=32, V=4096)

    def temp_bytes(chunk):
        def f(table, hidden):
            ce, _ = chunked_token_losses(config, table, hidden, targets, chunk)
            return ce.sum()
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(table, hidden).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = 4 * 256 * 4096 * 4
    plain, chunked = temp_bytes(0), temp_bytes(32)
    assert plain >= logits_bytes  # The plain loss does hold them (the test can fail).
    assert chunked < logits_bytes / 2, (plain, chunked)


def test_constrain_pins_activations_by_the_rule_table_only_under_a_mesh():
    mesh = mesh_lib.make_mesh((2, 2, 2))
    x = jnp.ones((8, 4, 16))

    def f(x):
        return constrain(x * 2, ("activation_batch", "activation_length", "activation_mlp"))

    # Constraints are taken at trace time: a fresh function each time, as each
    # make_train_step builds its own (jit caches traces per function).
    f = lambda x, f=f: f(x)  # noqa: E731
    with activation_sharding(mesh):
        out = jax.jit(f)(x)
    f = lambda x, f=f: f(x)  # noqa: E731
    # Batch over data×fsdp, the mlp axis over tensor (the table's activation rules).
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    # Outside the context the constraint is the identity: the jitted result stays on one device.
    assert len(jax.jit(f)(x).sharding.device_set) == 1
    # A dimension the mesh axes do not divide stays replicated rather than failing.
    f = lambda x, f=f: f(x)  # noqa: E731
    with activation_sharding(mesh):
        odd = jax.jit(f)(jnp.ones((8, 4, 3)))
    assert odd.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, None)), 3)


def test_constrain_refuses_a_wrong_number_of_axis_names():
    with activation_sharding(mesh_lib.make_mesh((8, 1, 1))):
        with pytest.raises(ValueError, match="2 logical axes"):
            jax.jit(lambda x: constrain(x, ("activation_batch", "activation_embed")))(
                jnp.ones((8, 2, 2)))
