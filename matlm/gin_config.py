"""The thin gin layer: registers plain dataclasses/functions and parses gin flags.

Code never reads gin globals. Entry points call :func:`parse_gin` once, then build
their config objects by calling the registered constructors with no arguments
(gin fills in the bound values).
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import tokenize
from pathlib import Path
from typing import Sequence

import gin

from matlm.messages import first_line
from matlm.model import families
from matlm.training.config import TrainConfig

# Every model family's config class (matlm.model.families), registered under the `matlm`
# module so gin files may write `ModelConfig.d_model = 512` or the fully-qualified
# `matlm.ModelConfig.d_model = 512`. Gin returns a wrapping subclass; code keeps using the
# plain dataclass (see `model_config_from_gin`).
_GIN_MODEL_CONFIGS = {family.name: gin.external_configurable(family.config_class, module="matlm")
                      for family in families.families()}
_GinTrainConfig = gin.external_configurable(TrainConfig, module="matlm")

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A gin file or binding that cannot be applied."""


def resolve_gin_file(path: str) -> Path:
    """Finds a gin file as given, or relative to the repository root (for `configs/...`)."""
    candidates = [Path(path), REPO_ROOT / path, REPO_ROOT / "configs" / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"gin file not found: {path!r} (looked in {os.getcwd()} and {REPO_ROOT}). "
        "Pass an existing path, e.g. --gin_file=configs/models/tiny.gin")


def parse_gin(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
              model_from_dir: str = "") -> None:
    """Clears gin, then applies files and bindings; any error is one line naming the
    culprit (the file and line, or the binding) and the fix.

    `model_from_dir`: the command (e.g. "matlm eval") rebuilds the run's configs from
    --model_dir's run_config.json, so a file or binding that sets one of them (ModelConfig,
    TrainConfig, DataConfig) would be silently ignored: it is refused, naming it.

    The config is not locked (`gin.finalize`): modules imported later (e.g. the eval
    tasks, loaded lazily) must still be able to register their configurables.
    """
    gin.clear_config()
    files = [resolve_gin_file(f) for f in gin_files]
    for given, path in zip(gin_files, files):
        _parse_file(path, (path.resolve(),))
        if model_from_dir:
            _refuse_run_config_bindings(f"--gin_file={given}", model_from_dir)
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except _GIN_ERRORS as e:
            raise ConfigError(_binding_error(binding, e)) from None
        if model_from_dir:
            name, value = (part.strip() for part in binding.split("=", 1))
            _refuse_run_config_bindings(f"--gin.{name}={value}", model_from_dir)


def _run_config_selectors() -> list[str]:
    """The configurables whose values a run records in run_config.json (the registered
    ones: DataConfig registers when matlm.data is imported)."""
    return [*(c.__name__ for c in _GIN_MODEL_CONFIGS.values()), "TrainConfig", "DataConfig"]


def _refuse_run_config_bindings(where: str, command: str) -> None:
    """Raises ConfigError if the gin bindings applied so far (the last being `where`) set
    a field of a run-config configurable. Files and bindings are applied one at a time and
    checked after each, so the first one that binds such a field is the one named."""
    for selector in _run_config_selectors():
        try:
            bound = gin.get_bindings(selector)
        except ValueError:  # Not registered in this process: nothing can bind it.
            continue
        if bound:
            fields = sorted(bound)
            more = f" (and {len(fields) - 1} more fields)" if len(fields) > 1 else ""
            raise ConfigError(
                f"{where} sets {selector}.{fields[0]}{more}, but {command} takes the model and its "
                "training and data config from --model_dir's run_config.json (gin flags "
                "here only define eval tasks); drop it, or train a model with it")


# What gin raises for bad input: SyntaxError for values that are not Python literals,
# tokenize.TokenError for unbalanced brackets, ValueError/KeyError for unknown names.
_GIN_ERRORS = (SyntaxError, tokenize.TokenError, ValueError, KeyError, TypeError, IOError)
# An include statement on a line of its own (how gin files write them).
_INCLUDE = re.compile(r"""^\s*include\s+(['"])(?P<path>[^'"]+)\1\s*(#.*)?$""")
_DYNAMIC_REGISTRATION = re.compile(r"^\s*from\s+__gin__\s+import\s+.*$", re.MULTILINE)


def _parse_file(path: Path, stack: tuple) -> None:
    """Applies one gin file, resolving its includes here rather than in gin.

    Gin would look up `include 'configs/models/tiny.gin'` relative to the working
    directory first, and for a miss its package-resource reader logs
    `ERROR:root:Path not found: ...` before the next search path finds the file: every
    run outside the repo printed a false error. So the file is applied in pieces between
    its include lines (each padded with blank lines so that gin's line numbers stay the
    file's own), and each include is resolved like a --gin_file (as given, then under the
    repository root) and applied in its place: gin never tries a path that is missing.
    """
    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read gin file {str(path)!r}: {e}") from None
    text = "".join(lines)
    # `from __gin__ import dynamic_registration` switches the parse mode of one
    # parse_config call: repeat it in every piece.
    header = "".join(m.group(0) + "\n" for m in _DYNAMIC_REGISTRATION.finditer(text))
    start = 0
    for number, line in enumerate(lines, start=1):
        match = _INCLUDE.match(line)
        if not match:
            continue
        _parse_piece(path, lines, start, number - 1, header)
        try:
            included = resolve_gin_file(match.group("path"))
        except ConfigError:
            raise ConfigError(
                f"gin file {str(path)!r} line {number}: included file "
                f"{match.group('path')!r} not found (looked in {os.getcwd()} and "
                f"{REPO_ROOT})") from None
        if included.resolve() in stack:
            raise ConfigError(f"gin file {str(path)!r} line {number}: including "
                              f"{match.group('path')!r} again makes a cycle")
        _parse_file(included, stack + (included.resolve(),))
        start = number
    _parse_piece(path, lines, start, len(lines), header)


def _parse_piece(path: Path, lines: list, start: int, end: int, header: str) -> None:
    body = "".join(lines[start:end])
    if not body.strip():
        return
    padding = "\n" * (start - header.count("\n")) if start else ""
    piece = io.StringIO((header if start else "") + padding + body)
    piece.name = str(path)  # Gin's locations (SyntaxError.filename) name the file.
    try:
        gin.parse_config(piece)
    except _GIN_ERRORS as e:
        raise ConfigError(_file_error(path, e)) from None


def unwrap_gin_error(error: BaseException) -> BaseException:
    """The exception a configurable raised, without the lines gin appends.

    Gin re-raises errors from inside a configurable (and from bindings) as a proxy
    subclass whose message adds "In call to configurable ..." / "In file ... line ...":
    the original is the proxy's __context__."""
    while (error.__context__ is not None and error.__suppress_context__
           and type(error).__name__ == type(error.__context__).__name__
           and isinstance(error, type(error.__context__))):
        error = error.__context__
    return error


def _first_line(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        message = error.msg or ""
    elif isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])
    else:
        message = str(error)
    return first_line(message) or type(error).__name__


_UNPARSED_TOKEN = re.compile(r"Failed to parse token '(?P<token>.*)'")
_NOT_FINITE = re.compile(r"^[+-]?(nan|inf|infinity)$", re.IGNORECASE)


def _value_advice(name: str, error: BaseException, as_flag: bool) -> str:
    """What is wrong with a binding's value and how to write it (gin values are Python
    literals)."""
    original = unwrap_gin_error(error)
    match = _UNPARSED_TOKEN.search(str(error))
    if match and _NOT_FINITE.match(match.group("token")):
        return (f"{match.group('token')} is not accepted: gin values are Python literals "
                "and nan/inf are not; give a finite number")
    if match:
        token = match.group("token")
        quoted = f"--gin.{name}=\"'{token}'\"" if as_flag else f"{name} = '{token}'"
        return (f"{token} is not a Python literal (gin values are numbers, quoted "
                f"strings, True/False/None, tuples or @references): quote strings, e.g. "
                f"{quoted}")
    if isinstance(original, tokenize.TokenError):
        return "unbalanced brackets or quotes"
    return _first_line(original)


def _binding_name(binding: str) -> str:
    return binding.split("=", 1)[0].strip()


def _binding_error(binding: str, error: BaseException) -> str:
    name = _binding_name(binding)
    where = f"--gin.{name}={binding.split('=', 1)[1].strip()}" if "=" in binding else binding
    advice = _value_advice(name, error, as_flag=True)
    if isinstance(unwrap_gin_error(error), (ValueError, KeyError)) and not isinstance(
            error, SyntaxError):
        advice += (". Check the spelling against the configurable's fields "
                   "(e.g. --gin.ModelConfig.d_model=512)")
    return f"cannot apply gin binding {where}: {advice}"


_LOCATION = re.compile(r'In file "(?P<file>.*)", line (?P<line>\d+)\n\s*(?P<text>.*)')


def _file_error(path: Path, error: BaseException) -> str:
    """One line: the file, the line number and statement, what is wrong."""
    line, text = None, None
    if isinstance(error, SyntaxError) and error.lineno:
        line, text = error.lineno, (error.text or "").strip()
    else:
        match = _LOCATION.search(str(error))
        if match:
            line, text = int(match.group("line")), match.group("text").strip()
    where = f"gin file {str(path)!r}" + (f" line {line}" if line else "")
    name = _binding_name(text) if text and "=" in text else ""
    advice = _value_advice(name, error, as_flag=False)
    return f"{where}: {text}: {advice}" if text else f"{where}: {advice}"


def _misspelled_gin_flag(argv: Sequence[str], index: int) -> str:
    """The error for `--gin NAME=VALUE` or `--gin=NAME=VALUE`. Left to argparse, `--gin`
    would be taken as an abbreviation of --gin_file and the binding read as a file name."""
    if argv[index] == "--gin":
        given = " ".join(argv[index:index + 2])
        binding = argv[index + 1] if index + 1 < len(argv) else ""
    else:
        given, binding = argv[index], argv[index][len("--gin="):]
    if "=" in binding:
        name, value = binding.split("=", 1)
        fix = f"--gin.{name.strip()}={value.strip()}"
    else:
        fix = "--gin.NAME=VALUE"
    return f"{given}: write a gin binding as one argument, {fix} (a dot after --gin, no space)"


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `--gin.NAME=VALUE` flags (T5X style) from the other arguments.

    Returns (bindings, remaining_argv). `--gin.ModelConfig.d_model=512` becomes the
    binding `ModelConfig.d_model=512`. `--gin NAME=VALUE` (a space) and `--gin=NAME=VALUE`
    are refused with the spelling to use.
    """
    bindings, rest = [], []
    for index, arg in enumerate(argv):
        if arg == "--gin" or arg.startswith("--gin="):
            raise ConfigError(_misspelled_gin_flag(argv, index))
        if arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" not in body:
                raise ConfigError(f"gin flag {arg!r} has no value; write --gin.NAME=VALUE")
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return bindings, rest


def config_from_gin(cls, gin_cls):
    """The plain dataclass `cls` with the values gin binds to `gin_cls` (its registered
    wrapper). Errors the dataclass raises (one line naming the field) come out as raised,
    without the lines gin appends to them."""
    try:
        bound = gin_cls()
    except Exception as e:  # noqa: BLE001 - re-raised unchanged, only unwrapped.
        raise unwrap_gin_error(e) from None
    return cls(**{f.name: getattr(bound, f.name) for f in dataclasses.fields(cls)})


def bound_model_family() -> str:
    """The family whose config class the parsed gin bindings name (`ViTConfig.d_model = ...`
    → "vit"); the LM's when they name none. Bindings of two families are a ConfigError."""
    bound = [f.name for f in families.families() if gin.get_bindings(f.config_class.__name__)]
    if len(bound) > 1:
        raise ConfigError(f"the gin bindings configure several model families "
                          f"({', '.join(bound)}); a model is one family: bind one config class")
    return bound[0] if bound else families.DEFAULT_FAMILY


def model_config_from_gin(family: str | None = None):
    """The config that the parsed gin bindings describe (a plain dataclass), of `family`
    or, by default, of the family they bind (`bound_model_family`)."""
    family = family or bound_model_family()
    return config_from_gin(families.get_family(family).config_class, _GIN_MODEL_CONFIGS[family])


def train_config_from_gin() -> TrainConfig:
    """The TrainConfig that the parsed gin bindings describe (a plain dataclass)."""
    return config_from_gin(TrainConfig, _GinTrainConfig)
