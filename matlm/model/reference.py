"""Plain dense models in pure `jax.numpy`, independent of the Flax modules: a decoder
(`dense_forward`, MatLM's oracle) and a ViT encoder (`dense_vit_forward`, MatViT's).

Each takes a parameter tree shaped like its model's (either layer form: stacked layers are
unstacked first) but with each FFN kernel already cut to
that layer's width, and runs no slicing and no masking. Tests use it as the oracle
("a dense model with sliced weights"); benchmarks use it as the dense baseline.
It is written differently on purpose (repeated KV heads, rotate-half RoPE, one
matmul per head group; a convolution for the ViT's patches, positions
from explicit loops) so that a bug in the model is unlikely to be copied here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from matlm.model.config import ModelConfig
from matlm.model.layout import unstack_layers


def slice_params(params, widths):
    """Cuts every layer's FFN kernels to their first `widths[i]` hidden units (the result
    is unrolled: sliced layers differ in width)."""
    params = unstack_layers(params)
    out = dict(params)  # Only the FFN entries are replaced below.
    for i, m in enumerate(widths):
        ffn = dict(out[f"layer_{i}"]["ffn"])
        for name in ffn:
            ffn[name] = ffn[name][:m] if name == "wo" else ffn[name][:, :m]
        out[f"layer_{i}"] = {**out[f"layer_{i}"], "ffn": ffn}
    return out


def _rms(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):
    # x: [B, T, N, E]; rotate-half formulation with duplicated frequencies.
    E = x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, E, 2, dtype=jnp.float32) / E)
    ang = pos[..., None].astype(jnp.float32) * jnp.concatenate([inv, inv])
    rotated = jnp.concatenate([-x[..., E // 2:], x[..., : E // 2]], axis=-1)
    return x * jnp.cos(ang)[:, :, None] + rotated * jnp.sin(ang)[:, :, None]


def _act(name, x, gate_params, h):
    if name in ("geglu", "swiglu"):
        g = h @ gate_params["wi_gate"]
        u = h @ gate_params["wi_up"]
        return (jax.nn.silu(g) if name == "swiglu" else jax.nn.gelu(g)) * u
    z = h @ gate_params["wi"]
    return jax.nn.gelu(z) if name == "gelu" else jax.nn.relu(z)


def _dense_block(config, p, x, allowed, rope_positions=None):
    """One pre-norm block: attention where `allowed` [B, T, T] says (RoPE at
    `rope_positions` when given), then the FFN at its kernels' width."""
    B, T = x.shape[:2]
    H, K, E = config.n_heads, config.num_kv_heads, config.head_size
    h = _rms(x, p["attn_norm"]["scale"], config.norm_eps)
    q = (h @ p["attn"]["wq"].reshape(config.d_model, H * E)).reshape(B, T, H, E)
    k = (h @ p["attn"]["wk"].reshape(config.d_model, K * E)).reshape(B, T, K, E)
    v = (h @ p["attn"]["wv"].reshape(config.d_model, K * E)).reshape(B, T, K, E)
    if rope_positions is not None:
        q, k = (_rope(a, rope_positions, config.rope_theta) for a in (q, k))
    k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(E)
    scores = jnp.where(allowed[:, None], scores, -1e30)
    mixed = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), v)
    x = x + mixed.reshape(B, T, H * E) @ p["attn"]["wo"].reshape(H * E, config.d_model)
    h = _rms(x, p["ffn_norm"]["scale"], config.norm_eps)
    return x + _act(config.activation, x, p["ffn"], h) @ p["ffn"]["wo"]


def dense_forward(config: ModelConfig, params, tokens, segment_ids=None, positions=None):
    """Float32 logits of the dense model whose FFN widths are the kernels' widths."""
    B, T = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    if positions is None:
        positions = jnp.tile(jnp.arange(T), (B, 1))
    params = unstack_layers(params)
    emb = params["embedding"]
    x = emb[tokens]
    if config.position_encoding == "learned":
        x = x + params["position_embedding"][positions]
    allowed = (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])[None] & (
        segment_ids[:, :, None] == segment_ids[:, None, :])
    rope = positions if config.position_encoding == "rope" else None
    for i in range(config.n_layers):
        x = _dense_block(config, params[f"layer_{i}"], x, allowed, rope)
    x = _rms(x, params["final_norm"]["scale"], config.norm_eps)
    if config.tie_embeddings:
        return x @ emb.T / jnp.sqrt(config.d_model)
    return x @ params["unembedding"]


def _sincos_2d(grid: int, d_model: int) -> np.ndarray:
    """[grid², D] MAE-style 2-D sin/cos features, built entry by entry (a different
    construction from the model's vectorised one)."""
    quarter = d_model // 4
    table = np.zeros((grid * grid, d_model))
    for row in range(grid):
        for col in range(grid):
            for f in range(quarter):
                omega = 10_000.0 ** (-f / quarter)
                for offset, coord in ((0, row), (2 * quarter, col)):
                    table[row * grid + col, offset + f] = np.sin(coord * omega)
                    table[row * grid + col, offset + quarter + f] = np.cos(coord * omega)
    return table


def dense_vit_forward(config, params, images, return_embedding: bool = False):
    """Float32 class logits [B, classes] (or the pooled embedding [B, D]) of the dense
    ViT whose FFN widths are the kernels' widths (`config` a ViTConfig). Patches by a
    stride-P convolution; every token attends to every token."""
    params = unstack_layers(params)
    P, C, D = config.patch_size, config.num_channels, config.d_model
    kernel = params["patch_kernel"].reshape(P, P, C, D)  # Row-major (row, column, channel).
    x = jax.lax.conv_general_dilated(images, kernel, (P, P), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    B = x.shape[0]
    x = x.reshape(B, -1, D) + params["patch_bias"]
    if config.position_encoding == "sincos":
        x = x + _sincos_2d(config.grid_size, D).astype(np.float32)
    if config.pooling == "cls":
        x = jnp.concatenate([jnp.tile(params["cls_token"], (B, 1, 1)), x], axis=1)
    if config.position_encoding == "learned":
        x = x + params["position_embedding"]
    T = x.shape[1]
    everyone = jnp.ones((B, T, T), bool)
    for i in range(config.n_layers):
        x = _dense_block(config, params[f"layer_{i}"], x, everyone)
    x = _rms(x, params["final_norm"]["scale"], config.norm_eps)
    embedding = x[:, 0] if config.pooling == "cls" else x.mean(axis=1)
    if return_embedding:
        return embedding
    return embedding @ params["head_kernel"] + params["head_bias"]
