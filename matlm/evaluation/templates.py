"""Field paths and prompt templates over raw records (plain dicts from any source).

A *field path* names a value inside a record: `question`, `choices.text`,
`answer.aliases`, `doc.answers_text[0]`. A *template* is a `str.format` string whose
fields are paths, with a few one-letter conversions for the clean-ups prompts need:

    {premise!p}   strip trailing '.'/whitespace       {choice!l}  lower-case the first letter
    {ctx_b!c}     capitalise the first letter          {text!t}    strip whitespace
    {ctx_b!C}     Python's str.capitalize (first letter upper, the rest lower: what
                  lm-eval-harness does to hellaswag's ctx_b)
    {support!s}   strip leading whitespace             {subject!u} '_' → ' '
    {ctx!b}       lm-eval-harness's hellaswag `preprocess`: strip, ' [title]' → '. ',
                  drop bracketed markup ('[header]' → ''), '  ' → ' ' 

`field_maps` rewrite a field's values before formatting, e.g.
`{"question": {"cause": "because", "effect": "therefore"}}`.
"""
from __future__ import annotations

import re
import string
from typing import Any, Mapping

from matlm.evaluation.errors import FieldMappingError

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def lookup(record: Mapping[str, Any], path: str, where: str = "") -> Any:
    """The value at `path` in `record`; FieldMappingError naming the path and the keys."""
    value: Any = record
    for name, index in _PATH_PART.findall(path):
        try:
            value = value[int(index)] if index else value[name]
        except (KeyError, IndexError, TypeError):
            keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
            raise FieldMappingError(
                f"{where}field {path!r} is not in the data (at {name or '[' + index + ']'!r}; "
                f"available: {keys})") from None
    return value


def _strip_brackets(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


CONVERSIONS = {
    "C": str.capitalize,
    "l": lambda s: s[:1].lower() + s[1:],
    "c": lambda s: s[:1].upper() + s[1:],
    "p": lambda s: s.rstrip().rstrip("."),
    "t": lambda s: s.strip(),
    "s": lambda s: s.lstrip(),
    "u": lambda s: s.replace("_", " "),
    "b": _strip_brackets,
}


class _Formatter(string.Formatter):
    def __init__(self, record: Mapping[str, Any], field_maps: Mapping[str, Mapping], where: str):
        self.record, self.field_maps, self.where = record, field_maps, where

    def get_field(self, field_name, args, kwargs):
        value = lookup(self.record, field_name, self.where)
        mapping = self.field_maps.get(field_name)
        if mapping is not None:
            if str(value) not in mapping:
                raise FieldMappingError(
                    f"{self.where}field {field_name!r} has value {value!r}, which its "
                    f"field map does not cover (keys: {sorted(mapping)})")
            value = mapping[str(value)]
        return value, field_name

    def convert_field(self, value, conversion):
        if conversion in CONVERSIONS:
            return CONVERSIONS[conversion](str(value))
        return super().convert_field(value, conversion)


def render(template: str, record: Mapping[str, Any],
           field_maps: Mapping[str, Mapping] | None = None, where: str = "") -> str:
    """`template` formatted with `record`'s fields (see the module docstring)."""
    try:
        return _Formatter(record, field_maps or {}, where).format(template)
    except (ValueError, IndexError) as e:  # Malformed template, e.g. an unknown conversion.
        raise FieldMappingError(f"{where}bad template {template!r}: {e}") from None
