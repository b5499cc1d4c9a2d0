"""In-loop evaluation for the trainer: a small eval set every N steps.

    options = runner.EvalOptions(num_shots=1, max_examples=32)
    metrics = in_loop_eval(params, model_config, vocab, ["loss", "hellaswag"],
                           {"S": (64,) * 4, "XL": (512,) * 4}, options)
    # {"eval/loss:matlm_wiki/S/loss": 5.1, ..., "eval/hellaswag/XL/acc": 0.27, ...}

Prepared tasks (tokenised prompts, loss batches) and the compiled scoring functions
are cached across calls, so each call after the first only runs the model.

`downstream_eval_hook` wraps it as a trainer hook (training never imports this package;
`matlm train` passes the hook to `train(..., hooks=[downstream_eval_hook])` when
`TrainConfig.downstream_eval_tasks` is set). The hook scores with the options `matlm eval`
derives for the run (`runner.eval_options_for_run`): held-out loss on the run's data task
at the sequence length it trains at, rows of at most that many tokens, so the numbers in
metrics.jsonl are the ones `matlm eval` reports for the saved checkpoint.
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


def in_loop_eval(params, model_config, vocab, tasks: Sequence[str],
                 widths_by_name: Mapping[str, Sequence[int]], options: runner.EvalOptions,
                 reference: str | None = None) -> dict[str, float]:
    """Flat metrics `eval/<task>/<submodel>/<metric>` (see the module docstring), scored
    with `options` (`options.max_examples` examples per task). `reference` (default: the
    submodel with the most parameters) is the one agreement is measured against."""
    if not widths_by_name:
        raise ValueError("in_loop_eval needs at least one submodel in widths_by_name")
    if any(not (t == runner.LOSS or t.startswith(runner.LOSS + ":")) for t in tasks):
        ensure_builtin_tasks()
    submodels = [Submodel(name, tuple(int(w) for w in widths),
                          param_count(model_config, widths),
                          non_embedding_param_count(model_config, widths))
                 for name, widths in widths_by_name.items()]
    for s in submodels:
        model_config.resolve_widths(list(s.widths))  # Validates before any work.
    reference = reference or max(submodels, key=lambda s: s.params).name
    plan_key = (tuple(tasks), options, vocab.tokenizer.serialized_model_proto())
    if plan_key not in _PLANS:
        _PLANS.clear()  # One configuration per trainer: keep memory bounded.
        _PLANS[plan_key] = runner.prepare(list(tasks), vocab, options)
    scorer_key = (model_config, options.batch_size, options.max_len)
    if scorer_key not in _SCORERS:
        _SCORERS[scorer_key] = scoring.SubmodelScorer(model_config, params, options.batch_size,
                                                      options.max_len)
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
    from matlm.model_dir import RunConfig
    from matlm.training.hooks import DOWNSTREAM_EVAL_HOOK, Hook
    from matlm.training.preemption import SIGNALS
    train_config = context.train_config
    if not train_config.downstream_eval_tasks:
        raise ValueError("downstream_eval_hook needs TrainConfig.downstream_eval_tasks, "
                         "e.g. --gin.TrainConfig.downstream_eval_tasks=\"('copa',)\"")
    # The run's own configs (as run_config.json records them), not a re-read of the file.
    run_config = RunConfig(model=context.model_config, data=context.data_config,
                           train=train_config)
    options = runner.eval_options_for_run(
        run_config, num_shots=1, max_examples=train_config.downstream_eval_examples)

    def score(info):
        # Already in metrics.jsonl (the restored step, a finished run started again): the
        # same parameters give the same scores; writing them again would duplicate rows.
        if context.writer.has(info.step, f"eval/{train_config.downstream_eval_tasks[0]}/"):
            return
        SIGNALS.check()  # A signal before a (long) downstream eval: give up, save, stop.
        context.writer.write(info.step, in_loop_eval(
            info.state.params, context.model_config, context.vocab,
            list(train_config.downstream_eval_tasks), context.widths_by_name, options))

    return Hook(score, train_config.eval_every, at_start=True, at_end=True,
                name=DOWNSTREAM_EVAL_HOOK)
