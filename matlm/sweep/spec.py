"""Sweep specs: parsing (YAML or gin-style), expansion into named trials, validation.

A spec is one mapping (docs/sweep.md has the full reference):

    base_dir: runs/sweeps/lr        # trials go to BASE_DIR/<trial name>/ (a model dir each)
    seed: 0                         # draws of the random axes
    fixed:  {TrainConfig.steps: 100}                  # bound in every trial
    grid:   {TrainConfig.learning_rate: [1e-3, 3e-3], ModelConfig.d_ff: [256, 512]}
    list:   {ModelConfig.d_model: [64, 128], ModelConfig.n_heads: [2, 4]}   # zipped
    random: {TrainConfig.weight_decay: {uniform: [0.0, 0.1]}}
    num_random: 3
    labels: {TrainConfig.learning_rate: lr}           # short names in trial names
    list_names: [small, big]        # optional: one name per list position, used in trial
                                    # names instead of the list axes' values

The trials are the product of the three blocks: every grid combination x every list
position x every random draw. The gin-style form writes the same keys one per line,
values as Python literals: `grid.TrainConfig.learning_rate = [1e-3, 3e-3]`,
`num_random = 3`, `random.TrainConfig.weight_decay = {'uniform': (0.0, 0.1)}`.
"""
from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import random as random_lib
import re
from pathlib import Path
from typing import Any, Optional, Sequence

KEYS = ("base_dir", "seed", "fixed", "grid", "list", "list_names", "random", "num_random",
        "labels")
AXIS_KINDS = ("grid", "list", "random")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
# A gin binding name: Configurable.param, optionally scoped/qualified (scope/a.b.C.param).
_BINDING = re.compile(r"^[A-Za-z_][\w./]*\.[A-Za-z_]\w*$")


class SweepSpecError(ValueError):
    """A sweep spec that cannot be expanded or whose trials would not start."""


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of the sweep: its name (its model dir's name) and its gin bindings."""
    name: str
    values: dict      # swept binding -> value (what differs between trials)
    fixed: dict       # binding -> value bound in every trial
    variant: str = ""  # The list position's name (list_names), if the spec names them.

    @property
    def bindings(self) -> list[str]:
        """The trial's gin bindings (fixed first, then swept), as `matlm train` takes them."""
        return [f"{k} = {gin_literal(v)}" for k, v in {**self.fixed, **self.values}.items()]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    base_dir: Optional[str]
    seed: int
    fixed: dict
    grid: dict
    list: dict
    random: dict
    num_random: int
    labels: dict
    list_names: tuple = ()

    @property
    def axes(self) -> list[str]:
        """Every swept binding, in spec order."""
        return [*self.grid, *self.list, *self.random]


# --- Reading. -------------------------------------------------------------------------------
def load_spec(path: str | Path) -> SweepSpec:
    """Reads a .yaml/.yml or gin-style (.gin or anything else) sweep file."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SweepSpecError(f"--sweep={str(path)!r}: cannot read the sweep file ({e})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml
        try:
            raw = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" line {where.line + 1}" if where else ""
            raise SweepSpecError(f"--sweep={str(path)!r}{line}: not valid YAML "
                                 f"({getattr(e, 'problem', None) or e})") from None
    else:
        raw = parse_gin_style(text, str(path))
    return spec_from_dict(raw if raw is not None else {}, where=f"--sweep={str(path)!r}")


def _yaml_loader():
    """PyYAML's safe loader, reading 1e-3 as a float as YAML 1.2 (and Python) do: YAML 1.1
    wants a dot (1.0e-3) and would hand the trainer the string '1e-3'."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?"
                   r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
        list("-+0123456789."))
    return Loader


def parse_gin_style(text: str, where: str) -> dict:
    """`key = literal` lines (values may span lines while brackets are open) into the
    same nested mapping the YAML form gives."""
    out: dict = {}
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip() if not pending else line.strip()
        if not pending and not stripped:
            continue
        if not pending:
            start = number
        pending = f"{pending} {stripped}" if pending else stripped
        if "=" not in pending:
            raise SweepSpecError(f"{where} line {start}: expected KEY = VALUE, got {pending!r}")
        key, value = (s.strip() for s in pending.split("=", 1))
        try:
            parsed = ast.literal_eval(value)
        except (SyntaxError, ValueError):
            if _open_brackets(value):
                continue  # The value goes on on the next line.
            raise SweepSpecError(
                f"{where} line {start}: {key} = {value}: not a Python literal (quote strings, "
                "e.g. 'cosine'; lists as [a, b])") from None
        pending = ""
        section, _, binding = key.partition(".")
        if section in ("fixed", "grid", "list", "random", "labels"):
            if not binding:
                raise SweepSpecError(f"{where} line {start}: write {section}.BINDING = VALUE")
            out.setdefault(section, {})[binding] = parsed
        else:
            out[key] = parsed
    if pending:
        raise SweepSpecError(f"{where} line {start}: unbalanced brackets in {pending!r}")
    return out


def _open_brackets(text: str) -> bool:
    depth = 0
    for ch in re.sub(r"'[^']*'|\"[^\"]*\"", "", text):
        depth += ch in "([{"
        depth -= ch in ")]}"
    return depth > 0


def spec_from_dict(raw: Any, where: str = "sweep spec") -> SweepSpec:
    """Checks the mapping's shape (keys, axis values, distributions) and builds the spec."""
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{where}: expected a mapping with keys {', '.join(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SweepSpecError(f"{where}: unknown key {unknown[0]!r}; expected one of "
                             f"{', '.join(KEYS)} (bindings go under grid/list/random/fixed)")
    sections = {}
    for section in ("fixed", "grid", "list", "random", "labels"):
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise SweepSpecError(f"{where}: {section} must map gin bindings to values, "
                                 f"got {value!r}")
        for binding in value:
            if not isinstance(binding, str) or not _BINDING.match(binding):
                raise SweepSpecError(f"{where}: {section}: {binding!r} is not a gin binding "
                                     "name (write Configurable.param, e.g. TrainConfig.seed)")
        sections[section] = dict(value)
    seen: dict = {}
    for section in ("fixed", *AXIS_KINDS):
        for binding in sections[section]:
            if binding in seen:
                raise SweepSpecError(f"{where}: {binding} is in both {seen[binding]} and "
                                     f"{section}; give each binding once")
            seen[binding] = section
    for section in ("grid", "list"):
        for binding, values in sections[section].items():
            if not isinstance(values, (list, tuple)):
                raise SweepSpecError(f"{where}: {section}.{binding} must be a list of values, "
                                     f"got {values!r}")
            if not values:
                raise SweepSpecError(f"{where}: {section}.{binding} is an empty axis; give at "
                                     "least one value")
            sections[section][binding] = [_plain(v) for v in values]
    lengths = {b: len(v) for b, v in sections["list"].items()}
    if len(set(lengths.values())) > 1:
        raise SweepSpecError(f"{where}: the list axes are zipped and must have one length, got "
                             + ", ".join(f"{b}: {n}" for b, n in lengths.items()))
    for binding, dist in sections["random"].items():
        sections["random"][binding] = _check_distribution(binding, dist, where)
    sections["fixed"] = {b: _plain(v) for b, v in sections["fixed"].items()}
    num_random = raw.get("num_random", 0 if not sections["random"] else None)
    if sections["random"] and (not isinstance(num_random, int) or isinstance(num_random, bool)
                               or num_random < 1):
        raise SweepSpecError(f"{where}: num_random must be an integer >= 1 with random axes, "
                             f"got {num_random!r}")
    if num_random and not sections["random"]:
        raise SweepSpecError(f"{where}: num_random={num_random} but there are no random axes")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepSpecError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    base_dir = raw.get("base_dir")
    if base_dir is not None and not isinstance(base_dir, str):
        raise SweepSpecError(f"{where}: base_dir must be a path string, got {base_dir!r}")
    for binding, label in sections["labels"].items():
        if binding not in seen or seen[binding] == "fixed":
            raise SweepSpecError(f"{where}: labels.{binding}: not a swept binding")
        if not isinstance(label, str) or not re.fullmatch(r"[\w.]+", label):
            raise SweepSpecError(f"{where}: labels.{binding} must be a short word "
                                 f"(letters, digits, _ .), got {label!r}")
    list_names = raw.get("list_names") or ()
    if list_names:
        n_list = next(iter(lengths.values()), 0)
        if not isinstance(list_names, (list, tuple)) or len(list_names) != n_list or not all(
                isinstance(n, str) and re.fullmatch(r"[\w.+-]+", n) for n in list_names):
            raise SweepSpecError(f"{where}: list_names must be {n_list} short names (one per "
                                 f"list position; letters, digits, _ . + -), got {list_names!r}")
    if not any(sections[k] for k in AXIS_KINDS):
        raise SweepSpecError(f"{where}: no axes; give at least one of grid, list, random")
    return SweepSpec(base_dir=base_dir, seed=seed, fixed=sections["fixed"],
                     grid=sections["grid"], list=sections["list"], random=sections["random"],
                     num_random=num_random or 0, labels=sections["labels"],
                     list_names=tuple(list_names))


def _plain(value):
    """YAML lists inside values become tuples (gin's ModelConfig/TrainConfig take tuples)."""
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        raise SweepSpecError(f"a binding value cannot be a mapping: {value!r}")
    return value


def _check_distribution(binding: str, dist, where: str) -> dict:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise SweepSpecError(
            f"{where}: random.{binding} must be one distribution, one of "
            f"{{uniform: [lo, hi]}}, {{log_uniform: [lo, hi]}}, {{int_uniform: [lo, hi]}}, "
            f"{{choice: [a, b, ...]}}; got {dist!r}")
    (kind, args), = dist.items()
    if not isinstance(args, (list, tuple)) or not args:
        raise SweepSpecError(f"{where}: random.{binding}: {kind} needs a non-empty list, "
                             f"got {args!r}")
    if kind == "choice":
        return {kind: [_plain(a) for a in args]}
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != 2 or not numeric or not args[0] < args[1]:
        raise SweepSpecError(f"{where}: random.{binding}: {kind} needs [lo, hi] with lo < hi, "
                             f"got {args!r}")
    if kind == "log_uniform" and args[0] <= 0:
        raise SweepSpecError(f"{where}: random.{binding}: log_uniform needs lo > 0, got {args!r}")
    if kind == "int_uniform" and not all(isinstance(a, int) for a in args):
        raise SweepSpecError(f"{where}: random.{binding}: int_uniform needs integers, "
                             f"got {args!r}")
    return {kind: list(args)}


# --- Expansion and naming. ------------------------------------------------------------------
def _draw(dist: dict, rng: random_lib.Random):
    (kind, args), = dist.items()
    if kind == "choice":
        return args[rng.randrange(len(args))]
    if kind == "int_uniform":
        return rng.randint(args[0], args[1])
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return rng.uniform(args[0], args[1])


def labels_of(spec: SweepSpec) -> dict[str, str]:
    """The short name of each swept binding in trial names and table headers: the given
    label, else the parameter name, else (two axes share it) the whole binding."""
    params = [b.rsplit(".", 1)[1] for b in spec.axes]
    return {b: spec.labels.get(b) or (p if params.count(p) == 1 else b)
            for b, p in zip(spec.axes, params)}


def format_value(value) -> str:
    """A value as it appears in a trial name: short, filesystem-safe."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, tuple):
        text = "x".join(format_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^\w.+-]", "", text.replace("/", "_")) or "_"


def expand(spec: SweepSpec) -> list[Trial]:
    """The spec's trials, in a fixed order (grid outermost, then list, then random draws).
    Random axes are drawn from `random.Random(seed)`: the same spec gives the same trials."""
    grid_points = [dict(zip(spec.grid, combo))
                   for combo in itertools.product(*spec.grid.values())] or [{}]
    n_list = len(next(iter(spec.list.values()))) if spec.list else 0
    list_points = [{b: v[i] for b, v in spec.list.items()} for i in range(n_list)] or [{}]
    variants = list(spec.list_names) or [""] * len(list_points)
    rng = random_lib.Random(spec.seed)
    random_points = [{b: _draw(d, rng) for b, d in spec.random.items()}
                     for _ in range(spec.num_random)] or [{}]
    labels = labels_of(spec)
    trials, names = [], {}
    for g, (variant, l), (k, r) in itertools.product(grid_points, zip(variants, list_points),
                                                     enumerate(random_points)):
        values = {**g, **l, **r}
        parts = [f"{labels[b]}={format_value(values[b])}" for b in spec.grid] + \
            ([variant] if variant else [f"{labels[b]}={format_value(values[b])}"
                                        for b in spec.list]) + \
            [f"{labels[b]}={format_value(values[b])}" for b in spec.random]
        # Random draws may repeat a value set (choice axes): the draw index keeps names apart.
        name = "-".join(([f"r{k}"] if spec.random else []) + parts)
        if name in names:
            raise SweepSpecError(
                f"duplicate trial name {name!r}: trials {names[name]} and {len(trials)} have "
                "the same swept values (remove the repeated value, or set labels that tell "
                "them apart)")
        names[name] = len(trials)
        trials.append(Trial(name=name, values=values, fixed=dict(spec.fixed), variant=variant))
    return trials


def gin_literal(value) -> str:
    """A Python value as a gin binding's right-hand side (strings quoted, tuples kept;
    `@name` / `%MACRO` references pass through unquoted)."""
    if isinstance(value, str) and re.fullmatch(r"[@%][\w./]+(\(\))?", value):
        return value
    return repr(value)


# --- Validation against the real configs. ---------------------------------------------------
def validate(trials: Sequence[Trial], gin_files: Sequence[str], bindings: Sequence[str],
             check_data: bool = True) -> dict[str, tuple]:
    """Builds every trial's ModelConfig / TrainConfig (and DataConfig) exactly as
    `matlm train` would, so that an unknown binding or a value of the wrong type stops the
    sweep before any trial runs. Returns {trial name: (model_config, train_config)}."""
    from matlm.gin_config import model_config_from_gin, parse_gin, train_config_from_gin
    if check_data:
        from matlm import data  # Registers DataConfig's configurables (imports TensorFlow).
    configs = {}
    try:
        for trial in trials:
            try:
                parse_gin(gin_files, [*bindings, *trial.bindings])
                model_config, train_config = model_config_from_gin(), train_config_from_gin()
                if check_data:  # The family's data: text (DataConfig) or images.
                    from matlm.model import family_of
                    if family_of(model_config).tokens:
                        data.data_config_from_gin()
                    else:
                        data.image_data_config_from_gin()
            except ValueError as e:
                raise SweepSpecError(f"trial {trial.name!r}: {e}") from None
            configs[trial.name] = (model_config, train_config)
    finally:
        import gin
        gin.clear_config()  # The sweep process itself trains nothing: leave gin empty.
    return configs
