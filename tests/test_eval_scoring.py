"""Eval scores against brute force: one unbatched, unpadded model call per example and
choice (or per decoding step), on a tiny random model and a few real examples of each
kind of task. Also: the masked path equals static slices for a Mix'n'Match config."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.model import MatLM, ModelConfig, init_params

CONFIG = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, d_ff=128)
MIX = (16, 128)  # S in layer 0, XL in layer 1.


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(1))


@pytest.fixture(scope="module")
def setup(eval_tasks, wiki_vocab, params):
    from matlm.evaluation import runner, scoring
    options = runner.EvalOptions(max_examples=3, max_len=1024, batch_size=8)
    plan = {t.name: t for t in runner.prepare(
        ["piqa", "winogrande", "arc_easy", "lambada", "trivia_qa", "loss"], wiki_vocab, options)}
    scorer = scoring.SubmodelScorer(CONFIG, params, batch_size=8, max_len=1024)
    return plan, scorer, options


@functools.partial(jax.jit, static_argnums=(2,))
def _apply(params, tokens_1T, widths, segment_ids_1T, positions_1T):
    return MatLM(CONFIG).apply({"params": params}, tokens_1T, segment_ids_1T, positions_1T,
                               widths=widths)


def _brute_logits(params, tokens, widths, segment_ids=None, positions=None):
    """One sequence, no padding, static (sliced) widths (jitted only to run quickly)."""
    T = len(tokens)
    segment_ids = np.ones(T, np.int32) if segment_ids is None else segment_ids
    positions = np.arange(T, dtype=np.int32) if positions is None else positions
    return np.asarray(_apply(params, jnp.asarray([tokens], jnp.int32), widths,
                             jnp.asarray([segment_ids]), jnp.asarray([positions])))[0]


def _brute_continuation(params, vocab, context, continuation, widths):
    """(sum log p(continuation | context), all greedy) from one call on the exact text."""
    context_ids = vocab.encode(context)
    whole = vocab.encode(context + continuation)
    cont = whole[len(context_ids):] if whole[:len(context_ids)] == context_ids else vocab.encode(continuation)
    tokens = [vocab.tokenizer.bos_id()] + context_ids + cont
    logits = _brute_logits(params, tokens[:-1], widths)
    logp = jax.nn.log_softmax(logits, axis=-1)
    positions = range(len(tokens) - 1 - len(cont), len(tokens) - 1)
    total = sum(float(logp[p, tokens[p + 1]]) for p in positions)
    greedy = all(int(np.argmax(logits[p])) == tokens[p + 1] for p in positions)
    return total, greedy


@pytest.mark.parametrize("task", ["piqa", "winogrande", "arc_easy"])
def test_multiple_choice_matches_brute_force(setup, params, wiki_vocab, task):
    from matlm.evaluation import runner
    plan, scorer, _ = setup
    metrics, predictions, _ = runner._score_multiple_choice(plan[task], scorer, MIX,
                                                            lambda n: None)
    correct = correct_norm = 0
    for request, predicted in zip(plan[task].requests, predictions):
        scores = [_brute_continuation(params, wiki_vocab, c, k, MIX)[0]
                  for c, k in zip(request.contexts, request.continuations)]
        # lm-eval-harness's acc_norm: characters of the choice (without the " " delimiter).
        norm = [s / len(k.removeprefix(" ")) for s, k in zip(scores, request.continuations)]
        assert predicted == int(np.argmax(scores))
        correct += int(np.argmax(scores)) == request.label
        correct_norm += int(np.argmax(norm)) == request.label
    assert metrics["acc"] == correct / 3 and metrics["acc_norm"] == correct_norm / 3


def test_loglik_values_match_brute_force(setup, params, wiki_vocab):
    plan, scorer, _ = setup
    request = plan["piqa"].requests[0]
    sums, _, _ = scorer.loglik(plan["piqa"].rows[:2], MIX)
    for k in range(2):
        expected, _ = _brute_continuation(params, wiki_vocab, request.contexts[k],
                                          request.continuations[k], MIX)
        assert sums[k] == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_last_word_matches_brute_force(setup, params, wiki_vocab):
    from matlm.evaluation import runner
    plan, scorer, _ = setup
    metrics, _, _ = runner._score_last_word(plan["lambada"], scorer, MIX, lambda n: None)
    total, tokens, correct = 0.0, 0, 0
    for request in plan["lambada"].requests:
        logp, greedy = _brute_continuation(params, wiki_vocab, request.contexts[0],
                                           request.continuations[0], MIX)
        context_ids = wiki_vocab.encode(request.contexts[0])
        tokens += len(wiki_vocab.encode(request.contexts[0] + request.continuations[0])) - len(context_ids)
        total += logp
        correct += greedy
    assert metrics["acc"] == correct / 3
    assert metrics["perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-4)


def test_generative_qa_matches_brute_force_greedy_decoding(setup, params, wiki_vocab):
    from matlm.evaluation import metrics as m, runner
    plan, scorer, _ = setup
    task = dataclasses.replace(plan["trivia_qa"])  # Short answers keep brute force quick.
    task.mapping = dataclasses.replace(task.mapping, max_new_tokens=8)
    got, predictions = runner._score_generative(task, scorer, MIX, wiki_vocab, lambda n: None)
    em = f1 = 0.0
    for request, predicted in zip(task.requests, predictions):
        tokens = [wiki_vocab.tokenizer.bos_id()] + wiki_vocab.encode(request.contexts[0])
        generated = []
        for _ in range(task.mapping.max_new_tokens):  # One full call per new token.
            next_id = int(np.argmax(_brute_logits(params, tokens, MIX)[-1]))
            tokens.append(next_id)
            generated.append(next_id)
        if wiki_vocab.eos_id in generated:
            generated = generated[:generated.index(wiki_vocab.eos_id)]
        text = wiki_vocab.decode(generated)
        for stop in task.mapping.stop_sequences:
            text = text.split(stop)[0]
        text = text.strip()
        assert predicted == text  # As generated, cut at the first stop sequence.
        em += max(m.exact_match(text, a) for a in request.answers)
        f1 += max(m.f1(text, a) for a in request.answers)
    assert got["exact_match"] == pytest.approx(em / 3) and got["f1"] == pytest.approx(f1 / 3)


def test_heldout_loss_matches_brute_force(setup, params, wiki_vocab):
    from matlm.evaluation import runner
    plan, scorer, _ = setup
    task = plan["loss:matlm_wiki"]
    byte_lengths = runner.piece_byte_lengths(wiki_vocab, CONFIG.vocab_size)
    got, _ = runner._score_loss(task, scorer, MIX, byte_lengths, lambda n: None)
    nll, count, num_bytes = 0.0, 0, 0
    for batch in task.batches:
        for row in range(len(batch["inputs"])):
            mask = batch["loss_mask"][row] > 0
            if not mask.any():
                continue
            logits = _brute_logits(params, batch["inputs"][row], MIX, batch["segment_ids"][row],
                                   batch["positions"][row])
            logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
            targets = batch["targets"][row]
            nll -= sum(logp[t, targets[t]] for t in np.flatnonzero(mask))
            count += int(mask.sum())
            text = "".join(wiki_vocab.tokenizer.id_to_piece(int(i)) for i in targets[mask]
                           if not wiki_vocab.tokenizer.is_control(int(i)))
            num_bytes += len(text.replace("\u2581", " ").encode())
    assert got["tokens"] == count == 3 * 256
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)


def test_masked_mix_equals_sliced_mix_and_compiles_once(setup, params):
    from matlm.evaluation import scoring
    plan, masked, _ = setup
    sliced = scoring.SubmodelScorer(CONFIG, params, batch_size=8, max_len=1024, masked=False)
    rows = plan["winogrande"].rows
    before = masked.compiled_count()
    results = {}
    for widths in (MIX, (128, 16), (32, 64)):
        m_sums, m_greedy, m_tokens = masked.loglik(rows, widths)
        s_sums, s_greedy, s_tokens = sliced.loglik(rows, widths)
        np.testing.assert_allclose(m_sums, s_sums, rtol=1e-5, atol=1e-4)
        assert m_tokens == s_tokens
        results[widths] = m_sums
    # Different configs really differ (the test would notice widths being ignored).
    assert not np.allclose(results[MIX], results[(32, 64)])
    buckets = len({scoring.bucket_for(r.length, masked.buckets) for r in rows})
    assert masked.compiled_count() - before <= buckets  # Reused for all three configs.
    assert sliced.compiled_count() == 3 * buckets  # One per config and bucket.


# --- rows too long for the context: lm-evaluation-harness's rule -------------------------

def _lm_eval_loglikelihood_inputs(context_enc, continuation_enc, max_length):
    """lm-evaluation-harness, HFLM._loglikelihood_tokens (causal backend), transcribed:
    the model's inputs and the positions whose logits score the continuation. Its
    context_enc starts with BOS (the export's tokenizer adds it)."""
    assert len(continuation_enc) > 0
    assert len(continuation_enc) <= max_length
    inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]
    inplen, contlen = len(inp), len(continuation_enc)
    return inp, list(range(inplen - contlen, inplen))  # _select_cont_toks' slice.


def _row_inputs(row):
    """A ScoreRow as the scorer feeds it (scoring._pad_rows): inputs and scored positions."""
    return list(row.tokens[:-1]), list(range(row.score_from - 1, row.length))


def test_make_row_follows_lm_eval_on_random_lengths():
    from matlm.evaluation import scoring
    rng = np.random.default_rng(0)
    truncated = 0
    for _ in range(3000):
        max_len = int(rng.integers(1, 48))
        context = [int(t) for t in rng.integers(3, 1000, size=int(rng.integers(0, 64)))]
        continuation = [int(t) for t in rng.integers(3, 1000,
                                                      size=int(rng.integers(1, max_len + 1)))]
        row = scoring.make_row(1, context, continuation, max_len)
        expected = _lm_eval_loglikelihood_inputs([1] + context, continuation, max_len)
        assert _row_inputs(row) == expected
        # The scored targets are the continuation, and the model reads <= max_len tokens.
        assert list(row.tokens[row.score_from:]) == continuation and row.length <= max_len
        if 1 + len(context) + len(continuation) <= max_len + 1:  # Fits: as before, whole.
            assert row.tokens == (1, *context, *continuation)
            assert row.score_from == 1 + len(context)
        else:
            truncated += 1
            assert row.tokens[0] != 1 and len(row.tokens) == max_len + 1  # BOS went first.
    assert 1000 < truncated < 2900  # Both cases well covered.


def test_make_row_keeps_bos_while_it_fits_and_drops_it_first():
    from matlm.evaluation import scoring
    fits = scoring.make_row(1, [10, 11], [20, 21], max_len=4)  # 5 tokens: exactly fits.
    assert fits.tokens == (1, 10, 11, 20, 21) and fits.score_from == 3
    over = scoring.make_row(1, [10, 11], [20, 21], max_len=3)  # One too many: BOS goes.
    assert over.tokens == (10, 11, 20, 21) and over.score_from == 2
    whole = scoring.make_row(1, [10, 11], [20, 21, 22], max_len=3)  # Continuation = max_len.
    assert whole.tokens == (11, 20, 21, 22) and whole.score_from == 1


def test_make_prompt_follows_lm_eval_generate_until():
    """generate_until encodes the context with BOS and keeps its last
    max_length - max_gen_toks tokens (tok_batch_encode's left_truncate_len)."""
    from matlm.evaluation import scoring
    rng = np.random.default_rng(1)
    for _ in range(500):
        room = int(rng.integers(2, 40))
        context = [int(t) for t in rng.integers(3, 1000, size=int(rng.integers(0, 64)))]
        assert scoring.make_prompt(1, context, room) == ([1] + context)[-room:]
        if len(context) < room:
            assert scoring.make_prompt(1, context, room) == [1, *context]


def test_continuation_longer_than_max_len_names_task_and_example(eval_tasks, wiki_vocab):
    from matlm.evaluation import EvalError, runner, scoring
    with pytest.raises(EvalError, match=r"^where: the continuation of 3 tokens does not fit "
                                        r"max_len 2; it needs --max_len >= 3 \(the default is the "):
        scoring.make_row(1, [5], [6, 7, 8], 2, where="where: ")
    options = runner.EvalOptions(max_examples=2, max_len=1)
    with pytest.raises(EvalError, match=r"^task 'piqa' \(validation example 0, choice 0\): "
                                        r"the continuation of \d+ tokens does not fit max_len 1"):
        runner.prepare(["piqa"], wiki_vocab, options)
    with pytest.raises(EvalError, match=r"^task 'lambada' \(validation example 0\): the continuation"):
        runner.prepare(["lambada"], wiki_vocab, options)


def test_scorer_refuses_a_row_longer_than_its_max_len_naming_the_row(setup):
    from matlm.evaluation import EvalError, scoring
    _, scorer, _ = setup
    row = scoring.make_row(1, list(range(3, 2000)), [5], 2000, where="task 'x' (example 4): ")
    with pytest.raises(EvalError, match=r"^task 'x' \(example 4\): a row of 1998 model inputs "
                                        r"exceeds this scorer's max_len 1024"):
        scorer.loglik([row], MIX)


def test_a_truncated_row_scores_lm_eval_inputs(setup, params):
    """The number for a row cut to max_len is the continuation's log-likelihood given
    exactly the inputs lm-eval feeds the model (one unpadded call on them)."""
    from matlm.evaluation import scoring
    _, scorer, _ = setup
    rng = np.random.default_rng(2)
    context = [int(t) for t in rng.integers(3, CONFIG.vocab_size, size=40)]
    continuation = [int(t) for t in rng.integers(3, CONFIG.vocab_size, size=5)]
    row = scoring.make_row(1, context, continuation, max_len=16)
    sums, _, _ = scorer.loglik([row], MIX)
    inp, scored = _lm_eval_loglikelihood_inputs([1] + context, continuation, 16)
    logp = np.asarray(jax.nn.log_softmax(_brute_logits(params, inp, MIX), axis=-1))
    expected = sum(float(logp[p, t]) for p, t in zip(scored, continuation))
    assert sums[0] == pytest.approx(expected, rel=1e-5, abs=1e-4)
