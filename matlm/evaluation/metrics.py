"""Answer metrics: SQuAD-normalised exact match and token F1 against every gold alias."""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, squash spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # SQuAD v2 convention: both empty → 1.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_answers(metric, prediction: str, answers: Sequence[str]) -> float:
    return max(metric(prediction, a) for a in answers)


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stop_sequences:
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]
