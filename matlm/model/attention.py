"""Self-attention behind one interface, for every kernel and for cached decoding.

`attend(q_BTHE, k_BSKE, v_BSKE, mask, config)` returns softmax(q kᵀ + mask) v, [B, T, H, E],
for queries already scaled by 1/sqrt(E) and grouped/multi-query KV heads (K divides H).
*Which* keys a query may see is the mask's business alone (`AttentionMask`, the one
definition of causality in the model):
- `causal=True` (a decoder) or False (bidirectional: an encoder);
- `segment_ids_BT`: packed documents never see each other (equal ids only); padding is a
  segment of its own (id 0), so real tokens never see it and it never sees them;
- `query_positions_BT` (cached decoding): T new queries at these absolute positions over
  S cached keys; a causal query sees cache positions up to its own, so keys past a row's
  length (stale or never written) stay hidden.
The kernels only translate the mask into their own form. Implementations, chosen by
`ModelConfig.attention_impl`:

- "xla": query blocks in plain XLA (`ModelConfig.attention_query_block`; causal blocks
  skip the upper triangle); the CPU path and the oracle that the fused kernels are tested
  against. Cached decoding always runs here (grouped heads, no repeated cache).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention on NVIDIA GPUs (bfloat16/float16 only). Causal masking is the kernel's own
  (`is_causal`, skips the upper triangle); packed segments go in as a boolean [B, 1, T, T]
  `mask`, which jax turns into an additive bias.
- "splash": Pallas splash attention on TPU (`make_splash_mha`, `CausalMask` or `FullMask`
  + `SegmentIds`), per example (vmapped over the batch), GQA native. Under a mesh it runs
  inside `shard_map`: batch and heads over the mesh axes that the sharding rules in force
  (`matlm.sharding.activation_sharding`, else the default table) give them.
- "auto": splash on TPU, cuDNN on GPU (when the compute dtype is bfloat16), else xla.

The platform is the one the computation is *compiled for*: the mesh set with
`jax.set_mesh` when there is one (a TPU topology compiled ahead of time on a CPU host
resolves "auto" to splash), else `jax.default_backend()`. A fused kernel asked for on a
platform without it raises `ModelConfigError` at trace time, before XLA sees it.

The mask is built once per forward (`make_attention_mask`, `decode_mask`) and handed to
every layer as an opaque pytree, so scanned and unrolled layer stacks pass it alike.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from matlm.model.config import ATTENTION_IMPLS, BodyConfig, ModelConfigError
from matlm.sharding import current_rules

# Splash attention tiles: the kernel walks [block, block] tiles of the score matrix and
# skips those the causal/segment mask empties. 512 is MaxText's default on v5e/v5p.
SPLASH_BLOCK = 512
_LANES = 128  # A splash tile must span whole 128-lane vregs.
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query may see, shared by every layer of one forward pass (the
    module docstring lists the kinds). `bias_BTS`: the additive [B, T, S] form of the
    xla path, built once per forward rather than per layer (None for the fused kernels,
    which never materialise it)."""

    segment_ids_BT: Optional[jax.Array] = None
    bias_BTS: Optional[jax.Array] = None
    query_positions_BT: Optional[jax.Array] = None
    causal: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def kind(self) -> str:
        """"causal" or "bidirectional", "+segments" with packed segments (and padding),
        "+cache" for queries over a KV cache."""
        return ("causal" if self.causal else "bidirectional") + (
            "+segments" if self.segment_ids_BT is not None else "") + (
            "+cache" if self.query_positions_BT is not None else "")

    def allowed_BTS(self, T: int, S: int) -> jax.Array:
        """Boolean [B or 1, T, S]: query t may see key s. Queries sit at positions
        0..T-1 (keys are the same tokens), or at `query_positions_BT` over S cache slots."""
        if self.query_positions_BT is not None:
            query_pos_BT = self.query_positions_BT
        else:
            query_pos_BT = jnp.arange(T)[None]
        if self.causal:  # The model's one definition of causal: keys at or before the query.
            allowed_BTS = jnp.arange(S)[None, None, :] <= query_pos_BT[:, :, None]
        else:
            allowed_BTS = jnp.ones((1, T, S), bool)
        if self.segment_ids_BT is not None:
            if T != S:
                raise ValueError("segment ids mask T queries against the same T keys; a "
                                 f"KV cache of {S} positions has none")
            seg_BT = self.segment_ids_BT
            allowed_BTS = allowed_BTS & (seg_BT[:, :, None] == seg_BT[:, None, :])
        return allowed_BTS

    def bias(self, T: int, S: int) -> jax.Array:
        """The additive form: 0 where a query may attend and -1e30 elsewhere, float32."""
        if self.bias_BTS is not None:
            return self.bias_BTS
        return jnp.where(self.allowed_BTS(T, S), 0.0, -1e30).astype(jnp.float32)


def target_platform() -> str:
    """The platform the current trace compiles for: the set mesh's, else the default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve_impl(config: BodyConfig, platform: str | None = None,
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


def attention_bias(segment_ids_BT, causal: bool = True):
    """Additive [B, T, T] mask of packed segments (causal by default): 0 where a query may
    attend and -1e30 elsewhere (AttentionMask.bias)."""
    T = segment_ids_BT.shape[1]
    return AttentionMask(segment_ids_BT, causal=causal).bias(T, T)


def make_attention_mask(segment_ids_BT, config: BodyConfig, causal: bool = True
                        ) -> AttentionMask:
    """The mask of one forward pass over packed segments; only the xla path builds the
    [B, T, T] bias."""
    T = segment_ids_BT.shape[1]
    impl = resolve_impl(config, seq_len=T)
    if impl == "splash":
        check_splash_seq_len(T)
    mask = AttentionMask(segment_ids_BT=segment_ids_BT, causal=causal)
    return mask.replace(bias_BTS=mask.bias(T, T)) if impl == "xla" else mask


def decode_mask(query_positions_BT, cache_len: int) -> AttentionMask:
    """The causal mask of T new tokens at `query_positions_BT` over a KV cache of
    `cache_len` positions: each sees its row's positions up to its own. Positions past a
    row's length hold stale entries (rewound or never written) and stay masked until
    overwritten."""
    mask = AttentionMask(query_positions_BT=query_positions_BT, causal=True)
    return mask.replace(bias_BTS=mask.bias(query_positions_BT.shape[1], cache_len))


def attend(q_BTHE, k_BSKE, v_BSKE, mask: AttentionMask, config: BodyConfig):
    """softmax(q kᵀ + mask) v with q pre-scaled; [B, T, H, E] in q's dtype. Keys and
    values have T positions, or S with a cache mask (`decode_mask`)."""
    T, S = q_BTHE.shape[1], k_BSKE.shape[1]
    if mask.query_positions_BT is not None:
        # A few queries against a cache: the grouped xla path whatever the kernel choice
        # (the fused kernels here are built for [T, T] training shapes).
        return cached_attention(q_BTHE, k_BSKE, v_BSKE, mask.bias(T, S))
    impl = resolve_impl(config, seq_len=T)
    if impl == "cudnn":
        return cudnn_attention(q_BTHE, k_BSKE, v_BSKE, mask.segment_ids_BT, mask.causal)
    if impl == "splash":
        return splash_attention(q_BTHE, k_BSKE, v_BSKE, mask.segment_ids_BT, causal=mask.causal)
    blocks = config.attention_blocks(T) if mask.causal else ((0, T),)
    return xla_attention(q_BTHE, k_BSKE, v_BSKE, mask.bias(T, S), blocks, causal=mask.causal)


# --- xla: blocked attention (CPU path and test oracle) ------------------------------------

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


def xla_attention(q_BTHE, k_BTKE, v_BTKE, bias_BTS, blocks, causal: bool = True):
    """Attention in query blocks [start, end); causal blocks see keys [0, end) only, so
    the masked upper triangle is skipped block by block (static slices, unrolled)."""
    H, K = q_BTHE.shape[2], k_BTKE.shape[2]
    # Grouped KV heads are repeated to the query heads: on CPU the 4-D layout's
    # backward pass is ~2× faster than a 5-D grouped einsum (benchmark_model.py).
    k_BTHE = jnp.repeat(k_BTKE, H // K, axis=2) if K != H else k_BTKE
    v_BTHE = jnp.repeat(v_BTKE, H // K, axis=2) if K != H else v_BTKE
    # Heads-major layout for the score and mixing matmuls: on CPU the forward pass is
    # ~2.5× faster than contracting in the [B, T, H, E] layout (benchmark_train.py).
    q_BHTE, k_BHTE, v_BHTE = (a.transpose(0, 2, 1, 3) for a in (q_BTHE, k_BTHE, v_BTHE))
    T = k_BHTE.shape[2]
    keys_end = lambda end: end if causal else T
    out_blocks = [_softmax_mix(q_BHTE[:, :, start:end], k_BHTE[:, :, :keys_end(end)],
                               v_BHTE[:, :, :keys_end(end)],
                               bias_BTS[:, start:end, :keys_end(end)], q_BTHE.dtype)
                  for start, end in blocks]
    out_BHTE = out_blocks[0] if len(out_blocks) == 1 else jnp.concatenate(out_blocks, axis=2)
    return out_BHTE.transpose(0, 2, 1, 3)


def cached_attention(q_BTHE, k_BSKE, v_BSKE, bias_BTS):
    """softmax(q kᵀ + bias) v of T new queries (pre-scaled) against S cached keys, GQA
    without repeating the cache: query head h = k·G + g reads KV head k, so the G query
    heads of a group ride along the query axis ([B, K, G·T, E]) of the blocked path's
    core (_softmax_mix). [B, T, H, E] in q's dtype."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    G = H // K
    q_BKNE = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
    k_BKSE, v_BKSE = (a.astype(q_BTHE.dtype).transpose(0, 2, 1, 3) for a in (k_BSKE, v_BSKE))
    bias_BNS = jnp.tile(bias_BTS, (1, G, 1))  # Row g·T + t is query t of group member g.
    out_BKNE = _softmax_mix(q_BKNE, k_BKSE, v_BKSE, bias_BNS, q_BTHE.dtype)
    return out_BKNE.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


# --- cudnn: jax.nn.dot_product_attention's fused kernel on NVIDIA GPUs ----------------------

def cudnn_attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, causal: bool = True):
    """cuDNN flash attention: causality by the kernel, packed segments as a boolean mask.

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
    same_doc_B1TT = None if segment_ids_BT is None else (
        segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, mask=same_doc_B1TT,
                                        scale=1.0, is_causal=causal, implementation="cudnn")


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
def _splash_kernel(num_heads: int, T: int, tile: int, interpret: bool, causal: bool = True):
    """One kernel per (heads, length, tile, causality): its mask tables are built in numpy
    at trace time, so caching keeps them out of every layer's trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    head_mask = splash.CausalMask if causal else splash.FullMask
    mask = splash.MultiHeadMask([head_mask((T, T)) for _ in range(num_heads)])
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                              block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                              block_q_dq=tile, block_kv_dq=tile)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash_local(q_BHTE, k_BKTE, v_BKTE, segment_ids_BT, *, tile, interpret, causal):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    kernel = _splash_kernel(q_BHTE.shape[1], q_BHTE.shape[2], tile, interpret, causal)

    def one(q_HTE, k_KTE, v_KTE, seg_T):
        return kernel(q_HTE, k_KTE, v_KTE, segment_ids=splash.SegmentIds(q=seg_T, kv=seg_T))
    return jax.vmap(one)(q_BHTE, k_BKTE, v_BKTE, segment_ids_BT)


def _mesh_axes(mesh, names, size):
    """The mesh axes among `names` (present, >1) whose product divides `size`, else none."""
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def splash_shard_axes(mesh, rules, B: int, H: int) -> tuple[tuple, tuple]:
    """(batch axes, head axes): the mesh axes that `rules` give the activations' batch and
    heads, kept where they divide B and H (none without a mesh)."""
    if mesh.empty:
        return (), ()
    rules = dict(rules)
    as_tuple = lambda a: (a,) if isinstance(a, str) else tuple(a or ())
    return (_mesh_axes(mesh, as_tuple(rules.get("activation_batch")), B),
            _mesh_axes(mesh, as_tuple(rules.get("activation_heads")), H))


def splash_attention(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, *, block: int = SPLASH_BLOCK,
                     interpret: bool = False, causal: bool = True, rules=None):
    """Splash attention in the [B, T, H, E] interface. `interpret=True` runs the Pallas
    kernel in interpret mode (any platform, slow: tests). Under a mesh, batch and heads
    are split as `rules` say (default: the rules in force, `matlm.sharding.current_rules`)."""
    B, T, H, E = q_BTHE.shape
    tile = check_splash_seq_len(T, block)
    K = k_BTKE.shape[2]
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, head_axes = splash_shard_axes(mesh, current_rules() if rules is None else rules,
                                              B, H)
    if head_axes and K % math.prod(mesh.shape[a] for a in head_axes):
        # Heads sharded but too few KV heads to split alike (e.g. MQA over 4 shards): give
        # each query head its own KV head, so every shard holds the KV heads it reads.
        k_BTKE, v_BTKE = (jnp.repeat(a, H // K, axis=2) for a in (k_BTKE, v_BTKE))
    # The kernel's layout is heads-major, [H, T, E] per example.
    q_BHTE, k_BKTE, v_BKTE = (a.transpose(0, 2, 1, 3) for a in (q_BTHE, k_BTKE, v_BTKE))
    local = functools.partial(_splash_local, tile=tile, interpret=interpret, causal=causal)
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
