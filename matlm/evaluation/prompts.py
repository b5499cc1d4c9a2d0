"""k-shot prompts: exemplars drawn deterministically, prepended to each query.

Exemplars for query `i` come from the task's pool: its train split when it has one,
else a fixed set of its evaluated split that is then not evaluated (runner.prepare; the
offline data ships validation splits only). The "random" sampler draws them with
`numpy.random.default_rng([seed, i])`; "first_n" takes the pool's first k in order
(lm-eval-harness's MMLU: the dev split's first 5). The same (seed, query) always gives
the same prompt, whatever else is evaluated or however examples are batched.

A shot is the example's context followed by its gold answer (the gold choice's
continuation, the first answer alias, or the target word); shots and the query are
joined by a blank line (lm-eval-harness's fewshot_delimiter "\n\n"). A task's
description (MMLU's "The following are multiple choice questions ...\n\n") comes
once, before the first shot.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from matlm.evaluation import mappings
from matlm.evaluation.errors import EvalError

SHOT_SEPARATOR = "\n\n"


def exemplar_indices(query_index: int, pool_size: int, num_shots: int, seed: int,
                     exclude_query: bool) -> list[int]:
    """`num_shots` distinct pool indices for a query, never the query itself when
    `exclude_query` (the pool is the query's own split)."""
    if num_shots == 0:
        return []
    available = pool_size - 1 if exclude_query else pool_size
    if num_shots > available:
        raise EvalError(f"{num_shots}-shot needs {num_shots} exemplars but the pool has "
                        f"only {available} (excluding the query)" if exclude_query else
                        f"{num_shots}-shot needs {num_shots} exemplars; the pool has {available}")
    rng = np.random.default_rng([seed, query_index])
    picks = rng.choice(available, size=num_shots, replace=False)
    if exclude_query:  # Skip over the query: indices >= query_index shift up by one.
        picks = picks + (picks >= query_index)
    return [int(p) for p in picks]


def shot_text(mapping, example: dict) -> str:
    """An exemplar as it appears in a prompt: its context and its gold answer."""
    if mapping.kind == mappings.MULTIPLE_CHOICE:
        gold = example["label"]
        return example["contexts"][gold] + example["continuations"][gold]
    if mapping.kind == mappings.GENERATIVE_QA:
        return example["context"] + mapping.answer_prefix + example["answers"][0]
    return example["context"] + example["target"]


@dataclasses.dataclass(frozen=True)
class Request:
    """One query, ready to tokenise: per-choice (context, continuation) pairs for
    multiple choice, one pair (context, target) for last word, a prompt for QA."""

    index: int
    kind: str
    contexts: tuple
    continuations: tuple = ()
    label: int = 0
    answers: tuple = ()
    exemplars: tuple = ()  # Pool indices of the shots, for inspection and tests.


def build_request(mapping, example: dict, pool: Sequence[dict], num_shots: int, seed: int,
                  exclude_query: bool, sampler: str = "random",
                  description: str = "") -> Request:
    if sampler == "first_n":
        if num_shots > len(pool):
            raise EvalError(f"{num_shots}-shot needs {num_shots} exemplars; the pool has "
                            f"{len(pool)}")
        shots = list(range(num_shots))
    else:
        shots = exemplar_indices(example["index"], len(pool), num_shots, seed, exclude_query)
    prefix = description + "".join(shot_text(mapping, pool[j]) + SHOT_SEPARATOR for j in shots)
    if mapping.kind == mappings.MULTIPLE_CHOICE:
        return Request(example["index"], mapping.kind,
                       tuple(prefix + c for c in example["contexts"]),
                       tuple(example["continuations"]), int(example["label"]),
                       exemplars=tuple(shots))
    if mapping.kind == mappings.GENERATIVE_QA:
        return Request(example["index"], mapping.kind, (prefix + example["context"],),
                       answers=tuple(example["answers"]), exemplars=tuple(shots))
    return Request(example["index"], mapping.kind, (prefix + example["context"],),
                   (example["target"],), exemplars=tuple(shots))
