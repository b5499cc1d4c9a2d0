"""Declarative checks of config fields: each field states its type and range once, in its
dataclass metadata, and one function checks them all.

    learning_rate: float = checked(3e-3, float, gt=0)
    adam_b1: float = checked(0.9, float, ge=0, lt=1)
    head_dim: Optional[int] = checked(None, int, ge=1, optional=True)
    mesh_shape: tuple = checked((-1, 1, 1), tuple, each=Check(int, ge=1, also=(-1,)))

    def __post_init__(self):
        check_fields(self, TrainConfigError)   # then the cross-field checks

A failure is one line naming the field as a gin binding writes it and the expected value:
`TrainConfig.learning_rate must be a finite number > 0, got -0.1`. Types are strict the
way gin hands them over (Python literals): a bool is not an integer, a float is not an
integer, a string is not a number, and nan/inf are not finite numbers. Checks run at
construction, so a bad value never reaches a write, a compile or a step.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Optional

_TYPE_WORDS = {int: "an integer", float: "a finite number", bool: "True or False",
               str: "a string", tuple: "a tuple"}


@dataclasses.dataclass(frozen=True)
class Check:
    """What one value must be. `kind` is int, float (any finite real), bool, str or tuple;
    bounds are inclusive (`ge`, `le`) or strict (`gt`, `lt`); `choices` lists the allowed
    values; `also` lists values accepted outside the bounds (e.g. -1 = "the rest");
    `optional` accepts None; `each` checks every element of a tuple; `presets` lists
    names (strings) accepted instead of a value of `kind`."""
    kind: type
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: tuple = ()
    also: tuple = ()
    optional: bool = False
    each: Optional["Check"] = None
    presets: tuple = ()

    def expected(self) -> str:
        """The expected value in words: 'a finite number > 0', 'an integer >= 1 or -1'."""
        if self.choices:
            words = f"one of {', '.join(repr(c) for c in self.choices)}"
        else:
            words = _TYPE_WORDS[self.kind]
            words += _range_words(self)
            if self.also:
                words += "".join(f" or {a!r}" for a in self.also)
            if self.each is not None:
                words += f" of {_plural(self.each.expected())}"
        if self.presets:
            words += f" or one of {', '.join(repr(p) for p in self.presets)}"
        return words + (" or None" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, str) and value in self.presets:
            return True
        if self.choices:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if not _is_kind(value, self.kind):
            return False
        if self.kind is tuple:
            return self.each is None or all(self.each.ok(v) for v in value)
        if value in self.also:
            return True
        if self.kind in (int, float):
            return _in_range(self, value)
        return True


def _is_kind(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # numpy integers count; bools do not (True is not a step count).
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:  # Integers are numbers too (learning_rate=1 is fine); nan/inf are not.
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind is tuple:  # Gin writes (a, b) or [a, b]; the config stores a tuple.
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def _in_range(check: Check, value) -> bool:
    return ((check.ge is None or value >= check.ge) and (check.gt is None or value > check.gt)
            and (check.le is None or value <= check.le) and (check.lt is None or value < check.lt))


def _num(x) -> str:
    return repr(int(x)) if float(x).is_integer() else repr(x)


def _range_words(check: Check) -> str:
    low = (("[", check.ge) if check.ge is not None else ("(", check.gt)
           if check.gt is not None else None)
    high = (("]", check.le) if check.le is not None else (")", check.lt)
            if check.lt is not None else None)
    if low and high:
        return f" in {low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {_num(high[1])}"
    return ""


def _plural(words: str) -> str:
    for article, plural in (("an integer", "integers"), ("a finite number", "finite numbers"),
                            ("a string", "strings"), ("a tuple", "tuples")):
        if words.startswith(article):
            return plural + words[len(article):]
    return words


def checked(default, kind: type, **check) -> Any:
    """A dataclass field with a default and its check (see `Check`)."""
    return dataclasses.field(default=default, metadata={"check": Check(kind, **check)})


def check_fields(config, error: type[ValueError]) -> None:
    """Checks every field of the dataclass `config` that declares a check, in field order;
    raises `error` with one line naming the first bad field. Lists become tuples."""
    cls_name = type(config).__name__
    for base in type(config).__mro__:  # Gin's wrapping subclass keeps the plain name.
        if dataclasses.is_dataclass(base) and "__dataclass_fields__" in base.__dict__:
            cls_name = base.__name__
            break
    for f in dataclasses.fields(config):
        check = f.metadata.get("check")
        if check is None:
            continue
        value = getattr(config, f.name)
        if not check.ok(value):
            raise error(f"{cls_name}.{f.name} must be {check.expected()}, got {value!r}")
        if check.kind is tuple and isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


class FlagError(ValueError):
    """A command-line flag with a value out of its range."""


def check_flags(args, checks: dict) -> None:
    """Checks parsed argparse flags against `{flag name: Check}` (None values are skipped
    unless the check forbids them: argparse's "not given"); raises FlagError with one line
    naming the first bad flag: `--num_shots must be an integer >= 0, got -1`."""
    for name, check in checks.items():
        value = getattr(args, name)
        if value is None:
            continue
        if not check.ok(value):
            raise FlagError(f"--{name} must be {check.expected()}, got {value!r}")
