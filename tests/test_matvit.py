"""MatViT, the "vit" family, against independent references: a dense ViT oracle at every
granularity (sliced and masked widths), bidirectional attention against a naive softmax,
joint and scanned passes, exact counts, bad configs, the registry, gin and `matlm info`."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from matlm.cli.main import main as matlm_main
from matlm.gin_config import model_config_from_gin, parse_gin
from matlm.model import (ModelConfigError, build_model, families, family_of, init_params,
                         logical_axes, param_count)
from matlm.model.attention import attend, make_attention_mask
from matlm.model.counting import (forward_flops_per_image, forward_flops_per_token,
                                  joint_forward_flops_per_image)
from matlm.model.layout import ffn_to_contiguous, stack_layers
from matlm.model.reference import dense_vit_forward, slice_params
from matlm.model.vit import MatViT
from matlm.model.vit_config import ViTConfig
from test_model import _dot_flops  # The jaxpr's own matmul FLOPs (tests/test_model.py).

# 12×12 RGB images in 4×4 patches: 9 patch tokens (+ a class token).
BASE = ViTConfig(image_size=12, patch_size=4, num_channels=3, num_classes=7, d_model=32,
                 n_layers=3, n_heads=4, d_ff=64, activation="gelu")
VARIANTS = {
    "cls_learned_gelu": BASE,
    "gap_sincos_swiglu_gqa": dataclasses.replace(BASE, pooling="gap", position_encoding="sincos",
                                                 activation="swiglu", n_kv_heads=2),
    # Shard-local nesting: 4 blocks, each with its own nested prefix.
    "cls_4_nest_blocks": dataclasses.replace(BASE, ffn_nest_blocks=4),
    "gap_learned_scanned": dataclasses.replace(BASE, pooling="gap", scan_layers=True),
}


def _images(config, B=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (B, *config.image_shape))


@functools.lru_cache(maxsize=None)
def _params(config, seed=0):
    """Initialised parameters moved off their init values: the classifier and class token
    start at zero and the norms at one, which would hide a wrong wiring of either. The
    noise is numpy's (eager jax.random per leaf costs seconds); cached per config."""
    params = init_params(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), params)


def _width_vectors(config):
    spec = config.granularities
    mixed = tuple(spec.widths[i % len(spec.widths)] for i in range(config.n_layers))
    return [spec.uniform(n) for n in spec.names] + [mixed, (24, 8, 64)]


# Scanned layers are held to the unrolled ones (test_scanned_equals_unrolled), every width
# form included; the oracle checks the unrolled variants.
UNROLLED = sorted(name for name, config in VARIANTS.items() if not config.scan_layers)


@pytest.mark.parametrize("name", UNROLLED)
def test_every_width_equals_the_dense_vit_with_sliced_weights(name):
    config = VARIANTS[name]
    params, images = _params(config), _images(config)
    model = MatViT(config)
    # The oracle knows nothing of nesting blocks: reorder units into nesting order first.
    contiguous = ffn_to_contiguous(params, config.ffn_nest_blocks)
    masked = jax.jit(lambda p, x, w: model.apply({"params": p}, x, widths=w))
    full = model.apply({"params": params}, images)
    np.testing.assert_allclose(full, dense_vit_forward(config, contiguous, images),
                               rtol=2e-5, atol=2e-5)
    for widths in _width_vectors(config):
        sliced = slice_params(contiguous, widths)
        want = dense_vit_forward(config, sliced, images)
        got = model.apply({"params": params}, images, widths=widths)
        assert got.shape == (2, config.num_classes) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(widths))
        # Traced widths: the masked path, one compiled function for every vector.
        np.testing.assert_allclose(masked(params, images, jnp.array(widths, jnp.int32)), want,
                                   rtol=2e-5, atol=2e-5, err_msg=str(widths))
        embedding = model.apply({"params": params}, images, widths=widths, return_embedding=True)
        np.testing.assert_allclose(embedding, dense_vit_forward(config, sliced, images, True),
                                   rtol=2e-5, atol=2e-5)
    assert masked._cache_size() == 1


def test_different_widths_give_different_logits_and_embeddings():
    # Guards the oracle test against a model that ignores `widths`.
    params, images = _params(BASE), _images(BASE)
    spec, model = BASE.granularities, MatViT(BASE)
    for out in ("logits", "embedding"):
        s, xl = (model.apply({"params": params}, images, widths=spec.uniform(n),
                             return_embedding=out == "embedding") for n in ("S", "XL"))
        assert float(jnp.max(jnp.abs(s - xl))) > 1e-3, out


def test_bidirectional_attention_equals_a_naive_softmax_over_all_positions():
    config = dataclasses.replace(BASE, n_kv_heads=2, attention_impl="xla")
    B, T, H, K, E = 2, 10, 4, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, n, E))
               for i, n in ((0, H), (1, K), (2, K)))
    mask = make_attention_mask(jnp.ones((B, T), jnp.int32), config, causal=False)
    assert mask.kind == "bidirectional+segments"
    got = attend(q, k, v, mask, config)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    want = np.zeros((B, T, H, E))
    for b in range(B):
        for h in range(H):
            scores = qn[b, :, h] @ kn[b, :, h // (H // K)].T  # Every query, every key.
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            want[b, :, h] = probs @ vn[b, :, h // (H // K)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_class_token_sees_every_patch():
    # Causal attention would hide the later patches from the class token (position 0).
    params, images = _params(BASE), _images(BASE)
    changed = images.at[:, -4:, -4:, :].add(1.0)  # The last patch only.
    model = MatViT(BASE)
    embed = lambda x: model.apply({"params": params}, x, return_embedding=True)
    assert float(jnp.max(jnp.abs(embed(changed) - embed(images)))) > 1e-3


def _joint_vectors(config):
    spec = config.granularities
    s, xl = spec.uniform("S"), spec.uniform("XL")
    return [spec.uniform(n) for n in spec.names] + [(s[0],) + xl[1:], s]


@pytest.mark.parametrize("name", ["cls_learned_gelu", "gap_sincos_swiglu_gqa"])
def test_joint_pass_equals_each_submodel_alone(name):
    config = VARIANTS[name]
    params, images = _params(config), _images(config)
    vectors = _joint_vectors(config)
    model = MatViT(config)
    for out in (False, True):
        joint = model.apply({"params": params}, images, joint_widths=vectors,
                            return_embedding=out)
        assert len(joint) == len(vectors)
        for widths, got in zip(vectors, joint):
            want = model.apply({"params": params}, images, widths=widths, return_embedding=out)
            # Shared FFN hidden units are summed segment by segment: float32 reassociation.
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(widths))


def test_sharded_over_data_fsdp_and_tensor_equals_one_device():
    # The rule table places MatViT's own parameters (patches, class token, positions,
    # classifier) beside the body's; 8 CPU devices as data × fsdp × tensor = 2 × 2 × 2.
    from matlm.sharding import activation_sharding
    from matlm.training.mesh import batch_sharding, make_mesh, param_shardings
    config = VARIANTS["cls_4_nest_blocks"]  # Whole nesting blocks per tensor shard.
    params, images = _params(config), _images(config, B=4)
    mesh = make_mesh((2, 2, 2))
    shardings = param_shardings(logical_axes(config), jax.eval_shape(lambda: params), mesh)
    assert shardings["patch_kernel"].spec == P(None, "fsdp")
    vectors = _joint_vectors(config)
    model = MatViT(config)

    def forward(p, x, w):
        return model.apply({"params": p}, x, widths=w), model.apply(
            {"params": p}, x, joint_widths=vectors)
    widths = jnp.array(vectors[-2], jnp.int32)
    with activation_sharding(mesh):
        got = jax.jit(forward)(jax.device_put(params, shardings),
                               jax.device_put(images, batch_sharding(mesh)), widths)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5),
                 got, forward(params, images, widths))


def test_scanned_equals_unrolled():
    unrolled = dataclasses.replace(BASE, pooling="gap", position_encoding="sincos")
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    params, images = _params(unrolled), _images(unrolled)
    stacked = stack_layers(params)
    mixed = _width_vectors(unrolled)[-2]
    for kwargs in (dict(), dict(widths=mixed), dict(widths=jnp.array(mixed, jnp.int32)),
                   dict(joint_widths=_joint_vectors(unrolled))):
        want = MatViT(unrolled).apply({"params": params}, images, **kwargs)
        got = MatViT(scanned).apply({"params": stacked}, images, **kwargs)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5),
                     got, want)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_counts_match_the_real_parameter_tree_and_executed_matmuls(name):
    config = VARIANTS[name]
    images = _images(config, B=1)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == param_count(config)
    # The jaxpr counts a scan body once: count the unrolled twin (scanned == unrolled is
    # tested above).
    config = dataclasses.replace(config, scan_layers=False)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))  # Traced only.
    for widths in _width_vectors(config)[:4] + [_width_vectors(config)[-1]]:
        # A model *built* at these widths (an extracted one).
        built = dataclasses.replace(config, layer_d_ff=widths)
        shapes = jax.eval_shape(lambda: init_params(built, jax.random.key(0)))
        assert sum(x.size for x in jax.tree.leaves(shapes)) == param_count(config, widths)
        jaxpr = jax.make_jaxpr(lambda p: MatViT(config).apply({"params": p}, images,
                                                              widths=widths))(params)
        assert _dot_flops(jaxpr.jaxpr) == forward_flops_per_image(config, widths)
    vectors = _joint_vectors(config)
    jaxpr = jax.make_jaxpr(lambda p: MatViT(config).apply({"params": p}, images,
                                                          joint_widths=vectors))(params)
    joint = joint_forward_flops_per_image(config, vectors)
    assert _dot_flops(jaxpr.jaxpr) == joint
    assert joint < sum(forward_flops_per_image(config, w) for w in vectors)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=30, patch_size=4),
     "ViTConfig.image_size=30 is not divisible by ViTConfig.patch_size=4"),
    (dict(position_encoding="sincos", d_model=30, n_heads=3), "needs d_model divisible by 4"),
    (dict(pooling="max"), "ViTConfig.pooling must be one of 'cls', 'gap', got 'max'"),
    (dict(position_encoding="rope"), "ViTConfig.position_encoding must be one of 'learned'"),
    (dict(num_classes=0), "ViTConfig.num_classes must be an integer >= 1, got 0"),
    (dict(d_model=30, n_heads=4), "not divisible by n_heads"),  # The body's own checks.
])
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(ModelConfigError, match=message) as info:
        ViTConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_inputs_are_named():
    params = _params(BASE)
    with pytest.raises(ValueError, match=r"images of shape \(2, 16, 16, 3\) for a MatViT of "
                                         r"\[B, 12, 12, 3\] inputs"):
        MatViT(BASE).apply({"params": params}, jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(TypeError, match="counted per image"):
        forward_flops_per_token(BASE, 10)


def test_the_registry_builds_and_round_trips_the_vit_family():
    family = family_of(BASE)
    assert family.name == "vit" and not family.tokens and family.config_class is ViTConfig
    assert isinstance(build_model(BASE), MatViT)
    assert type(BASE.body).__name__ == "BodyConfig" and not hasattr(BASE.body, "image_size")
    d = families.config_to_dict(BASE)
    assert d["family"] == "vit" and families.config_from_dict(d) == (BASE, [])


def test_gin_binds_the_vit_config():
    parse_gin(["configs/models/matvit_tiny.gin"], ["ViTConfig.d_model = 192",
                                                   "ViTConfig.n_heads = 3"])
    config = model_config_from_gin("vit")
    assert type(config) is ViTConfig and (config.d_model, config.n_heads) == (192, 3)
    assert (config.image_size, config.num_channels, config.num_classes) == (28, 1, 10)


@pytest.mark.parametrize("recipe", ["matvit_tiny", "matvit_b16", "matvit_l16"])
def test_info_prints_the_vit_table(recipe, capsys):
    assert matlm_main(["info", f"--gin_file=configs/models/{recipe}.gin"]) == 0
    out = capsys.readouterr().out
    parse_gin([f"configs/models/{recipe}.gin"])
    config = model_config_from_gin("vit")
    assert "│ vit " in out and "fwd FLOPs/image" in out
    assert f"{config.num_tokens} ({config.num_patches} patches + class token)" in out
    for name in config.granularities.names:
        assert f"{param_count(config, config.granularities.uniform(name)):,}" in out
    if recipe == "matvit_b16":  # ViT-B/16's well-known size and cost, less its biases.
        assert 86e6 < param_count(config) < 87e6
        assert forward_flops_per_image(config) == pytest.approx(35.1e9, rel=2e-3)
        assert config.granularities.widths == (384, 768, 1536, 3072)


def test_info_refuses_gin_that_binds_two_families(capsys):
    assert matlm_main(["info", "--gin_file=configs/models/matvit_tiny.gin",
                       "--gin.ModelConfig.d_model=64"]) == 2
    assert "several model families (lm, vit)" in capsys.readouterr().err


def test_the_recipes_remat_and_bfloat16_leave_the_math_alone():
    # The ImageNet recipes train in bfloat16 with remat_policy="minimal".
    config = dataclasses.replace(BASE, n_layers=2)
    params, images = _params(config), _images(config)

    def value_and_grad(**changes):
        model = MatViT(dataclasses.replace(config, **changes))
        loss = lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)
    want = value_and_grad()
    remat = value_and_grad(remat_policy="minimal")  # Recomputes, never changes a value.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), remat, want)
    logits = MatViT(dataclasses.replace(config, compute_dtype="bfloat16")).apply(
        {"params": params}, images)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, MatViT(config).apply({"params": params}, images),
                               rtol=0.05, atol=0.1)
