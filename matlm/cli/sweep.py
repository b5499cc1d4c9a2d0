"""`matlm sweep`: grid / list / random sweeps over gin bindings, one `matlm train` per trial.

    matlm sweep --gin_file=configs/runs/default.gin --sweep=configs/sweeps/lr.yaml
    matlm sweep --gin_file=RUN.gin --sweep=SWEEP.gin --parallel=2 --eval --gin.TrainConfig.steps=50
    matlm sweep ... --dry_run                    # the trials and their commands; nothing runs
    matlm sweep ... --launcher=tpu --tpu=NAME --zone=Z --dry_run   # one TPU launch per trial
    matlm sweep ... --collect_only               # results of trials run elsewhere (TPU), nothing runs

Every trial is expanded, named and built into its ModelConfig / TrainConfig / DataConfig
before the first one runs: a bad spec is one line, exit 2. Trials go to
BASE_DIR/<trial name>/ (model dirs); results to BASE_DIR/sweep_results.{csv,md} and plots.
Rerunning the same command skips finished trials and resumes interrupted ones.
Reference: docs/sweep.md.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

FLAG_CHECKS = {"parallel": Check(int, ge=1)}

PARENTS = [flags.gin_files("the run's gin file(s) (repeatable); default "
                           "configs/runs/default.gin; --gin.NAME=VALUE flags apply to every "
                           "trial"),
           flags.no_plots()]


def add_arguments(parser) -> None:
    parser.add_argument("--sweep", required=True,
                        help="the sweep spec: a .yaml/.yml file or a gin-style file (docs/sweep.md)")
    parser.add_argument("--base_dir", default=None,
                        help="where the trials' model dirs and the results go (default: the "
                             "spec's base_dir, else runs/sweeps/<spec file name>)")
    parser.add_argument("--parallel", type=int, default=1, help="trials run at the same time")
    parser.add_argument("--dry_run", action="store_true",
                        help="check the spec and print the trials and commands; run nothing")
    parser.add_argument("--eval", action="store_true",
                        help="run `matlm eval` on each trial after training")
    parser.add_argument("--eval_flags", default="--tasks=loss",
                        help="flags for each trial's matlm eval, one string "
                             "(default --tasks=loss)")
    parser.add_argument("--metric", default=None,
                        help="the column plotted against the axes: val_loss_<G> (default: "
                             "the largest granularity), wall_s, tokens, or with --eval an "
                             "eval_* column")
    parser.add_argument("--retry_failed", action="store_true",
                        help="rerun trials that failed (by default a rerun skips them)")
    parser.add_argument("--collect_only", action="store_true",
                        help="run nothing: write sweep_results.{csv,md} and plots from what "
                             "BASE_DIR holds (e.g. after --launcher=tpu, once the trials' "
                             "model dirs are readable here)")
    parser.add_argument("--launcher", choices=("local", "tpu"), default="local",
                        help="local: run the trials here; tpu: one `matlm launch --tpu` per "
                             "trial (with --tpu, --zone, [--project], [--install])")
    parser.add_argument("--tpu", default=None, help="TPU VM name (--launcher=tpu)")
    parser.add_argument("--zone", default=None, help="TPU zone (--launcher=tpu)")
    parser.add_argument("--project", default=None, help="GCP project (--launcher=tpu)")
    parser.add_argument("--install", default="copy",
                        help="--launcher=tpu: copy | git+URL[@REV] | none (see matlm launch)")


def _metric_choices(configs: dict) -> list[str]:
    names = []
    for model_config, _ in configs.values():
        names += [n for n in model_config.granularities.names if n not in names]
    return [*(f"val_loss_{n}" for n in names), "wall_s", "tokens"]


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    from matlm.cli.train import DEFAULT_GIN
    from matlm.sweep import results as results_lib
    from matlm.model_dir import storage
    from matlm.sweep import runner, spec as spec_lib

    gin_files = args.gin_file or [DEFAULT_GIN]
    spec = spec_lib.load_spec(args.sweep)
    trials = spec_lib.expand(spec)
    # A local dir (made absolute), or gs://bucket/path (URL and client checked) before any work.
    base_dir = storage.model_dir_path(
        args.base_dir or spec.base_dir or Path("runs/sweeps") / Path(args.sweep).stem)
    eval_flags = shlex.split(args.eval_flags)
    # Every trial's configs, built as `matlm train` builds them, before anything runs.
    configs = spec_lib.validate(trials, gin_files, gin_bindings)
    choices = _metric_choices(configs)
    metric = args.metric or next(c for c in reversed(choices) if c.startswith("val_loss_"))
    # eval_* columns are named after the eval's tasks, known once it ran (docs/sweep.md).
    if metric not in choices and not ((args.eval or args.collect_only)
                                      and metric.startswith("eval_")):
        raise spec_lib.SweepSpecError(f"--metric={metric!r}: expected one of {', '.join(choices)}"
                                      + (", or an eval_* column with --eval" if not args.eval
                                         else ""))
    options = runner.SweepOptions(gin_files=gin_files, bindings=list(gin_bindings),
                                  base_dir=base_dir, parallel=args.parallel,
                                  eval=args.eval, eval_flags=eval_flags,
                                  retry_failed=args.retry_failed)
    steps = {name: train_config.steps for name, (_, train_config) in configs.items()}
    if args.collect_only:
        return _write_results(spec, trials, steps, options, metric, args.no_plots)
    if args.launcher == "tpu":
        return _launch_on_tpu(args, trials, options)
    runner.check_base_dir(trials, options)
    labels = spec_lib.labels_of(spec)
    if args.dry_run:
        to_run, skipped = runner.plan(trials, options, wanted_eval=args.eval)
        print(f"{len(trials)} trials ({len(to_run)} to run, {sum(skipped.values())} finished) "
              f"in {options.base_dir}:")
        for trial in trials:
            state = "run" if trial in to_run else "skip"
            print(f"  [{state}] {trial.name}: " + ", ".join(
                f"{labels[b]}={spec_lib.gin_literal(v)}" for b, v in trial.values.items()))
        if to_run:
            print("\nfirst command:\n  " + shlex.join(runner.train_command(to_run[0], options)))
        return 0
    print(f"sweep: {len(trials)} trials, {args.parallel} at a time, in {options.base_dir}",
          flush=True)
    runner.run_sweep(trials, steps, options)
    return _write_results(spec, trials, steps, options, metric, args.no_plots)


def _write_results(spec, trials, steps: dict, options, metric: str, no_plots: bool) -> int:
    """Collects every trial's row, writes the CSV/MD/plots, prints the table; exit 1 unless
    every trial is done."""
    from matlm.sweep import results as results_lib
    from matlm.sweep import runner, spec as spec_lib
    from matlm.model_dir import storage
    storage.check_access(options.base_dir, write=True)  # A bucket: exists, writable.
    if not options.base_dir.is_dir():
        raise spec_lib.SweepSpecError(f"--base_dir={options.base_dir}: no such directory "
                                      "(nothing to collect: run the sweep first)")
    rows = results_lib.collect(spec, trials, options.base_dir, steps)
    if not any(metric in row for row in rows):
        # An eval_* metric is only checked now, once the evals named their columns.
        evals = sorted({c for row in rows for c in row if c.startswith("eval_")})
        print(f"sweep: --metric={metric}: no trial has this column, its plots are empty; "
              f"eval columns: {', '.join(evals) or 'none'}", file=sys.stderr)
    labels = spec_lib.labels_of(spec)
    with storage.staged_dir(options.base_dir) as local:  # On a bucket: uploaded after.
        written = results_lib.write_results(rows, local, metric,
                                            [labels[b] for b in spec.axes],
                                            plots=not no_plots, sweep_dir=options.base_dir)
    print()
    print(results_lib.format_table(rows))
    failed = [row["trial"] for row in rows if row["status"] != runner.DONE]
    print(f"\n{len(trials) - len(failed)} of {len(trials)} trials done"
          + (f"; not done: {', '.join(failed)}" if failed else "")
          + f". Wrote {', '.join(p.name for p in written)} to {options.base_dir}")
    return 1 if failed else 0


def _launch_on_tpu(args, trials, options) -> int:
    """One TPU launch per trial: install once, then each trial's train on every worker.
    The trials' model dirs are BASE_DIR/<trial>, a path every worker must see."""
    import subprocess
    from matlm.launch import launcher
    from matlm.sweep.runner import train_job
    for flag in ("tpu", "zone"):
        if not getattr(args, flag):
            raise launcher.LaunchError(f"--launcher=tpu needs --{flag}")
    commands = launcher.tpu_commands([train_job(t, options) for t in trials], args.tpu,
                                     args.zone, args.project, args.install)
    for command in commands:
        print(launcher.show(command), flush=True)
        if not args.dry_run:
            code = subprocess.run(command).returncode
            if code != 0:
                print(f"matlm sweep: command failed with exit {code}: {launcher.show(command)}",
                      file=sys.stderr)
                return code
    if not args.dry_run:
        print(f"matlm sweep: launched {len(trials)} trials; once {options.base_dir} is readable "
              "here, the same command with --collect_only writes the results", flush=True)
    return 0
