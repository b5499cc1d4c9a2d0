#!/usr/bin/env python
"""Benchmark: compile time of the joint train step against depth, scanned vs unrolled.

Lowers and compiles the real train step (`make_train_step`, granularity_mode 'all': the
joint pass over shared streams, backward, AdamW) for the same model at several depths,
with `ModelConfig.scan_layers` off and on, on this machine's first device. Unrolled, the
HLO holds one copy of every layer, so lowering and compile time grow with depth; scanned,
one body per group of layers (for S/M/L/XL: layer 0, then one scan over layers 1..L-1),
so they should stay roughly flat. Prints a table, then a JSON line.

  python scripts/benchmark_compile.py                       # d_model 256, 8/16/32 layers
  python scripts/benchmark_compile.py --layers 4,8 --d_model 128   # quicker
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
from tabulate import tabulate

from matlm.model import ModelConfig
from matlm.training import mesh as mesh_lib
from matlm.training.config import TrainConfig
from matlm.training.objective import build_objective
from matlm.training.optimizer import learning_rate_schedule, make_optimizer
from matlm.training.train_step import abstract_state, make_train_step


def compile_once(model: ModelConfig, train: TrainConfig, mesh) -> dict:
    """Seconds to lower and to compile the train step, and the HLO's size."""
    optimizer = make_optimizer(train)
    step = make_train_step(model, build_objective(model, train), optimizer,
                           learning_rate_schedule(train), mesh)
    state = abstract_state(model, optimizer, mesh)
    B, T = train.global_batch_size, train.seq_len
    sharding = mesh_lib.batch_sharding(mesh)
    spec = lambda dtype: jax.ShapeDtypeStruct((B, T), dtype, sharding=sharding)
    batch = {"inputs": spec(jnp.int32), "targets": spec(jnp.int32),
             "segment_ids": spec(jnp.int32), "positions": spec(jnp.int32),
             "loss_mask": spec(jnp.float32)}
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    hlo_chars = len(lowered.as_text())
    start = time.perf_counter()
    lowered.compile()
    return {"lower_s": lower_s, "compile_s": time.perf_counter() - start,
            "hlo_chars": hlo_chars}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="8,16,32", help="comma-separated depths")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--remat_policy", default="dots_saveable")
    args = parser.parse_args()

    base = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_heads=args.n_heads,
                       d_ff=4 * args.d_model, activation="swiglu",
                       remat_policy=args.remat_policy)
    train = TrainConfig(steps=10, seq_len=args.seq_len, global_batch_size=args.batch)
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rows, results = [], []
    for n_layers in (int(n) for n in args.layers.split(",")):
        by_form = {}
        for scan in (False, True):
            model = dataclasses.replace(base, n_layers=n_layers, scan_layers=scan)
            by_form[scan] = compile_once(model, train, mesh)
            results.append({"n_layers": n_layers, "scan_layers": scan, **by_form[scan]})
            print(f"  {n_layers} layers, scan_layers={scan}: {by_form[scan]}", flush=True)
        u, s = by_form[False], by_form[True]
        rows.append([n_layers, f"{u['lower_s']:.1f}", f"{u['compile_s']:.1f}",
                     f"{u['hlo_chars'] / 1e6:.2f}", f"{s['lower_s']:.1f}",
                     f"{s['compile_s']:.1f}", f"{s['hlo_chars'] / 1e6:.2f}"])
    print(f"joint train step (S/M/L/XL, AdamW, remat {args.remat_policy}), d_model "
          f"{args.d_model}, d_ff {4 * args.d_model}, vocab {args.vocab_size}, batch "
          f"{args.batch} × seq {args.seq_len}, on {jax.devices()[0].device_kind}")
    print(tabulate(rows, headers=["layers", "unrolled lower s", "unrolled compile s",
                                  "unrolled HLO MB", "scanned lower s", "scanned compile s",
                                  "scanned HLO MB"], tablefmt="simple_outline"))
    print(json.dumps({"benchmark": "compile_vs_depth", "d_model": args.d_model,
                      "seq_len": args.seq_len, "batch": args.batch,
                      "remat_policy": args.remat_policy, "results": results}))


if __name__ == "__main__":
    main()
