"""`matlm search`: per-layer widths on the Pareto front of metric vs cost, under a budget.

    matlm search --model_dir=runs/default --budget_params=1.6e6
    matlm search --model_dir=runs/default --budget_flops=3e6 --method=heuristic
    matlm search --model_dir=runs/default --budget_params=1.6e6 --metric=piqa \
        --space=aligned --max_evals=200 --seed=1

Every candidate is scored through the masked path (one compiled function for all width
vectors) on a fixed held-out sample: the first `--eval_batches` validation batches of the
checkpoint's data task (`--metric=loss`) or the first eval_batches×batch_size examples
of an eval task. For `loss` the front is re-scored on the *next* `--eval_batches`
batches (`metric_confirm`): the search picked its winners on the first sample, so only
the second one is an unbiased comparison. Everything the user gave is checked before
parameters are loaded or anything is compiled. Writes front.csv, candidates.csv,
best.json and search.png to `--output` (default MODEL_DIR/search/<run name>), which must
not already hold files.
"""
from __future__ import annotations

import time
from pathlib import Path

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

DEFAULT_GIN = "configs/eval/offline.gin"

PARENTS = [
    flags.model_dir(), flags.step(),
    flags.gin_files(f"gin files defining more tasks (repeatable); {DEFAULT_GIN} is always read"),
    flags.output("output dir (default MODEL_DIR/search/<step, method, budget, metric, "
                 "seed>); must be new or empty"),
    flags.no_plots(), flags.no_progress()]


def add_arguments(parser) -> None:
    parser.add_argument("--budget_params", type=float, default=None,
                        help="most parameters the submodel may use (embeddings included, as "
                             "`matlm info` counts them), e.g. 1.6e6")
    parser.add_argument("--budget_flops", type=float, default=None,
                        help="most forward matmul FLOPs per token (at the run's seq_len), "
                             "e.g. 3e6")
    parser.add_argument("--metric", default=None,
                        help="'loss' (held-out loss on the checkpoint's data task; the "
                             "default), 'loss:TASK', or an eval task (multiple choice and "
                             "last word: accuracy; generative: F1). MatViT: top1 (default), "
                             "top5 or loss on its validation images")
    parser.add_argument("--method", default="evolution",
                        help="heuristic (the paper's slowly-growing Mix'n'Match) or "
                             "evolution (regularised evolution, seeded)")
    parser.add_argument("--space", default="granularities",
                        help="allowed widths per layer: 'granularities' (the model's S/M/L/XL "
                             "widths) or 'aligned' (every multiple of lcm(width_alignment, "
                             "ffn_nest_blocks))")
    parser.add_argument("--max_evals", type=int, default=64,
                        help="new candidates to evaluate (the uniform granularities under "
                             "the budget are evaluated on top)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_batches", type=int, default=8,
                        help="held-out batches each candidate is scored on")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows per batch (rounded up to a multiple of the device count; "
                             "default 8 prompts, or 64 images)")
    parser.add_argument("--max_len", type=int, default=None,
                        help="tokens per row for eval tasks (default: the context the "
                             "checkpoint trained at, as for matlm eval)")


FLAG_CHECKS = {
    "step": Check(int, ge=0),
    "budget_params": Check(float, gt=0),
    "budget_flops": Check(float, gt=0),
    "max_evals": Check(int, ge=1),
    "seed": Check(int, ge=0),
    "eval_batches": Check(int, ge=1),
    "batch_size": Check(int, ge=1),
    "max_len": Check(int, ge=2),
}


def run(args, gin_bindings) -> int:
    from matlm.submodels import search as S
    check_flags(args, FLAG_CHECKS)
    if (args.budget_params is None) == (args.budget_flops is None):
        raise S.SearchError("give exactly one of --budget_params=N and --budget_flops=F")
    if args.method not in S.METHODS:
        raise S.SearchError(f"--method must be one of {', '.join(S.METHODS)}, "
                            f"got {args.method!r}")
    # Heavy imports (TensorFlow via seqio) only when the command runs.
    from matlm.evaluation import runner, tasks
    from matlm.gin_config import parse_gin
    import matlm.model_dir as model_dir_lib

    start = time.time()
    # 1. The checkpoint: its config and the step (missing dir/step: one line, no loading).
    model_dir, run_config = model_dir_lib.open_run(args.model_dir)
    config = run_config.model
    step = model_dir.resolve_step(args.step)
    from matlm.model import family_of
    if not family_of(config).tokens:  # A MatViT: ranked by accuracy on its images.
        return _run_images(args, gin_bindings, model_dir, run_config, step, start)
    args.metric = args.metric or runner.LOSS
    # Loss batches are sharded over every device: whole rows per device (as the scorer).
    batch_size = runner.device_batch_size(args.batch_size or 8)
    rows = args.eval_batches * batch_size
    is_loss = args.metric == runner.LOSS or args.metric.startswith(runner.LOSS + ":")
    options = runner.eval_options_for_run(
        run_config, num_shots=1, seed=args.seed, max_examples=2 * rows if is_loss else rows,
        batch_size=batch_size, max_len=args.max_len, masked=True, progress=False)
    # 2. Space and budget, against that config (FLOPs at the run's seq_len).
    space = S.SearchSpace.build(config, args.space)
    kind = "params" if args.budget_params is not None else "flops"
    budget = S.Budget(kind, float(args.budget_params or args.budget_flops),
                      options.loss_seq_len)
    S.check_budget(space, budget)
    # 3. The metric (gin-defined tasks too).
    parse_gin([DEFAULT_GIN, *args.gin_file], gin_bindings, model_from_dir="matlm search")
    tasks.eval_suite()
    try:
        runner.check_task_names([args.metric])
    except ValueError as e:
        raise S.SearchError(f"--metric={args.metric!r}: {e}") from None
    # 4. The output dir: new or empty, so nothing is overwritten.
    slug = (f"step{step}_{args.method}_{kind}{budget.limit:.4g}_"
            f"{args.metric.replace(':', '_')}_{args.space}_seed{args.seed}")
    output = flags.new_output_dir(model_dir, args.output, model_dir.path / "search" / slug,
                                  S.SearchError)
    # 5. Data: the search sample (+ for loss the next as many batches, to confirm).
    vocab = model_dir.vocabulary(fallback=lambda: run_config.data.vocabulary())
    (task,) = runner.prepare([args.metric], vocab, options)
    confirm_task = None
    if is_loss:
        import dataclasses
        confirm_task = dataclasses.replace(task, batches=task.batches[args.eval_batches:])
        task = dataclasses.replace(task, batches=task.batches[:args.eval_batches])
        if not confirm_task.batches:
            confirm_task = None  # A short validation split: no second sample.
    # 6. Parameters, then the search.
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    evaluator = S.TaskEvaluator(task, config, loaded.params, vocab, options)
    metric_name = f"{task.name} {evaluator.key}"
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_evals, desc=f"search ({args.method})", unit="candidate")

    best_so_far = []

    def progress(c):
        if bar is not None:
            objective = S.objective(c.metric, evaluator.minimize)
            if not best_so_far or objective < best_so_far[0][0]:
                best_so_far[:] = [(objective, c)]
            b = best_so_far[0][1]
            bar.update(1)
            bar.set_postfix_str(f"best {b.metric:.4f} at {','.join(map(str, b.widths))}")

    result = S.search(space, budget, evaluator, args.method, args.max_evals, args.seed,
                      evaluator.minimize, progress)
    if bar is not None:
        bar.close()
    confirm = None
    if confirm_task is not None:
        again = [*result.front, *result.uniform, *result.over_budget]
        again = list({c.widths: c for c in again})
        values = evaluator.with_task(confirm_task)([c for c in again])
        confirm = dict(zip(again, values))
    info = {"checkpoint": str(Path(args.model_dir)), "step": step, "seed": args.seed,
            "max_evals": args.max_evals, "eval_rows": sum(
                int(b["loss_mask"].any(axis=1).sum()) for b in task.batches) if is_loss
            else len(task.rows), "compiled_functions": evaluator.compiled_count()}
    return _write_and_print(args, result, output, metric_name, info, confirm, budget,
                            evaluator, start, per="token")


def _run_images(args, gin_bindings, model_dir, run_config, step: int, start: float) -> int:
    """The search on a MatViT: candidates ranked by top-1 (or --metric) on the first
    `--eval_batches` batches of its validation images in a fixed shuffled order (the
    split may be sorted by class); the front re-scored on the next as many
    (`metric_confirm`), as for held-out loss."""
    import itertools

    from matlm.evaluation import image_classification
    from matlm.gin_config import parse_gin
    import matlm.model_dir as model_dir_lib
    from matlm.submodels import search as S

    config, data_config = run_config.model, run_config.data
    metric = args.metric or "top1"
    if metric not in S.ImageEvaluator.METRICS:
        raise S.SearchError(f"--metric={metric!r} is not a MatViT metric; give one of "
                            f"{', '.join(S.ImageEvaluator.METRICS)}")
    parse_gin([*args.gin_file], gin_bindings, model_from_dir="matlm search")
    space = S.SearchSpace.build(config, args.space)
    kind = "params" if args.budget_params is not None else "flops"
    budget = S.Budget(kind, float(args.budget_params or args.budget_flops), 0)
    S.check_budget(space, budget)
    slug = (f"step{step}_{args.method}_{kind}{budget.limit:.4g}_{metric}_{args.space}_"
            f"seed{args.seed}")
    output = flags.new_output_dir(model_dir, args.output, model_dir.path / "search" / slug,
                                  S.SearchError)
    batch_size = args.batch_size or 64
    batches = list(itertools.islice(
        data_config.eval_iterator(config.image_shape, batch_size, shuffle=True),
        2 * args.eval_batches))
    sample, confirm_sample = batches[:args.eval_batches], batches[args.eval_batches:]
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, step)
    task = image_classification.task_name(data_config.dataset, data_config.eval_split)
    evaluator = S.ImageEvaluator(sample, config, loaded.params, metric, task)
    metric_name = f"{task} {metric}"
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.max_evals, desc=f"search ({args.method})", unit="candidate")
    result = S.search(space, budget, evaluator, args.method, args.max_evals, args.seed,
                      evaluator.minimize, (lambda c: bar.update(1)) if bar else None)
    if bar is not None:
        bar.close()
    confirm = None
    if confirm_sample:
        again = list({c.widths: c for c in [*result.front, *result.uniform,
                                            *result.over_budget]})
        confirm = dict(zip(again, evaluator.with_batches(confirm_sample)(again)))
    info = {"checkpoint": str(Path(args.model_dir)), "step": step, "seed": args.seed,
            "max_evals": args.max_evals,
            "eval_rows": int(sum(b["mask"].sum() for b in sample)),
            "compiled_functions": evaluator.compiled_count()}
    return _write_and_print(args, result, output, metric_name, info, confirm, budget,
                            evaluator, start, per="image")


def _write_and_print(args, result, output, metric_name: str, info: dict, confirm, budget,
                     evaluator, start: float, per: str) -> int:
    """front.csv, candidates.csv, best.json, search.png; the front and the best candidate."""
    from matlm.model_dir import storage
    from matlm.submodels import search as S
    with storage.staged_dir(output) as local:  # On a bucket: written here, then uploaded.
        written = S.write_outputs(result, local, metric_name, info, confirm,
                                  plot=not args.no_plots)
    print(S.front_table(result, metric_name, confirm))
    best = result.best
    print(f"\nbest under {budget.kind} <= {budget.limit:.6g}: "
          f"--widths={','.join(map(str, best.widths))} ({best.params:,} params, "
          f"{best.flops / 1e6:.3f} MFLOPs/{per}, {metric_name} {best.metric:.4f})")
    print(f"{len(result.candidates)} candidates ({len(result.uniform)} uniform) in "
          f"{time.time() - start:.0f}s, {evaluator.compiled_count()} compiled function(s); "
          f"wrote {', '.join(p.name for p in written)} to {output}")
    return 0
