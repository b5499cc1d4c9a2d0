"""Decoding speed side by side on the same prompts: no cache, KV cache, speculative.

    python scripts/benchmark_decode.py --model_dir=runs/default
    python scripts/benchmark_decode.py                      # a fresh tiny init (speed only)

Prompts: the first `--prompt_tokens` tokens of `--prompts` articles of the embedded
corpus's validation split (matlm_wiki), each decoded alone (batch 1: the latency setting
speculative decoding is for), greedy unless `--temperature` is set. Every configuration
is compiled on a warm-up prompt first; tokens/s = new tokens / wall time over all prompts
(prefill included), the best of `--repeats` passes. Rows:

1. no-cache XL (full recomputation per token) and KV-cache XL at `--long_tokens` (256)
   new tokens: `cache_over_nocache`.
2. KV-cache decoding of XL and of each draft alone at `--new_tokens` (default: up to the
   run's context), with FLOPs per token relative to XL;
3. speculative XL with the S, M and a Mix'n'Match draft for k in --ks, and the shared
   attention cache for the S draft: tokens/s, acceptance rate α (accepted / drafted),
   tokens per target pass, the speed-up over KV-cache XL, and the speed-up a cost model
   predicts from α and measured extend times: tokens per round (1 - α^(k+1)) / (1 - α)
   over a round's cost in 1-token XL extends, (k + 1)·c + v (k·c + v shared), where c is a
   1-token draft extend's time over XL's and v a (k+1)-token XL extend's (the verify).
   Greedy speculative output is checked token-for-token against KV-cache XL.
4. the extend times themselves (ms per K-token extend, per submodel).
The last line is JSON.
"""
from __future__ import annotations

from matlm.runtime import reexec_with_hugepage_malloc

if __name__ == "__main__":  # Run as a script, not when imported.
    reexec_with_hugepage_malloc()  # Before anything allocates: see matlm/runtime.py.

import argparse
import json
import time

import jax
from tabulate import tabulate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", default=None,
                        help="a model dir (default: a fresh init of --gin_file, speed only)")
    parser.add_argument("--gin_file", default="configs/models/tiny.gin")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=None,
                        help="new tokens per prompt for the speculative rows (default: "
                             "context - prompt_tokens, 96 without a checkpoint)")
    parser.add_argument("--long_tokens", type=int, default=256,
                        help="new tokens for no-cache vs KV cache")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--mix", default=None,
                        help="the Mix'n'Match draft (default: S in the first half of the "
                             "layers, L in the second)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best is kept)")
    args = parser.parse_args()

    from matlm.data.task_vocabulary import task_texts
    from matlm.data.vocabulary import start_id
    from matlm.decoding.generate import generate
    from matlm.decoding.nocache import generate_no_cache
    from matlm.decoding.sampling import SamplingConfig
    from matlm.decoding.speculative import speculative_generate
    from matlm.model.counting import forward_flops_per_token

    config, params, vocab, context, source = _load(args)
    xl = config.granularities.uniform(config.granularities.names[-1])
    half = config.n_layers // 2
    mix = (config.resolve_widths(args.mix) if args.mix else
           config.resolve_widths(",".join(["S"] * half + ["L"] * (config.n_layers - half))))
    drafts = {"S": config.resolve_widths("S"), "M": config.resolve_widths("M"), "mix": mix}
    ks = [int(k) for k in args.ks.split(",")]
    new_tokens = args.new_tokens or ((context or 128) - args.prompt_tokens)
    sampling = SamplingConfig(temperature=args.temperature)

    texts = [t for t in task_texts("matlm_wiki", "validation", max_documents=4 * args.prompts)
             if len(vocab.encode(t)) >= args.prompt_tokens]
    prompts = [[start_id(vocab), *vocab.encode(t)[:args.prompt_tokens - 1]]
               for t in texts[:args.prompts + 1]]
    warm, prompts = prompts[0], prompts[1:]
    print(f"{source}: d_model={config.d_model} layers={config.n_layers} d_ff={config.d_ff} "
          f"vocab={config.vocab_size}; {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s); {len(prompts)} validation prompts of {args.prompt_tokens} tokens, "
          f"batch 1, {'greedy' if sampling.greedy else f'temperature {args.temperature}'}; "
          f"mix draft = {','.join(config.granularities.name_of([w]) for w in mix)}")

    def timed(decode, repeats=None):
        """(outputs, tokens/s) of `decode(prompt)` over the prompts, after one warm-up call
        (compiles): the best of --repeats passes (the machine may be shared)."""
        decode(warm)
        best = float("inf")
        for _ in range(repeats or args.repeats):
            start = time.perf_counter()
            outs = [decode(p) for p in prompts]
            best = min(best, time.perf_counter() - start)
        return outs, sum(len(o[0]) for o in outs) / best

    rows, result = [], {}

    def plain(widths, n):
        return timed(lambda p: (generate(params, config, [p], widths=widths, max_new_tokens=n,
                                         sampling=sampling, seed=1)[0], None))

    # 1. Cache vs no cache at the long length.
    _, nocache_tps = timed(lambda p: (generate_no_cache(params, config, [p], widths=xl,
                                                        max_new_tokens=args.long_tokens)[0],
                                      None), repeats=1)  # Slow: one long pass.
    _, cache_long_tps = plain(xl, args.long_tokens)
    rows.append(["no cache", "XL", "", "", args.long_tokens, f"{nocache_tps:.1f}", "", "", "",
                 ""])
    rows.append(["KV cache", "XL", "", "", args.long_tokens, f"{cache_long_tps:.1f}", "", "",
                 f"{cache_long_tps / nocache_tps:.2f}x over no cache", ""])
    result["cache_over_nocache"] = round(cache_long_tps / nocache_tps, 3)

    # 2. KV cache of the target and of each draft alone.
    xl_outs, xl_tps = plain(xl, new_tokens)
    rows.append(["KV cache", "XL", "", "", new_tokens, f"{xl_tps:.1f}", "", "", "1.00x", ""])
    for name, widths in drafts.items():
        _, tps = plain(widths, new_tokens)
        flops = (forward_flops_per_token(config, context or 128, widths)
                 / forward_flops_per_token(config, context or 128, xl))
        rows.append(["KV cache", name, "", "", new_tokens, f"{tps:.1f}", "", "",
                     f"{tps / xl_tps:.2f}x (FLOPs/token {flops:.2f} of XL)", ""])
    # The cost model: one K-token extend at the prompt + new_tokens / 2 cache depth.
    cache_len = args.prompt_tokens + new_tokens + max(ks) + 1
    widths_of = {"XL": xl, **drafts}
    extend_ms = {name: {K: extend_milliseconds(params, config, widths, K, cache_len,
                                      args.prompt_tokens + new_tokens // 2)
                        for K in sorted({1, *(k + 1 for k in ks)})}
                 for name, widths in widths_of.items()}
    cost = {name: extend_ms[name][1] / extend_ms["XL"][1] for name in drafts}

    # 3. Speculative XL.
    acceptance, speedups, exact = {}, {}, True
    variants = [(name, False) for name in drafts] + [("S", True)]
    for name, shared in variants:
        label = name + ("+shared" if shared else "")
        for k in ks:
            stats_all = []

            def decode(p):
                outs, stats = speculative_generate(
                    params, config, [p], target_widths=xl, draft_widths=drafts[name],
                    draft_tokens=k, max_new_tokens=new_tokens, sampling=sampling, seed=1,
                    shared_cache=shared)
                stats_all.append(stats)
                return outs[0], stats
            outs, tps = timed(decode)
            stats_all = stats_all[1:1 + len(prompts)]  # One timed pass (not the warm-up).
            drafted = sum(s.drafted for s in stats_all)
            alpha = sum(s.accepted for s in stats_all) / drafted
            per_pass = sum(s.new_tokens for s in stats_all) / sum(s.target_passes
                                                                  for s in stats_all)
            # Tokens per round over a round's cost in 1-token XL extends: k (shared) or
            # k + 1 one-token draft extends, and one (k+1)-token XL verify.
            round_cost = ((k if shared else k + 1) * cost[name]
                          + extend_ms["XL"][k + 1] / extend_ms["XL"][1])
            predicted = ((1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
                         ) / round_cost
            if sampling.greedy:
                same = [o for o, _ in outs] == [o for o, _ in xl_outs]
                exact &= same
            acceptance.setdefault(label, {})[str(k)] = round(alpha, 4)
            speedups[(label, k)] = tps / xl_tps
            rows.append(["speculative", "XL", label, k, new_tokens, f"{tps:.1f}",
                         f"{alpha:.3f}", f"{per_pass:.2f}", f"{tps / xl_tps:.2f}x",
                         f"{predicted:.2f}x" + ("" if not sampling.greedy or same
                                                else " OUTPUT DIFFERS")])

    print(tabulate(rows, headers=["decoder", "target", "draft", "k", "new tokens",
                                  "tokens/s", "acceptance", "tokens/target pass",
                                  "speed-up vs KV-cache XL", "predicted"],
                   tablefmt="github"))
    Ks = sorted(extend_ms["XL"])
    print(f"\nms per extend of K tokens (batch 1, cache of {cache_len}; jitted loop of "
          f"{EXTEND_REPEATS}, best of 3):")
    print(tabulate([[name] + [f"{extend_ms[name][K]:.3f}" for K in Ks]
                    + [f"{extend_ms[name][1] / extend_ms['XL'][1]:.2f}"]
                    for name in extend_ms],
                   headers=["widths"] + [f"K={K}" for K in Ks] + ["1-token cost / XL's"],
                   tablefmt="github"))
    (best_draft, best_k), best = max(speedups.items(), key=lambda kv: kv[1])
    result.update(best_spec_speedup=round(best, 3), best_spec_draft=best_draft,
                  best_spec_k=best_k, acceptance=acceptance,
                  draft_cost_ratio={n: round(c, 3) for n, c in cost.items()},
                  extend_ms={n: {str(K): round(v, 4) for K, v in d.items()}
                             for n, d in extend_ms.items()},
                  tokens_per_s={"nocache_xl_long": round(nocache_tps, 1),
                                "cache_xl_long": round(cache_long_tps, 1),
                                "cache_xl": round(xl_tps, 1)},
                  greedy_spec_equals_xl=exact if sampling.greedy else None,
                  new_tokens=new_tokens, long_tokens=args.long_tokens, prompts=len(prompts),
                  checkpoint=source, device=jax.devices()[0].device_kind)
    print(json.dumps(result))


EXTEND_REPEATS = 32


def extend_milliseconds(params, config, widths, K, cache_len, depth):
    """Milliseconds per `extend` of K tokens at a cache depth of `depth` (a jitted scan of
    EXTEND_REPEATS extends, each rewound, best of 3): the cost model's unit."""
    import jax.numpy as jnp
    from matlm.decoding import kv_cache
    params, config = kv_cache.decoding_form(params, config)
    cache = kv_cache.init_cache(config, 1, cache_len).rewind(jnp.array([depth]))

    @jax.jit
    def loop(params, cache):
        def body(cache, _):
            logits, extended = kv_cache.extend(params, config, cache,
                                               jnp.ones((1, K), jnp.int32), widths)
            return extended.rewind(cache.lengths_B), logits[0, 0, 0]
        return jax.lax.scan(body, cache, None, length=EXTEND_REPEATS)

    jax.block_until_ready(loop(params, cache))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(loop(params, cache))
        best = min(best, time.perf_counter() - start)
    return best / EXTEND_REPEATS * 1e3


def _load(args):
    """(config, params, vocabulary, context, description) of the checkpoint, or a fresh
    init of --gin_file with the default vocabulary."""
    if args.model_dir:
        import matlm.model_dir as model_dir_lib
        model_dir, run_config = model_dir_lib.open_run(args.model_dir, "--model_dir")
        loaded = model_dir_lib.load_checkpoint_for_inference(model_dir)
        vocab = model_dir.vocabulary(fallback=lambda: run_config.data.vocabulary())
        return (run_config.model, loaded.params, vocab, run_config.seq_len,
                f"{args.model_dir} step {loaded.step}")
    from matlm import data
    from matlm.gin_config import model_config_from_gin, parse_gin
    from matlm.model import init_params
    parse_gin([args.gin_file], [])
    config = model_config_from_gin()
    vocab = data.default_vocabulary(vocab_size=config.vocab_size)
    return config, init_params(config, jax.random.key(0)), vocab, None, \
        f"fresh init of {args.gin_file}"


if __name__ == "__main__":
    main()
