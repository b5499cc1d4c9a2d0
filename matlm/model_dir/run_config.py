"""run_config.json: the configs a run was started with, written once and read back typed.

    {"model": ModelConfig fields, "data": DataConfig fields, "train": TrainConfig fields}

`ModelDir.run_config()` returns a `RunConfig`; nothing outside this package reads the file.
Files written by other matlm versions load:

- a field the file lacks takes today's default (it was added after the run started);
- a data, train or top-level field this matlm does not know is left out and named in
  `RunConfig.unknown_fields` (e.g. "train.old_knob");
- an unknown *model* field is an error: it could change the parameters;
- an empty or absent "train" section (a params-only checkpoint: `save_for_inference`,
  `matlm extract`) reads as `train=None`.

The model is typed when the file is read. The data and train sections are typed when first
read, so a command pays only for what it uses: `DataConfig`'s module imports seqio and
TensorFlow, which the core (decoding, `matlm verify`) must run without; and a saved train
section this matlm cannot use fails only the commands that need it.

Model (de)serialisation is `model_config_to_dict` / `model_config_from_dict`, one pair, so
that the model-family registry is wired in at one place.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from matlm.fileio import write_atomically
from matlm.messages import first_line
from matlm.model import ModelConfig, families
from matlm.model.config import ModelConfigError
from matlm.model_dir.errors import CheckpointError
from matlm.training.config import TrainConfig

if TYPE_CHECKING:
    from matlm.data.config import DataConfig

FILE_NAME = "run_config.json"
SECTIONS = ("model", "data", "train")

# ModelConfig fields that change how a step is computed, not the parameters it trains.
EXECUTION_ONLY_FIELDS = frozenset({"remat_policy", "attention_impl", "attention_query_block"})


def model_config_to_dict(config: ModelConfig) -> dict:
    """The model section: the config's fields and its family's name (the registry's)."""
    return families.config_to_dict(config)


def model_config_from_dict(d: dict) -> ModelConfig:
    """The config of the family the section names ("family"; absent: the LM, as every run
    written before families existed)."""
    try:
        config, unknown = families.config_from_dict(d)
    except ModelConfigError as e:
        raise CheckpointError(f"saved model config: {first_line(e, 300)}") from e
    if unknown:
        raise CheckpointError(f"saved model config has unknown fields {unknown}; "
                              "was it written by a newer matlm?")
    return config


def _known_fields(config_class, d: Mapping) -> tuple[dict, list[str]]:
    """(the fields of `d` that `config_class` has, the names of those it does not)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in d.items() if k in known}, sorted(set(d) - known)


def train_config_from_dict(d: dict) -> tuple[TrainConfig, list[str]]:
    """A saved run's TrainConfig, and the saved fields this TrainConfig does not know
    (written by another matlm version; left out). Raises TrainConfigError (a ValueError)
    or TypeError where the saved values do not make a valid recipe."""
    fields, unknown = _known_fields(TrainConfig, d)
    return TrainConfig(**fields), unknown


def data_config_from_dict(d: dict, tokens: bool = True) -> tuple["DataConfig", list[str]]:
    """A saved run's data config and the saved fields it does not know (left out): a
    DataConfig (text; imports TensorFlow through matlm.data) for a family that reads
    tokens, else an ImageDataConfig (numpy only)."""
    if tokens:
        from matlm.data.config import DataConfig as config_class
    else:
        from matlm.data.image_config import ImageDataConfig as config_class
    fields, unknown = _known_fields(config_class, d)
    return config_class(**fields), unknown


class RunConfig:
    """A run's typed configs: `model` (ModelConfig), `data` (DataConfig), `train`
    (TrainConfig, or None for a params-only checkpoint) and `unknown_fields` (saved
    fields this matlm left out). Read-only.

    `data` and `train` may be given as their saved JSON objects: they are then typed on
    first read (see the module docstring); a section that does not make a valid config
    raises CheckpointError naming the file, at that read.
    """

    def __init__(self, model: ModelConfig, data: "DataConfig | Mapping",
                 train: "Optional[TrainConfig | Mapping]" = None,
                 unknown_fields: tuple[str, ...] = (), *, source: str = FILE_NAME):
        self._model = model
        self._data, self._train = data, train or None  # {}: no train section.
        self._unknown = tuple(unknown_fields)
        self._source = source  # Named in errors: the file the sections came from.

    @property
    def model(self) -> ModelConfig:
        return self._model

    @property
    def data(self) -> "DataConfig":
        if isinstance(self._data, Mapping):
            tokens = families.family_of(self._model).tokens  # Text or images.
            self._data, dropped = self._typed(
                "data", lambda d: data_config_from_dict(d, tokens), self._data)
            self._unknown += tuple(f"data.{name}" for name in dropped)
        return self._data

    @property
    def train(self) -> Optional[TrainConfig]:
        if isinstance(self._train, Mapping):
            self._train, dropped = self._typed("train", train_config_from_dict, self._train)
            self._unknown += tuple(f"train.{name}" for name in dropped)
        return self._train

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        """Every saved field left out, sorted; types both sections to know theirs."""
        _ = self.data, self.train  # Typing a section records its unknown fields.
        return tuple(sorted(self._unknown))

    @property
    def seq_len(self) -> Optional[int]:
        """The sequence length the run trained at (None: no train section)."""
        return self.train.seq_len if self.train is not None else None

    def _typed(self, section: str, from_dict, saved: Mapping):
        try:
            return from_dict(dict(saved))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self._source}: the saved {section} config does not "
                                  f"make a valid {section} config ({first_line(e, 300)})"
                                  ) from e

    def __eq__(self, other) -> bool:
        if not isinstance(other, RunConfig):
            return NotImplemented
        return (self.model, self.data, self.train, self.unknown_fields) == \
            (other.model, other.data, other.train, other.unknown_fields)

    __hash__ = None  # Mutable caches inside; equal by value, not hashable.

    def __repr__(self) -> str:
        return (f"RunConfig(model={self._model!r}, data={self._data!r}, "
                f"train={self._train!r}, unknown_fields={self._unknown!r})")


def run_config_from_dict(saved: Mapping, source: str = FILE_NAME) -> RunConfig:
    """The RunConfig of a parsed run_config.json (see the module docstring)."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("model"), Mapping):
        raise CheckpointError(f"{source} has no \"model\" object; is it a matlm run config?")
    for section in ("data", "train"):
        if not isinstance(saved.get(section) or {}, Mapping):
            raise CheckpointError(f"{source}: \"{section}\" is not a JSON object")
    return RunConfig(model=model_config_from_dict(dict(saved["model"])),
                     data=saved.get("data") or {}, train=saved.get("train") or None,
                     unknown_fields=sorted(set(saved) - set(SECTIONS)), source=source)


def read_run_config_dict(model_dir_path: Path) -> dict:
    """The parsed run_config.json of a model dir (private to this package: everyone else
    reads `ModelDir.run_config()`)."""
    path = model_dir_path / FILE_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {model_dir_path} is not a matlm model dir "
                              "(train one with `matlm train --model_dir=...`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _as_dict(config) -> dict:
    """A config section as saved: a dataclass's fields, a mapping as given, None as {}."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return dataclasses.asdict(config)


def write_run_config(path: Path, model_config: ModelConfig, data_config=None,
                     train_config=None) -> None:
    """Writes run_config.json atomically (a reader never sees it half-written)."""
    write_atomically(path, json.dumps(
        {"model": model_config_to_dict(model_config), "data": _as_dict(data_config),
         "train": _as_dict(train_config)}, indent=2))


def _json_value(value):
    """What `value` reads back as after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value))


def model_differences(saved_model: Mapping, model_config: ModelConfig) -> list[str]:
    """The parameter-changing ModelConfig fields where `model_config` differs from the
    saved model section, as "field: saved X, now Y"."""
    current = model_config_to_dict(model_config)
    # A field the saved config lacks was added after the run started: the run had its
    # default. Fields that only change how the same parameters are computed (memory,
    # kernels) may change between jobs, e.g. to resume on another slice.
    defaults = model_config_to_dict(families.family_of(model_config).config_class())
    return [f"{k}: saved {saved_model.get(k, defaults[k])!r}, now {_json_value(v)!r}"
            for k, v in current.items() if k not in EXECUTION_ONLY_FIELDS
            and _json_value(v) != saved_model.get(k, _json_value(defaults[k]))]
