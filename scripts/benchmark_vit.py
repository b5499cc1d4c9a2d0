#!/usr/bin/env python
"""Benchmark the MatViT train step: joint (all granularities, sliced FFNs over shared
streams) vs XL only vs the masked joint step (traced widths: every granularity at full
FFN FLOPs), as patches/s and as a fraction of this machine's matmul peak, measured in the
same run, beside a MatLM joint step with the same body over as many tokens (the goal:
the MatViT's fraction of peak within 10 % of the LM's).

Each variant is a full optimizer step (forward, backward, AdamW update) on one device,
built as `matlm train` builds it (`make_train_step`, the family's batch sharding). The
timing and the peak are scripts/benchmark_model.py's helpers, as scripts/benchmark_train.py
uses them for the LM: variants interleaved in rounds (`--steps` rounds of `--block`
back-to-back steps), best kept; the peak is the better of a standalone 2048³ matmul and
one interleaved with the steps. FLOPs are matlm.model.counting's per-image counts (the
trainer's MFU). The last line is one JSON object.

  python scripts/benchmark_vit.py                    # a CPU-sized ViT: 64 px in 8 px patches
  python scripts/benchmark_vit.py --image_size 224 --patch_size 16 --d_model 768 \\
      --n_layers 12 --n_heads 12 --d_ff 3072 --num_classes 1000 --batch 64   # B/16
"""
from __future__ import annotations

from matlm.runtime import reexec_with_hugepage_malloc

if __name__ == "__main__":  # Run as a script, not when imported.
    reexec_with_hugepage_malloc()  # Before anything allocates: see matlm/runtime.py.

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(__file__))
from benchmark_model import (matmul_peak_gflops, synthetic_token_batch,  # noqa: E402
                             time_interleaved)

from matlm.model import ModelConfig  # noqa: E402
from matlm.model.attention import resolve_impl  # noqa: E402
from matlm.model.counting import joint_forward_flops_per_image, train_flops_per_image  # noqa: E402
from matlm.model.vit_config import ViTConfig  # noqa: E402
from matlm.training import mesh as mesh_lib  # noqa: E402
from matlm.training.config import TrainConfig  # noqa: E402
from matlm.training.objective import build_objective  # noqa: E402
from matlm.training.optimizer import learning_rate_schedule, make_optimizer  # noqa: E402
from matlm.training.train_step import batch_sharding_of, init_state, make_train_step  # noqa: E402

VARIANTS = ("joint", "xl_only", "masked_joint")


def step_flops(config: ViTConfig, joint) -> dict:
    """Training FLOPs per image of each variant (3 × forward, matlm.model.counting): the
    joint step shares residual streams (at least layer 0); the masked one runs each
    granularity whole at the stored widths."""
    full = train_flops_per_image(config)
    return {"joint": 3 * joint_forward_flops_per_image(config, joint.widths),
            "xl_only": full, "masked_joint": len(joint.widths) * full}


def benchmark(args) -> dict:
    config = ViTConfig(image_size=args.image_size, patch_size=args.patch_size,
                       num_channels=3, num_classes=args.num_classes, d_model=args.d_model,
                       n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff,
                       activation="gelu", compute_dtype=args.compute_dtype,
                       width_alignment=8, scan_layers=args.scan_layers)
    train = TrainConfig(steps=1000, global_batch_size=args.batch, mesh_shape=(1, 1, 1),
                        seq_len=config.num_tokens)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(train), learning_rate_schedule(train)
    joint = build_objective(config, train)
    xl_only = build_objective(config, dataclasses.replace(train, granularities=("XL",)))
    # Traced-width (masked) FFNs: the same joint objective, full FLOPs for every granularity.
    masked = dataclasses.replace(joint, widths=tuple(jnp.asarray(w, jnp.int32)
                                                     for w in joint.widths))
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.normal(size=(args.batch, *config.image_shape)).astype(np.float32),
        "labels": rng.integers(0, args.num_classes, (args.batch,)).astype(np.int32),
        "mask": np.ones((args.batch,), np.float32)}, batch_sharding_of(config, mesh))
    steps = {name: make_train_step(config, objective, optimizer, schedule, mesh)
             for name, objective in zip(VARIANTS, (joint, xl_only, masked))}
    state = init_state(config, optimizer, mesh, seed=0)
    # Each variant gets its own state, donated and replaced every step as in the trainer.
    states = {name: jax.tree.map(jnp.copy, state) for name in steps}
    batches = {name: batch for name in steps}
    # The reference: a MatLM joint step with the same body (d_model, layers, heads, d_ff)
    # over as many tokens per example (num_tokens) and a vocabulary of --lm_vocab.
    lm = ModelConfig(vocab_size=args.lm_vocab, d_model=args.d_model, n_layers=args.n_layers,
                     n_heads=args.n_heads, d_ff=args.d_ff, activation="gelu",
                     compute_dtype=args.compute_dtype, width_alignment=8,
                     scan_layers=args.scan_layers)
    lm_train = dataclasses.replace(train, seq_len=config.num_tokens)
    lm_joint = build_objective(lm, lm_train)
    steps["lm_joint"] = make_train_step(lm, lm_joint, optimizer, schedule, mesh)
    states["lm_joint"] = init_state(lm, optimizer, mesh, seed=0)
    T = config.num_tokens
    batches["lm_joint"] = synthetic_token_batch(args.batch, T, args.lm_vocab, mesh)

    def runner(name):
        def run(_):
            states[name], metrics = steps[name](states[name], batches[name])
            return metrics["loss"]
        return run

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    standalone_peak = matmul_peak_gflops()
    times = time_interleaved({"matmul": lambda _: matmul(a),
                              **{name: runner(name) for name in steps}}, (None,), args.steps,
                             block=args.block)
    peak = max(standalone_peak, 2 * 2048 ** 3 / times.pop("matmul") / 1e9)

    flops = step_flops(config, joint)
    # Per example (a sequence of num_tokens), as the ViT's are per image.
    lm_flops = T * lm_joint.train_flops_per_token(lm, T)
    patches = args.batch * config.num_patches
    rows = []
    for name in VARIANTS:
        gflops = flops[name] * args.batch / times[name] / 1e9
        rows.append([name, f"{times[name] * 1e3:.1f}", f"{patches / times[name]:,.0f}",
                     f"{args.batch / times[name]:,.1f}", f"{gflops:.1f}",
                     f"{gflops / peak:.0%}"])
    print(f"device: {jax.devices()[0].device_kind}; fp32 matmul peak {peak:.1f} GFLOP/s "
          f"(2048³: the better of standalone and interleaved with the steps)")
    print(f"shape: {args.image_size} px / {args.patch_size} px patches = "
          f"{config.num_patches} patches + class token; d_model={args.d_model} "
          f"layers={args.n_layers} heads={args.n_heads} d_ff={args.d_ff} (gelu) "
          f"granularities {'/'.join(joint.names)} = {[w[0] for w in joint.widths]} "
          f"classes={args.num_classes} batch={args.batch} {args.compute_dtype} "
          f"attention={resolve_impl(config, seq_len=config.num_tokens)}"
          f"{' scanned' if args.scan_layers else ''}; best of {args.steps} rounds × "
          f"{args.block} back-to-back optimizer steps, variants interleaved")
    print(tabulate(rows, headers=["train step", "ms", "patches/s", "images/s", "GFLOP/s",
                                  "of peak"], tablefmt="simple_outline", disable_numparse=True))
    time_ratio = times["joint"] / times["masked_joint"]
    flop_ratio = flops["joint"] / flops["masked_joint"]
    print(f"sliced joint / masked joint: time {time_ratio:.3f}, FLOPs {flop_ratio:.3f} "
          f"(target: time at most 5 % above FLOPs — slicing saves what it should)")
    print(f"joint / XL only: time {times['joint'] / times['xl_only']:.3f}, FLOPs "
          f"{flops['joint'] / flops['xl_only']:.3f}")
    mfu = lambda name: flops[name] * args.batch / times[name] / 1e9 / peak
    lm_mfu = lm_flops * args.batch / times["lm_joint"] / 1e9 / peak
    print(f"MatLM joint step, same body over {T} tokens, vocab {args.lm_vocab}: "
          f"{times['lm_joint'] * 1e3:.1f} ms, {lm_mfu:.0%} of peak; MatViT joint / MatLM "
          f"joint fraction of peak: {mfu('joint') / lm_mfu:.3f} (target: at least 0.9)")
    return {"joint_patches_per_s": round(patches / times["joint"], 1),
            "xl_only_patches_per_s": round(patches / times["xl_only"], 1),
            "masked_joint_patches_per_s": round(patches / times["masked_joint"], 1),
            "peak_gflops": round(peak, 1), "mfu_joint": round(mfu("joint"), 4),
            "mfu_xl": round(mfu("xl_only"), 4), "mfu_masked": round(mfu("masked_joint"), 4),
            "sliced_over_masked_time": round(time_ratio, 4),
            "sliced_over_masked_flops": round(flop_ratio, 4),
            "joint_over_xl_time": round(times["joint"] / times["xl_only"], 4),
            "joint_over_xl_flops": round(flops["joint"] / flops["xl_only"], 4),
            "mfu_lm_joint": round(lm_mfu, 4),
            "vit_over_lm_joint_mfu": round(mfu("joint") / lm_mfu, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [("image_size", 64), ("patch_size", 8), ("d_model", 256),
                          ("n_layers", 6), ("n_heads", 4), ("d_ff", 1024),
                          ("num_classes", 1000), ("batch", 16), ("steps", 4), ("block", 2),
                          ("lm_vocab", 8192)]:
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--scan_layers", action="store_true",
                        help="ViTConfig.scan_layers (the pod recipes' setting)")
    args = parser.parse_args()
    if args.image_size % args.patch_size:
        parser.error(f"--image_size {args.image_size} is not divisible by --patch_size "
                     f"{args.patch_size}")
    print(json.dumps(benchmark(args)))


if __name__ == "__main__":
    main()
