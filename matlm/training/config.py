"""TrainConfig: the run recipe (steps, batch, optimizer, objective, mesh, logging)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from matlm.config_checks import Check, check_fields, checked


class TrainConfigError(ValueError):
    """A run recipe that cannot train."""


DECAYS = ("cosine", "linear", "constant")
GRANULARITY_MODES = ("all", "sample", "sandwich")
# Named weights (matlm.training.objective.preset_weights).
WEIGHT_PRESETS = ("uniform", "paper_table6")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Each field declares its type and range (matlm.config_checks); __post_init__ checks
    # them all first, then the relations between fields.
    steps: int = checked(300, int, ge=1)
    seq_len: int = checked(128, int, ge=2)  # Inputs and targets are shifted by one.
    global_batch_size: int = checked(16, int, ge=1)
    # Gradient accumulation: the batch is split into this many.
    microbatches: int = checked(1, int, ge=1)
    seed: int = checked(0, int, ge=0)

    # Optimizer: AdamW, warmup then cosine/linear decay, global-norm clipping.
    learning_rate: float = checked(3e-3, float, gt=0)
    warmup_steps: int = checked(30, int, ge=0)
    decay: str = checked("cosine", str, choices=DECAYS)
    end_learning_rate_fraction: float = checked(0.1, float, ge=0, le=1)
    # Not applied to norm scales (the model has no biases).
    weight_decay: float = checked(0.1, float, ge=0)
    adam_b1: float = checked(0.9, float, ge=0, lt=1)
    adam_b2: float = checked(0.95, float, ge=0, lt=1)
    adam_eps: float = checked(1e-8, float, gt=0)
    # optax.clip_by_global_norm: a threshold of 0 would zero every update.
    clip_grad_norm: float = checked(1.0, float, gt=0)

    # MatFormer objective: loss = Σ_i λ_i · L_i over the granularities trained this step
    # (docs/objective.md). "all": every granularity every step (paper v1); "sample":
    # `sample_k` granularities drawn per step with `sample_probabilities`, identical on
    # every host (from seed, step); "sandwich": the smallest and the largest every step
    # plus `sample_k − 2` others drawn like "sample" (the sandwich rule of US-Nets/BigNAS).
    granularity_mode: str = checked("all", str, choices=GRANULARITY_MODES)
    # Names to train; () → all of the model's granularities.
    granularities: tuple = checked((), tuple, each=Check(str))
    # λ per trained granularity (mode "all"), per slot (mode "sandwich", smallest first) or
    # per sampled slot (mode "sample"); or a preset name: 'uniform' (1/k each: a *mean*, so
    # learning rate and clip threshold mean what they do for a single model; OLMo's
    # reproduction sums, λ = 1: effective LR and clip ×k) or 'paper_table6' (0.17, 0.20,
    # 0.22, 0.41 for S/M/L/XL; interpolated for other counts). () → 'uniform'.
    granularity_weights: tuple = checked((), tuple, each=Check(float, ge=0),
                                         presets=WEIGHT_PRESETS)
    sample_k: int = checked(1, int, ge=1)
    # One per granularity, or a preset name; () → uniform.
    sample_probabilities: tuple = checked((), tuple, each=Check(float, ge=0),
                                          presets=WEIGHT_PRESETS)
    # In-place distillation: α. Each trained granularity but the largest trained in the
    # step (the teacher, under stop_gradient) has loss (1 − α)·CE + α·T²·KL(p_teacher,T ‖
    # p_i,T). 0: plain CE everywhere (the step is bit for bit the one without the option).
    distill_weight: float = checked(0.0, float, ge=0, le=1)
    distill_temperature: float = checked(1.0, float, gt=0)  # T of the KL.
    # Coefficient of mean(logsumexp(logits)²), e.g. 1e-4.
    z_loss: float = checked(0.0, float, ge=0)
    # Cross entropy in sequence chunks of this many positions (forward and backward), so
    # no step holds the float32 [B, T, vocab] logits of every granularity at once; 0: in
    # one piece. Costs one extra head matmul per chunk in the backward pass.
    loss_chunk_size: int = checked(512, int, ge=0)

    # Mesh: sizes of (data, fsdp, tensor); one of them may be -1 (the remaining devices).
    mesh_shape: tuple = checked((-1, 1, 1), tuple, each=Check(int, ge=1, also=(-1,)))

    # Logging, eval, checkpoints.
    log_every: int = checked(10, int, ge=1)
    eval_every: int = checked(100, int, ge=0)  # 0: only at the start and the end.
    eval_batches: int = checked(0, int, ge=0)  # 0: the whole validation split.
    # Downstream tasks (see `matlm eval`) scored at every eval, e.g. ("copa", "lambada"):
    # `downstream_eval_examples` examples each, for every granularity, into TensorBoard.
    downstream_eval_tasks: tuple = checked((), tuple, each=Check(str))
    downstream_eval_examples: int = checked(16, int, ge=1)
    # 0: only at the end (and on preemption or --stop_at), like eval_every = 0; the
    # checkpoint hook is then not periodic (matlm.training.hooks.Hook: every=0).
    checkpoint_every: int = checked(100, int, ge=0)
    keep_checkpoints: int = checked(3, int, ge=1)
    # Peak FLOP/s per device for MFU; None: a known accelerator's bf16 peak, or this
    # CPU's measured fp32 matmul rate.
    peak_flops_per_device: Optional[float] = checked(None, float, gt=0, optional=True)

    def __post_init__(self):
        check_fields(self, TrainConfigError)  # Types and ranges of every field.
        if self.global_batch_size % self.microbatches:
            raise TrainConfigError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"microbatches={self.microbatches}")
        if self.granularity_mode == "sandwich" and self.sample_k < 2:
            raise TrainConfigError(
                f"TrainConfig.sample_k={self.sample_k}: granularity_mode='sandwich' trains the "
                "smallest and the largest granularity every step, so sample_k must be >= 2")
        if len(self.mesh_shape) != 3 or list(self.mesh_shape).count(-1) > 1:
            raise TrainConfigError(
                f"TrainConfig.mesh_shape must be (data, fsdp, tensor) with at most one -1, "
                f"got {self.mesh_shape}")
