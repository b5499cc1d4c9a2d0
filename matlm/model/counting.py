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
"""
from __future__ import annotations

from typing import Sequence

from matlm.model.config import ModelConfig
from matlm.model.streams import stream_plan


def _ffn_kernels(config: ModelConfig) -> int:
    return 3 if config.gated else 2  # (gate, up, out) or (in, out)


def _attn_proj_params(config: ModelConfig) -> int:
    D, H, K, E = config.d_model, config.n_heads, config.num_kv_heads, config.head_size
    return D * H * E + 2 * D * K * E + H * E * D


def param_count(config: ModelConfig, widths: Sequence[int] | None = None) -> int:
    """Parameters used by the submodel at `widths` (None: every layer at its stored width)."""
    widths = config.ffn_dims if widths is None else widths
    D = config.d_model
    embed = _embedding_params(config)
    per_layer_fixed = _attn_proj_params(config) + 2 * D  # + attention and FFN norms
    ffn = sum(_ffn_kernels(config) * D * m for m in widths)
    return embed + config.n_layers * per_layer_fixed + ffn + D  # + final norm


def _embedding_params(config: ModelConfig) -> int:
    """The token table (and its untied transpose) and a learned position table."""
    D, V = config.d_model, config.vocab_size
    positions = config.max_positions * D if config.position_encoding == "learned" else 0
    return V * D * (1 if config.tie_embeddings else 2) + positions


def non_embedding_param_count(config: ModelConfig, widths: Sequence[int] | None = None) -> int:
    return param_count(config, widths) - _embedding_params(config)


def attended_keys_per_token(config: ModelConfig, seq_len: int) -> float:
    """Mean number of keys a query's score and mixing matmuls cover, over `seq_len`
    positions: query block [s, e) is computed against keys [0, e)."""
    pairs = sum((end - start) * end for start, end in config.attention_blocks(seq_len))
    return pairs / seq_len


def _attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    keys = attended_keys_per_token(config, seq_len)
    return 2 * _attn_proj_params(config) + 2 * 2 * keys * config.n_heads * config.head_size


def forward_flops_per_token(config: ModelConfig, seq_len: int,
                            widths: Sequence[int] | None = None) -> float:
    """Matmul FLOPs of one forward pass, per token, for sequences of `seq_len`.

    For the masked path pass the stored widths (`config.ffn_dims`): masking does not
    save FLOPs.
    """
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
