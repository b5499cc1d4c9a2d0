"""Model configs as plain frozen dataclasses: the shared nested-Transformer body
(`BodyConfig`) and the causal LM family's config on top of it (`ModelConfig`).

`ModelConfig` *is* a `BodyConfig` (a subclass) with the LM's own fields added (vocabulary,
tied embeddings, position encoding): its fields stay flat, so gin bindings
(`ModelConfig.d_model = 256`) and old run_config.json model dicts load unchanged, while
the body's modules (matlm.model.layers, matlm.model.nested_stack) are handed
`config.body`, the body part alone. A new family subclasses BodyConfig the same way
(docs/model_families.md)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from matlm.config_checks import Check, check_fields, checked
from matlm.model.granularity import GranularitySpec

ACTIVATIONS = ("gelu", "relu", "geglu", "swiglu")
GATED_ACTIVATIONS = ("geglu", "swiglu")
DTYPES = ("float32", "bfloat16")
# What the backward pass keeps of each layer's forward (matlm.model.transformer):
# none = everything, full = only the layer's input, minimal = also the projection and FFN
# matmul outputs (not attention scores), dots_saveable = every matmul output.
REMAT_POLICIES = ("none", "full", "minimal", "dots_saveable")
# "auto": splash on TPU, cuDNN on GPU (bfloat16), blocked XLA on CPU (matlm.model.attention).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# How token positions enter the model: rotary embeddings on queries and keys (every layer),
# a learned [max_positions, d_model] table added to the token embeddings, or nothing.
POSITION_ENCODINGS = ("rope", "learned", "none")


class ModelConfigError(ValueError):
    """Model dimensions that cannot build a model."""


@dataclasses.dataclass(frozen=True)
class BodyConfig:
    """The nested-Transformer body every family shares: widths, heads, the nested FFN's
    granularities and Mix'n'Match widths, scanned layers, remat, the attention kernel.

    `d_ff` is the full (XL) FFN width; granularities nest inside it. `layer_d_ff`
    is for *extracted* models whose FFN widths differ per layer: when set, layer `i`
    stores kernels of width `layer_d_ff[i]`, and a named granularity uses
    min(its width, layer_d_ff[i]) units there (matlm.submodels.extract).
    """

    # Each field declares its type and range (matlm.config_checks); __post_init__ checks
    # them all first, then the relations between fields.
    d_model: int = checked(64, int, ge=1)
    n_layers: int = checked(2, int, ge=1)
    n_heads: int = checked(4, int, ge=1)
    # None: multi-head; 1: multi-query; else grouped.
    n_kv_heads: Optional[int] = checked(None, int, ge=1, optional=True)
    head_dim: Optional[int] = checked(None, int, ge=1, optional=True)  # None: d_model // n_heads.
    d_ff: int = checked(256, int, ge=1)
    activation: str = checked("swiglu", str, choices=ACTIVATIONS)
    norm_eps: float = checked(1e-6, float, gt=0)
    # Parameters are always stored in float32.
    compute_dtype: str = checked("float32", str, choices=DTYPES)
    remat_policy: str = checked("none", str, choices=REMAT_POLICIES)
    # Causal attention in query blocks of this many positions, each against only the
    # keys up to its end: skips the masked upper triangle (T/blk blocks save about
    # (1 - 1/blocks)/2 of the score and mixing work). 0 = one [T, T] block.
    attention_query_block: int = checked(128, int, ge=0)
    # Attention kernel (matlm.model.attention): "auto" picks the platform's fused kernel
    # (splash on TPU, cuDNN on GPU) and the blocked XLA path (the test oracle) on CPU.
    attention_impl: str = checked("auto", str, choices=ATTENTION_IMPLS)
    granularity_names: tuple = checked(("S", "M", "L", "XL"), tuple, each=Check(str))
    # () → d_ff/8, d_ff/4, d_ff/2, d_ff.
    granularity_widths: tuple = checked((), tuple, each=Check(int, ge=1))
    width_alignment: int = checked(1, int, ge=1)  # 128 for TPU lanes, 64 for GPUs in real configs.
    # Shard-local nesting: the FFN hidden axis is stored as `ffn_nest_blocks` equal blocks,
    # each holding its own nested prefix, so that with the `mlp` axis sharded over T
    # tensor shards (T dividing the block count) every granularity is spread over all
    # shards instead of living on the first ones. 1 = one plain prefix. Baked into
    # checkpoints; `matlm.model.layout.ffn_to_contiguous` converts for export.
    ffn_nest_blocks: int = checked(1, int, ge=1)
    layer_d_ff: tuple = checked((), tuple, each=Check(int, ge=1))
    # Blocks stored stacked (params["layers"], leading logical axis "layers") and run
    # under jax.lax.scan: compile time and HLO size stay flat in depth. Unrolled
    # (params["layer_{i}"]) otherwise; matlm.model.layout converts between the two.
    scan_layers: bool = checked(False, bool)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ModelConfigError(msg)

        check_fields(self, ModelConfigError)  # Types and ranges of every field.
        need(self.head_dim is not None or self.d_model % self.n_heads == 0,
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
             "set head_dim explicitly or change n_heads")
        need(self.n_heads % self.num_kv_heads == 0,
             f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.num_kv_heads}")
        need(self.attention_impl != "cudnn" or self.compute_dtype == "bfloat16",
             "attention_impl='cudnn' runs cuDNN's fused kernel, which takes 16-bit inputs "
             f"only; set compute_dtype='bfloat16' (it is {self.compute_dtype!r}) or "
             "attention_impl='auto'")
        self._check_family()
        need(self.d_ff % self.ffn_nest_blocks == 0,
             f"ffn_nest_blocks={self.ffn_nest_blocks} must be a positive divisor of "
             f"d_ff={self.d_ff}")
        if self.layer_d_ff:
            need(len(self.layer_d_ff) == self.n_layers,
                 f"layer_d_ff has {len(self.layer_d_ff)} entries for {self.n_layers} layers")
            need(all(0 < w <= self.d_ff and w % self.ffn_nest_blocks == 0
                     for w in self.layer_d_ff),
                 f"layer_d_ff entries must be in (0, d_ff={self.d_ff}] and multiples of "
                 f"ffn_nest_blocks={self.ffn_nest_blocks}: {self.layer_d_ff}")
        need(not (self.scan_layers and len(set(self.ffn_dims)) > 1),
             f"scan_layers=True stacks every layer's parameters into one array, so every "
             f"layer must store the same FFN width; layer_d_ff={tuple(self.layer_d_ff)} "
             "differs per layer (an extracted model): set scan_layers=False")
        object.__setattr__(self, "granularity_names", tuple(self.granularity_names))
        object.__setattr__(self, "granularity_widths", tuple(self.granularity_widths))
        object.__setattr__(self, "layer_d_ff", tuple(self.layer_d_ff))
        self.granularities  # Validates the nesting eagerly, before any compile.

    def _check_family(self):
        """A family's own relations between fields (raise ModelConfigError); run after
        the body's head checks, in the order ModelConfig always checked them."""

    @property
    def body(self) -> "BodyConfig":
        """The body part alone: what the shared modules (layers, nested_stack) are given,
        so that they cannot come to depend on a family's fields."""
        if type(self) is BodyConfig:
            return self
        return BodyConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BodyConfig)})

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def ffn_dims(self) -> tuple[int, ...]:
        """The stored FFN kernel width of each layer."""
        return self.layer_d_ff or (self.d_ff,) * self.n_layers

    @property
    def granularities(self) -> GranularitySpec:
        return GranularitySpec(d_ff=self.d_ff, n_layers=self.n_layers,
                               names=self.granularity_names, widths=self.granularity_widths,
                               alignment=self.width_alignment,
                               nest_blocks=self.ffn_nest_blocks, layer_caps=self.layer_d_ff)

    def attention_blocks(self, seq_len: int) -> tuple[tuple[int, int], ...]:
        """The causal query blocks [start, end) over `seq_len` positions; each attends to
        keys [0, end). The one definition the attention layer and the FLOP counts share."""
        block = self.attention_query_block or seq_len
        return tuple((start, min(start + block, seq_len)) for start in range(0, seq_len, block))

    def resolve_widths(self, value) -> tuple[int, ...]:
        """A validated per-layer width vector (see GranularitySpec.resolve), checked
        against each layer's stored width as well."""
        widths = self.granularities.resolve(value)
        for i, (w, cap) in enumerate(zip(widths, self.ffn_dims)):
            if w > cap:
                raise ModelConfigError(f"layer {i}: width {w} exceeds the stored width {cap}")
        return widths


@dataclasses.dataclass(frozen=True)
class ModelConfig(BodyConfig):
    """The causal LM family (MatLM): the body plus a token vocabulary, a tied or untied
    output head and a position encoding. Its attention is causal (the mask says so,
    matlm.model.attention); the fields are flat (module docstring)."""

    vocab_size: int = checked(256, int, ge=1)
    tie_embeddings: bool = checked(True, bool)
    position_encoding: str = checked("rope", str, choices=POSITION_ENCODINGS)
    rope_theta: float = checked(10_000.0, float, gt=0)  # position_encoding="rope" only.
    # The learned table's length (position_encoding="learned" only): no position may
    # reach it, in training or in cached decoding.
    max_positions: int = checked(2048, int, ge=1)

    def _check_family(self):
        if self.position_encoding == "rope" and self.head_size % 2:
            raise ModelConfigError(f"head_dim={self.head_size} must be even for RoPE")
