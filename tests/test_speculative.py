"""matlm.decoding.speculative: exactness of greedy output, the target's distribution under
sampling (chi-square, which must reject a broken acceptance rule), bookkeeping and bad
input.

Two models: a trigram "toy" behind the same cache interface (a pure function of the
token prefix, so its exact sequence distribution is enumerable and its draft can be made
as wrong as a test needs), and a tiny MatLM with its nested S/M drafts.
"""
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from matlm.decoding.sampling import SamplingConfig
from matlm.decoding.speculative import SpeculativeStats, speculative_generate
from matlm.model import ModelConfig, init_params
from matlm.model.reference import dense_forward, slice_params

# ---------------------------------------------------------------------------------------
# The toy: next-token logits = table[token two back, last token] (token 0 before the
# start). The draft and the target are two tables, picked by the FFN width of layer 0.

TOY_CONFIG = ModelConfig(vocab_size=3, d_model=8, n_layers=1, n_heads=1, d_ff=64)
TOY_DRAFT, TOY_TARGET = (8,), (64,)  # S and XL of TOY_CONFIG.


@flax.struct.dataclass
class ToyCache:
    tokens_BS: jax.Array
    lengths_B: jax.Array

    def rewind(self, lengths_B):
        return self.replace(lengths_B=lengths_B)


class ToyBackend:
    def init_cache(self, batch_size, max_len):
        return ToyCache(jnp.zeros((batch_size, max_len), jnp.int32),
                        jnp.zeros((batch_size,), jnp.int32))

    def extend(self, params, cache, tokens_BK, widths):
        B, K = tokens_BK.shape
        positions_BK = cache.lengths_B[:, None] + jnp.arange(K)[None]
        rows_B1 = jnp.arange(B)[:, None]
        tokens_BS = cache.tokens_BS.at[rows_B1, positions_BK].set(tokens_BK)
        before_BK = jnp.where(positions_BK > 0,
                              tokens_BS[rows_B1, jnp.maximum(positions_BK - 1, 0)], 0)
        logits_BKV = params[widths[0]][before_BK, tokens_BK]
        return logits_BKV, ToyCache(tokens_BS, cache.lengths_B + K)

    def prefill(self, params, cache, tokens_BT, lengths_B, widths):
        logits, cache = self.extend(params, cache, tokens_BT, widths)
        return logits, cache.rewind(lengths_B)

    # Hashable by identity: one instance per test module (a static jit argument).


TOY = ToyBackend()


def toy_params(seed=0, scale=1.5):
    rng = np.random.default_rng(seed)
    V = TOY_CONFIG.vocab_size
    # Independent tables: the draft is badly wrong, so rejections are frequent and a
    # wrong residual distribution shows.
    return {w[0]: jnp.asarray(rng.normal(size=(V, V, V)) * scale, jnp.float32)
            for w in (TOY_DRAFT, TOY_TARGET)}


def toy_sequence_probs(table, prompt, n, temperature=1.0):
    """Exact probability of every n-token continuation under the target table."""
    table = np.asarray(table, np.float64) / temperature
    probs = np.exp(table - table.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = {}
    for seq in itertools.product(range(TOY_CONFIG.vocab_size), repeat=n):
        history = [0, *prompt] if len(prompt) == 1 else list(prompt)
        prob = 1.0
        for token in seq:
            prob *= probs[history[-2], history[-1], token]
            history.append(token)
        out[seq] = prob
    return out


def chi_square_pvalue(samples, expected_probs):
    cells = list(expected_probs)
    counts = np.array([sum(1 for s in samples if tuple(s) == c) for c in cells], np.float64)
    expected = np.array([expected_probs[c] for c in cells], np.float64)
    # Normalised in float64: float32 probabilities can miss 1 by ~1e-7, which scipy refuses.
    expected = expected / expected.sum() * len(samples)
    return scipy_stats.chisquare(counts, expected).pvalue


def toy_generate(prompt, rows, n, k, rule="standard", seed=0, shared=False, **kw):
    return speculative_generate(
        toy_params(), TOY_CONFIG, [prompt] * rows, target_widths=TOY_TARGET,
        draft_widths=TOY_DRAFT, draft_tokens=k, max_new_tokens=n,
        sampling=kw.pop("sampling", SamplingConfig(temperature=1.0)), seed=seed,
        shared_cache=shared, _rule=rule, _backend=TOY, **kw)


def test_toy_sampling_matches_the_target_distribution():
    """4 new tokens (81 sequences) from 4,000 rows: the first comes from the prefill,
    the next ones from accepted drafts, resamples and bonus tokens."""
    prompt = [1, 2]
    outputs, stats = toy_generate(prompt, 4000, 4, 3)
    assert 0.2 < stats.acceptance_rate < 0.8  # Both accept and reject paths are exercised.
    expected = toy_sequence_probs(toy_params()[TOY_TARGET[0]], prompt, 4)
    assert chi_square_pvalue(outputs, expected) > 1e-3


@pytest.mark.parametrize("rule", ["always_accept", "resample_from_p"])
def test_chi_square_rejects_a_broken_acceptance_rule(rule):
    prompt = [1, 2]
    outputs, _ = toy_generate(prompt, 4000, 4, 3, rule=rule)
    expected = toy_sequence_probs(toy_params()[TOY_TARGET[0]], prompt, 4)
    assert chi_square_pvalue(outputs, expected) < 1e-6


def test_stats_and_stops_with_a_perfect_draft():
    """The draft IS the target (same table): every draft is accepted, so each round
    yields k + 1 tokens; stop ids end a row without being returned."""
    params = toy_params()
    params = {w: params[TOY_TARGET[0]] for w in params}
    outputs, stats = speculative_generate(
        params, TOY_CONFIG, [[1, 2]], target_widths=TOY_TARGET, draft_widths=TOY_DRAFT,
        draft_tokens=3, max_new_tokens=9, sampling=SamplingConfig(temperature=1.0),
        _backend=TOY)
    assert stats.acceptance_rate == 1.0
    # 1 token from the prefill, then 4 per round: 9 tokens take 2 rounds.
    assert (stats.rounds, stats.target_passes, stats.drafted) == (2, 3, 6)
    assert len(outputs[0]) == 9 and stats.new_tokens == 9
    stop = outputs[0][5]
    cut, _ = speculative_generate(
        params, TOY_CONFIG, [[1, 2]], target_widths=TOY_TARGET, draft_widths=TOY_DRAFT,
        draft_tokens=3, max_new_tokens=9, sampling=SamplingConfig(temperature=1.0),
        stop_ids=[stop], _backend=TOY)
    assert cut[0] == outputs[0][:outputs[0].index(stop)]


def test_stop_fn_and_streaming_see_every_token_once():
    seen = {}
    outputs, _ = toy_generate([1, 2], 3, 12, 4, on_tokens=lambda r, ids: seen.setdefault(
        r, []).extend(ids), stop_fn=lambda r, toks: r == 1 and len(toks) == 5)
    assert [len(o) for o in outputs] == [12, 5, 12]
    assert seen == {r: outputs[r] for r in range(3)}


# ---------------------------------------------------------------------------------------
# Bad input: one-line errors naming the flag, before any model work.

@pytest.mark.parametrize("kwargs,match", [
    (dict(draft_tokens=0), "--draft_tokens must be an integer >= 1"),
    (dict(draft_widths="XL"), "equals the target.*pointless"),
    (dict(draft_widths=(64,), target_widths=(32,)), "wider than the target.*layer 0"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[[1] * 9], max_len=8), "prompt 0 has 9 tokens, longer than the model's "
                                          "context of 8"),
    (dict(max_new_tokens=0), "--max_new_tokens must be an integer >= 1"),
])
def test_bad_input(kwargs, match):
    args = dict(prompts=[[1]], target_widths=TOY_TARGET, draft_widths=TOY_DRAFT,
                draft_tokens=2, max_new_tokens=4)
    args.update(kwargs)

    class NoWork:  # Any model call fails the test.
        def __getattr__(self, name):
            raise AssertionError("model work before the input was checked")
    with pytest.raises(ValueError, match=match):
        speculative_generate(None, TOY_CONFIG, args.pop("prompts"), _backend=NoWork(), **args)


def test_stats_dict():
    s = SpeculativeStats(drafted=10, accepted=4, new_tokens=20, seconds=2.0)
    assert s.as_dict()["acceptance_rate"] == 0.4 and s.tokens_per_second == 10.0


# ---------------------------------------------------------------------------------------
# A tiny MatLM (GQA), its nested drafts, against the dense full-recomputation oracle.

MAT_CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=128)


def with_strong_ffn(params, scale=4.0):
    """At init the FFN outputs are small next to the embeddings, so S and XL agree on
    nearly every argmax (acceptance 1.0, nothing tested); scaled up, they disagree often."""
    def scaled(path, x):
        return x * scale if "'ffn'" in jax.tree_util.keystr(path) and "'wo'" in \
            jax.tree_util.keystr(path) else x
    return jax.tree_util.tree_map_with_path(scaled, params)


@pytest.fixture(scope="module")
def mat_params():
    return with_strong_ffn(init_params(MAT_CONFIG, jax.random.key(3)))


DENSE = jax.jit(dense_forward, static_argnums=0)


def dense_greedy(params, config, prompt, n, widths, pad_to=32):
    """Greedy continuation by full recomputation with the independent dense oracle (one
    padded shape, one compile: causal logits at a position ignore the padding after it)."""
    sliced = slice_params(params, widths)
    tokens = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([tokens + [0] * (pad_to - len(tokens))], jnp.int32)
        tokens.append(int(jnp.argmax(DENSE(config, sliced, padded)[0, len(tokens) - 1])))
    return tokens[len(prompt):]


MAT_PROMPTS = [[5], [1, 2, 3], [9, 40, 41, 7, 7, 2, 63], [17, 17], [30, 1, 0, 12, 50]]


@pytest.fixture(scope="module")
def greedy_reference(mat_params):
    """Plain target greedy (the KV-cache `generate`), itself checked against the oracle."""
    from matlm.decoding.generate import generate
    xl = MAT_CONFIG.resolve_widths("XL")
    plain = generate(mat_params, MAT_CONFIG, MAT_PROMPTS, widths=xl, max_new_tokens=10)
    assert plain == [dense_greedy(mat_params, MAT_CONFIG, p, 10, xl) for p in MAT_PROMPTS]
    return plain


@pytest.mark.parametrize("k,shared,draft", [(1, False, "S"), (2, True, "S"), (3, False, "M"),
                                            (5, False, "S,L"), (5, True, "S")])
def test_greedy_is_target_greedy_on_a_matlm(mat_params, greedy_reference, k, shared, draft):
    outputs, stats = speculative_generate(
        mat_params, MAT_CONFIG, MAT_PROMPTS, target_widths="XL", draft_widths=draft,
        draft_tokens=k, max_new_tokens=10, shared_cache=shared)
    assert outputs == greedy_reference
    # The draft is a different model: it is both right and wrong sometimes.
    assert 0 < stats.accepted < stats.drafted


def test_matlm_sampling_matches_the_target_distribution():
    """3 new tokens of a 4-token vocabulary (64 sequences) from 6,000 rows, each
    sequence's exact probability from the dense oracle."""
    config = ModelConfig(vocab_size=4, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         d_ff=128)
    params = with_strong_ffn(init_params(config, jax.random.key(1)))
    prompt = [1, 3, 0]
    outputs, stats = speculative_generate(
        params, config, [prompt] * 6000, target_widths="XL", draft_widths="S",
        draft_tokens=2, max_new_tokens=3, sampling=SamplingConfig(temperature=1.0), seed=7)
    assert 0.1 < stats.acceptance_rate < 0.95
    seqs = list(itertools.product(range(4), repeat=3))
    logits = DENSE(config, params, jnp.asarray([prompt + list(s) for s in seqs]))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    expected = {}
    for i, seq in enumerate(seqs):
        expected[seq] = float(np.exp(sum(logp[i, len(prompt) - 1 + j, t]
                                         for j, t in enumerate(seq))))
    assert abs(sum(expected.values()) - 1) < 1e-4
    assert chi_square_pvalue(outputs, expected) > 1e-3


def test_a_rows_draws_do_not_depend_on_its_batch():
    """Row i samples with fold_in(key(seed), i): the same output alone or batched."""
    together, _ = toy_generate([1, 2], 3, 6, 2, seed=5)
    alone, _ = toy_generate([1, 2], 3, 6, 2, seed=5, batch_size=1)
    assert together == alone and len({tuple(o) for o in together}) > 1
