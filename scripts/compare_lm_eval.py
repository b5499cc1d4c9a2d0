"""Does lm-evaluation-harness on a fresh `matlm export` give `matlm eval`'s numbers?

    python scripts/compare_lm_eval.py --model_dir=runs/readme_check --limit=20

Both tools run with their default arguments on the same examples; the script prints,
per task, both tools' acc and acc_norm, how many examples get the same prediction, and
the largest difference between the two tools' log-likelihoods of one choice; it exits 1
unless they agree (docs/lm_eval_check.md has the measured tables). Steps:

1. `matlm export --format=hf` of `--model_dir` (the stored widths: XL, or
   `--widths=G` for `--granularity=G`) into a fresh `--work_dir/export`.
2. lm-eval task configs: for each task, lm-eval's OWN yaml from the installed package,
   with only the data source replaced by matlm's offline copy of the same split
   (`.matlm_cache/eval_data`, converted to jsonl in its own order) and the splits that
   copy lacks (train, test) set to null; helper modules the yaml names (`!function`) are
   copied beside it. Registered under the same task names via `--include_path`, which
   lm-eval lets override its built-in tasks.
3. `lm_eval --model hf --model_args pretrained=EXPORT --tasks T --limit N --device cpu
   --log_samples` (the rest default: batch size 1, BOS as the tokenizer adds it, the
   context length from the export's `max_position_embeddings`).
4. `matlm eval --model_dir=D --tasks=T --max_examples=N --granularities=G --log_samples`
   (the rest default; `--granularities` only picks the submodel that was exported).
   `--max_examples=N` and `--limit N` both take the first N examples of the split.
5. The comparison table, from both tools' per-example logs.

lm-eval is not a matlm dependency: install it once into the (gitignored) cache, reusing
the venv's torch and transformers (docs/lm_eval_check.md lists the pinned packages):

    pip install --no-deps --target .matlm_cache/lm_eval lm_eval==0.4.13 datasets==5.2.0 ...

Nothing is downloaded at run time (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# task -> (lm-eval's yaml under lm_eval/tasks, the helper module it names or None,
#          matlm's offline arrow folder under .matlm_cache/eval_data)
TASKS = {
    "piqa": ("piqa/piqa.yaml", None, "hf_datasets/piqa/plain_text"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/utils.py",
                  "hf_datasets/hellaswag/none"),
    "arc_easy": ("arc/arc_easy.yaml", None, "hf_datasets/ai2_arc/ARC-Easy"),
    "winogrande": ("winogrande/default.yaml", "winogrande/preprocess_winogrande.py",
                   "hf_datasets/winogrande/winogrande_xl"),
    "boolq": ("super_glue/boolq/default.yaml", None, "hf_datasets/boolq/none"),
}
SPLIT = "validation"  # The only split matlm's offline data has.
# Largest |log-likelihood difference| of one choice counted as the same score: both tools
# sum float32 log-probabilities (measured up to 6e-5 on sums near -350); scoring rows
# with another context length (--max_len=1024) moved them by 0.16-0.31.
LOGLIK_TOLERANCE = 1e-3


def to_lm_eval_record(task: str, record: dict) -> dict:
    """A record of matlm's offline data as lm-eval's dataset for the task has it. Only
    boolq differs: lm-eval reads `aps/super_glue` (label 0 = False, 1 = True), the
    offline copy is HF `boolq` (answer: bool) with the same questions and passages."""
    if task == "boolq":
        return {**record, "label": int(record["answer"])}
    return record


def offline_yaml(yaml_text: str, data_file: Path) -> str:
    """lm-eval's task yaml with only the data source replaced (text edits, so its
    `!function` tags stay as they are)."""
    text, n = re.subn(r"(?m)^dataset_path: .*$", "dataset_path: json", yaml_text)
    assert n == 1, "expected one dataset_path line"
    text = re.sub(r"(?m)^dataset_name: .*$", "dataset_name: null", text)
    # The offline copy has only the validation split: a train split lm-eval would read
    # for its few-shot sampler (unused at 0 shots) and a test split it would evaluate
    # instead of validation (ARC) are set to null.
    text = re.sub(r"(?m)^(training_split|test_split|fewshot_split): .*$", r"\1: null", text)
    assert re.search(rf"(?m)^validation_split: {SPLIT}$", text), "expected a validation split"
    assert "dataset_kwargs" not in text, "the yaml already has dataset_kwargs"
    return (text.rstrip("\n") + f"\ndataset_kwargs:\n  data_files:\n    {SPLIT}: "
            f"{json.dumps(str(data_file))}\n")


def write_task_configs(tasks: list[str], lm_eval_tasks: Path, out: Path) -> None:
    from matlm.evaluation.sources import ArrowSource  # matlm's own reader: same order.
    for task in tasks:
        yaml_path, helper, arrow_path = TASKS[task]
        folder = out / task
        folder.mkdir(parents=True)
        data_file = folder / f"{task}_{SPLIT}.jsonl"
        records = ArrowSource(arrow_path).read(SPLIT)
        data_file.write_text("".join(json.dumps(to_lm_eval_record(task, r), ensure_ascii=False)
                                     + "\n" for r in records))
        source = lm_eval_tasks / yaml_path
        (folder / source.name).write_text(offline_yaml(source.read_text(), data_file))
        if helper:
            shutil.copy(lm_eval_tasks / helper, folder / Path(helper).name)


def run(cmd: list[str], log: Path, env=None) -> float:
    """Runs a command with its output in `log`; stops the script if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode:
        sys.exit(f"failed (exit {done.returncode}); its output: {log}\n"
                 + "".join(log.read_text().splitlines(True)[-15:]))
    return time.time() - start


# --- reading both tools' per-example logs ----------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lm_eval_samples(out: Path, task: str) -> dict[int, dict]:
    """doc_id -> {lls, contexts, continuations, acc_norm} from lm-eval's
    samples_<task>_<time>.jsonl (one `arguments` pair and one response per choice)."""
    files = sorted(out.glob(f"**/samples_{task}_*.jsonl"))
    assert len(files) == 1, f"expected one lm-eval samples file for {task}: {files}"
    rows = {}
    for s in read_jsonl(files[0]):
        args = [a if isinstance(a, (list, tuple)) else (a["arg_0"], a["arg_1"])
                for a in (s["arguments"].values() if isinstance(s["arguments"], dict)
                          else s["arguments"])]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        rows[s["doc_id"]] = dict(lls=lls, contexts=[a[0] for a in args],
                                 continuations=[a[1] for a in args],
                                 acc_norm=s.get("acc_norm"))
    return rows


def matlm_samples(out: Path, submodel: str, task: str) -> dict[int, dict]:
    rows = {}
    for s in read_jsonl(out / "samples" / submodel / f"samples_{task}.jsonl"):
        n = len(s["choices"])
        prompts = s["prompt"] if isinstance(s["prompt"], list) else [s["prompt"]] * n
        rows[s["index"]] = dict(lls=s["loglikelihoods"], contexts=prompts,
                                continuations=s["choices"], pred=s["prediction"],
                                pred_norm=s["prediction_norm"], gold=s["gold"])
    return rows


def lm_eval_results(out: Path) -> dict:
    files = sorted(out.glob("**/results_*.json"))
    assert len(files) == 1, f"expected one lm-eval results file: {files}"
    return json.loads(files[0].read_text())


def lm_eval_metrics(out: Path, task: str) -> dict:
    metrics = lm_eval_results(out)["results"][task]
    return {m: metrics.get(f"{m},none") for m in ("acc", "acc_norm")}


def rows_cut(export: Path, samples: dict[int, dict]) -> int:
    """Scored rows (BOS + context + continuation) longer than max_length + 1 tokens, which
    both tools cut on the left (the export's tokenizer adds BOS, as lm-eval encodes)."""
    from transformers import AutoConfig, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(export)
    max_len = AutoConfig.from_pretrained(export).max_position_embeddings
    return sum(len(tokenizer(c + t)["input_ids"]) > max_len + 1
               for s in samples.values() for c, t in zip(s["contexts"], s["continuations"]))


def compare_task(task: str, lm_dir: Path, matlm_dir: Path, submodel: str, export: Path) -> dict:
    ours, theirs = matlm_samples(matlm_dir, submodel, task), lm_eval_samples(lm_dir, task)
    assert sorted(ours) == sorted(theirs), (
        f"{task}: different examples (matlm {sorted(ours)}, lm-eval {sorted(theirs)})")
    same_text = same_pred = same_acc_norm = 0
    max_diff = 0.0
    for i, m in ours.items():
        h = theirs[i]
        # lm-eval's arguments are the (context, continuation) strings it scored.
        same_text += (m["contexts"] == h["contexts"] and m["continuations"] == h["continuations"])
        max_diff = max(max_diff, *(abs(a - b) for a, b in zip(m["lls"], h["lls"])))
        # The choice each tool picks by log-likelihood (both take the first of equal ones).
        same_pred += m["pred"] == h["lls"].index(max(h["lls"]))
        # lm-eval logs acc_norm per example (right or wrong), not the normalised argmax.
        if h["acc_norm"] is not None:
            same_acc_norm += (m["pred_norm"] == m["gold"]) == bool(h["acc_norm"])
    n = len(ours)
    results = json.loads((matlm_dir / "results.json").read_text())
    metrics = results["tasks"][task]["metrics"][submodel]
    theirs_metrics = lm_eval_metrics(lm_dir, task)
    return dict(task=task, n=n, matlm=(metrics["acc"], metrics.get("acc_norm")),
                lm_eval=(theirs_metrics["acc"], theirs_metrics["acc_norm"]),
                same_text=same_text, same_pred=same_pred,
                same_acc_norm=None if theirs_metrics["acc_norm"] is None else same_acc_norm,
                max_diff=max_diff, rows=sum(len(s["lls"]) for s in ours.values()),
                cut=rows_cut(export, theirs))


def fmt(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| task | n | matlm acc | lm-eval acc | matlm acc_norm | lm-eval acc_norm | "
             "same strings | same prediction | same acc_norm outcome | max abs loglik diff | "
             "rows cut to the context |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['n']} | {fmt(r['matlm'][0])} | {fmt(r['lm_eval'][0])} | "
            f"{fmt(r['matlm'][1])} | {fmt(r['lm_eval'][1])} | {r['same_text']}/{r['n']} | "
            f"{r['same_pred']}/{r['n']} | "
            + ("-" if r["same_acc_norm"] is None else f"{r['same_acc_norm']}/{r['n']}")
            + f" | {r['max_diff']:.2e} | {r['cut']}/{r['rows']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a matlm model dir")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=20, help="examples per task (first N)")
    parser.add_argument("--granularity", default="XL",
                        help="submodel: exported with --widths and evaluated with "
                             "--granularities (XL: the whole model, export's default)")
    parser.add_argument("--work_dir", default=None,
                        help="a new dir for the export, task configs and both tools' "
                             "outputs (default: .matlm_cache/lm_eval_check/<time>)")
    parser.add_argument("--matlm_eval_arg", action="append", default=[],
                        help="an extra flag for matlm eval (repeatable), e.g. "
                             "--matlm_eval_arg=--max_len=1024 (the default before issue 25) "
                             "to see the check fail")
    parser.add_argument("--lm_eval_path", default=str(REPO / ".matlm_cache" / "lm_eval"),
                        help="where lm_eval and its extra packages were pip --target'ed")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; known: {list(TASKS)}")
    lm_eval_path = Path(args.lm_eval_path).resolve()
    lm_eval_tasks = lm_eval_path / "lm_eval" / "tasks"
    if not lm_eval_tasks.is_dir():
        parser.error(f"no lm_eval under {lm_eval_path}: install it (see this script's doc)")
    work = Path(args.work_dir or REPO / ".matlm_cache" / "lm_eval_check"
                / time.strftime("%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=False)
    model_dir = str(Path(args.model_dir).resolve())
    bin_dir = Path(sys.executable).parent

    export = work / "export"
    widths = [] if args.granularity == "XL" else [f"--widths={args.granularity}"]
    took = {"export": run([str(bin_dir / "matlm"), "export", f"--model_dir={model_dir}",
                           "--format=hf", f"--output={export}", *widths],
                          work / "export.log", env={**os.environ, "JAX_PLATFORMS": "cpu"})}
    write_task_configs(tasks, lm_eval_tasks, work / "tasks")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf_datasets_cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(lm_eval_path),
                                                       os.environ.get("PYTHONPATH")]))}
    took["lm_eval"] = run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={export}", "--tasks", ",".join(tasks), "--include_path",
         str(work / "tasks"), "--limit", str(args.limit), "--device", "cpu",
         "--log_samples", "--output_path", str(work / "lm_eval")],
        work / "lm_eval.log", env=env)
    took["matlm eval"] = run(
        [str(bin_dir / "matlm"), "eval", f"--model_dir={model_dir}", f"--tasks={','.join(tasks)}",
         f"--max_examples={args.limit}", f"--granularities={args.granularity}",
         "--log_samples", "--no_plots", "--no_progress", f"--output={work / 'matlm'}",
         *args.matlm_eval_arg],
        work / "matlm_eval.log", env={**os.environ, "JAX_PLATFORMS": "cpu"})

    text, agree = summarize(work, tasks, args.granularity)
    print(text)
    print("took " + ", ".join(f"{k} {v:.0f}s" for k, v in took.items()) + f"; outputs in {work}")
    print("identical metrics and scores: " + ("yes" if agree else "NO"))
    return 0 if agree else 1


def summarize(work: Path, tasks: list[str], granularity: str) -> tuple[str, bool]:
    """The comparison table of a finished run (also written to WORK/comparison.md) and
    whether every metric both tools report is identical, on identical strings, with
    log-likelihoods equal within LOGLIK_TOLERANCE."""
    rows = [compare_task(t, work / "lm_eval", work / "matlm", granularity, work / "export")
            for t in tasks]
    theirs = lm_eval_results(work / "lm_eval")
    matlm_options = json.loads((work / "matlm" / "results.json").read_text())["options"]
    text = (table(rows) + f"\n\ncontext length: lm-eval max_length "
            f"{theirs.get('max_length')}, matlm eval max_len {matlm_options['max_len']}; lm-eval "
            f"{theirs.get('lm_eval_version')}, transformers "
            f"{theirs.get('transformers_version')}, batch size "
            f"{theirs['config']['batch_size']} (lm-eval), "
            f"{matlm_options['batch_size']} (matlm)")
    (work / "comparison.md").write_text(text + "\n")
    # acc_norm where lm-eval reports it (its winogrande and boolq configs list acc only).
    # The log-likelihoods too: on a small model acc can coincide while the rows differ.
    agree = all(r["matlm"][0] == r["lm_eval"][0] and r["same_text"] == r["n"]
                and r["lm_eval"][1] in (None, r["matlm"][1])
                and r["max_diff"] <= LOGLIK_TOLERANCE for r in rows)
    return text, agree


if __name__ == "__main__":
    sys.exit(main())
