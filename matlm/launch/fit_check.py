"""Ahead-of-time fit check: compile a recipe's real train and eval steps for a target's
devices (no hardware needed for TPU topologies) and read XLA's memory and cost analyses.

Peak memory per device (what the compiled step needs resident on one device):

    peak = arguments + outputs − aliased + temporaries + generated code

`aliased` is the output bytes that reuse a donated argument's buffer (the train state is
donated, so the new state overwrites the old one), counted once. All five figures come
from `compiled.memory_analysis()`: XLA's static buffer assignment, per device.

While the eval step runs in the trainer the train state is still resident: the eval
step's own peak plus the optimizer state (its parameters are the state's, already
counted in its arguments) is what the device holds then. The verdict takes the larger of
the two.

Any registered family compiles: the batch is the family's (the LM's packed [B, T] token
rows; the ViT's images [B, H, W, C], labels [B] and mask [B]), sharded as the trainer
shards it (`train_step.batch_sharding_of`). Work per step is counted in the family's unit
(`step_work`): tokens for the LM, patches for the ViT; its FLOPs are the objective's.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from matlm.launch.topology import Target
from matlm.model import ModelConfig
from matlm.model.families import family_of
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import (abstract_state, batch_sharding_of, make_eval_step,
                                       make_train_step)

# libtpu stops compiling a program that needs more HBM than the chip has, early (before
# its backend passes), with one line naming both figures in GiB. That total is all there
# is to report then. (Its `xla_tpu_no_crash_on_oom` flag lets some such compiles finish
# with a full memory analysis, but ends others in "Invalid TPU program" after the whole
# backend compile; `xla_tpu_max_hbm_size_mib` is not honoured as a compile option.)
_TPU_OOM_RE = re.compile(r"total memory required for HLO temporaries \(([\d.]+)G\) exceeds "
                         r"available HBM \(([\d.]+)G\)")

# The packed batch the train and eval steps take (matlm.data.packing): [B, T] each.
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "loss_mask": jnp.float32}
# The image batch of a family without tokens (matlm.data.images; what ViTLossHead and the
# ViT eval step read): images [B, H, W, C], labels [B], mask [B] (0: padding).
IMAGE_BATCH_DTYPES = {"images": jnp.float32, "labels": jnp.int32, "mask": jnp.float32}


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one train step processes, in the family's unit, and its FLOPs by matlm's
    exact count (the objective's, as the trainer's MFU counts them)."""
    examples: int  # Sequences (LM) or images (ViT) per step.
    tokens: int  # LM: examples × seq_len tokens; ViT: examples × num_patches patches.
    unit: str  # "tokens" or "patches".
    flops: float


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """`compiled.memory_analysis()` of one step, bytes per device; or, when libtpu stopped
    the compile for lack of HBM, only the total it reported (`oom_total`, ±5 MiB: it
    prints GiB with two decimals) and None for the parts."""
    argument: Optional[int]
    output: Optional[int]
    alias: Optional[int]
    temp: Optional[int]
    generated_code: Optional[int]
    host_temp: int = 0
    oom_total: Optional[int] = None

    @property
    def peak(self) -> int:
        if self.oom_total is not None:
            return self.oom_total
        return self.argument + self.output - self.alias + self.temp + self.generated_code

    @classmethod
    def from_oom(cls, total_bytes: int) -> "StepMemory":
        return cls(None, None, None, None, None, oom_total=total_bytes)

    @classmethod
    def of(cls, compiled) -> "StepMemory":
        m = compiled.memory_analysis()
        return cls(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                   alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
                   generated_code=int(m.generated_code_size_in_bytes),
                   host_temp=int(getattr(m, "host_temp_size_in_bytes", 0) or 0))


@dataclasses.dataclass(frozen=True)
class StepReport:
    memory: StepMemory
    flops_per_device: Optional[float]  # cost_analysis()["flops"] of the per-device program
    lower_s: float
    compile_s: float
    xla_optimal_seconds: Optional[float] = None  # libtpu's roofline estimate, if given


@dataclasses.dataclass(frozen=True)
class FitReport:
    target: Target
    mesh_shape: dict
    tokens_per_step: int  # In `token_unit`: the LM's tokens, the ViT's patches.
    microbatches: int
    train: StepReport
    eval: Optional[StepReport]
    opt_state_bytes_per_device: int
    min_headroom: float
    # FLOPs a step executes by matlm's exact count (matlm.model.counting, as the trainer's
    # MFU counts them: the joint pass, no remat recompute). XLA's cost analysis counts a
    # scanned loop's body once and does not see inside Pallas kernels, so it is no step
    # total for scanned layers or fused attention; it is reported beside.
    model_flops_per_step: float = 0.0
    examples_per_step: int = 0  # Sequences (LM) or images (ViT).
    token_unit: str = "tokens"

    @property
    def devices(self) -> int:
        return len(self.target.devices)

    @property
    def eval_resident_peak(self) -> Optional[int]:
        return None if self.eval is None else self.eval.memory.peak + self.opt_state_bytes_per_device

    @property
    def peak_bytes(self) -> int:
        return max(self.train.memory.peak, self.eval_resident_peak or 0)

    @property
    def headroom(self) -> Optional[float]:
        hbm = self.target.hbm_bytes
        return None if not hbm else 1.0 - self.peak_bytes / hbm

    @property
    def fits(self) -> Optional[bool]:
        hbm = self.target.hbm_bytes
        return None if not hbm else self.peak_bytes <= hbm

    @property
    def meets_min_headroom(self) -> Optional[bool]:
        return None if self.headroom is None else self.headroom >= self.min_headroom

    @property
    def flops_per_step(self) -> float:
        return self.model_flops_per_step

    @property
    def xla_flops_per_step(self) -> Optional[float]:
        flops = self.train.flops_per_device
        return None if flops is None else flops * self.devices

    @property
    def step_time_at_50pct_mfu(self) -> Optional[float]:
        peak, flops = self.target.peak_flops, self.flops_per_step
        return None if not peak or flops is None else flops / (0.5 * peak * self.devices)


def abstract_batch(model_config: ModelConfig, train_config: TrainConfig, mesh) -> dict:
    """The global batch the steps take, as sharded ShapeDtypeStructs: the LM's [B, T] token
    rows, or a ViT's images [B, H, W, C], labels [B] and mask [B]."""
    B = train_config.global_batch_size
    sharding = batch_sharding_of(model_config, mesh)
    if family_of(model_config).tokens:
        return {k: jax.ShapeDtypeStruct((B, train_config.seq_len), dtype, sharding=sharding)
                for k, dtype in BATCH_DTYPES.items()}
    shapes = {"images": (B, *model_config.image_shape), "labels": (B,), "mask": (B,)}
    return {k: jax.ShapeDtypeStruct(shapes[k], dtype, sharding=sharding)
            for k, dtype in IMAGE_BATCH_DTYPES.items()}


def step_work(model_config: ModelConfig, train_config: TrainConfig) -> StepWork:
    """Examples, tokens (or patches) and training FLOPs of one step.

    The objective counts a ViT per image, spread over its `num_tokens` (patches and the
    class token), so FLOPs per step = images × num_tokens × its per-token figure = images ×
    3 × the joint forward FLOPs of one image; the patches reported are the image's
    `num_patches` (the class token is no input patch)."""
    B = train_config.global_batch_size
    per_token = build_objective(model_config, train_config).train_flops_per_token(
        model_config, train_config.seq_len)
    if family_of(model_config).tokens:
        tokens = B * train_config.seq_len
        return StepWork(examples=B, tokens=tokens, unit="tokens", flops=tokens * per_token)
    return StepWork(examples=B, tokens=B * model_config.num_patches, unit="patches",
                    flops=B * model_config.num_tokens * per_token)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _compile(jitted, args, target: Target, what: str, progress) -> tuple:
    progress(f"lowering {what}…")
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - start
    progress(f"compiling {what} for {len(target.devices)} × "
             f"{target.devices[0].device_kind} (large models take minutes on a CPU)…")
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # JaxRuntimeError; only libtpu's out-of-memory is a result.
        oom = _TPU_OOM_RE.search(str(e)) if target.is_tpu_topology else None
        if not oom:
            raise
        compile_s = time.perf_counter() - start
        needed = int(float(oom.group(1)) * (1 << 30))
        progress(f"libtpu stopped compiling the {what} after {compile_s:.1f} s: it needs "
                 f"{oom.group(1)} GiB per device, {oom.group(2)} GiB available")
        return None, StepReport(memory=StepMemory.from_oom(needed), flops_per_device=None,
                                lower_s=lower_s, compile_s=compile_s)
    compile_s = time.perf_counter() - start
    progress(f"compiled {what} in {compile_s:.1f} s")
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
        cost = cost[0] if cost else {}
    cost = cost or {}
    optimal = cost.get("optimal_seconds")
    if optimal is not None and optimal <= 0:  # libtpu gives a negative value for "unknown".
        optimal = None
    return compiled, StepReport(memory=StepMemory.of(compiled),
                                flops_per_device=float(cost.get("flops", 0.0)),
                                lower_s=lower_s, compile_s=compile_s,
                                xla_optimal_seconds=None if optimal is None else float(optimal))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lower_train_step(model_config: ModelConfig, train_config: TrainConfig, mesh):
    """The real train step (as `matlm train` builds it) and its abstract arguments."""
    objective = build_objective(model_config, train_config)
    optimizer = make_optimizer(train_config)
    schedule = learning_rate_schedule(train_config)
    step = make_train_step(model_config, objective, optimizer, schedule, mesh,
                           train_config.microbatches)
    state = abstract_state(model_config, optimizer, mesh)
    return step, (state, abstract_batch(model_config, train_config, mesh)), state


def check_fit(model_config: ModelConfig, train_config: TrainConfig, target: Target,
              include_eval: bool = True, min_headroom: float = 0.15,
              progress: Callable[[str], None] = _stderr) -> FitReport:
    """Compiles the train (and eval) step for `target` and reports memory and FLOPs.

    Mesh, batch and objective are checked first (MeshError, TrainConfigError: ValueErrors),
    before any compile. Any family: its batch (`abstract_batch`) and unit (`step_work`).
    """
    mesh = mesh_lib.make_mesh(train_config.mesh_shape, devices=list(target.devices))
    mesh_lib.check_batch_fits(mesh, train_config.global_batch_size, train_config.microbatches)
    mesh_lib.check_shard_local_nesting(mesh, model_config.ffn_nest_blocks)
    work = step_work(model_config, train_config)  # The objective's checks, before compiling.
    step, args, state = lower_train_step(model_config, train_config, mesh)
    _, train_report = _compile(step, args, target, "train step", progress)
    eval_report = None
    if include_eval:
        spec = model_config.granularities
        widths_by_name = {name: spec.uniform(name) for name in spec.names}
        eval_step = make_eval_step(model_config, widths_by_name, mesh,
                                   train_config.loss_chunk_size)
        _, eval_report = _compile(eval_step, (state.params, args[1]), target, "eval step",
                                  progress)
    return FitReport(target=target, mesh_shape=dict(mesh.shape),
                     model_flops_per_step=work.flops, tokens_per_step=work.tokens,
                     examples_per_step=work.examples, token_unit=work.unit,
                     microbatches=train_config.microbatches, train=train_report,
                     eval=eval_report, opt_state_bytes_per_device=bytes_per_device(
                         state.opt_state), min_headroom=min_headroom)
