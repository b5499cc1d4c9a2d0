"""`matlm train`: pretrain (or resume) a MatLM or MatViT from gin configs."""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from tabulate import tabulate

from matlm.cli import flags
from matlm.gin_config import model_config_from_gin, parse_gin, train_config_from_gin

DEFAULT_GIN = "configs/runs/default.gin"

PARENTS = [
    flags.gin_files(f"gin file(s) (repeatable); default {DEFAULT_GIN}"),
    flags.model_dir(required=False, default="runs/default",
                    help="where checkpoints, metrics and TensorBoard files go; an existing "
                         "run there is resumed (default runs/default)"),
    flags.no_progress()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps to train to (overrides TrainConfig.steps)")
    parser.add_argument("--stop_at", type=int, default=None,
                        help="save and stop at this step without changing the schedule "
                             "(split a run into several jobs); rerun to resume")
    parser.add_argument("--multihost", action="store_true",
                        help="call jax.distributed.initialize() first (automatic on TPU pods "
                             "and SLURM; elsewhere give the three flags below)")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--skip_memory_check", action="store_true",
                        help="do not refuse a model estimated not to fit the local devices' "
                             "memory (matlm.training.memory_check)")


def loss_table(model_config, result) -> str:
    from matlm.model.counting import param_count
    (first_step, first), (last_step, last) = result.eval_history[0], result.eval_history[-1]
    spec = model_config.granularities
    classifier = f"{spec.names[0]}/top1" in last  # The ViT: top-1, not perplexity.
    rows = [[name, f"{param_count(model_config, spec.uniform(name)):,}", f"{first[name]:.3f}",
             f"{last[name]:.3f}", f"{last[name] - first[name]:+.3f}",
             f"{100 * last[f'{name}/top1']:.2f}" if classifier
             else f"{math.exp(min(last[name], 50)):.1f}"] for name in spec.names]
    return tabulate(rows, headers=["granularity", "params", f"val loss @ step {first_step}",
                                   f"val loss @ step {last_step}", "change",
                                   "val top-1 %" if classifier else "val perplexity"],
                    tablefmt="simple_outline", disable_numparse=True)


def initialize_multihost(args) -> None:
    """Joins the job's other processes (before anything touches a device)."""
    import jax
    kwargs = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")
              if getattr(args, k) is not None}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no-op else.
    jax.distributed.initialize(**kwargs)


def run(args, gin_bindings) -> int:
    parse_gin(args.gin_file or [DEFAULT_GIN], gin_bindings)
    if args.multihost:
        initialize_multihost(args)
    from matlm import data  # Registers data configurables (imports TensorFlow).
    from matlm.training.preemption import SIGNALS
    from matlm.training.trainer import TrainingError, train
    SIGNALS.check()  # The imports were a start-up phase (seconds): a signal stops here.

    model_config = model_config_from_gin()
    train_config = train_config_from_gin()
    if args.steps is not None:
        train_config = dataclasses.replace(train_config, steps=args.steps)
    from matlm.model import family_of
    # The family decides the data: text (DataConfig) or images (ImageDataConfig).
    data_config = (data.data_config_from_gin() if family_of(model_config).tokens
                   else data.image_data_config_from_gin())
    hooks = []
    if train_config.downstream_eval_tasks:
        # Training never imports evaluation: the downstream-eval hook is wired in here.
        from matlm.evaluation.in_loop import downstream_eval_hook
        hooks.append(downstream_eval_hook)
    try:
        result = train(model_config, data_config, train_config, args.model_dir,
                       show_progress=not args.no_progress, stop_at=args.stop_at, hooks=hooks,
                       check_memory=not args.skip_memory_check)
    except TrainingError as e:  # E.g. a non-finite loss: the message says what to do.
        print(f"matlm train: error: {e}", file=sys.stderr)
        return 1
    if result.interrupted:
        saved = ("checkpoint saved in" if result.final_step > result.start_step
                 else "nothing new to save in")
        print(f"stopped at step {result.final_step}; {saved} {args.model_dir}. "
              "Run the same command to resume.")
        return 0
    print(f"\nvalidation loss per granularity ({args.model_dir}):")
    print(loss_table(model_config, result))
    return 0
