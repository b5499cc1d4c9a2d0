"""The shared CLI flags (matlm.cli.flags): one name per concept in every subcommand, the
old spellings still parsed with a one-line deprecation warning, gin flags described in
every --help, and `--gin NAME=VALUE` (a space) refused with the spelling to use."""
import argparse
import importlib

import pytest

from matlm.cli import flags
from matlm.cli.main import SUBCOMMANDS, main
from matlm.gin_config import ConfigError, split_gin_flags

# The subcommands that read or write a model dir.
MODEL_DIR_COMMANDS = {"eval", "search", "export", "extract", "generate", "info", "verify",
                      "embed", "retrieve",
                      "train", "launch"}


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_describes_gin_flags_and_the_model_dir(capsys):
    text = _help(capsys, [])
    assert "--gin.NAME=VALUE" in text and "--gin_file=FILE" in text
    assert "--model_dir=DIR" in text


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_help_names_one_spelling_per_concept(command, capsys):
    text = _help(capsys, [command])
    assert "--gin.NAME=VALUE" in text and "--gin_file" in text  # How, or that it takes none.
    assert ("--model_dir MODEL_DIR" in text) == (command in MODEL_DIR_COMMANDS), text
    for old in ("--checkpoint_dir", "--output_dir", "--no_plot "):
        assert old not in text, f"matlm {command} --help shows the old spelling {old}"


def test_commands_without_gin_say_so():
    for command in ("export", "extract", "generate", "verify"):
        module = importlib.import_module(SUBCOMMANDS[command][0])
        epilog = flags.gin_epilog(module.PARENTS)
        assert "takes no --gin_file or --gin.NAME=VALUE" in epilog
        assert "--model_dir's run_config.json" in epilog
    assert flags.gin_epilog(importlib.import_module("matlm.cli.eval").PARENTS) == flags.GIN_HELP


@pytest.mark.parametrize("command, argv, attribute, value, old", [
    ("eval", ["--checkpoint_dir=runs/a"], "model_dir", "runs/a", "--checkpoint_dir"),
    ("eval", ["--model_dir=runs/a", "--output_dir=out"], "output", "out", "--output_dir"),
    ("search", ["--checkpoint_dir", "runs/a"], "model_dir", "runs/a", "--checkpoint_dir"),
    ("search", ["--model_dir=runs/a", "--no_plot"], "no_plots", True, "--no_plot"),
    ("info", ["--checkpoint_dir=runs/a"], "model_dir", "runs/a", "--checkpoint_dir"),
    ("export", ["--checkpoint_dir=runs/a", "--output=x"], "model_dir", "runs/a",
     "--checkpoint_dir"),
])
def test_old_spellings_parse_with_a_one_line_warning(command, argv, attribute, value, old,
                                                     capsys):
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"matlm {command}", parents=module.PARENTS)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    assert getattr(args, attribute) == value
    err = capsys.readouterr().err
    new = {"--checkpoint_dir": "--model_dir", "--output_dir": "--output",
           "--no_plot": "--no_plots"}[old]
    assert err == f"matlm {command}: warning: {old} is deprecated; use {new}\n"


def test_new_spellings_parse_silently(capsys):
    module = importlib.import_module("matlm.cli.eval")
    parser = argparse.ArgumentParser(parents=module.PARENTS)
    module.add_arguments(parser)
    args = parser.parse_args(["--model_dir=runs/a", "--output=out", "--no_plots"])
    assert (args.model_dir, args.output, args.no_plots) == ("runs/a", "out", True)
    assert capsys.readouterr().err == ""


def test_a_required_model_dir_is_still_required(capsys):
    with pytest.raises(SystemExit):
        main(["eval"])
    assert "--model_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # Both spellings at once: which one was meant?
        main(["eval", "--model_dir=a", "--checkpoint_dir=b"])
    assert "not allowed with argument --model_dir" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--gin", "TrainConfig.steps=3"],
     "--gin TrainConfig.steps=3: write a gin binding as one argument, --gin.TrainConfig.steps=3"),
    (["--gin=TrainConfig.steps=3"],
     "--gin=TrainConfig.steps=3: write a gin binding as one argument, --gin.TrainConfig.steps=3"),
    (["--steps=2", "--gin"], "--gin: write a gin binding as one argument, --gin.NAME=VALUE"),
])
def test_gin_with_a_space_is_refused_with_the_spelling_to_use(argv, message):
    with pytest.raises(ConfigError) as error:
        split_gin_flags(argv)
    assert str(error.value).startswith(message)


def test_gin_flags_split_from_the_rest():
    bindings, rest = split_gin_flags(["--gin_file=a.gin", "--gin.TrainConfig.steps=3",
                                      "--model_dir=x"])
    assert bindings == ["TrainConfig.steps = 3"]
    assert rest == ["--gin_file=a.gin", "--model_dir=x"]


def test_results_go_where_the_model_dir_is_unless_output_is_given():
    """A gs:// model dir's default output stays its bucket path object (the commands write
    through storage.staged_dir, never a local ./gs:/ dir); a local --output is a local
    Path as given; a local model dir's default is a Path."""
    from pathlib import Path
    from types import SimpleNamespace

    from matlm.cli.flags import default_output
    bucket_default = object()  # Stands for the bucket's epath path: returned untouched.
    bucket = SimpleNamespace(is_url=True, path="gs://bucket/run")
    assert default_output(bucket, None, bucket_default) is bucket_default
    assert default_output(bucket, "out/x", None) == Path("out/x")
    local = SimpleNamespace(is_url=False, path=Path("/runs/a"))
    assert default_output(local, None, "/runs/a/eval/3") == Path("/runs/a/eval/3")
