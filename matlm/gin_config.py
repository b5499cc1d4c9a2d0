"""The thin gin layer: registers plain dataclasses/functions and parses gin flags.

Code never reads gin globals. Entry points call :func:`parse_gin` once, then build
their config objects by calling the registered constructors with no arguments
(gin fills in the bound values).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import gin

from matlm.model.config import ModelConfig
from matlm.training.config import TrainConfig

# Registered under the `matlm` module so gin files may write `ModelConfig.d_model = 512`
# or the fully-qualified `matlm.ModelConfig.d_model = 512`. Gin returns a wrapping
# subclass; code keeps using the plain dataclass (see `model_config_from_gin`).
_GinModelConfig = gin.external_configurable(ModelConfig, module="matlm")
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


def parse_gin(gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
    """Clears gin, then applies files and bindings, naming the culprit on error.

    The config is not locked (`gin.finalize`): modules imported later (e.g. the eval
    tasks, loaded lazily) must still be able to register their configurables.
    """
    gin.clear_config()
    files = [resolve_gin_file(f) for f in gin_files]
    # Gin resolves `include` statements relative to these search paths.
    gin.add_config_file_search_path(str(REPO_ROOT))
    for path in files:
        try:
            gin.parse_config_file(str(path))
        except (ValueError, KeyError, IOError) as e:
            raise ConfigError(f"cannot apply gin file {str(path)!r}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"cannot apply gin binding {binding!r}: {e}. "
                "Check the spelling against the configurable's fields "
                "(e.g. ModelConfig.d_model=512).") from e


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `--gin.NAME=VALUE` flags (T5X style) from the other arguments.

    Returns (bindings, remaining_argv). `--gin.ModelConfig.d_model=512` becomes the
    binding `ModelConfig.d_model=512`.
    """
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" not in body:
                raise ConfigError(f"gin flag {arg!r} has no value; write --gin.NAME=VALUE")
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return bindings, rest


def _plain(cls, bound):
    return cls(**{f.name: getattr(bound, f.name) for f in dataclasses.fields(cls)})


def model_config_from_gin() -> ModelConfig:
    """The ModelConfig that the parsed gin bindings describe (a plain dataclass)."""
    return _plain(ModelConfig, _GinModelConfig())


def train_config_from_gin() -> TrainConfig:
    """The TrainConfig that the parsed gin bindings describe (a plain dataclass)."""
    return _plain(TrainConfig, _GinTrainConfig())
