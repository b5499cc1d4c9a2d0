"""Exact parameter counts and forward FLOPs per token of any submodel.

Used by `matlm info`, the trainer's MFU, and width-search tools. FLOPs count the
matrix multiplies (2 per multiply-add) as the model executes them: the projections,
the FFN at the width actually computed, the logits, and the attention scores and
value mixing over the key ranges actually computed: attention runs in causal query
blocks (`ModelConfig.attention_query_block`), each against the keys up to its own
end, so the skipped upper triangle is not counted (with one block it is the full
T×T). MFU from these counts is never flattered by work that was not done.
A joint pass over several submodels counts its shared streams once
(`joint_forward_flops_per_token`). Element-wise work (norms, softmax, RoPE) is not counted.
Training FLOPs are 3× forward (backward = 2× forward).

The ViT family (MatViT) counts per *image*: its encoder attends bidirectionally over all
`num_tokens` tokens, the patch projection runs once per patch and the classifier once
per image (`forward_flops_per_image`, `joint_forward_flops_per_image`); `param_count`
covers both families.
"""
from __future__ import annotations

from typing import Sequence

from matlm.model.config import BodyConfig, ModelConfig
from matlm.model.streams import stream_plan
from matlm.model.vit_config import ViTConfig


def _ffn_kernels(config: BodyConfig) -> int:
    return 3 if config.gated else 2  # (gate, up, out) or (in, out)


def _attn_proj_params(config: BodyConfig) -> int:
    D, H, K, E = config.d_model, config.n_heads, config.num_kv_heads, config.head_size
    return D * H * E + 2 * D * K * E + H * E * D


def param_count(config: BodyConfig, widths: Sequence[int] | None = None) -> int:
    """Parameters used by the submodel at `widths` (None: every layer at its stored width)."""
    widths = config.ffn_dims if widths is None else widths
    D = config.d_model
    embed = _embedding_params(config)
    per_layer_fixed = _attn_proj_params(config) + 2 * D  # + attention and FFN norms
    ffn = sum(_ffn_kernels(config) * D * m for m in widths)
    return embed + config.n_layers * per_layer_fixed + ffn + D  # + final norm


def _embedding_params(config: BodyConfig) -> int:
    """The token table (and its untied transpose) and a learned position table; for a
    ViT, its input and output ends (`_vit_end_params`)."""
    if isinstance(config, ViTConfig):
        return _vit_end_params(config)
    D, V = config.d_model, config.vocab_size
    positions = config.max_positions * D if config.position_encoding == "learned" else 0
    return V * D * (1 if config.tie_embeddings else 2) + positions


def non_embedding_param_count(config: BodyConfig, widths: Sequence[int] | None = None) -> int:
    return param_count(config, widths) - _embedding_params(config)


def attended_keys_per_token(config: ModelConfig, seq_len: int) -> float:
    """Mean number of keys a query's score and mixing matmuls cover, over `seq_len`
    positions: query block [s, e) is computed against keys [0, e)."""
    pairs = sum((end - start) * end for start, end in config.attention_blocks(seq_len))
    return pairs / seq_len


def _attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    return _attention_flops(config, attended_keys_per_token(config, seq_len))


def _attention_flops(config: BodyConfig, keys: float) -> float:
    """One token's attention: the projections and its scores and mixing over `keys` keys."""
    return 2 * _attn_proj_params(config) + 2 * 2 * keys * config.n_heads * config.head_size


def forward_flops_per_token(config: ModelConfig, seq_len: int,
                            widths: Sequence[int] | None = None) -> float:
    """Matmul FLOPs of one forward pass, per token, for sequences of `seq_len`.

    For the masked path pass the stored widths (`config.ffn_dims`): masking does not
    save FLOPs.
    """
    _check_token_family(config)
    widths = config.ffn_dims if widths is None else widths
    D, V = config.d_model, config.vocab_size
    ffn = sum(2 * _ffn_kernels(config) * D * m for m in widths)
    return config.n_layers * _attention_flops_per_token(config, seq_len) + ffn + 2 * D * V


def joint_forward_flops_per_token(config: ModelConfig, seq_len: int,
                                  widths_per_submodel: Sequence[Sequence[int]]) -> float:
    """Matmul FLOPs per token of one joint forward pass over several static-width
    submodels (`MatLM(..., joint_widths=...)`), which shares residual streams
    (matlm.model.streams): per layer, attention once per stream and the FFN once per
    stream at its widest width; logits once per final stream. At most the sum of the
    submodels' `forward_flops_per_token`."""
    _check_token_family(config)
    layers, final_streams = stream_plan(widths_per_submodel)
    D, V = config.d_model, config.vocab_size
    attn = _attention_flops_per_token(config, seq_len)
    total = 2 * D * V * len(final_streams)
    for plan in layers:
        total += sum(attn + 2 * _ffn_kernels(config) * D * max(widths) for _, widths in plan)
    return total


def train_flops_per_token(config: ModelConfig, seq_len: int,
                          widths: Sequence[int] | None = None) -> float:
    return 3 * forward_flops_per_token(config, seq_len, widths)


def joint_train_flops_per_token(config: ModelConfig, seq_len: int,
                                widths_per_submodel: Sequence[Sequence[int]]) -> float:
    return 3 * joint_forward_flops_per_token(config, seq_len, widths_per_submodel)


# ---- the ViT family (MatViT, matlm.model.vit) ---------------------------------------------

def _check_token_family(config: BodyConfig) -> None:
    """Per-token counts are the LM's (a vocabulary head on every token); a ViT's unit of
    work is the image."""
    if isinstance(config, ViTConfig):
        raise TypeError("a ViTConfig is counted per image: use forward_flops_per_image / "
                        "joint_forward_flops_per_image")


def _vit_end_params(config: ViTConfig) -> int:
    """The patch projection (kernel and bias), the class token, a learned position table
    and the classifier (kernel and bias)."""
    D = config.d_model
    cls = D if config.pooling == "cls" else 0
    positions = config.num_tokens * D if config.position_encoding == "learned" else 0
    return config.patch_dim * D + D + cls + positions + (D + 1) * config.num_classes


def _vit_layer_flops(config: ViTConfig, width: int) -> float:
    """One encoder layer over an image's tokens at FFN width `width`: every token attends
    to all `num_tokens` (bidirectional, one block)."""
    T = config.num_tokens
    return T * (_attention_flops(config, T) + 2 * _ffn_kernels(config) * config.d_model * width)


def _vit_end_flops(config: ViTConfig, final_streams: int) -> float:
    """The patch projection (once per image) and the classifier (once per final stream)."""
    return (2 * config.num_patches * config.patch_dim * config.d_model
            + 2 * config.d_model * config.num_classes * final_streams)


def forward_flops_per_image(config: ViTConfig, widths: Sequence[int] | None = None) -> float:
    """Matmul FLOPs of one image's forward pass through the submodel at `widths` (the
    masked path: pass the stored widths, `config.ffn_dims`)."""
    widths = config.ffn_dims if widths is None else widths
    return _vit_end_flops(config, 1) + sum(_vit_layer_flops(config, m) for m in widths)


def joint_forward_flops_per_image(config: ViTConfig,
                                  widths_per_submodel: Sequence[Sequence[int]]) -> float:
    """Matmul FLOPs of one image's joint forward pass over several static-width
    submodels (`MatViT(..., joint_widths=...)`), sharing residual streams as
    `joint_forward_flops_per_token` does for the LM."""
    layers, final_streams = stream_plan(widths_per_submodel)
    total = _vit_end_flops(config, len(final_streams))
    for plan in layers:
        total += sum(_vit_layer_flops(config, max(widths)) for _, widths in plan)
    return total


def train_flops_per_image(config: ViTConfig, widths: Sequence[int] | None = None) -> float:
    return 3 * forward_flops_per_image(config, widths)
