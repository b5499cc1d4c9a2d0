"""Causal self-attention over packed segments, behind one interface.

`attend(q_BTHE, k_BTKE, v_BTKE, mask, config)` returns softmax(q kᵀ + mask) v, [B, T, H, E],
for queries already scaled by 1/sqrt(E), grouped/multi-query KV heads (K divides H), causal
masking, and packed documents that never see each other (equal `segment_ids`). Three
implementations, chosen by `ModelConfig.attention_impl`:

- "xla": causal query blocks in plain XLA (`ModelConfig.attention_query_block`); the CPU
  path and the oracle that the fused kernels are tested against.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention on NVIDIA GPUs (bfloat16/float16 only). Causal masking is the kernel's own
  (`is_causal`, skips the upper triangle); packed segments go in as a boolean [B, 1, T, T]
  `mask`, which jax turns into an additive bias.
- "splash": Pallas splash attention on TPU (`make_splash_mha`, `CausalMask` + `SegmentIds`),
  per example (vmapped over the batch), GQA native. Under a mesh (`jax.set_mesh`) it runs
  inside `shard_map`: batch over (data, fsdp), heads over tensor, as the rule table says.
- "auto": splash on TPU, cuDNN on GPU (when the compute dtype is bfloat16), else xla.

The platform is the one the computation is *compiled for*: the mesh set with
`jax.set_mesh` when there is one (a TPU topology compiled ahead of time on a CPU host
resolves "auto" to splash), else `jax.default_backend()`. A fused kernel asked for on a
platform without it raises `ModelConfigError` at trace time, before XLA sees it.

The mask is built once per forward by `make_attention_mask` and handed to every layer as
an opaque pytree (`AttentionMask`), so scanned and unrolled layer stacks pass it alike.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from matlm.model.config import ATTENTION_IMPLS, ModelConfig, ModelConfigError

# Splash attention tiles: the kernel walks [block, block] tiles of the score matrix and
# skips those the causal/segment mask empties. 512 is MaxText's default on v5e/v5p.
SPLASH_BLOCK = 512
_LANES = 128  # A splash tile must span whole 128-lane vregs.
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query may see, shared by every layer of one forward pass.

    `segment_ids_BT`: packed-document ids (a query sees keys of its own id at or before
    its position). `bias_BTT`: the additive [B, T, T] mask of the xla path, built once per
    forward rather than per layer (None for the fused kernels, which never materialise it).
    """

    segment_ids_BT: jax.Array
    bias_BTT: Optional[jax.Array] = None


def target_platform() -> str:
    """The platform the current trace compiles for: the set mesh's, else the default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_impl(config: ModelConfig, platform: str | None = None,
                 seq_len: int | None = None) -> str:
    """The concrete implementation ("xla" | "cudnn" | "splash") of `config.attention_impl`
    on `platform` (default: `target_platform()`); a fused kernel asked for on a platform
    that lacks it is a ModelConfigError that says what to set instead."""
    impl = config.attention_impl
    platform = platform or target_platform()
    if impl not in ATTENTION_IMPLS:  # ModelConfig validates too; this guards replace().
        raise ModelConfigError(f"unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")
    if impl == "auto":
        if platform == "tpu":
            # Splash tiles the sequence in 128-lane multiples; a length it cannot tile (a
            # tiny test config) falls back to the XLA path rather than failing.
            return "splash" if seq_len is None or splash_tiles(seq_len) else "xla"
        if platform in _GPU_PLATFORMS and config.compute_dtype == "bfloat16":
            return "cudnn"
        return "xla"  # CPU, or float32 on GPU (cuDNN's fused kernels need 16-bit inputs).
    if impl == "splash" and platform != "tpu":
        raise ModelConfigError(
            f"attention_impl='splash' is a Pallas TPU kernel but this computation is for "
            f"{platform!r}; use attention_impl='auto' (or 'xla'), or compile for a TPU "
            "(a TPU device mesh set with jax.set_mesh)")
    if impl == "cudnn" and platform not in _GPU_PLATFORMS:
        raise ModelConfigError(
            f"attention_impl='cudnn' needs an NVIDIA GPU but this computation is for "
            f"{platform!r}; use attention_impl='auto' (or 'xla')")
    return impl


def attention_bias(segment_ids_BT):
    """Additive mask, 0 where a query may attend and -1e30 elsewhere: causal and
    block-diagonal by segment (packed documents never see each other)."""
    T = segment_ids_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_doc_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return jnp.where(causal_TT[None] & same_doc_BTT, 0.0, -1e30).astype(jnp.float32)


def make_attention_mask(segment_ids_BT, config: ModelConfig) -> AttentionMask:
    """The mask for one forward pass; only the xla path builds the [B, T, T] bias."""
    impl = resolve_impl(config, seq_len=segment_ids_BT.shape[1])
    if impl == "splash":
        check_splash_seq_len(segment_ids_BT.shape[1])
    bias_BTT = attention_bias(segment_ids_BT) if impl == "xla" else None
    return AttentionMask(segment_ids_BT=segment_ids_BT, bias_BTT=bias_BTT)


def attend(q_BTHE, k_BTKE, v_BTKE, mask: AttentionMask, config: ModelConfig):
    """softmax(q kᵀ + mask) v with q pre-scaled; [B, T, H, E] in q's dtype."""
    impl = resolve_impl(config, seq_len=q_BTHE.shape[1])
    if impl == "cudnn":
        return cudnn_attention(q_BTHE, k_BTKE, v_BTKE, mask.segment_ids_BT)
    if impl == "splash":
        return splash_attention(q_BTHE, k_BTKE, v_BTKE, mask.segment_ids_BT)
    bias_BTT = mask.bias_BTT if mask.bias_BTT is not None else attention_bias(mask.segment_ids_BT)
    return xla_attention(q_BTHE, k_BTKE, v_BTKE, bias_BTT, config.attention_blocks(q_BTHE.shape[1]))


# --- xla: blocked causal attention (CPU path and test oracle) -----------------------------

def _softmax_mix(q_BHTE, k_BHSE, v_BHSE, bias_BTS, dtype):
    """softmax(q kᵀ + bias) v for one query block, in float32 where it matters.

    The normalisation is deferred past the mixing matmul: dividing the [T, E] output
    instead of the [T, S] probabilities saves a pass over the largest tensor. The row
    max only stabilises exp() and cancels out, so it carries no gradient.
    """
    scores_BHTS = jnp.einsum("bhte,bhse->bhts", q_BHTE, k_BHSE).astype(jnp.float32)
    scores_BHTS = scores_BHTS + bias_BTS[:, None]
    max_BHT1 = jax.lax.stop_gradient(scores_BHTS.max(axis=-1, keepdims=True))
    unnorm_BHTS = jnp.exp(scores_BHTS - max_BHT1)
    denom_BHT1 = unnorm_BHTS.sum(axis=-1, keepdims=True)
    out_BHTE = jnp.einsum("bhts,bhse->bhte", unnorm_BHTS.astype(dtype), v_BHSE)
    return (out_BHTE.astype(jnp.float32) / denom_BHT1).astype(dtype)


def xla_attention(q_BTHE, k_BTKE, v_BTKE, bias_BTT, blocks):
    """Causal attention in query blocks [start, end), each against keys [0, end) only, so
    the masked upper triangle is skipped block by block (static slices, unrolled)."""
    H, K = q_BTHE.shape[2], k_BTKE.shape[2]
    # Grouped KV heads are repeated to the query heads: on CPU the 4-D layout's
    # backward pass is ~2× faster than a 5-D grouped einsum (benchmark_model.py).
    k_BTHE = jnp.repeat(k_BTKE, H // K, axis=2) if K != H else k_BTKE
    v_BTHE = jnp.repeat(v_BTKE, H // K, axis=2) if K != H else v_BTKE
    # Heads-major layout for the score and mixing matmuls: on CPU the forward pass is
    # ~2.5× faster than contracting in the [B, T, H, E] layout (benchmark_train.py).
    q_BHTE, k_BHTE, v_BHTE = (a.transpose(0, 2, 1, 3) for a in (q_BTHE, k_BTHE, v_BTHE))
    out_blocks = [_softmax_mix(q_BHTE[:, :, start:end], k_BHTE[:, :, :end],
                               v_BHTE[:, :, :end], bias_BTT[:, start:end, :end], q_BTHE.dtype)
                  for start, end in blocks]
    out_BHTE = out_blocks[0] if len(out_blocks) == 1 else jnp.concatenate(out_blocks, axis=2)
    return out_BHTE.transpose(0, 2, 1, 3)


# --- cudnn: jax.nn.dot_product_attention's fused kernel on NVIDIA GPUs ----------------------

def cudnn_attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT):
    """cuDNN flash attention: causal by the kernel, packed segments as a boolean mask.

    The mask is [B, 1, T, T] (broadcast over heads), not per-head scores: the flash
    kernel still never holds the [B, H, T, T] scores. GQA is native (K divides H).
    """
    if q_BTHE.dtype not in (jnp.bfloat16, jnp.float16):
        raise ModelConfigError(
            f"attention_impl='cudnn' needs bfloat16/float16 inputs, got {q_BTHE.dtype}; set "
            "ModelConfig.compute_dtype='bfloat16' or attention_impl='xla'")
    E = q_BTHE.shape[-1]
    if E % 8 or E > 256:
        raise ModelConfigError(
            f"attention_impl='cudnn' needs a head dim that is a multiple of 8 and at most 256 "
            f"(128 before Hopper), got {E}; change head_dim or use attention_impl='xla'")
    same_doc_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, mask=same_doc_B1TT,
                                        scale=1.0, is_causal=True, implementation="cudnn")


# --- splash: Pallas TPU splash attention ----------------------------------------------------

def splash_tiles(T: int, block: int = SPLASH_BLOCK) -> bool:
    """Whether splash can tile a sequence of length T (see check_splash_seq_len)."""
    tile = min(block, T)
    return T % tile == 0 and tile % _LANES == 0


def check_splash_seq_len(T: int, block: int = SPLASH_BLOCK) -> int:
    """The splash tile for length T: min(block, T), which must divide T and be a multiple
    of 128 lanes; a clear error otherwise (the kernel's own is an opaque assert)."""
    tile = min(block, T)
    if not splash_tiles(T, block):
        raise ModelConfigError(
            f"attention_impl='splash' tiles the sequence in blocks of {tile} (min({block}, "
            f"T)), which must divide the sequence length T={T} and be a multiple of "
            f"{_LANES}; use a sequence length that is a multiple of {min(block, max(_LANES, T))} "
            "or attention_impl='xla'")
    return tile


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, T: int, tile: int, interpret: bool):
    """One kernel per (heads, length, tile): its mask tables are built in numpy at trace
    time, so caching keeps them out of every layer's trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    mask = splash.MultiHeadMask([splash.CausalMask((T, T)) for _ in range(num_heads)])
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                              block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                              block_q_dq=tile, block_kv_dq=tile)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash_local(q_BHTE, k_BKTE, v_BKTE, segment_ids_BT, *, tile, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    kernel = _splash_kernel(q_BHTE.shape[1], q_BHTE.shape[2], tile, interpret)

    def one(q_HTE, k_KTE, v_KTE, seg_T):
        return kernel(q_HTE, k_KTE, v_KTE, segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T))
    return jax.vmap(one)(q_BHTE, k_BKTE, v_BKTE, segment_ids_BT)


def _mesh_axes(mesh, names, size):
    """The mesh axes among `names` (present, >1) whose product divides `size`, else none."""
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def splash_attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, *, block: int = SPLASH_BLOCK,
                     interpret: bool = False):
    """Splash attention in the [B, T, H, E] interface. `interpret=True` runs the Pallas
    kernel in interpret mode (any platform, slow: tests)."""
    B, T, H, E = q_BTHE.shape
    tile = check_splash_seq_len(T, block)
    K = k_BTKE.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    from matlm.sharding import DEFAULT_RULES
    rules = dict(DEFAULT_RULES)
    as_tuple = lambda a: (a,) if isinstance(a, str) else tuple(a or ())
    batch_axes = _mesh_axes(mesh, as_tuple(rules.get("batch")), B) if not mesh.empty else ()
    head_axes = _mesh_axes(mesh, as_tuple(rules.get("heads")), H) if not mesh.empty else ()
    if head_axes and K % math.prod(mesh.shape[a] for a in head_axes):
        # Heads sharded but too few KV heads to split alike (e.g. MQA over 4 shards): give
        # each query head its own KV head, so every shard holds the KV heads it reads.
        k_BTKE, v_BTKE = (jnp.repeat(a, H // K, axis=2) for a in (k_BTKE, v_BTKE))
    # The kernel's layout is heads-major, [H, T, E] per example.
    q_BHTE, k_BKTE, v_BKTE = (a.transpose(0, 2, 1, 3) for a in (q_BTHE, k_BTKE, v_BTKE))
    local = functools.partial(_splash_local, tile=tile, interpret=interpret)
    if batch_axes or head_axes:
        # A Pallas call is opaque to XLA's SPMD partitioner (it would gather its inputs):
        # run it per shard. Attention never mixes batch rows or heads, so no collectives.
        P = jax.sharding.PartitionSpec
        b, h = batch_axes or None, head_axes or None
        local = jax.shard_map(local, mesh=mesh,
                              in_specs=(P(b, h), P(b, h), P(b, h), P(b)),
                              out_specs=P(b, h), check_vma=False)
    out_BHTE = local(q_BHTE, k_BKTE, v_BKTE, segment_ids_BT.astype(jnp.int32))
    return out_BHTE.transpose(0, 2, 1, 3).astype(q_BTHE.dtype)
