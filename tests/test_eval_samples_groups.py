"""Per-example logs (--log_samples) reproduce the aggregate metrics; group micro/macro
averages equal a brute-force recomputation. A deterministic stand-in scorer (log-
likelihoods from a hash of the tokens and widths) keeps these fast and independent of
any model: what is tested is the bookkeeping from scores to metrics, logs and groups."""
import json
import math
import zlib

import numpy as np
import pytest

from matlm.evaluation import metrics, report, runner, tasks
from matlm.evaluation.submodels import Submodel


class HashScorer:
    """log p of a row = a pseudo-random function of (its tokens, the widths)."""

    def __init__(self, vocab=None, generated="Paris\nQuestion: and then"):
        self.vocab, self.generated = vocab, generated

    @staticmethod
    def _h(tokens, widths) -> int:
        return zlib.crc32(np.asarray([*tokens, -1, *widths], np.int64).tobytes())

    def loglik(self, rows, widths, progress=None):
        hashes = [self._h(r.tokens, widths) for r in rows]
        sums = np.array([-(h % 1000) / 37.0 for h in hashes])
        greedy = np.array([h % 3 == 0 for h in hashes])
        return sums, greedy, [(h % 50,) for h in hashes]

    def generate(self, prompts, widths, max_new_tokens, progress=None, stop_ids=()):
        return [list(self.vocab.encode(self.generated)) for _ in prompts]

    def compiled_count(self):
        return 0


class _Config:
    vocab_size = 2048


SUBMODELS = [Submodel("S", (16, 16), 100, 50), Submodel("XL", (128, 128), 200, 150)]


def _run(names, vocab, **options):
    opts = runner.EvalOptions(batch_size=8, max_len=256, **options)
    names, groups = runner.expand_groups(names)
    plan = runner.prepare(names, vocab, opts)
    return runner.run(plan, _Config(), None, SUBMODELS, "XL", vocab, opts,
                      scorer=HashScorer(vocab), groups=groups, log_samples=True)


def _read_samples(out_dir, submodel, task):
    path = out_dir / "samples" / submodel / f"samples_{task}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logged_samples_reproduce_the_metrics(tmp_path, eval_tasks, wiki_vocab):
    results = _run(["hellaswag", "winogrande", "lambada", "trivia_qa"], wiki_vocab,
                   max_examples=7, acc_uncond=True, num_shots=1)
    report.write_results(results, tmp_path, plots=False)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert "samples" not in stored
    for sub in ("S", "XL"):
        for task in ("hellaswag", "winogrande"):
            logged = _read_samples(tmp_path, sub, task)
            assert len(logged) == 7
            m = stored["tasks"][task]["metrics"][sub]
            ll = [np.array(s["loglikelihoods"]) for s in logged]
            # Characters of the choice: the continuation without its delimiter " ".
            chars = [np.array([len(c) - 1 for c in s["choices"]]) for s in logged]
            gold = [s["gold"] for s in logged]
            assert m["acc"] == np.mean([np.argmax(x) == g for x, g in zip(ll, gold)])
            assert m["acc_norm"] == np.mean([np.argmax(x / n) == g
                                             for x, n, g in zip(ll, chars, gold)])
            assert m["acc_uncond"] == np.mean(
                [np.argmax(x - np.array(s["uncond_loglikelihoods"])) == g
                 for x, s, g in zip(ll, logged, gold)])
        lam = _read_samples(tmp_path, sub, "lambada")
        m = stored["tasks"]["lambada"]["metrics"][sub]
        assert m["acc"] == pytest.approx(np.mean([s["greedy_match"] for s in lam]))
        assert m["perplexity"] == pytest.approx(math.exp(
            -sum(s["loglikelihood"] for s in lam) / sum(s["target_tokens"] for s in lam)))
        qa = _read_samples(tmp_path, sub, "trivia_qa")
        m = stored["tasks"]["trivia_qa"]["metrics"][sub]
        assert {s["generated"] for s in qa} == {"Paris"}  # Cut at the "\n" stop.
        assert m["exact_match"] == pytest.approx(np.mean([max(
            metrics.exact_match(s["generated"], a) for a in s["answers"]) for s in qa]))
        assert m["f1"] == pytest.approx(np.mean([max(
            metrics.f1(s["generated"], a) for a in s["answers"]) for s in qa]))
    # Winogrande scores one context per choice (partial evaluation): both are logged.
    assert len(_read_samples(tmp_path, "S", "winogrande")[0]["prompt"]) == 2


def test_group_micro_and_macro_equal_a_brute_force_recomputation(eval_tasks, wiki_vocab, monkeypatch):
    subjects = ["mmlu_abstract_algebra", "mmlu_anatomy", "mmlu_astronomy"]  # 100/135/152.
    tasks.register_eval_group("mmlu3", subjects)
    results = _run(["mmlu3"], wiki_vocab)
    assert list(results["tasks"]) == subjects
    for sub in ("S", "XL"):
        correct = {t: [int(np.argmax(s["loglikelihoods"]) == s["gold"])
                       for s in results["samples"][t][sub]] for t in subjects}
        assert [len(c) for c in correct.values()] == [100, 135, 152]
        pooled = [c for t in subjects for c in correct[t]]
        got = results["groups"]["mmlu3"]["metrics"][sub]
        assert got["micro"] == pytest.approx(sum(pooled) / len(pooled))
        assert got["macro"] == pytest.approx(np.mean([np.mean(correct[t]) for t in subjects]))
        assert got["examples"] == 387
    rows = {(r[0], r[1]): r[2:] for r in report.table_rows(results)[1]}
    assert rows[("mmlu3", "micro avg (3 tasks)")] == [
        f"{100 * results['groups']['mmlu3']['metrics'][s]['micro']:.1f}" for s in ("S", "XL")]
    # A large group alone (its members have no rows, as `--tasks=mmlu`): the table still
    # renders (it divided by zero), agreement counted as the mean over the members.
    monkeypatch.setattr(report, "GROUP_ROWS_LIMIT", 2)
    rows = {(r[0], r[1]): r[2:] for r in report.table_rows(results)[1]}
    assert ("mmlu_anatomy", "acc") not in rows
    assert rows[("answer agree w/ XL", "avg")] == [
        f"{100 * np.mean([results['tasks'][t]['metrics'][s]['answer_agreement'] for t in subjects]):.1f}"
        for s in ("S", "XL")]


def test_unknown_group_member_is_an_error(eval_tasks):
    tasks.register_eval_group("broken", ["piqa", "no_such_task"])
    with pytest.raises(ValueError, match="group 'broken': member 'no_such_task' is not a "
                                         "registered eval task"):
        runner.expand_groups(["broken"])
