"""The flags several subcommands share, declared once as argparse parents.

    PARENTS = [flags.model_dir(), flags.step(), flags.gin_files("gin files defining tasks")]

A subcommand module lists its parents in `PARENTS`; `matlm.cli.main` builds the
subcommand's parser from them (`add_parser(parents=...)`) and adds the gin epilog that
says how `--gin_file` and `--gin.NAME=VALUE` work (or that the command takes neither).

One name per concept: the model dir is `--model_dir`, where a command writes is
`--output`, turning plots off is `--no_plots`. The spellings used before (`--checkpoint_dir`,
`--output_dir`, `--no_plot`) still parse, print a one-line deprecation warning on stderr
and are hidden from --help.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

GIN_HELP = """\
gin flags:
  --gin_file=FILE        apply a gin file (repeatable; a path, or one under the
                         repository such as configs/models/tiny.gin)
  --gin.NAME=VALUE       bind one value after the files, e.g.
                         --gin.TrainConfig.steps=100 or
                         --gin.DataConfig.task="'matlm_wiki'" (a dot, no space;
                         values are Python literals: quote strings)"""

NO_GIN_HELP = "gin flags: this command takes no --gin_file or --gin.NAME=VALUE flags."
FROM_MODEL_DIR = "\nThe model comes from --model_dir's run_config.json."

MODEL_DIR_HELP = "a model dir written by `matlm train` (or `matlm extract`)"


class _Parent(argparse.ArgumentParser):
    """A parent parser (no -h of its own); `kind` names the concept it declares, for the
    epilog ("gin", "model_dir" or "")."""

    def __init__(self, kind: str = ""):
        super().__init__(add_help=False)
        self.kind = kind


class _Deprecated(argparse.Action):
    """An old spelling: stores into the new flag's attribute and says, in one line on
    stderr, which name to use instead."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use "
              f"{self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def _with_old_spellings(parent, flag: str, old: Sequence[str], required: bool = False,
                        **kwargs):
    """`flag` plus its deprecated spellings `old`, all storing into `flag`'s attribute.
    They form a mutually exclusive group that carries `required`: argparse's check of a
    required flag would refuse a command line that gives only the old spelling."""
    dest = flag.lstrip("-")
    if not old:
        parent.add_argument(flag, dest=dest, required=required, **kwargs)
        return parent
    group = parent.add_mutually_exclusive_group(required=required)
    group.add_argument(flag, dest=dest, **kwargs)
    for name in old:
        group.add_argument(name, dest=dest, action=_Deprecated, replacement=flag,
                           nargs=0 if kwargs.get("action") == "store_true" else None,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parent


def model_dir(required: bool = True, default: Optional[str] = None,
              help: str = MODEL_DIR_HELP) -> argparse.ArgumentParser:
    """`--model_dir` (old spelling `--checkpoint_dir`), parsed as `args.model_dir`."""
    return _with_old_spellings(_Parent("model_dir"), "--model_dir", ["--checkpoint_dir"],
                               required, default=default, help=help)


def step(help: str = "checkpoint step (default: the newest)") -> argparse.ArgumentParser:
    parent = _Parent()
    parent.add_argument("--step", type=int, default=None, help=help)
    return parent


def gin_files(help: str, required: bool = False) -> argparse.ArgumentParser:
    """`--gin_file` (repeatable); the command's --help also explains `--gin.NAME=VALUE`."""
    parent = _Parent("gin")
    parent.add_argument("--gin_file", action="append", default=[], required=required,
                        metavar="FILE", help=help)
    return parent


def output(help: str, required: bool = False,
           old: Sequence[str] = ()) -> argparse.ArgumentParser:
    """`--output`: where the command writes (a dir or a file, as `help` says)."""
    return _with_old_spellings(_Parent(), "--output", old, required, default=None, help=help)


def no_plots() -> argparse.ArgumentParser:
    """`--no_plots` (old spelling `--no_plot`)."""
    return _with_old_spellings(_Parent(), "--no_plots", ["--no_plot"], action="store_true",
                               help="write no plots")


def no_progress() -> argparse.ArgumentParser:
    parent = _Parent()
    parent.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parent


def refuse_gin_bindings(command: str, gin_bindings: Sequence[str]) -> None:
    """For a command that takes no gin flags: the model comes from the model dir, so a
    --gin.NAME=VALUE would be silently ignored; refused (ValueError: one line, exit 2),
    naming the first. Commands that read gin files for tasks (eval, search) refuse only
    the run's configs instead: `parse_gin(..., model_from_dir=...)`."""
    if gin_bindings:
        raise ValueError(f"{command} takes no gin bindings: the model comes from "
                         f"--model_dir's run_config.json (got {gin_bindings[0]!r})")


def gin_epilog(parents: Sequence[argparse.ArgumentParser]) -> str:
    """The --help epilog: how gin flags work, or that the command takes none (and, for a
    command reading a model dir, where its model comes from instead)."""
    kinds = {getattr(p, "kind", "") for p in parents}
    if "gin" in kinds:
        return GIN_HELP
    return NO_GIN_HELP + (FROM_MODEL_DIR if "model_dir" in kinds else "")


def new_output_dir(model_dir, output, default, error=ValueError):
    """`default_output`, refused (`error`, one line) when it exists and is not an empty
    dir, so nothing is overwritten."""
    path = default_output(model_dir, output, default)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise error(f"--output={str(path)!r} exists and is not empty; give a new dir "
                    "(nothing is overwritten)")
    return path


def default_output(model_dir, output, default):
    """`output` if given (a local path, or a gs:// URL checked for write access), else
    `default`: a path in the model dir, e.g. `model_dir.eval_dir(step)` (on a bucket, its
    gs:// path). The commands write such a path through `storage.staged_dir`/`staged_file`."""
    from pathlib import Path
    from matlm.model_dir import storage
    if output:
        return storage.output_path(output)
    return default if getattr(model_dir, "is_url", False) else Path(default)
