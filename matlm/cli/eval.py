"""`matlm eval`: evaluate any set of submodels of one checkpoint.

    matlm eval --model_dir=runs/tiny --max_examples=50
    matlm eval --model_dir=runs/tiny --tasks=loss,hellaswag,trivia_qa \
        --granularities=S,XL --widths=S,XL,M,L --widths=mixnmatch:10 --num_shots=1
    matlm eval --model_dir=runs/tiny --tasks=mmlu --num_shots=5 --log_samples

The model is rebuilt from the checkpoint's own `run_config.json`. Everything the user
gave is checked — checkpoint dir, task names, widths, task data and field mappings —
before parameters are loaded or anything is compiled. Results go to
`--output` (default `MODEL_DIR/eval/STEP/`): results.json, results.md, plots and,
with --log_samples, samples/<submodel>/samples_<task>.jsonl. docs/eval.md says which
numbers compare with which published tables.
"""
from __future__ import annotations

import re
import sys
import time
import warnings
from pathlib import Path

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

DEFAULT_GIN = "configs/eval/offline.gin"
TEXT_BATCH_SIZE = 8  # Rows (prompts) per batch.
IMAGE_BATCH_SIZE = 250  # Images per batch: mnist_5k's 500 validation images in 2.

PARENTS = [
    flags.model_dir(), flags.step(),
    flags.gin_files(f"gin files defining more tasks (repeatable); {DEFAULT_GIN} is always "
                    "read first, e.g. add configs/eval/tfds.gin"),
    flags.output("where to write results (default MODEL_DIR/eval/STEP)", old=["--output_dir"]),
    flags.no_plots(), flags.no_progress()]


def add_arguments(parser) -> None:
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks or groups (default: loss and every offline "
                             "task). 'loss' = held-out loss on the checkpoint's data task; "
                             "'loss:TASK' on any seqio text task; groups: 'mmlu' (57 "
                             "subjects), 'paper_suite'")
    parser.add_argument("--granularities", default=None,
                        help="comma-separated granularity names (default: all of the model's)")
    parser.add_argument("--widths", action="append", default=[],
                        help="a submodel to add: a granularity name, an integer, one "
                             "name/integer per layer (S,XL,M,L), or mixnmatch:N[:SEED] for N "
                             "seeded Mix'n'Match configurations (repeatable)")
    parser.add_argument("--reference", default=None,
                        help="submodel to measure consistency against (default: the largest "
                             "granularity, XL)")
    parser.add_argument("--max_examples", type=int, default=None,
                        help="examples per task (held-out loss: sequences)")
    parser.add_argument("--num_shots", type=int, default=0,
                        help="exemplars per prompt: 0 (zero-shot, lm-eval-harness's default), "
                             "5 for MMLU's usual 5-shot, ... (from a train/dev split, else "
                             "from a fixed pool of the evaluated split that is not evaluated)")
    parser.add_argument("--acc_uncond", action="store_true",
                        help="also report acc_uncond for multiple choice (OLMES/PMI: each "
                             "choice's log-likelihood minus its log-likelihood after "
                             "'Answer:' alone; scores every choice twice)")
    parser.add_argument("--log_samples", action="store_true",
                        help="write samples/<submodel>/samples_<task>.jsonl: every example's "
                             "prompt, choices, log-likelihoods (or generated text), "
                             "prediction and gold")
    parser.add_argument("--seed", type=int, default=0, help="exemplar seed")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"rows per batch (rounded up to a multiple of the device count; "
                             f"default {TEXT_BATCH_SIZE} prompts, or {IMAGE_BATCH_SIZE} images)")
    parser.add_argument("--max_len", type=int, default=None,
                        help="tokens per row; longer prompts lose their start (default: the "
                             "context the checkpoint trained at, its train.seq_len, as "
                             "lm-evaluation-harness reads an export's "
                             "max_position_embeddings; 1024 when the dir records none)")
    parser.add_argument("--split", default=None,
                        help="MatViT checkpoints: the image split to classify (default: the "
                             "run's eval split, e.g. validation; 'test' where the set has one)")
    parser.add_argument("--sliced", action="store_true",
                        help="slice kernels per submodel (fewer FLOPs, one compile per "
                             "submodel) instead of the masked path (one compile for all)")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"matlm eval: warning: {message}", file=sys.stderr)


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


# The numeric flags' ranges, checked before anything is imported or loaded.
FLAG_CHECKS = {
    "step": Check(int, ge=0),
    "max_examples": Check(int, ge=1),
    "num_shots": Check(int, ge=0),
    "seed": Check(int, ge=0),
    "batch_size": Check(int, ge=1),
    "max_len": Check(int, ge=2),  # At least one context and one continuation token.
}


def run(args, gin_bindings) -> int:
    check_flags(args, FLAG_CHECKS)
    # Heavy imports (TensorFlow via seqio) only when the command runs.
    from matlm.evaluation import report, runner, tasks
    from matlm.evaluation.submodels import resolve_submodels
    from matlm.gin_config import parse_gin, unwrap_gin_error
    import matlm.model_dir as model_dir_lib
    from matlm.model_dir import storage

    start = time.time()
    # 1. The checkpoint's own config (missing or empty dir: CheckpointError naming it).
    model_dir, run_config = model_dir_lib.open_run(args.model_dir)
    # --output: a gs:// one is checked (bucket, write access) before the work; None: the
    # model dir's eval/<step>/, known once the checkpoint is loaded.
    output_dir = storage.output_path(args.output) if args.output else None
    config = run_config.model
    from matlm.model import family_of
    if not family_of(config).tokens:  # A MatViT: its images, not text tasks.
        return _run_images(args, gin_bindings, model_dir, run_config, output_dir, start)
    if args.split is not None:
        raise ValueError("--split selects an image split; for text tasks "
                         "the split is part of each task's definition")
    # 2. Tasks (gin) and submodels, validated against that config.
    parse_gin([DEFAULT_GIN, *args.gin_file], gin_bindings, model_from_dir="matlm eval")
    try:  # Gin builds (and so validates) every task declaration here.
        suite = tasks.eval_suite()
    except ValueError as e:  # One line: without the "In call to configurable" lines gin adds,
        # but naming the gin scope (the task's bindings, e.g. `piqa/multiple_choice`).
        original = unwrap_gin_error(e)
        scope = re.search(r"in scope '([^']+)'", str(e))
        if scope and original is not e:
            raise type(original)(f"{scope.group(1)}/{original}") from None
        raise original from None
    names = _split(args.tasks) or ["loss", *suite]
    names, groups = runner.expand_groups(names)
    submodels, reference = resolve_submodels(config, _split(args.granularities), args.widths,
                                             args.reference)
    # 3. Data: vocabulary, tasks, prompts (field mappings and empty splits fail here).
    vocab = model_dir.vocabulary(fallback=lambda: run_config.data.vocabulary())
    options = runner.eval_options_for_run(
        run_config, num_shots=args.num_shots, seed=args.seed, max_examples=args.max_examples,
        batch_size=runner.device_batch_size(args.batch_size or TEXT_BATCH_SIZE),
        max_len=args.max_len,
        masked=not args.sliced, progress=not args.no_progress, acc_uncond=args.acc_uncond)
    with warnings.catch_warnings():  # One line per task on stderr, not a code location.
        warnings.simplefilter("always", runner.VocabularyRoundTripWarning)
        warnings.showwarning = _show_warning
        plan = runner.prepare(names, vocab, options)
    # 4. Parameters, then the model.
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, args.step)
    results = runner.run(plan, config, loaded.params, submodels, reference, vocab, options,
                         groups=groups, log_samples=args.log_samples)
    results.update(checkpoint=str(Path(args.model_dir)), step=loaded.step)
    output_dir = output_dir or model_dir.eval_dir(loaded.step)
    names, samples = _write_report(results, output_dir, plots=not args.no_plots)
    print(report.format_table(results))
    print(f"\n{len(submodels)} submodels x {len(plan)} tasks in {time.time() - start:.0f}s "
          f"({results['compiled_functions']} compiled functions, "
          f"{'sliced' if args.sliced else 'masked'} path); wrote {', '.join(names)}"
          + (f" and {samples} sample files under samples/" if args.log_samples else "")
          + f" to {output_dir}")
    return 0


def _write_report(results: dict, output_dir, plots: bool) -> tuple[list[str], int]:
    """results.json, results.md, plots (and samples/) into `output_dir`, through
    storage.staged_dir (a gs:// dir: written locally, then uploaded); returns the names
    written at its top and the number of sample files."""
    from matlm.evaluation import report
    from matlm.model_dir import storage
    with storage.staged_dir(output_dir) as local:
        written = report.write_results(results, local, plots=plots)
    names = [p.name for p in written if p.parent == local]
    return names, len(written) - len(names)


def _run_images(args, gin_bindings, model_dir, run_config, output_dir, start: float) -> int:
    """Top-1 / top-5 / consistency of a MatViT's submodels on one image split."""
    from matlm.evaluation import image_classification, report
    from matlm.evaluation.submodels import resolve_submodels
    from matlm.gin_config import parse_gin
    import matlm.model_dir as model_dir_lib

    if args.tasks is not None or args.num_shots or args.log_samples or args.acc_uncond:
        raise ValueError("--tasks, --num_shots, --log_samples and "
                         "--acc_uncond are for text models; a MatViT checkpoint is evaluated "
                         "on its image split (--split)")
    parse_gin([*args.gin_file], gin_bindings, model_from_dir="matlm eval")
    config, data_config = run_config.model, run_config.data
    submodels, reference = resolve_submodels(config, _split(args.granularities), args.widths,
                                             args.reference)
    split = args.split or data_config.eval_split
    batches = data_config.eval_iterator(config.image_shape,
                                        args.batch_size or IMAGE_BATCH_SIZE, split=split)
    task = image_classification.task_name(data_config.dataset, split)
    loaded = model_dir_lib.load_checkpoint_for_inference(model_dir, args.step)
    results = image_classification.evaluate(
        config, loaded.params, batches, submodels, reference, task=task,
        masked=not args.sliced, progress=not args.no_progress,
        max_examples=args.max_examples, total=getattr(batches, "num_examples", None))
    results.update(checkpoint=str(Path(args.model_dir)), step=loaded.step)
    output_dir = output_dir or model_dir.eval_dir(loaded.step)
    names, _ = _write_report(results, output_dir, plots=not args.no_plots)
    print(report.format_table(results))
    examples = results["tasks"][task]["metrics"][reference]["examples"]
    print(f"\n{len(submodels)} submodels x {examples} images of {task} in "
          f"{time.time() - start:.0f}s ({results['compiled_functions']} compiled functions, "
          f"{'sliced' if args.sliced else 'masked'} path); wrote "
          f"{', '.join(names)} to {output_dir}")
    return 0
