"""Evaluation throughput, and Mix'n'Match: one masked compile versus a compile per slice.

    python scripts/benchmark_eval.py [--gin_file=configs/models/tiny.gin] [--examples=32]

1. examples/s of each kind of task (held-out loss rows, multiple choice, last word,
   generative QA) for one submodel, warm (compiled) and cold (first call, with compiles).
2. 10 Mix'n'Match configurations on the same multiple-choice rows: the masked path (one
   compiled function per bucket, shared by all 10) versus static slices (each config
   compiles its own), total wall time side by side, measured in one run.
Random parameters: speed does not depend on what the model learnt.
"""
from __future__ import annotations

from matlm.runtime import reexec_with_hugepage_malloc

if __name__ == "__main__":  # Run as a script, not when imported (tests, other benchmarks).
    reexec_with_hugepage_malloc()  # Before anything allocates: see matlm/runtime.py.

import argparse
import time

import jax
from tabulate import tabulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gin_file", default="configs/models/tiny.gin")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--mixes", type=int, default=10)
    args = parser.parse_args()

    from matlm import data
    from matlm.evaluation import runner, scoring, submodels
    from matlm.evaluation import tasks as task_registry
    from matlm.evaluation.setup_data import setup_eval_data
    from matlm.gin_config import model_config_from_gin, parse_gin
    from matlm.model import init_params

    setup_eval_data()
    parse_gin([args.gin_file, "configs/eval/offline.gin"], [])
    task_registry.eval_suite()
    config = model_config_from_gin()
    vocab = data.default_vocabulary(vocab_size=config.vocab_size)
    params = init_params(config, jax.random.key(0))
    options = runner.EvalOptions(max_examples=args.examples, max_len=512, batch_size=8)
    xl = config.granularities.uniform(config.granularities.names[-1])
    byte_lengths = runner.piece_byte_lengths(vocab, config.vocab_size)
    print(f"model {args.gin_file}: d_model={config.d_model} layers={config.n_layers} "
          f"d_ff={config.d_ff} vocab={config.vocab_size}; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); {args.examples} examples per task, 1-shot")

    plan = {t.name: t for t in runner.prepare(
        ["loss", "hellaswag", "lambada", "trivia_qa"], vocab, options)}
    score = {
        "loss:matlm_wiki": lambda t, s: runner._score_loss(t, s, xl, byte_lengths, _noop),
        "hellaswag": lambda t, s: runner._score_multiple_choice(t, s, xl, _noop),
        "lambada": lambda t, s: runner._score_last_word(t, s, xl, _noop),
        "trivia_qa": lambda t, s: runner._score_generative(t, s, xl, vocab, _noop),
    }
    rows = []
    for name, fn in score.items():
        scorer = scoring.SubmodelScorer(config, params, options.batch_size, options.max_len)
        task = plan[name]
        n = (sum(int(b["loss_mask"].any(axis=1).sum()) for b in task.batches)
             if task.kind == "loss" else len(task.requests))
        cold = _timed(lambda: fn(task, scorer))
        warm = min(_timed(lambda: fn(task, scorer)) for _ in range(2))
        unit = {"loss": f"rows of {options.loss_seq_len} tokens",
                "multiple_choice": "examples (4 choices)", "last_word": "examples",
                "generative_qa": "examples (greedy, "
                f"{getattr(task.mapping, 'max_new_tokens', 0)} new tokens)"}[task.kind]
        rows.append([name, task.kind, n, unit, f"{n / warm:.1f}", f"{n / cold:.1f}",
                     scorer.compiled_count()])
    print(tabulate(rows, headers=["task", "kind", "n", "unit", "examples/s (warm)",
                                  "examples/s (cold)", "compiles"], tablefmt="github"))

    mixes = submodels.mixnmatch_vectors(config, args.mixes, seed=0)
    rows_mc = plan["hellaswag"].rows
    side = []
    for label, masked in (("masked (traced widths)", True), ("sliced (static widths)", False)):
        scorer = scoring.SubmodelScorer(config, params, options.batch_size, options.max_len,
                                        masked=masked)
        first = time.perf_counter()
        first_config = _timed(lambda: scorer.loglik(rows_mc, mixes[0]))
        for widths in mixes[1:]:
            scorer.loglik(rows_mc, widths)
        total = time.perf_counter() - first
        warm = min(_timed(lambda: scorer.loglik(rows_mc, w)) for w in mixes[:3])
        side.append([label, f"{total:.2f}", f"{first_config:.2f}",
                     f"{(total - first_config) / (len(mixes) - 1):.2f}", f"{warm:.2f}",
                     scorer.compiled_count()])
    print(f"\n{len(mixes)} Mix'n'Match configurations, hellaswag, {len(rows_mc)} rows each:")
    print(tabulate(side, headers=["path", f"total s ({len(mixes)} configs)", "1st config s",
                                  "each later config s", "warm config s", "compiles"],
                   tablefmt="github"))
    print(f"masked / sliced total: {float(side[0][1]) / float(side[1][1]):.2f}")


def _noop(_):
    pass


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
