"""One table of task metrics: which way each metric is better, and each task kind's
metrics and default primary metric.

A task's *primary* metric is its one number: its row in results.md, what group averages
and "average accuracy" take, and what `matlm search` optimises. `matlm eval`'s report,
`matlm search` and sweep results all read it here, so they cannot disagree:

    primary_metric(kind, task.primary_metric)  # the task's own choice, else the default
    lower_is_better(metric)                    # search minimises these, maximises the rest

Plain Python over the kind names (no TensorFlow, no JAX): low enough for any caller.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from matlm.evaluation.errors import EvalError
from matlm.evaluation.mappings import GENERATIVE_QA, LAST_WORD, MULTIPLE_CHOICE

# Held-out loss (`loss`, `loss:<seqio task>`): a kind beside the mappings' three.
LOSS = "loss"
# A MatViT's split of labelled images (matlm.evaluation.image_classification).
IMAGE_CLASSIFICATION = "image_classification"

# Every metric a task reports, and whether a higher value is better.
HIGHER_IS_BETTER: Mapping[str, bool] = {
    "acc": True, "acc_norm": True, "acc_uncond": True,
    "exact_match": True, "f1": True, "top1": True, "top5": True,
    "answer_agreement": True, "greedy_agreement": True,
    "loss": False, "perplexity": False, "bits_per_byte": False,
}


@dataclasses.dataclass(frozen=True)
class KindMetrics:
    # The metrics a task of this kind may take as its primary, in the order results.md
    # shows them after the primary (acc_uncond only when it was computed).
    metrics: tuple
    # The primary unless the task names its own: acc for multiple choice and last word
    # (published tables use acc_norm for some tasks, which say so), exact match for QA.
    primary: str


KINDS: Mapping[str, KindMetrics] = {
    MULTIPLE_CHOICE: KindMetrics(("acc", "acc_norm", "acc_uncond"), "acc"),
    LAST_WORD: KindMetrics(("acc",), "acc"),
    GENERATIVE_QA: KindMetrics(("exact_match", "f1"), "exact_match"),
    LOSS: KindMetrics(("loss",), "loss"),
    IMAGE_CLASSIFICATION: KindMetrics(("top1", "top5"), "top1"),
}
# Kinds scored by their answers: fractions in [0, 1], shown in %, and averaged into
# results.md's "average accuracy" (held-out loss is not).
ANSWER_KINDS = (MULTIPLE_CHOICE, LAST_WORD, GENERATIVE_QA, IMAGE_CLASSIFICATION)


def kind_metrics(kind: str) -> KindMetrics:
    if kind not in KINDS:
        raise EvalError(f"unknown task kind {kind!r}; expected one of {', '.join(KINDS)}")
    return KINDS[kind]


def check_primary(kind: str, metric: str, where: str = "") -> None:
    """One-line EvalError unless `metric` is a primary metric a `kind` task may take."""
    allowed = kind_metrics(kind).metrics
    if metric not in allowed:
        raise EvalError(f"{where}primary_metric={metric!r}; expected one of {allowed} for a "
                        f"{kind} task")


def primary_metric(kind: str, chosen: Optional[str] = None) -> str:
    """A task's primary metric: its own choice, else its kind's default."""
    return chosen or kind_metrics(kind).primary


def result_primary(entry: Mapping) -> str:
    """The primary metric of one task's entry in results.json (files written before the
    entry recorded its `metric` get their kind's default)."""
    return primary_metric(entry["kind"], entry.get("metric"))


def lower_is_better(metric: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise EvalError(f"unknown metric {metric!r}; expected one of "
                        f"{', '.join(HIGHER_IS_BETTER)}")
    return not HIGHER_IS_BETTER[metric]
