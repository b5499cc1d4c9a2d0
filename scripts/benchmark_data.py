"""Tokens/s the data pipeline delivers, against what the trainer could consume on this CPU.

    python scripts/benchmark_data.py [--steps 50]

Pipeline rows: per-host batches from `make_batch_iterator` (steady state after the
one-time read+tokenise, which is reported separately), for the default task and for a
packed TFDS task on `tfds.testing.mock_data`. Trainer row: an upper bound on the
tokens/s a training step could consume, = this CPU's measured fp32 matmul peak /
(training FLOPs per token of the full-width (XL) model, `matlm.model.counting`), i.e.
the trainer at 100% MFU training one granularity; a real trainer (lower MFU, several
granularities per step) consumes less, so the ratio printed is a lower bound.
"""
from __future__ import annotations

import argparse
import time


def pipeline_rate(task, seq_len, batch, vocab, steps):
    from matlm import data
    start = time.perf_counter()
    it = data.make_batch_iterator(task, "train", seq_len, batch, vocab, seed=0)
    next(it)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - start
    return steps * batch * seq_len / elapsed, setup


def matmul_peak_flops(n=2048, repeats=10):
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def trainer_bound(model_gin, seq_len, peak):
    from matlm.gin_config import model_config_from_gin, parse_gin
    from matlm.model.counting import train_flops_per_token
    parse_gin([model_gin], [])
    config = model_config_from_gin()
    return peak / train_flops_per_token(config, seq_len)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    import tensorflow_datasets as tfds
    from matlm import data

    vocab = data.default_vocabulary()
    peak = matmul_peak_flops()
    rows = []
    for model_gin, seq_len, batch in [("configs/models/tiny.gin", 256, 64),
                                      ("configs/models/matlm_78m.gin", 1024, 16)]:
        trainer = trainer_bound(model_gin, seq_len, peak)
        wiki, wiki_setup = pipeline_rate("matlm_wiki", seq_len, batch, vocab, args.steps)
        with tfds.testing.mock_data(num_examples=2000):
            c4, c4_setup = pipeline_rate("matlm_c4_en", seq_len, batch, vocab, args.steps)
        name = model_gin.rsplit("/", 1)[-1]
        rows.append((f"{name} L={seq_len} B={batch}", trainer, "matlm_wiki", wiki, wiki_setup))
        rows.append(("", trainer, "matlm_c4_en (mock)", c4, c4_setup))
    print(f"CPU fp32 matmul peak (measured): {peak / 1e9:.0f} GFLOP/s")
    header = (f"{'model / batch':28} {'trainer max tok/s':>18} {'task':20} "
              f"{'pipeline tok/s':>15} {'ratio':>7} {'setup s':>8}")
    print(header)
    print("-" * len(header))
    for label, trainer, task, rate, setup in rows:
        print(f"{label:28} {trainer:18,.0f} {task:20} {rate:15,.0f} {rate / trainer:6.0f}x "
              f"{setup:8.2f}")


if __name__ == "__main__":
    main()
