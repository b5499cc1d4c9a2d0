"""Tokens/s the data pipeline delivers, against what the trainer could consume on this CPU;
and how its start-up time and memory scale with the corpus (10 K vs 1 M documents).

    python scripts/benchmark_data.py [--steps 50]
    python scripts/benchmark_data.py --corpus_docs=10000,1000000 --skip_tasks

Pipeline rows: per-host batches from `make_batch_iterator` (steady state after the
one-time read+tokenise, which is reported separately), for the default task and for a
streamed TFDS task on a prepared mock of c4/en (scripts/make_mock_c4.py, 4000 documents). Trainer row: an upper bound on the
tokens/s a training step could consume, = this CPU's measured fp32 matmul peak /
(training FLOPs per token of the full-width (XL) model, `matlm.model.counting`), i.e.
the trainer at 100% MFU training one granularity; a real trainer (lower MFU, several
granularities per step) consumes less, so the ratio printed is a lower bound.

Corpus scaling, for the streamed local-files path (`streaming_files_task`, the issue-12
keys), streamed TFDS (`tfds_task`, keys prefixed `tfds_`) and the in-memory path
(`local_files_task`, keys prefixed `in_memory_`): a generated corpus of N documents
(words drawn from the embedded Wikipedia sample's word frequencies, 20-200 words each;
jsonl files of 10 K documents, or a prepared c4/en-shaped TFDS dataset with a TFRecord
shard per 10 K documents; written to a temporary dir and deleted; never committed) is
read in a fresh process per size and path: seconds to the first batch, the process's peak RSS (VmHWM), and
tokens/s of the following batches at the 78M recipe's row length. The 78M trainer's
consumption per host is its recipe's (configs/runs/c4_matlm_78m.gin) tokens per step
at 50 % MFU on its slice, per host of 4 chips. The last line is one JSON object
(startup_s_10k, startup_s_1m, peak_rss_mb_10k, peak_rss_mb_1m, tokens_per_s_streaming,
trainer_78m_tokens_per_s_per_host, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # make_mock_c4


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


def trainer_bound(model_gin, seq_len, peak):
    from matlm.gin_config import model_config_from_gin, parse_gin
    from matlm.model.counting import train_flops_per_token
    parse_gin([model_gin], [])
    config = model_config_from_gin()
    return peak / train_flops_per_token(config, seq_len)


def corpus_texts(num_docs: int, seed: int = 0, chunk: int = 10_000):
    """`num_docs` documents of words drawn with the embedded sample's word frequencies,
    20-200 words each, in chunks (lists) of `chunk`."""
    import collections
    import re
    import numpy as np
    from matlm.data import documents
    counts = collections.Counter(w for _, text in documents.wiki_articles()
                                 for w in re.findall(r"[A-Za-z]+", text))
    words, freq = zip(*counts.most_common(20_000))
    words = np.asarray(words, dtype=object)
    p = np.asarray(freq, np.float64) / sum(freq)
    rng = np.random.default_rng(seed)
    for first in range(0, num_docs, chunk):
        n = min(chunk, num_docs - first)
        lengths = rng.integers(20, 201, n)
        drawn = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
        ends = np.cumsum(lengths)
        yield [" ".join(drawn[e - k:e]) for e, k in zip(ends, lengths)]


def write_corpus(directory: str, num_docs: int, docs_per_file: int = 10_000, seed: int = 0) -> int:
    """`corpus_texts` as jsonl files of `docs_per_file` documents; returns the bytes written."""
    written = 0
    for i, texts in enumerate(corpus_texts(num_docs, seed, docs_per_file)):
        path = os.path.join(directory, f"part-{i:05d}.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
        written += os.path.getsize(path)
    return written


def write_tfds_corpus(directory: str, num_docs: int, seed: int = 0) -> int:
    """`corpus_texts` as a prepared c4/en:3.1.0-shaped TFDS dataset (TFRecord, one shard per
    10 K documents, as many as the jsonl corpus has files); returns its bytes."""
    from make_mock_c4 import build_mock_c4
    texts = (t for chunk in corpus_texts(num_docs, seed) for t in chunk)
    path = build_mock_c4(directory, num_docs, num_shards=max(num_docs // 10_000, 1),
                         num_validation_docs=1000, train_texts=texts)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


PIPELINES = ("streamed", "in_memory", "tfds")


def measure_corpus(directory: str, seq_len: int, batch: int, steps: int, pipeline: str) -> dict:
    """In this (fresh) process: time to the first batch, peak RSS, tokens/s after it."""
    from matlm import data
    from matlm.data import tasks
    vocab = data.default_vocabulary()
    start = time.perf_counter()
    if pipeline == "tfds":  # The prepared dataset under directory/tfds, streamed.
        task = tasks.register_tfds_task("benchmark_corpus", "c4/en:3.1.0",
                                        data_dir=os.path.join(directory, "tfds"))
    else:
        register = (tasks.register_streaming_files_task if pipeline == "streamed"
                    else tasks.register_local_files_task)
        task = register(os.path.join(directory, "*.jsonl"), name="benchmark_corpus")
    registered = time.perf_counter() - start  # In-memory: reads every file here.
    rate, setup = pipeline_rate(task, seq_len, batch, vocab, steps)
    startup = registered + setup
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"startup_s": startup, "peak_rss_mb": hwm_kb / 1024, "tokens_per_s": rate}


def trainer_78m_per_host() -> float:
    """Tokens/s one host of the 78M recipe's slice consumes at 50 % MFU (4 chips a host)."""
    from matlm.gin_config import model_config_from_gin, parse_gin, train_config_from_gin
    from matlm.launch.topology import parse_topology, slice_from_gin_files
    from matlm.training.metrics import KNOWN_PEAK_FLOPS
    from matlm.training.objective import build_objective
    recipe = "configs/runs/c4_matlm_78m.gin"
    parse_gin([recipe], [])
    model, train = model_config_from_gin(), train_config_from_gin()
    chip, grid = parse_topology(slice_from_gin_files([recipe]))
    chips = 1
    for d in grid:
        chips *= d
    objective = build_objective(model, train)
    flops_per_token = objective.train_flops_per_token(model, train.seq_len,
                                                      (True,) * len(objective.names))
    tokens_per_s = 0.5 * KNOWN_PEAK_FLOPS[chip.peak_flops_key] * chips / flops_per_token
    return tokens_per_s / max(chips // 4, 1)


def corpus_scaling(sizes, steps: int, pipelines) -> dict:
    """{(pipeline, documents): measurement}; each corpus is generated once."""
    results = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="matlm_corpus_") as directory:
            if {"streamed", "in_memory"} & set(pipelines):
                start = time.perf_counter()
                size = write_corpus(directory, n)
                print(f"generated {n:,} jsonl documents ({size / 1e6:,.0f} MB) in "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
            if "tfds" in pipelines:
                start = time.perf_counter()
                size = write_tfds_corpus(os.path.join(directory, "tfds"), n)
                print(f"prepared {n:,} documents as TFDS TFRecord shards ({size / 1e6:,.0f} "
                      f"MB) in {time.perf_counter() - start:.0f} s", flush=True)
            for pipeline in pipelines:
                child = subprocess.run(
                    [sys.executable, __file__, "--_measure", directory, "--steps", str(steps),
                     "--_pipeline", pipeline], capture_output=True, text=True)
                if child.returncode:
                    raise SystemExit(f"measuring {n} documents ({pipeline}) failed:\n"
                                     f"{child.stderr[-3000:]}")
                results[pipeline, n] = json.loads(child.stdout.strip().splitlines()[-1])
    return results


def _label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--corpus_docs", default="10000,1000000",
                        help="comma-separated corpus sizes in documents ('' skips)")
    parser.add_argument("--skip_tasks", action="store_true",
                        help="skip the per-task rows (default task, TFDS mock)")
    parser.add_argument("--pipelines", default="streamed,tfds,in_memory",
                        help="which paths to measure: streamed (streaming_files_task), "
                             "tfds (a streamed tfds_task on prepared shards), "
                             "in_memory (local_files_task)")
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_pipeline", default="streamed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seq_len, batch = 2048, 16  # The 78M recipe's rows; 16 rows per host per step.
    if args._measure:
        print(json.dumps(measure_corpus(args._measure, seq_len, batch, args.steps,
                                        args._pipeline)))
        return
    summary = {}
    if not args.skip_tasks:
        summary.update(task_rows(args.steps))
    sizes = [int(float(n)) for n in args.corpus_docs.split(",") if n.strip()]
    pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
    if unknown := set(pipelines) - set(PIPELINES):
        parser.error(f"--pipelines: unknown {sorted(unknown)}; choose from {PIPELINES}")
    if sizes and pipelines:
        scaling = corpus_scaling(sizes, args.steps, pipelines)
        per_host = trainer_78m_per_host()
        print(f"\ncorpus scaling (generated corpora, rows of {seq_len}, {batch} rows per batch); "
              f"the 78M recipe consumes {per_host:,.0f} tokens/s per host at 50 % MFU")
        print(f"{'pipeline':>10} {'documents':>10} {'start-up s':>11} {'peak RSS MB':>12} "
              f"{'tokens/s':>12} {'x 78M host':>11}")
        for (pipeline, n), r in scaling.items():
            print(f"{pipeline:>10} {n:>10,} {r['startup_s']:11.1f} {r['peak_rss_mb']:12,.0f} "
                  f"{r['tokens_per_s']:12,.0f} {r['tokens_per_s'] / per_host:10.1f}x")
            # The keys are the streamed path's; the in-memory path's are prefixed.
            prefix = "" if pipeline == "streamed" else f"{pipeline}_"
            summary[f"{prefix}startup_s_{_label(n)}"] = round(r["startup_s"], 2)
            summary[f"{prefix}peak_rss_mb_{_label(n)}"] = round(r["peak_rss_mb"])
            summary[f"{prefix}tokens_per_s_{_label(n)}"] = round(r["tokens_per_s"])
        for pipeline in pipelines:
            got = {n: r for (p, n), r in scaling.items() if p == pipeline}
            if len(got) > 1:
                small, large = got[min(got)], got[max(got)]
                print(f"{pipeline}: {_label(max(got))}/{_label(min(got))} start-up "
                      f"{large['startup_s'] / small['startup_s']:.1f}x, peak RSS "
                      f"{large['peak_rss_mb'] / small['peak_rss_mb']:.1f}x")
        if "streamed" in pipelines:
            streamed = {n: r for (p, n), r in scaling.items() if p == "streamed"}
            summary["tokens_per_s_streaming"] = round(streamed[max(streamed)]["tokens_per_s"])
        summary["trainer_78m_tokens_per_s_per_host"] = round(per_host)
    print(json.dumps(summary))


def task_rows(steps: int) -> dict:
    from make_mock_c4 import build_mock_c4
    from matlm import data

    from benchmark_model import matmul_peak_gflops
    vocab = data.default_vocabulary()
    peak = matmul_peak_gflops() * 1e9
    rows = []
    mock_dir = tempfile.TemporaryDirectory(prefix="matlm_mock_c4_")
    build_mock_c4(mock_dir.name, num_docs=4000, num_shards=16)
    c4_task = data.register_tfds_task("benchmark_mock_c4", "c4/en:3.1.0",
                                      data_dir=mock_dir.name)
    for model_gin, seq_len, batch in [("configs/models/tiny.gin", 256, 64),
                                      ("configs/models/matlm_78m.gin", 1024, 16)]:
        trainer = trainer_bound(model_gin, seq_len, peak)
        wiki, wiki_setup = pipeline_rate("matlm_wiki", seq_len, batch, vocab, steps)
        c4, c4_setup = pipeline_rate(c4_task, seq_len, batch, vocab, steps)
        name = model_gin.rsplit("/", 1)[-1]
        rows.append((f"{name} L={seq_len} B={batch}", trainer, "matlm_wiki", wiki, wiki_setup))
        rows.append(("", trainer, "c4 mock, streamed", c4, c4_setup))
    mock_dir.cleanup()
    print(f"CPU fp32 matmul peak (measured): {peak / 1e9:.0f} GFLOP/s")
    header = (f"{'model / batch':28} {'trainer max tok/s':>18} {'task':20} "
              f"{'pipeline tok/s':>15} {'ratio':>7} {'setup s':>8}")
    print(header)
    print("-" * len(header))
    for label, trainer, task, rate, setup in rows:
        print(f"{label:28} {trainer:18,.0f} {task:20} {rate:15,.0f} {rate / trainer:6.0f}x "
              f"{setup:8.2f}")
    return {"pipeline_tokens_per_s_wiki": round(rows[0][3])}


if __name__ == "__main__":
    main()
