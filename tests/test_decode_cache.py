"""KV-cache decoding against full recomputation.

The oracle for logits is the model's own full forward (`MatLM.apply` over the whole
prefix, no cache: the training path), and for tokens the no-cache greedy decoder; the
dense pure-jnp model (matlm.model.reference) checks one case independently of the Flax
modules. Tiny configs: every test runs in seconds on CPU.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.decoding import kv_cache
from matlm.decoding.generate import GenerateError, decoder_for, generate
from matlm.decoding.nocache import generate_no_cache
from matlm.decoding.sampling import SamplingConfig
from matlm.model import MatLM, ModelConfig, init_params
from matlm.model.layout import stack_layers
from matlm.model.reference import dense_forward, slice_params

V = 64
BASE = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64)
CONFIGS = {
    "mha": BASE,
    "gqa": dataclasses.replace(BASE, n_kv_heads=2),
    "mqa": dataclasses.replace(BASE, n_kv_heads=1),
}
WIDTHS = {"full": None, "sliced": (16, 64), "masked": np.array([8, 32], np.int32)}
RNG = np.random.RandomState(0)
TOKENS_BT = RNG.randint(0, V, (3, 14)).astype(np.int32)
PROMPT_LENGTHS = np.array([3, 7, 5], np.int32)  # Different per row: right padding.


def _with_kv_heads(params, K):
    """MHA parameters cut to the first K KV heads: valid parameters of the GQA/MQA config
    (one init for all three configs keeps the module quick)."""
    out = dict(params)
    for i in range(BASE.n_layers):
        attn = dict(params[f"layer_{i}"]["attn"])
        attn["wk"], attn["wv"] = attn["wk"][:, :K], attn["wv"][:, :K]
        out[f"layer_{i}"] = {**params[f"layer_{i}"], "attn": attn}
    return out


@pytest.fixture(scope="module")
def all_params():
    params = init_params(BASE, jax.random.key(1))
    return {name: _with_kv_heads(params, cfg.num_kv_heads) for name, cfg in CONFIGS.items()}


# Jitted once for the module (config and static widths static; traced widths traced).
_PREFILL = {True: jax.jit(kv_cache.prefill, static_argnums=(1, 5)),
            False: jax.jit(kv_cache.prefill, static_argnums=(1,))}
_EXTEND = {True: jax.jit(kv_cache.extend, static_argnums=(1, 4)),
           False: jax.jit(kv_cache.extend, static_argnums=(1,))}
_FULL = {True: jax.jit(lambda p, c, t, w: MatLM(c).apply({"params": p}, t, widths=w),
                       static_argnums=(1, 3)),
         False: jax.jit(lambda p, c, t, w: MatLM(c).apply({"params": p}, t, widths=w),
                        static_argnums=(1,))}


def _is_static(widths):
    return widths is None or isinstance(widths, tuple)


def _full_logits(params, config, tokens_BT, widths):
    """The oracle: one uncached forward over the whole sequence."""
    w = _widths(widths)
    return np.asarray(_FULL[_is_static(w)](params, config, jnp.asarray(tokens_BT), w))


def _widths(widths):
    return jnp.asarray(widths) if isinstance(widths, np.ndarray) else widths


def _decode_all(params, config, widths, step_sizes, cache_len=32):
    """Prefill each row's prompt (right-padded to the longest), then extend every row by
    `step_sizes` tokens in turn: the logits each row gets at each of its positions
    [prompt_len - 1, prompt_len - 1 + sum(step_sizes)), as an array [B, N, V]."""
    w = _widths(widths)
    T0 = int(PROMPT_LENGTHS.max())
    prompts_BT = np.where(np.arange(T0) < PROMPT_LENGTHS[:, None], TOKENS_BT[:, :T0], 0)
    cache = kv_cache.init_cache(config, len(TOKENS_BT), cache_len)
    logits_BTV, cache = _PREFILL[_is_static(w)](params, config, cache, prompts_BT,
                                                 PROMPT_LENGTHS, w)
    rows_B = np.arange(len(TOKENS_BT))
    got = [np.asarray(logits_BTV)[rows_B, PROMPT_LENGTHS - 1][:, None]]
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), PROMPT_LENGTHS)
    pos_B = PROMPT_LENGTHS.copy()
    extend = _EXTEND[_is_static(w)]
    for k in step_sizes:
        tokens_BK = TOKENS_BT[rows_B[:, None], pos_B[:, None] + np.arange(k)]
        logits_BKV, cache = extend(params, config, cache, tokens_BK, w)
        got.append(np.asarray(logits_BKV))
        pos_B = pos_B + k
        np.testing.assert_array_equal(np.asarray(cache.lengths_B), pos_B)
    return np.concatenate(got, axis=1)


def _expected(params, config, widths, n):
    full_BTV = _full_logits(params, config, TOKENS_BT, widths)
    idx_BN = PROMPT_LENGTHS[:, None] - 1 + np.arange(n)
    return full_BTV[np.arange(len(TOKENS_BT))[:, None], idx_BN]


@pytest.mark.parametrize("config_name, widths_name",
                         [("mha", "full"), ("gqa", "sliced"), ("mqa", "masked")])
def test_prefill_then_single_steps_equal_full_recomputation(all_params, config_name, widths_name):
    params, config, widths = all_params[config_name], CONFIGS[config_name], WIDTHS[widths_name]
    steps = [1] * 6
    got = _decode_all(params, config, widths, steps)
    np.testing.assert_allclose(got, _expected(params, config, widths, 1 + len(steps)),
                               rtol=1e-5, atol=1e-5)


def test_multi_token_extends_equal_full_recomputation(all_params):
    params, config = all_params["gqa"], CONFIGS["gqa"]
    steps = [3, 2]  # Several tokens per extend: each attends to its own prefix only.
    got = _decode_all(params, config, WIDTHS["masked"], steps)
    np.testing.assert_allclose(got, _expected(params, config, WIDTHS["masked"], 1 + sum(steps)),
                               rtol=1e-5, atol=1e-5)


def test_scanned_params_decode_like_unrolled(all_params):
    params, config = all_params["gqa"], CONFIGS["gqa"]
    scanned = dataclasses.replace(config, scan_layers=True)
    got = _decode_all(stack_layers(params), scanned, WIDTHS["masked"], [2, 1])
    np.testing.assert_allclose(got, _expected(params, config, WIDTHS["masked"], 4),
                               rtol=1e-5, atol=1e-5)


def test_cached_logits_match_the_independent_dense_model(all_params):
    """Against matlm.model.reference (pure jnp, its own RoPE and GQA): a bug shared by
    the cached and uncached Flax paths would not hide here."""
    params, config, widths = all_params["mqa"], CONFIGS["mqa"], (16, 32)
    got = _decode_all(params, config, widths, [1, 1, 1])
    dense = np.asarray(jax.jit(dense_forward, static_argnums=0)(
        config, slice_params(params, widths), jnp.asarray(TOKENS_BT)))
    idx_BN = PROMPT_LENGTHS[:, None] - 1 + np.arange(4)
    np.testing.assert_allclose(got, dense[np.arange(3)[:, None], idx_BN], rtol=1e-4, atol=1e-4)


def test_rewind_then_extend_equals_a_fresh_computation(all_params):
    params, config = all_params["mha"], CONFIGS["mha"]
    extend = _EXTEND[True]
    cache = kv_cache.init_cache(config, 3, 16)
    _, cache = extend(params, config, cache, TOKENS_BT[:, :6], None)
    # Rewind rows to different lengths, then continue with other tokens than before.
    keep_B = np.array([2, 4, 6], np.int32)
    other_B3 = (TOKENS_BT[:, 6:9] + 7) % V
    logits_B3V, cache = extend(params, config, cache.rewind(keep_B), other_B3, None)
    assert cache.max_len == 16
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), keep_B + 3)
    # The fresh sequences, right-padded into one batch (causal: padding changes nothing).
    fresh_BT = np.zeros((3, 9), np.int32)
    for b in range(3):
        fresh_BT[b, :keep_B[b] + 3] = np.concatenate([TOKENS_BT[b, :keep_B[b]], other_B3[b]])
    full_BTV = _full_logits(params, config, fresh_BT, None)
    for b in range(3):
        np.testing.assert_allclose(np.asarray(logits_B3V[b]),
                                   full_BTV[b, keep_B[b]:keep_B[b] + 3], rtol=1e-5, atol=1e-5)


def test_writes_past_the_cache_are_dropped_not_clamped(all_params):
    params, config = all_params["mha"], CONFIGS["mha"]
    cache = kv_cache.init_cache(config, 3, 8)
    _, cache = _EXTEND[True](params, config, cache, TOKENS_BT[:, :6], None)
    _, over = _EXTEND[True](params, config, cache, TOKENS_BT[:, 6:10], None)  # 6 + 4 > 8.
    # Positions 0..5 untouched (a clamped write would have shifted onto them).
    for before, after in zip(cache.keys, over.keys):
        np.testing.assert_array_equal(np.asarray(after[:, :6]), np.asarray(before[:, :6]))


def _prompts(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, V, n).tolist() for n in lengths]


def test_greedy_generate_equals_no_cache_decoding(all_params):
    # The full model here; the scorer test below compares sliced and masked widths.
    params, config, widths = all_params["gqa"], CONFIGS["gqa"], None
    prompts = _prompts([3, 9, 1, 17, 6])
    got = generate(params, config, prompts, widths=widths, max_new_tokens=21, batch_size=2)
    want = generate_no_cache(params, config, prompts, widths=widths, max_new_tokens=21,
                             batch_size=3)
    assert got == want and all(len(g) == 21 for g in got)
    assert len({tuple(g) for g in got}) > 1  # Rows really differ.
    scanned = dataclasses.replace(config, scan_layers=True)  # Stacked parameters decode too.
    assert generate(stack_layers(params), scanned, prompts, widths=widths, max_new_tokens=21,
                    batch_size=2) == got


def test_no_cache_decoder_is_plain_argmax_of_full_recomputation(all_params):
    params, config = all_params["mha"], CONFIGS["mha"]
    prompt = _prompts([4])[0]
    tokens = list(prompt)
    for _ in range(5):  # Right-padded to one length (causal: the padding is never read).
        padded_1T = np.array([tokens + [0] * (16 - len(tokens))])
        tokens.append(int(np.argmax(_full_logits(params, config, padded_1T, None)[0, len(tokens) - 1])))
    assert generate_no_cache(params, config, [prompt], max_new_tokens=5) == [tokens[4:]]


def test_stops_and_max_new_tokens(all_params):
    params, config = all_params["mha"], CONFIGS["mha"]
    prompts = _prompts([5, 8, 2, 11])
    run = lambda **kw: generate(params, config, prompts, chunk_steps=4, **kw)
    free = run(max_new_tokens=12)
    assert [len(f) for f in free] == [12] * 4
    # A stop id: each row ends before its first occurrence (rows without it run on).
    stop = free[0][4]
    got = run(max_new_tokens=12, stop_ids=(stop,))
    for f, g in zip(free, got):
        assert g == (f[:f.index(stop)] if stop in f else f)
    # stop_fn after every token: here "stop once 3 tokens are out" for row 1 only; and the
    # streamed tokens are exactly the returned ones.
    streamed = {i: [] for i in range(4)}
    got = run(max_new_tokens=12, stop_fn=lambda row, new: row == 1 and len(new) == 3,
              on_tokens=lambda row, ids: streamed[row].extend(ids))
    assert got == [free[0], free[1][:3], free[2], free[3]]
    assert [streamed[i] for i in range(4)] == got
    assert run(max_new_tokens=1) == [f[:1] for f in free]


def test_context_limit_ends_rows(all_params):
    params, config = all_params["mha"], CONFIGS["mha"]
    prompts = _prompts([30, 4])
    got = generate(params, config, prompts, max_new_tokens=8, max_len=32)
    free = generate(params, config, prompts, max_new_tokens=8)
    # 30 + 3 - 1 = 32 tokens read: three new tokens, the first three of the unlimited run.
    assert got == [free[0][:3], free[1]]
    assert generate_no_cache(params, config, prompts, max_new_tokens=8, max_len=32) == got


def test_sampling_is_reproducible_and_seeded(all_params):
    params, config = all_params["mha"], CONFIGS["mha"]
    prompts = _prompts([4, 6, 2])
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    a = generate(params, config, prompts, max_new_tokens=10, sampling=sampling, seed=3)
    # Same seed: the same tokens, whatever the batching (keys are per prompt).
    assert generate(params, config, prompts, max_new_tokens=10, sampling=sampling, seed=3,
                    batch_size=1) == a
    assert generate(params, config, prompts, max_new_tokens=10, sampling=sampling, seed=4) != a


def test_one_compile_per_bucket_not_per_prompt_length(all_params):
    params, config = all_params["mqa"], CONFIGS["mqa"]
    decoder = decoder_for(config)
    widths = jnp.asarray([8, 64], jnp.int32)
    generate(params, config, _prompts([5]), widths=widths, max_new_tokens=6, batch_size=2)
    before = decoder.compiled_count()
    for n, w in ((9, [16, 16]), (2, [64, 8]), (20, [32, 32])):  # Same buckets (T 32, S 32).
        generate(params, config, _prompts([n, 3], seed=n), widths=jnp.asarray(w, jnp.int32),
                 max_new_tokens=6, batch_size=2)
    assert decoder.compiled_count() == before
    generate(params, config, _prompts([40]), widths=widths, max_new_tokens=6, batch_size=2)
    assert decoder.compiled_count() == before + 2  # A new bucket: prefill and decode.


@pytest.mark.parametrize("call, message", [
    (lambda p, c: generate(p, c, [[1, 2], []], max_new_tokens=4), "prompt 1 is empty"),
    (lambda p, c: generate(p, c, [], max_new_tokens=4), "no prompts"),
    (lambda p, c: generate(p, c, [[1]], max_new_tokens=0), "--max_new_tokens must be"),
    (lambda p, c: generate(p, c, [[1] * 40], max_new_tokens=4, max_len=32),
     "longer than the model's context of 32"),
    (lambda p, c: generate(p, c, [[1, V]], max_new_tokens=4), "outside the vocabulary"),
    (lambda p, c: generate(p, c, [[1]], widths=(16,), max_new_tokens=4), "1 widths for 2"),
    (lambda p, c: generate_no_cache(p, c, [[]], max_new_tokens=4), "prompt 0 is empty"),
])
def test_bad_input_is_a_one_line_value_error(all_params, call, message):
    with pytest.raises(GenerateError, match=message) as info:
        call(all_params["mha"], CONFIGS["mha"])
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize("masked", [True, False])
def test_eval_scorer_generation_gives_the_no_cache_answers(all_params, masked):
    """matlm eval's generative tasks (SubmodelScorer.generate, rows sharded over the 8
    test devices) decode with the cache: the same greedy answers as before, cut at EOS."""
    from matlm.evaluation.scoring import SubmodelScorer
    params, config = all_params["gqa"], CONFIGS["gqa"]
    scorer = SubmodelScorer(config, params, batch_size=8, max_len=64, masked=masked)
    prompts = _prompts([12, 3, 30, 7, 19, 5, 1, 9, 25])  # Two batches of 8 rows.
    widths = (16, 64)
    want = generate_no_cache(params, config, prompts, widths=widths, max_new_tokens=10)
    assert scorer.generate(prompts, widths, 10) == want
    eos = want[2][3]
    cut = [w[:w.index(eos)] if eos in w else w for w in want]
    assert scorer.generate(prompts, widths, 10, stop_ids=(eos,)) == cut
    assert scorer.compiled_count() == 2  # One prefill and one decode chunk (T 32, S 64).
