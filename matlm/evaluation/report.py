"""Writes evaluation results: results.json, results.md (tasks × submodels), PNG plots
of loss and average accuracy against parameter count, and (with samples) one
`samples/<submodel>/samples_<task>.jsonl` per task and submodel.

Each task's row shows its primary metric (`metric` in results.json: what published
tables report, e.g. acc_norm for hellaswag), then the other metrics of its kind (acc /
acc_norm / acc_uncond when computed, exact_match / f1); both come from the one table in
`matlm.evaluation.task_metrics`. A group shows its micro and macro
averages; members of groups larger than GROUP_ROWS_LIMIT only appear in results.json."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tabulate import tabulate

from matlm.evaluation import task_metrics

AVERAGE_ACCURACY = "average accuracy"
GROUP_ROWS_LIMIT = 16  # MMLU's 57 subjects stay out of results.md.


def primary(entry: dict) -> str:
    return task_metrics.result_primary(entry)


def shown_tasks(results: dict) -> list[str]:
    """The tasks with a row of their own: all but the members of large groups."""
    hidden = {t for g in results.get("groups", {}).values() if len(g["tasks"]) > GROUP_ROWS_LIMIT
              for t in g["tasks"]}
    return [t for t in results["tasks"] if t not in hidden]


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _averaged_over(results: dict) -> tuple[list[dict], list[dict]]:
    """What the per-submodel averages count, each once: the scored (not loss) tasks with a
    row of their own, and the large groups (whose members have no rows)."""
    tasks = results["tasks"]
    shown = [tasks[t] for t in shown_tasks(results)
             if tasks[t]["kind"] in task_metrics.ANSWER_KINDS]
    large = [g for g in results.get("groups", {}).values() if len(g["tasks"]) > GROUP_ROWS_LIMIT]
    return shown, large


def average_accuracy(results: dict) -> dict[str, float]:
    """Per submodel: the mean primary metric over the tasks with a row of their own, each
    large group counting once by its micro average (nan if none)."""
    out = {}
    shown, large = _averaged_over(results)
    for name in results["submodels"]:
        values = [t["metrics"][name][primary(t)] for t in shown]
        values += [g["metrics"][name]["micro"] for g in large]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    names = list(results["submodels"])
    reference = results["reference"]
    headers = ["task", "metric", *names]
    rows = [["params", "", *[_human(results["submodels"][n]["params"]) for n in names]]]
    for task in shown_tasks(results):
        entry = results["tasks"][task]
        m = entry["metrics"]
        if entry["kind"] == task_metrics.LOSS:
            rows.append([task, "loss", *[f"{m[n]['loss']:.3f}" for n in names]])
            rows.append([task, "bits/byte", *[f"{m[n]['bits_per_byte']:.3f}" for n in names]])
            rows.append([task, f"greedy agree w/ {reference}",
                         *[f"{m[n]['greedy_agreement']:.3f}" for n in names]])
            continue
        metric = primary(entry)
        rows.append([task, metric, *[f"{100 * m[n][metric]:.1f}" for n in names]])
        for other in task_metrics.kind_metrics(entry["kind"]).metrics:
            if other != metric and other in m[names[0]]:
                rows.append([task, other, *[f"{100 * m[n][other]:.1f}" for n in names]])
    for group, entry in results.get("groups", {}).items():
        for kind in ("micro", "macro"):
            rows.append([group, f"{kind} avg ({len(entry['tasks'])} tasks)",
                         *[f"{100 * entry['metrics'][n][kind]:.1f}" for n in names]])
    average = average_accuracy(results)
    if any(not math.isnan(v) for v in average.values()):
        rows.append([AVERAGE_ACCURACY, "", *[f"{100 * average[n]:.1f}" for n in names]])
        agreements = answer_agreement(results)
        if any(not math.isnan(v) for v in agreements.values()):
            rows.append([f"answer agree w/ {reference}", "avg",
                         *[f"{100 * agreements[n]:.1f}" for n in names]])
    return headers, rows


def answer_agreement(results: dict) -> dict[str, float]:
    """Per submodel: the mean answer agreement with the reference, counted as
    `average_accuracy` counts (tasks with a row of their own, each large group once, by
    the mean over its members); nan if there are none (e.g. --tasks=mmlu alone)."""
    tasks = results["tasks"]
    shown, large = _averaged_over(results)
    out = {}
    for name in results["submodels"]:
        values = [t["metrics"][name]["answer_agreement"] for t in shown]
        values += [sum(tasks[t]["metrics"][name]["answer_agreement"] for t in g["tasks"])
                   / len(g["tasks"]) for g in large]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


def format_table(results: dict, tablefmt: str = "github") -> str:
    headers, rows = table_rows(results)
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def write_results(results: dict, output_dir: str | Path, plots: bool = True) -> list[Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "results.json", output_dir / "results.md"]
    samples = results.get("samples")
    results = {k: v for k, v in results.items() if k != "samples"}
    written[0].write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    mixes = [n for n, s in results["submodels"].items() if len(set(s["widths"])) > 1]
    notes = "".join(f"- `{n}`: widths {results['submodels'][n]['widths']}\n" for n in mixes)
    written[1].write_text(
        f"# Evaluation of {results.get('checkpoint', 'a model')} (step {results.get('step')})\n\n"
        f"{format_table(results)}\n\nAccuracies in %, {results['options']['num_shots']}-shot; "
        f"agreement is with the reference submodel {results['reference']}. Each task's first "
        "row is its primary metric (what published tables report; see docs/eval.md).\n"
        + (f"\n{notes}" if notes else ""))
    if samples:
        written += write_samples(samples, output_dir)
    if plots:
        written += _plots(results, output_dir)
    return written


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.+-]", "_", name)


def write_samples(samples: dict, output_dir: str | Path) -> list[Path]:
    """`samples/<submodel>/samples_<task>.jsonl`: one line per evaluated example."""
    written = []
    for task, per_model in samples.items():
        for submodel, rows in per_model.items():
            path = Path(output_dir) / "samples" / _file_name(submodel) / \
                f"samples_{_file_name(task)}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            written.append(path)
    return written


def _plots(results: dict, output_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # No display on servers.
    import matplotlib.pyplot as plt

    subs = results["submodels"]
    uniform = [n for n, s in subs.items() if len(set(s["widths"])) == 1]
    uniform.sort(key=lambda n: subs[n]["params"])
    mixes = [n for n in subs if n not in uniform]
    series = {task: {n: e["metrics"][n]["loss"] for n in subs}
              for task, e in results["tasks"].items() if e["kind"] == task_metrics.LOSS}
    average = average_accuracy(results)
    if not all(math.isnan(v) for v in average.values()):
        series[AVERAGE_ACCURACY] = average
    written = []
    for title, values in series.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([subs[n]["params"] for n in uniform], [values[n] for n in uniform], "o-",
                label="granularities")
        for n in uniform:
            ax.annotate(n, (subs[n]["params"], values[n]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        if mixes:
            ax.scatter([subs[n]["params"] for n in mixes], [values[n] for n in mixes],
                       marker="x", color="tab:red", label="Mix'n'Match")
        ax.set_xlabel("parameters")
        ax.set_ylabel("average accuracy" if title == AVERAGE_ACCURACY else "loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        slug = "average_accuracy" if title == AVERAGE_ACCURACY else title.replace(":", "_")
        path = output_dir / f"{slug}_vs_params.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
