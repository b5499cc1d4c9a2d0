"""TrainConfig: the run recipe (steps, batch, optimizer, objective, mesh, logging)."""
from __future__ import annotations

import dataclasses
from typing import Optional


class TrainConfigError(ValueError):
    """A run recipe that cannot train."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    seq_len: int = 128
    global_batch_size: int = 16
    microbatches: int = 1  # Gradient accumulation: the batch is split into this many.
    seed: int = 0

    # Optimizer: AdamW, warmup then cosine/linear decay, global-norm clipping.
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    decay: str = "cosine"  # "cosine" | "linear" | "constant"
    end_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.1  # Not applied to norm scales (the model has no biases).
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad_norm: float = 1.0

    # MatFormer objective: loss = Σ_i λ_i · CE_i over the granularities trained this step.
    # "all": every granularity every step (paper v1); "sample": `sample_k` granularities
    # drawn per step with `sample_probabilities`, identical on every host (from seed, step).
    granularity_mode: str = "all"
    granularities: tuple = ()  # Names to train; () → all of the model's granularities.
    # λ per trained granularity (mode "all") or per sampled slot (mode "sample").
    # () → 1/k each: a *mean*, so learning rate and clip threshold mean what they do for
    # a single model. (OLMo's reproduction sums, λ = 1: effective LR and clip ×k.)
    granularity_weights: tuple = ()
    sample_k: int = 1
    sample_probabilities: tuple = ()  # () → uniform.
    z_loss: float = 0.0  # Coefficient of mean(logsumexp(logits)²), e.g. 1e-4.
    # Cross entropy in sequence chunks of this many positions (forward and backward), so
    # no step holds the float32 [B, T, vocab] logits of every granularity at once; 0: in
    # one piece. Costs one extra head matmul per chunk in the backward pass.
    loss_chunk_size: int = 512

    # Mesh: sizes of (data, fsdp, tensor); one of them may be -1 (the remaining devices).
    mesh_shape: tuple = (-1, 1, 1)

    # Logging, eval, checkpoints.
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end.
    eval_batches: int = 0  # 0: the whole validation split.
    # Downstream tasks (see `matlm eval`) scored at every eval, e.g. ("copa", "lambada"):
    # `downstream_eval_examples` examples each, for every granularity, into TensorBoard.
    downstream_eval_tasks: tuple = ()
    downstream_eval_examples: int = 16
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    # Peak FLOP/s per device for MFU; None: a known accelerator's bf16 peak, or this
    # CPU's measured fp32 matmul rate.
    peak_flops_per_device: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise TrainConfigError(f"TrainConfig.loss_chunk_size must be a non-negative integer "
                                   f"(0 = no chunking), got {self.loss_chunk_size!r}")
        for field in ("steps", "seq_len", "global_batch_size", "microbatches", "log_every",
                      "keep_checkpoints", "sample_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"TrainConfig.{field} must be a positive integer, "
                                       f"got {value!r}")
        if self.seq_len < 2:
            raise TrainConfigError(f"TrainConfig.seq_len must be ≥ 2, got {self.seq_len}")
        if self.global_batch_size % self.microbatches:
            raise TrainConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"microbatches={self.microbatches}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise TrainConfigError(f"unknown decay {self.decay!r}; use cosine, linear or constant")
        if self.granularity_mode not in ("all", "sample"):
            raise TrainConfigError(
                f"unknown granularity_mode {self.granularity_mode!r}; use 'all' or 'sample'")
        if len(self.mesh_shape) != 3 or list(self.mesh_shape).count(-1) > 1:
            raise TrainConfigError(
                f"mesh_shape must be (data, fsdp, tensor) with at most one -1, "
                f"got {self.mesh_shape}")
        for name in ("granularities", "granularity_weights", "sample_probabilities",
                     "mesh_shape", "downstream_eval_tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
