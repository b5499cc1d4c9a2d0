"""The three kinds of one-shot task, each a field mapping from raw records to examples.

A mapping turns one raw record into one canonical example (plain Python):

- `MultipleChoice` → {"contexts": [str] per choice, "continuations": [str], "label": int}
  Scored by the log-likelihood of each continuation after its context.
- `GenerativeQA`   → {"context": str, "answers": [str]}
  Greedy decoding up to a stop sequence; exact match / F1 against every answer.
- `LastWord`       → {"context": str, "target": str}   (LAMBADA)
  Accuracy: the target's tokens are all the greedy choice; plus its perplexity.

Everything is configured in gin (`configs/eval/*.gin`): field paths and templates (see
`matlm.evaluation.templates`), so a new task needs no code.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import numpy as np

from matlm.evaluation.errors import FieldMappingError
from matlm.evaluation.templates import CONVERSIONS, lookup, render

MULTIPLE_CHOICE, GENERATIVE_QA, LAST_WORD = "multiple_choice", "generative_qa", "last_word"


def _as_list(value: Any, path: str, where: str) -> list:
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise FieldMappingError(f"{where}field {path!r} is {value!r}, not a list") from None


def _declaration_error(kind: str, name: str, value: Any, expected: str) -> FieldMappingError:
    return FieldMappingError(f"{kind}: {name}={value!r} is not valid; expected {expected}")


def _check_path(kind: str, name: str, value: Any, optional: bool = True) -> None:
    """A field path binding: a non-empty string (or None when optional). Caught here, at
    declaration, so a bad binding is one line instead of a TypeError deep in a lookup."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise _declaration_error(kind, name, value, "a field path string such as 'label'"
                                 + (" or None" if optional else ""))


def _check_strings(kind: str, name: str, value: Any, non_empty: bool = False) -> None:
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(
            isinstance(v, str) and (v or not non_empty) for v in value):
        raise _declaration_error(kind, name, value, "a tuple of " + ("non-empty " if non_empty
                                                                     else "") + "strings")


def _check_conversions(kind: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or any(c not in CONVERSIONS for c in value):
        raise _declaration_error(kind, name, value, "a string of template conversions from "
                                 f"{''.join(sorted(CONVERSIONS))!r} (e.g. 'b')")


def _apply_conversions(text: str, conversions: str) -> str:
    for c in conversions:
        text = CONVERSIONS[c](text)
    return text


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """Multiple choice by continuation log-likelihood.

    The choices come from exactly one of
      choices_field:    path of a list of choice texts (`endings`, `choices.text`);
      choice_templates: one template per choice (`("{sol1}", "{sol2}")`, `("no", "yes")`);
      choice_fields:    one field path per choice (SciQ: `("correct_answer", "distractor1",
                        "distractor2", "distractor3")`), usually with `shuffle_seed`.
    shuffle_seed:      permute the choices with `numpy.random.default_rng([seed, index])`
                       (index = the example's position in its split), so a gold answer that
                       the data always stores first is not always choice 0.
    The gold answer is exactly one of
      label_field:      path of the gold label; `label_map` maps its str() to an index,
                        `label_index_field` names a list the label is looked up in (ARC:
                        `choices.label`, which must have one entry per choice), else the
                        label must be an integer (not a bool: booleans need a label_map);
      gold_text_field:  path of a field holding the gold *text*, which must be exactly one
                        of the choices (found after any shuffle; set label_field=None).
    Every label is checked against the number of choices (FieldMappingError naming the
    task, the example and the value) in the data's order, then followed through any
    shuffle: a task never scores with a silently wrong gold.

    context:           template of the text before each choice; may use `{choice}`
                       (partial scoring: winogrande puts the choice in the context).
    context_conversions: conversions (templates.py letters) applied to the whole rendered
                       context, e.g. "b": lm-eval-harness preprocesses hellaswag's whole
                       query, not each field.
    continuation:      template of the scored text, `{choice}` = the choice (default
                       " {choice}": lm-eval-harness's target delimiter " " + the choice).
    blank_field:       a field with a `blank` ("_") to split: adds the fields
                       `before_blank` / `after_blank` for the templates.
    field_maps:        value rewrites for fields used in templates (see templates.py).
    """

    context: str
    choices_field: Optional[str] = None
    choice_templates: tuple = ()
    choice_fields: tuple = ()
    shuffle_seed: Optional[int] = None
    continuation: str = " {choice}"
    context_conversions: str = ""
    label_field: Optional[str] = "label"
    label_map: Optional[Mapping[str, int]] = None
    label_index_field: Optional[str] = None
    gold_text_field: Optional[str] = None
    blank_field: Optional[str] = None
    blank: str = "_"
    field_maps: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    kind = MULTIPLE_CHOICE

    def __post_init__(self):
        kind = "multiple_choice"
        if not isinstance(self.context, str):
            raise _declaration_error(kind, "context", self.context, "a template string")
        if not isinstance(self.continuation, str) or not self.continuation:
            raise _declaration_error(kind, "continuation", self.continuation,
                                     "a non-empty template string such as ' {choice}'")
        for name in ("choices_field", "label_field", "label_index_field", "gold_text_field",
                     "blank_field"):
            _check_path(kind, name, getattr(self, name))
        _check_strings(kind, "choice_templates", self.choice_templates)
        _check_strings(kind, "choice_fields", self.choice_fields, non_empty=True)
        _check_conversions(kind, "context_conversions", self.context_conversions)
        given = [n for n in ("choices_field", "choice_templates", "choice_fields")
                 if getattr(self, n)]
        if len(given) != 1:
            raise FieldMappingError(f"{kind} needs exactly one of choices_field, "
                                    f"choice_templates and choice_fields; got {given or 'none'}")
        if len(self.choice_templates or self.choice_fields or "xx") < 2:
            raise FieldMappingError(f"{kind} needs at least 2 choices; got "
                                    f"{self.choice_templates or self.choice_fields}")
        if (self.label_field is None) == (self.gold_text_field is None):
            raise FieldMappingError(
                f"{kind}: label_field={self.label_field!r}, gold_text_field="
                f"{self.gold_text_field!r}; expected exactly one of them (label_field names "
                "the gold label or index, gold_text_field the field holding the gold choice "
                "text; set the other to None)")
        if self.label_field is None and (self.label_map is not None or self.label_index_field):
            raise FieldMappingError(f"{kind}: label_map and label_index_field need "
                                    "label_field; gold_text_field finds the gold by its text")
        if self.label_map is not None and self.label_index_field:
            raise FieldMappingError(f"{kind}: give label_map or label_index_field, not both")
        if self.label_map is not None and (
                not isinstance(self.label_map, Mapping) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in self.label_map.values())):
            raise _declaration_error(kind, "label_map", self.label_map,
                                     "a dict from label strings to choice indices >= 0, "
                                     "e.g. {'False': 0, 'True': 1}")
        if self.shuffle_seed is not None and (isinstance(self.shuffle_seed, bool) or
                                              not isinstance(self.shuffle_seed, int)
                                              or self.shuffle_seed < 0):
            raise _declaration_error(kind, "shuffle_seed", self.shuffle_seed,
                                     "an integer >= 0 or None")
        if not isinstance(self.blank, str) or not self.blank:
            raise _declaration_error(kind, "blank", self.blank, "a non-empty string")

    def __call__(self, record: Mapping[str, Any], where: str = "", index: int = 0) -> dict:
        record = dict(record)
        if self.blank_field:
            text = str(lookup(record, self.blank_field, where))
            if self.blank not in text:
                raise FieldMappingError(f"{where}field {self.blank_field!r} has no blank "
                                        f"{self.blank!r}: {text[:80]!r}")
            record["before_blank"], record["after_blank"] = text.split(self.blank, 1)
        if self.choices_field:
            choices = [str(c) for c in _as_list(lookup(record, self.choices_field, where),
                                                self.choices_field, where)]
        elif self.choice_fields:
            choices = [str(lookup(record, f, where)) for f in self.choice_fields]
        else:
            choices = [render(t, record, self.field_maps, where) for t in self.choice_templates]
        if len(choices) < 2:
            raise FieldMappingError(f"{where}needs at least 2 choices, got {choices!r}")
        # The gold is found in the data's order, then followed through the shuffle.
        label = (None if self.gold_text_field else self._label(record, len(choices), where))
        if self.shuffle_seed is not None:
            order = [int(i) for i in np.random.default_rng([self.shuffle_seed, index])
                     .permutation(len(choices))]
            choices = [choices[i] for i in order]
            label = None if label is None else order.index(label)
        contexts, continuations = [], []
        for choice in choices:
            with_choice = {**record, "choice": choice}
            context = render(self.context, with_choice, self.field_maps, where)
            contexts.append(_apply_conversions(context, self.context_conversions))
            continuations.append(render(self.continuation, with_choice, self.field_maps, where))
        if label is None:
            label = self._gold_by_text(record, choices, where)
        return {"contexts": contexts, "continuations": continuations, "label": label}

    def _gold_by_text(self, record, choices: list, where: str) -> int:
        gold = str(lookup(record, self.gold_text_field, where))
        hits = [i for i, c in enumerate(choices) if c == gold]
        if len(hits) != 1:
            raise FieldMappingError(
                f"{where}gold text {gold!r} of field {self.gold_text_field!r} is "
                + ("not among" if not hits else f"{len(hits)} times among")
                + f" the choices {choices}")
        return hits[0]

    def _label(self, record, num_choices: int, where: str) -> int:
        raw = lookup(record, self.label_field, where)
        if self.label_map is not None:
            if str(raw) not in self.label_map:
                raise FieldMappingError(f"{where}label {raw!r} of field {self.label_field!r} "
                                        f"is not in label_map {dict(self.label_map)}")
            label = int(self.label_map[str(raw)])
        elif self.label_index_field:
            options = _as_list(lookup(record, self.label_index_field, where),
                               self.label_index_field, where)
            if len(options) != num_choices:  # Else a found label may name another choice.
                raise FieldMappingError(f"{where}{self.label_index_field!r} has {len(options)} "
                                        f"entries ({options}) for {num_choices} choices")
            if raw not in options:
                raise FieldMappingError(f"{where}label {raw!r} is not one of "
                                        f"{self.label_index_field!r} = {options}")
            label = options.index(raw)
        else:
            label = _integer_label(raw, self.label_field, where)
        if not 0 <= label < num_choices:
            raise FieldMappingError(f"{where}label {raw!r} of field {self.label_field!r} is "
                                    f"out of range for {num_choices} choices (0..."
                                    f"{num_choices - 1})")
        return label


def _integer_label(raw: Any, field: str, where: str) -> int:
    """An index label: an int, or a string of one ("3": HF hellaswag). Booleans and
    fractional numbers are rejected rather than silently truncated to 0/1."""
    if isinstance(raw, bool) or raw is None:
        raise FieldMappingError(f"{where}label field {field!r} is {raw!r}, not an index "
                                "(set label_map, e.g. {'False': 0, 'True': 1})")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        return int(raw)
    raise FieldMappingError(f"{where}label field {field!r} is {raw!r}, not an integer "
                            "index (set label_map or label_index_field)")


@dataclasses.dataclass(frozen=True)
class GenerativeQA:
    """Generative QA: greedy decoding, exact match and F1 (SQuAD normalisation).

    context:         template of the prompt, e.g. "Question: {question}\\nAnswer:".
    answers_field:   path of the gold answer or list of aliases (`answer.aliases`).
    answer_prefix:   put before the gold answer when the example is a shot (" ").
    stop_sequences:  generation is cut at the first of these.
    max_new_tokens:  decoding budget.
    """

    context: str
    answers_field: str
    answer_prefix: str = " "
    stop_sequences: tuple = ("\n",)
    max_new_tokens: int = 24

    kind = GENERATIVE_QA

    def __post_init__(self):
        kind = "generative_qa"
        if not isinstance(self.context, str):
            raise _declaration_error(kind, "context", self.context, "a template string")
        _check_path(kind, "answers_field", self.answers_field, optional=False)
        if not isinstance(self.answer_prefix, str):
            raise _declaration_error(kind, "answer_prefix", self.answer_prefix, "a string")
        _check_strings(kind, "stop_sequences", self.stop_sequences, non_empty=True)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise _declaration_error(kind, "max_new_tokens", self.max_new_tokens,
                                     "an integer >= 1")

    def __call__(self, record: Mapping[str, Any], where: str = "", index: int = 0) -> dict:
        answers = [str(a) for a in _as_list(lookup(record, self.answers_field, where),
                                            self.answers_field, where) if str(a).strip()]
        if not answers:
            raise FieldMappingError(f"{where}field {self.answers_field!r} has no answer")
        return {"context": render(self.context, record, where=where), "answers": answers}


@dataclasses.dataclass(frozen=True)
class LastWord:
    """Last-word completion (LAMBADA): `context` + `target` templates, or `text_field`,
    whose last whitespace-separated word becomes the target (" word")."""

    context: Optional[str] = None
    target: Optional[str] = None
    text_field: Optional[str] = None

    kind = LAST_WORD

    def __post_init__(self):
        for name in ("context", "target", "text_field"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise _declaration_error("last_word", name, value, "a string or None")
        if (self.text_field is None) == (self.context is None or self.target is None):
            raise FieldMappingError("last_word needs either text_field, or context and target")

    def __call__(self, record: Mapping[str, Any], where: str = "", index: int = 0) -> dict:
        if self.text_field:
            text = str(lookup(record, self.text_field, where)).rstrip()
            if " " not in text:
                raise FieldMappingError(f"{where}field {self.text_field!r} has no last word "
                                        f"to predict: {text[:80]!r}")
            context, word = text.rsplit(" ", 1)
            return {"context": context, "target": " " + word}
        context = render(self.context, record, where=where)
        target = render(self.target, record, where=where)
        if not target.strip():
            raise FieldMappingError(f"{where}empty target from template {self.target!r}")
        return {"context": context, "target": target}
