"""In-loop evaluation for the trainer: a small eval set every N steps.

    metrics = in_loop_eval(params, model_config, vocab, ["loss", "hellaswag"],
                           max_examples=32, widths_by_name={"S": (64,) * 4, "XL": (512,) * 4})
    # {"eval/loss:matlm_wiki/S/loss": 5.1, ..., "eval/hellaswag/XL/acc": 0.27, ...}

Prepared tasks (tokenised prompts, loss batches) and the compiled scoring functions
are cached across calls, so each call after the first only runs the model.

`downstream_eval_hook` wraps it as a trainer hook (training never imports this package;
`matlm train` passes the hook to `train(..., hooks=[downstream_eval_hook])` when
`TrainConfig.downstream_eval_tasks` is set).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import gin

from matlm.evaluation import runner, scoring, tasks as task_registry
from matlm.evaluation.submodels import Submodel
from matlm.model.counting import non_embedding_param_count, param_count

BUILTIN_GIN = "configs/eval/offline.gin"
_PLANS: dict = {}
_SCORERS: dict = {}


def ensure_builtin_tasks() -> None:
    """Registers the offline tasks if they are not yet (adds their gin bindings to the
    current gin config without clearing the caller's)."""
    if "hellaswag" in task_registry.registered_eval_tasks():
        return
    from matlm.gin_config import resolve_gin_file
    with gin.unlock_config():
        gin.parse_config_file(str(resolve_gin_file(BUILTIN_GIN)))
        task_registry.eval_suite()


def in_loop_eval(params, model_config, vocab, tasks: Sequence[str], max_examples: int,
                 widths_by_name: Mapping[str, Sequence[int]], num_shots: int = 1,
                 data_task: str | None = None, batch_size: int = 8,
                 max_len: int = 512, reference: str | None = None) -> dict[str, float]:
    """Flat metrics `eval/<task>/<submodel>/<metric>` (see the module docstring).
    `reference` (default: the submodel with the most parameters) is the one agreement
    is measured against."""
    if not widths_by_name:
        raise ValueError("in_loop_eval needs at least one submodel in widths_by_name")
    if any(not (t == runner.LOSS or t.startswith(runner.LOSS + ":")) for t in tasks):
        ensure_builtin_tasks()
    options = runner.EvalOptions(num_shots=num_shots, max_examples=max_examples,
                                 batch_size=batch_size, max_len=max_len,
                                 **({"data_task": data_task} if data_task else {}))
    submodels = [Submodel(name, tuple(int(w) for w in widths),
                          param_count(model_config, widths),
                          non_embedding_param_count(model_config, widths))
                 for name, widths in widths_by_name.items()]
    for s in submodels:
        model_config.resolve_widths(list(s.widths))  # Validates before any work.
    reference = reference or max(submodels, key=lambda s: s.params).name
    plan_key = (tuple(tasks), max_examples, num_shots, options.data_task, batch_size,
                max_len, vocab.tokenizer.serialized_model_proto())
    if plan_key not in _PLANS:
        _PLANS.clear()  # One configuration per trainer: keep memory bounded.
        _PLANS[plan_key] = runner.prepare(list(tasks), vocab, options)
    scorer_key = (model_config, batch_size, max_len)
    if scorer_key not in _SCORERS:
        _SCORERS[scorer_key] = scoring.SubmodelScorer(model_config, params, batch_size, max_len)
    scorer = _SCORERS[scorer_key].with_params(params)
    results = runner.run(_PLANS[plan_key], model_config, params, submodels, reference, vocab,
                         options, scorer=scorer)
    flat = {}
    for task, entry in results["tasks"].items():
        for sub, values in entry["metrics"].items():
            for metric, value in values.items():
                if isinstance(value, (int, float)) and not math.isnan(value):
                    flat[f"eval/{task}/{sub}/{metric}"] = float(value)
    return flat


def downstream_eval_hook(context):
    """A hook factory for `matlm.training.trainer.train(hooks=...)`: scores
    `TrainConfig.downstream_eval_tasks` (`downstream_eval_examples` examples each) for every
    granularity at each validation eval (the start, every `eval_every` steps, the end) and
    writes the metrics to the run's metrics.jsonl and TensorBoard."""
    from matlm.training.hooks import DOWNSTREAM_EVAL_HOOK, Hook
    from matlm.training.preemption import SIGNALS
    train_config = context.train_config
    if not train_config.downstream_eval_tasks:
        raise ValueError("downstream_eval_hook needs TrainConfig.downstream_eval_tasks, "
                         "e.g. --gin.TrainConfig.downstream_eval_tasks=\"('copa',)\"")

    def score(info):
        # Already in metrics.jsonl (the restored step, a finished run started again): the
        # same parameters give the same scores; writing them again would duplicate rows.
        if context.writer.has(info.step, f"eval/{train_config.downstream_eval_tasks[0]}/"):
            return
        SIGNALS.check()  # A signal before a (long) downstream eval: give up, save, stop.
        context.writer.write(info.step, in_loop_eval(
            info.state.params, context.model_config, context.vocab,
            list(train_config.downstream_eval_tasks), train_config.downstream_eval_examples,
            context.widths_by_name))

    return Hook(score, train_config.eval_every, at_start=True, at_end=True,
                name=DOWNSTREAM_EVAL_HOOK)
