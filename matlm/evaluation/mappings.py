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
from typing import Any, Mapping, Optional

from matlm.evaluation.errors import FieldMappingError
from matlm.evaluation.templates import lookup, render

MULTIPLE_CHOICE, GENERATIVE_QA, LAST_WORD = "multiple_choice", "generative_qa", "last_word"


def _as_list(value: Any, path: str, where: str) -> list:
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise FieldMappingError(f"{where}field {path!r} is {value!r}, not a list") from None


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    """Multiple choice by continuation log-likelihood.

    context:           template of the text before each choice; may use `{choice}`
                       (partial scoring: winogrande puts the choice in the context).
    choices_field:     path of a list of choice texts (`endings`, `choices.text`), or
    choice_templates:  one template per choice (`("{sol1}", "{sol2}")`, `("yes", "no")`).
    continuation:      template of the scored text, `{choice}` = the choice (default " {choice}").
    label_field:       path of the gold label; `label_map` maps its str() to an index,
                       `label_index_field` names a list the label is looked up in
                       (ARC: `choices.label`), else the label is int(value).
    blank_field:       a field with a `blank` ("_") to split: adds the fields
                       `before_blank` / `after_blank` for the templates.
    field_maps:        value rewrites for fields used in templates (see templates.py).
    """

    context: str
    choices_field: Optional[str] = None
    choice_templates: tuple = ()
    continuation: str = " {choice}"
    label_field: str = "label"
    label_map: Optional[Mapping[str, int]] = None
    label_index_field: Optional[str] = None
    blank_field: Optional[str] = None
    blank: str = "_"
    field_maps: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    kind = MULTIPLE_CHOICE

    def __post_init__(self):
        if (self.choices_field is None) == (not self.choice_templates):
            raise FieldMappingError("multiple_choice needs exactly one of choices_field "
                                    "and choice_templates")

    def __call__(self, record: Mapping[str, Any], where: str = "") -> dict:
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
        else:
            choices = [render(t, record, self.field_maps, where) for t in self.choice_templates]
        if len(choices) < 2:
            raise FieldMappingError(f"{where}needs at least 2 choices, got {choices!r}")
        contexts, continuations = [], []
        for choice in choices:
            with_choice = {**record, "choice": choice}
            contexts.append(render(self.context, with_choice, self.field_maps, where))
            continuations.append(render(self.continuation, with_choice, self.field_maps, where))
        return {"contexts": contexts, "continuations": continuations,
                "label": self._label(record, len(choices), where)}

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
            if raw not in options:
                raise FieldMappingError(f"{where}label {raw!r} is not one of "
                                        f"{self.label_index_field!r} = {options}")
            label = options.index(raw)
        else:
            try:
                label = int(raw)
            except (TypeError, ValueError):
                raise FieldMappingError(f"{where}label field {self.label_field!r} is {raw!r}, "
                                        "not an integer (set label_map)") from None
        if not 0 <= label < num_choices:
            raise FieldMappingError(f"{where}label {label} is out of range for "
                                    f"{num_choices} choices")
        return label


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

    def __call__(self, record: Mapping[str, Any], where: str = "") -> dict:
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
        if (self.text_field is None) == (self.context is None or self.target is None):
            raise FieldMappingError("last_word needs either text_field, or context and target")

    def __call__(self, record: Mapping[str, Any], where: str = "") -> dict:
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
