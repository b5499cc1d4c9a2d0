"""Will the run fit? A cheap per-device memory estimate, checked before anything is written.

`check_fits_local_memory(model_config, train_config, mesh)` adds, per device:

- **parameters**: each leaf of the real abstract train state (`train_step.abstract_state`,
  `jax.eval_shape`: no allocation, no compile) counts `sharding.shard_shape(shape)` ×
  itemsize, so FSDP and tensor sharding are what the run will use;
- **optimizer state**: the same over the AdamW state (mu and nu, float32 like the params);
- **gradients**: float32, sharded like the parameters; twice that with microbatches > 1
  (the scan's accumulator plus one microbatch's gradients);
- **activations** (an estimate; XLA's real buffers depend on fusion):
  with `N` = tokens per device per microbatch = global_batch / (data·fsdp) / microbatches
  × seq_len, `s` = bytes of compute_dtype, `k` = granularities trained per step (mode
  "all": every one; "sample": sample_k), `W` = the sum of their FFN widths (the k widest
  for "sample"), `t` = the tensor-parallel size, `q` = query heads, `kv` = key/value
  heads, `h` = head_dim, `K` = mean attended keys per query (matlm.model.counting):

      stream  = (6·d_model + (q + 2·kv)·h / t) · s          residual, norms, q/k/v, attention
                                                          and FFN outputs, per token, layer
      ffn     = ((2 if gated else 1) + 1) · W / t · s      FFN hidden pre/post activation
      scores  = 2 · q / t · K · 4                          float32 logits and probabilities
                                                          (XLA path only: splash and cuDNN
                                                          keep them on chip)
      per layer and token:  none, dots_saveable: k·stream + ffn + k·scores
                            minimal:             k·stream + ffn   (scores recomputed)
                            full:                k·d_model·s      (the layer input only)
      activations = n_layers · N · per_layer + one layer's "none" working set (the
                    backward recomputes a layer at a time under remat) + logits
      logits  = 2 · 4 · vocab · (k·N without loss chunking, else the chunk's tokens
                N·chunk/seq_len: chunks and granularities are processed one at a time)

  Layers whose input several granularities share run once (matlm.model.streams): the
  estimate counts them per granularity, an upper bound.

  A family without tokens (the ViT, `Family.tokens` False) reads images: its sequence is
  the config's `num_tokens` (patches + class token), not TrainConfig.seq_len, so `N` =
  images per device per microbatch × num_tokens; attention is bidirectional, so `K` =
  num_tokens (every query attends to every key); and instead of vocabulary logits its
  ends are the patches (num_patches · patch_dim · s per image, kept for the patch
  projection's gradient) and k float32 class logits with their gradient (2 · 4 ·
  num_classes · k per image).

It is compared with the smallest local device's memory: `memory_stats()["bytes_limit"]`
on accelerators; on CPU, the host's MemAvailable (/proc/meminfo) split between the
mesh's local CPU devices, which share it. A run is refused only when the estimate
exceeds that, so XLA's own temporaries and the data pipeline are not counted against
it: a refusal is certain, a pass is not a guarantee.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import numpy as np

from matlm.model.config import ModelConfig
from matlm.model.counting import attended_keys_per_token
from matlm.model.families import family_of
from matlm.training.config import TrainConfig

GIB = 1 << 30
_MEMINFO = "/proc/meminfo"


class MemoryCheckError(ValueError):
    """A model that cannot fit the local devices' memory."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each part of a training step, and what the device has."""
    params_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    activation_bytes: int
    available_bytes: Optional[int]  # None: unknown (nothing to check against).
    source: str  # Where available_bytes comes from, in words.

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.optimizer_bytes + self.gradient_bytes + \
            self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.total_bytes <= self.available_bytes

    def describe(self) -> str:
        def gib(x):
            return f"{x / GIB:.2f} GiB"
        parts = (f"{gib(self.params_bytes)} parameters + {gib(self.optimizer_bytes)} "
                 f"optimizer state (AdamW mu, nu) + {gib(self.gradient_bytes)} gradients + "
                 f"{gib(self.activation_bytes)} activations (estimate) = "
                 f"{gib(self.total_bytes)} per device")
        if self.available_bytes is None:
            return f"{parts}; available memory unknown"
        return f"{parts} vs {gib(self.available_bytes)} available ({self.source})"


def _shard_bytes(tree) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _trained_widths(model_config: ModelConfig, train_config: TrainConfig) -> list[int]:
    spec = model_config.granularities
    width_of = dict(zip(spec.names, spec.widths))
    if train_config.granularity_mode != "all":  # The k widest, an upper bound.
        names = list(train_config.granularities or spec.names)
        return sorted((width_of.get(n, model_config.d_ff) for n in names),
                      reverse=True)[:train_config.sample_k]
    return [width_of.get(n, model_config.d_ff) for n in train_config.granularities or spec.names]


def activation_bytes(model_config: ModelConfig, train_config: TrainConfig,
                     batch_shards: int, tensor: int, platform: str) -> int:
    """The activation estimate of the module docstring, per device, on `platform`."""
    from matlm.model.attention import resolve_impl
    c, t = model_config, max(tensor, 1)
    s = {"float32": 4, "bfloat16": 2}[c.compute_dtype]
    per_device_rows = max(train_config.global_batch_size // max(batch_shards, 1), 1)
    rows = max(per_device_rows // train_config.microbatches, 1)
    token_family = family_of(c).tokens
    # An image's tokens are the config's (patches + class token), not TrainConfig.seq_len;
    # its attention is bidirectional: every query attends to all of them.
    length = train_config.seq_len if token_family else c.num_tokens
    keys = attended_keys_per_token(c, length) if token_family else length
    tokens = rows * length
    widths = _trained_widths(c, train_config)
    k = len(widths)
    stream = (6 * c.d_model + (c.n_heads + 2 * c.num_kv_heads) * c.head_size / t) * s
    ffn = ((2 if c.gated else 1) + 1) * sum(widths) / t * s
    # Only the XLA path materialises scores; the fused kernels (splash, cuDNN) keep them
    # in on-chip memory per block.
    xla = resolve_impl(c, platform, seq_len=length) == "xla"
    scores = 2 * c.n_heads / t * keys * 4 * xla
    full_layer = k * (stream + scores) + ffn
    per_layer = {"none": full_layer, "dots_saveable": full_layer,
                 "minimal": k * stream + ffn, "full": k * c.d_model * s}[c.remat_policy]
    body = c.n_layers * tokens * per_layer + tokens * full_layer
    if not token_family:
        return int(body + _image_end_bytes(c, rows, k, s))
    chunk = train_config.loss_chunk_size
    logit_tokens = k * tokens if not chunk else tokens * min(chunk, train_config.seq_len) / \
        train_config.seq_len
    logits = 2 * 4 * c.vocab_size * logit_tokens / t
    return int(body + logits)


def _image_end_bytes(config, rows: int, k: int, s: int) -> float:
    """An image family's ends, per device: the patches in compute dtype (kept for the
    projection's gradient) and each trained granularity's float32 class logits and their
    gradient; no vocabulary logits. Small next to the body."""
    return rows * (config.num_patches * config.patch_dim * s + 2 * 4 * config.num_classes * k)


def _mem_available() -> Optional[int]:
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(mesh) -> tuple[Optional[int], str]:
    """(bytes per device, where it comes from) for the mesh's devices on this host."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limits, cpu = [], []
    for device in local:
        stats = None
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None.
            pass
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
        else:
            cpu.append(device)
    if cpu:
        host = _mem_available()
        if host is not None:
            limits.append(host // len(cpu))
    if not limits:
        return None, "unknown"
    if cpu:
        return min(limits), (f"{local[0].platform}: MemAvailable {_mem_available() / GIB:.1f} "
                             f"GiB shared by {len(cpu)} local device(s)")
    return min(limits), f"{local[0].device_kind}: bytes_limit"


def estimate(model_config: ModelConfig, train_config: TrainConfig, mesh, *,
             available: Optional[int] = None, platform: Optional[str] = None
             ) -> MemoryEstimate:
    """The per-device memory estimate (no allocation, no compile). `mesh` may be a
    `jax.sharding.AbstractMesh` (a target slice) when `available` gives the bytes per
    device and `platform` the chips' platform; else both come from the mesh's devices."""
    from matlm.training.optimizer import make_optimizer
    from matlm.training.train_step import abstract_state

    state = abstract_state(model_config, make_optimizer(train_config), mesh)
    params = _shard_bytes(state.params)
    shape = dict(mesh.shape)
    batch_shards = shape.get("data", 1) * shape.get("fsdp", 1)
    if available is not None:
        source = "given"
    else:
        available, source = available_bytes(mesh)
    return MemoryEstimate(
        params_bytes=params, optimizer_bytes=_shard_bytes(state.opt_state),
        gradient_bytes=params * (2 if train_config.microbatches > 1 else 1),
        activation_bytes=activation_bytes(model_config, train_config, batch_shards,
                                          shape.get("tensor", 1),
                                          platform or mesh.devices.flat[0].platform),
        available_bytes=available, source=source)


def check_fits_local_memory(model_config: ModelConfig, train_config: TrainConfig,
                            mesh) -> MemoryEstimate:
    """The estimate, or MemoryCheckError (one line, the numbers and what to do) when it
    exceeds the local devices' memory."""
    result = estimate(model_config, train_config, mesh)
    if not result.fits:
        raise MemoryCheckError(
            f"the model does not fit the local devices' memory: {result.describe()}. Use a "
            "smaller model, more devices with FSDP (TrainConfig.mesh_shape=(1, -1, 1)), "
            "remat (ModelConfig.remat_policy='full'), a smaller batch per device or more "
            "TrainConfig.microbatches; --skip_memory_check tries anyway")
    return result
