"""Building blocks of the shared nested-Transformer body: RMSNorm, RoPE, attention, the
nested FFN, the pre-norm block (every family's; matlm.model.nested_stack runs L of them).

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`kv`, `mlp`, `norm`); `matlm.sharding` maps them to mesh axes. Array names carry
their shapes: B batch, T length, D d_model, H query heads, K kv heads, G = H/K,
E head dim, F FFN width.
"""
from __future__ import annotations

from typing import Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matlm.model.config import BodyConfig
from matlm.sharding import constrain
# Re-exported: attention_bias and cached_attention lived here before the attention interface.
from matlm.model.attention import (AttentionMask, attend, attention_bias,  # noqa: F401
                                   cached_attention)

# A static width (python int → slice, no FLOPs on unused units) or a traced scalar
# (mask → one compiled function serves any width).
Width = Union[int, jax.Array]


def _param(module: nn.Module, name: str, shape, axes, init):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _dense_init(fan_in: int):
    return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)  # Normalise in fp32 whatever the compute dtype.
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(x.dtype)


def rope_tables(positions_BT, head_size: int, theta: float, table_len: int | None = None):
    """(sin, cos) of the rotary angles, [B, T, 1, E/2] each, looked up per token.

    Positions are offsets within a packed segment, so they are < T (a larger one reads
    NaN, jnp.take's fill mode, never a wrong angle); cached decoding, whose few new
    tokens sit at absolute positions up to the cache length, passes `table_len`. The
    table over [0, table_len or T) is
    computed in numpy at trace time and embedded as a constant: computed
    under jit, XLA fuses sin/cos into every consumer and recomputes them per head,
    per layer and again in the backward pass (on CPU, costlier than the rotation).
    """
    half = head_size // 2
    T = table_len or positions_BT.shape[1]
    freq_F = theta ** (-np.arange(half, dtype=np.float64) / half)
    angle_PF = np.arange(T, dtype=np.float64)[:, None] * freq_F
    sin_BTF = jnp.take(jnp.asarray(np.sin(angle_PF), jnp.float32), positions_BT, axis=0)
    cos_BTF = jnp.take(jnp.asarray(np.cos(angle_PF), jnp.float32), positions_BT, axis=0)
    return sin_BTF[:, :, None, :], cos_BTF[:, :, None, :]


def apply_rope(x_BTNE, tables):
    """Rotary embeddings on the two halves of the head dimension (GPT-NeoX layout)."""
    sin, cos = tables
    x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNE.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped / multi-query KV heads and RoPE (when `rope`
    tables are given); the score/mix core is `matlm.model.attention.attend` (the kernel
    that `ModelConfig.attention_impl` picks). `mask` (an AttentionMask) says which keys
    each query sees: causal or not is its business, not this layer's."""

    config: BodyConfig  # The body part (ModelConfig.body): no family fields here.

    @nn.compact
    def __call__(self, x_BTD, rope, mask: AttentionMask, cache=None):
        """Attention output [B, T, D]. With `cache = (k_BSKE, v_BSKE, positions_BT)` (cached
        decoding, matlm.decoding.kv_cache) the T new tokens' keys and values are written
        at `positions_BT` (writes at positions >= S are dropped), the queries attend over
        all S cache positions under `mask` (attention.decode_mask), and the result is
        (output, (k_BSKE, v_BSKE) updated)."""
        cfg = self.config
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_size
        dtype = jnp.dtype(cfg.compute_dtype)
        wq = _param(self, "wq", (D, H, E), ("embed", "heads", "kv"), _dense_init(D))
        wk = _param(self, "wk", (D, K, E), ("embed", "kv_heads", "kv"), _dense_init(D))
        wv = _param(self, "wv", (D, K, E), ("embed", "kv_heads", "kv"), _dense_init(D))
        wo = _param(self, "wo", (H, E, D), ("heads", "kv", "embed"), _dense_init(H * E))
        x_BTD = x_BTD.astype(dtype)
        B, T = x_BTD.shape[:2]
        # Projections as plain 2-D matmuls over flattened tokens (see NestedFFN: XLA:CPU's
        # backward pass is much faster than for multi-axis einsums).
        x_ND = x_BTD.reshape(B * T, D)
        project = lambda w, n: (x_ND @ w.reshape(D, n * E).astype(dtype)).reshape(B, T, n, E)
        q_BTHE, k_BTKE, v_BTKE = project(wq, H), project(wk, K), project(wv, K)
        # The 1/sqrt(E) scale rides on q (fused into RoPE) rather than on the [T, S] scores.
        # `rope` is None when positions enter otherwise (ModelConfig.position_encoding).
        if rope is not None:
            q_BTHE, k_BTKE = apply_rope(q_BTHE, rope), apply_rope(k_BTKE, rope)
        q_BTHE = q_BTHE * jnp.asarray(E ** -0.5, dtype)
        if cache is not None:
            k_BSKE, v_BSKE, positions_BT = cache
            rows_B1 = jnp.arange(B)[:, None]
            # A scatter, not dynamic_update_slice: each row writes at its own offset, and a
            # write past S is dropped instead of being clamped onto valid positions.
            k_BTKE = k_BSKE = k_BSKE.at[rows_B1, positions_BT].set(
                k_BTKE.astype(k_BSKE.dtype), mode="drop")
            v_BTKE = v_BSKE = v_BSKE.at[rows_B1, positions_BT].set(
                v_BTKE.astype(v_BSKE.dtype), mode="drop")
        out_BTHE = attend(q_BTHE, k_BTKE, v_BTKE, mask, cfg)  # matlm.model.attention
        out_BTD = (out_BTHE.reshape(B * T, H * E) @ wo.reshape(H * E, D).astype(dtype)
                   ).reshape(B, T, D)
        return out_BTD if cache is None else (out_BTD, (k_BSKE, v_BSKE))


def activate(name: str, gate, up=None):
    if name == "gelu":
        return nn.gelu(gate)
    if name == "relu":
        return nn.relu(gate)
    if name == "geglu":
        return nn.gelu(gate) * up
    if name == "swiglu":
        return nn.silu(gate) * up
    raise ValueError(f"unknown activation {name!r}")


class NestedFFN(nn.Module):
    """The MatFormer FFN: `act(x @ wi[:, :m]) @ wo[:m, :]` for a width m ≤ d_ff.

    Full kernels are stored once. A static `width` slices them (start 0, static size),
    so unused units cost no FLOPs; a traced `width` zeroes units ≥ width with a mask
    (full FLOPs, identical result) so that one compiled function serves any width.
    In a gated FFN the gate and up projections nest together.
    """

    config: BodyConfig  # The body part (ModelConfig.body): no family fields here.
    d_ff: int  # Stored width of this layer's kernels.

    @nn.compact
    def __call__(self, x_BTD, width: Width | None = None,
                 prefix_widths: tuple[int, ...] | None = None):
        """The FFN at `width`; or, given ascending static `prefix_widths`, a tuple with
        its output at each of them, sharing the hidden units they have in common
        (matlm.model.streams)."""
        cfg = self.config
        D, F = cfg.d_model, self.d_ff
        dtype = jnp.dtype(cfg.compute_dtype)
        names = ("wi_gate", "wi_up") if cfg.gated else ("wi",)
        wi = [_param(self, n, (D, F), ("embed", "mlp"), _dense_init(D)) for n in names]
        wo = _param(self, "wo", (F, D), ("mlp", "embed"), _dense_init(F))
        N = cfg.ffn_nest_blocks

        def units(w, axis, start, stop):
            """Units [start, stop) of the nesting order: the same range of each of the N
            blocks (N = 1: a plain slice)."""
            blocks = w.reshape(w.shape[:axis] + (N, F // N) + w.shape[axis + 1:])
            kept = jax.lax.slice_in_dim(blocks, start // N, stop // N, axis=axis + 1)
            return kept.reshape(w.shape[:axis] + (stop - start,) + w.shape[axis + 1:])

        # 2-D matmuls over flattened tokens: with a 3-D einsum, XLA:CPU computes the kernel
        # gradients by physically transposing the [B, T, F] activations first (slow).
        B, T = x_BTD.shape[:2]
        x_ND = x_BTD.astype(dtype).reshape(B * T, D)

        def ffn(wi, wo):
            # Hidden units over tensor, tokens over the batch shards (matlm.sharding).
            pre_NF = [constrain(x_ND @ w.astype(dtype), ("activation_batch", "activation_mlp"))
                      for w in wi]
            return activate(cfg.activation, *pre_NF) @ wo.astype(dtype)

        if prefix_widths is None and not (width is None or isinstance(width, int)):
            # Masking wo's rows equals masking the hidden units ((h·m) @ wo = h @ (m·wo))
            # and zeroes the gradients of unused units in wi and wo alike, but touches
            # d_ff × d_model weights instead of tokens × d_ff activations.
            mask_F = (jnp.arange(F) % (F // N)) < width // N
            return ffn(wi, jnp.where(mask_F[:, None], wo, 0)).reshape(B, T, D)
        # Static widths: each of the N blocks keeps its first width/N units (N = 1: a plain
        # prefix). Segment [start, stop) adds units start..stop-1, out(stop) = out(start) +
        # its contribution, so several widths cost what the widest alone does.
        outputs, out_ND, start = [], None, 0
        for stop in prefix_widths or (F if width is None else width,):
            part_ND = ffn([units(w, 1, start, stop) for w in wi], units(wo, 0, start, stop))
            out_ND = part_ND if out_ND is None else out_ND + part_ND
            outputs.append(out_ND.reshape(B, T, D))
            start = stop
        return tuple(outputs) if prefix_widths is not None else outputs[0]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + ffn(norm(x)).

    With `stream_widths` it runs shared residual streams (matlm.model.streams): the input
    is a tuple of streams, stream s is wanted at the ascending widths stream_widths[s],
    and the output is a tuple with, per stream, one output per width.
    """

    config: BodyConfig  # The body part (ModelConfig.body): no family fields here.
    d_ff: int
    static_width: int | None = None  # Static FFN width for the slicing path.
    stream_widths: tuple[tuple[int, ...], ...] | None = None

    @nn.compact
    def __call__(self, x_BTD, rope, mask, traced_width=None, cache=None):
        """The block's output; with a layer's `cache` (see Attention), (output, updated
        (k_BSKE, v_BSKE))."""
        cfg = self.config
        attn_norm, ffn_norm = (RMSNorm(cfg.norm_eps, name=n) for n in ("attn_norm", "ffn_norm"))
        attention, ffn = Attention(cfg, name="attn"), NestedFFN(cfg, self.d_ff, name="ffn")

        def residual(x):
            # The residual stream: rows over the batch shards, d_model whole on each.
            return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        def attend(x):
            return residual(x + attention(attn_norm(x), rope, mask).astype(x.dtype))

        if self.stream_widths is not None:
            outputs = []
            for x, widths in zip(x_BTD, self.stream_widths, strict=True):
                x = attend(x)
                outs = ffn(ffn_norm(x), prefix_widths=widths)
                outputs.append(tuple(residual(x + out.astype(x.dtype)) for out in outs))
            return tuple(outputs)
        new_cache = None
        if cache is None:
            x_BTD = attend(x_BTD)
        else:
            out_BTD, new_cache = attention(attn_norm(x_BTD), rope, mask, cache)
            x_BTD = residual(x_BTD + out_BTD.astype(x_BTD.dtype))
        width = self.static_width if traced_width is None else traced_width
        x_BTD = residual(x_BTD + ffn(ffn_norm(x_BTD), width).astype(x_BTD.dtype))
        return x_BTD if cache is None else (x_BTD, new_cache)
