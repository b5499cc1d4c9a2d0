"""One table of task metrics (matlm.evaluation.task_metrics): `matlm eval`'s report,
`matlm search` and sweep results pick the same primary metric for every task (its own
`primary_metric` when it names one), and search minimises exactly the lower-is-better
metrics."""
import json

import numpy as np
import pytest

from matlm.evaluation import mappings, report, task_metrics as tm
from matlm.model import ModelConfig
from matlm.submodels import search as S

CONFIG = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=2, d_ff=128)


class _FixedScorer:
    """Stands in for SubmodelScorer: every continuation scores 0 (ties: the first choice
    wins), generation stops at once, held-out tokens all have log p = -1."""

    def loglik(self, rows, widths, progress=None):
        return np.zeros(len(rows)), np.zeros(len(rows), bool), [()] * len(rows)

    def generate(self, prompts, widths, max_new_tokens, progress=None, stop_ids=()):
        return [[] for _ in prompts]

    def token_logprobs(self, batch, widths):
        shape = batch["targets"].shape
        return -np.ones(shape, np.float32), np.zeros(shape, np.int32)

    def compiled_count(self):
        return 0


# hellaswag names acc_norm itself; the others take their kind's default.
TASKS = ["hellaswag", "piqa", "winogrande", "lambada", "trivia_qa", "loss"]


def test_search_and_report_pick_the_same_primary_metric_for_each_kind(eval_tasks, wiki_vocab):
    from matlm.evaluation import runner, tasks
    from matlm.evaluation.submodels import Submodel
    options = runner.EvalOptions(max_examples=2, batch_size=2, max_len=256)
    plan = runner.prepare(TASKS, wiki_vocab, options)
    subs = [Submodel("S", (16, 16), 0, 0)]
    results = runner.run(plan, CONFIG, None, subs, "S", wiki_vocab, options,
                         scorer=_FixedScorer())
    searched = {}
    for task in plan:
        evaluator = S.TaskEvaluator(task, CONFIG, None, wiki_vocab, options,
                                    scorer=_FixedScorer())
        entry = results["tasks"][task.name]
        assert evaluator.key == report.primary(entry) in entry["metrics"]["S"]
        assert evaluator.minimize == tm.lower_is_better(evaluator.key)
        searched[task.kind if task.name != "hellaswag" else "hellaswag"] = evaluator.key
    assert searched == {mappings.MULTIPLE_CHOICE: "acc", "hellaswag": "acc_norm",
                        mappings.LAST_WORD: "acc", mappings.GENERATIVE_QA: "exact_match",
                        tm.LOSS: "loss"}
    assert tasks.get_eval_task("hellaswag").primary_metric == "acc_norm"
    # results.json written before entries recorded their metric: the kind's default.
    for kind, metric in (("multiple_choice", "acc"), ("generative_qa", "exact_match"),
                         ("last_word", "acc"), ("loss", "loss")):
        assert report.primary({"kind": kind}) == metric == tm.primary_metric(kind)


def test_the_table_is_consistent():
    for kind, entry in tm.KINDS.items():
        assert entry.primary in entry.metrics
        for metric in entry.metrics:
            assert metric in tm.HIGHER_IS_BETTER
            tm.check_primary(kind, metric)
    assert set(tm.ANSWER_KINDS) == set(tm.KINDS) - {tm.LOSS}
    assert [m for m in tm.HIGHER_IS_BETTER if tm.lower_is_better(m)] == \
        ["loss", "perplexity", "bits_per_byte"]
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        tm.lower_is_better("accuracy")
    with pytest.raises(ValueError, match=r"^task 'x': primary_metric='f1'; expected one of "
                                         r"\('acc', 'acc_norm', 'acc_uncond'\)"):
        tm.check_primary(mappings.MULTIPLE_CHOICE, "f1", "task 'x': ")


# --- search optimises the task's own primary metric, in its direction ----------------------

SEARCH_CONFIG = ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, d_ff=64)
FAVOURED = (64, 8, 8, 8)  # What the primary metric favours; every other metric disfavours it.


def _fake_run(metric_values):
    """runner.run as TaskEvaluator calls it: each candidate's metrics from its widths."""
    def run(plan, config, params, subs, reference, vocab, options, scorer=None):
        (task,) = plan
        return {"tasks": {task.name: {"metrics": {s.name: metric_values(s.widths)
                                                  for s in subs}}}}
    return run


def _search(monkeypatch, task, metric_values):
    from matlm.evaluation import runner
    monkeypatch.setattr(runner, "run", _fake_run(metric_values))
    options = runner.EvalOptions(masked=True)
    evaluator = S.TaskEvaluator(task, SEARCH_CONFIG, None, None, options, scorer=_FixedScorer())
    space = S.SearchSpace.build(SEARCH_CONFIG, "granularities")
    budget = S.Budget("params", 1e12, 128)  # Everything fits: the metric alone decides.
    result = S.search(space, budget, evaluator, "evolution", 300, 0, evaluator.minimize)
    return evaluator, result


def _distance(widths):
    return float(sum(abs(np.log2(w) - np.log2(f)) for w, f in zip(widths, FAVOURED)))


@pytest.mark.parametrize("kind,primary,other", [
    (mappings.MULTIPLE_CHOICE, "acc_norm", "acc"),
    (mappings.MULTIPLE_CHOICE, "acc", "acc_norm"),
    (mappings.GENERATIVE_QA, "f1", "exact_match"),
    (mappings.GENERATIVE_QA, "exact_match", "f1"),
])
def test_search_maximises_the_tasks_own_primary_metric(monkeypatch, kind, primary, other):
    from matlm.evaluation import runner
    task = runner.PreparedTask("custom", kind, None, tm.primary_metric(kind, primary))
    # The primary peaks at FAVOURED; the other metric peaks at the uniform widest model.
    evaluator, result = _search(monkeypatch, task, lambda w: {
        primary: 1.0 - _distance(w) / 100, other: sum(w) / 1000})
    assert (evaluator.key, evaluator.minimize) == (primary, False)
    assert result.best.widths == FAVOURED and result.best.metric == 1.0


@pytest.mark.parametrize("kind,metric", [(tm.LOSS, "loss")])
def test_search_minimises_a_lower_is_better_metric(monkeypatch, kind, metric):
    from matlm.evaluation import runner
    task = runner.PreparedTask("loss:custom", kind, metric=tm.primary_metric(kind))
    evaluator, result = _search(monkeypatch, task, lambda w: {metric: 2.0 + _distance(w)})
    assert (evaluator.key, evaluator.minimize) == (metric, True)
    assert result.best.widths == FAVOURED and result.best.metric == 2.0


# --- sweep results: the same primary metric as results.md's first row ----------------------

def test_sweep_eval_columns_are_each_tasks_primary_metric(tmp_path):
    from matlm.sweep import results as sweep_results
    metrics = {"XL": {"acc": 0.25, "acc_norm": 0.5, "exact_match": 0.125, "f1": 0.375,
                      "loss": 3.5, "bits_per_byte": 1.5, "greedy_agreement": 1.0,
                      "answer_agreement": 1.0},
               "S": {"acc": 0.75, "acc_norm": 0.0, "exact_match": 0.625, "f1": 0.875,
                     "loss": 4.5, "bits_per_byte": 2.0, "greedy_agreement": 0.5,
                     "answer_agreement": 0.5}}
    results = {"submodels": {"XL": {}, "S": {}}, "groups": {}, "tasks": {
        "hellaswag": {"kind": "multiple_choice", "metric": "acc_norm", "metrics": metrics},
        "trivia_qa": {"kind": "generative_qa", "metrics": metrics},  # An older file.
        "loss:matlm_wiki": {"kind": "loss", "metric": "loss", "metrics": metrics}}}
    (tmp_path / "eval" / "7").mkdir(parents=True)
    (tmp_path / "eval" / "7" / "results.json").write_text(json.dumps(results))
    columns = sweep_results._eval_columns(tmp_path)
    assert columns == {"eval_hellaswag_acc_norm_XL": 0.5, "eval_hellaswag_acc_norm_S": 0.0,
                       "eval_trivia_qa_exact_match_XL": 0.125,
                       "eval_trivia_qa_exact_match_S": 0.625,
                       "eval_loss:matlm_wiki_XL": 3.5, "eval_loss:matlm_wiki_S": 4.5,
                       "eval_acc_XL": (0.5 + 0.125) / 2, "eval_acc_S": (0.0 + 0.625) / 2}
    rows = {(r[0], r[1]): r[2:] for r in report.table_rows(
        {**results, "reference": "XL",
         "submodels": {"XL": {"params": 2}, "S": {"params": 1}}})[1]}
    assert rows[("hellaswag", "acc_norm")] == ["50.0", "0.0"]  # results.md's first row.
    assert rows[("trivia_qa", "exact_match")] == ["12.5", "62.5"]
