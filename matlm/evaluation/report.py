"""Writes evaluation results: results.json, results.md (tasks × submodels) and PNG plots
of loss and average accuracy against parameter count."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tabulate import tabulate

from matlm.evaluation import mappings

# The metric shown in the table (and averaged into "average accuracy") per task kind.
PRIMARY = {mappings.MULTIPLE_CHOICE: "acc", mappings.LAST_WORD: "acc",
           mappings.GENERATIVE_QA: "exact_match"}
AVERAGE_ACCURACY = "average accuracy"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def average_accuracy(results: dict) -> dict[str, float]:
    """Per submodel: the mean primary metric over the one-shot tasks (nan if none)."""
    out = {}
    for name in results["submodels"]:
        values = [t["metrics"][name][PRIMARY[t["kind"]]] for t in results["tasks"].values()
                  if t["kind"] in PRIMARY]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    names = list(results["submodels"])
    reference = results["reference"]
    headers = ["task", "metric", *names]
    rows = [["params", "", *[_human(results["submodels"][n]["params"]) for n in names]]]
    for task, entry in results["tasks"].items():
        m = entry["metrics"]
        if entry["kind"] == "loss":
            rows.append([task, "loss", *[f"{m[n]['loss']:.3f}" for n in names]])
            rows.append([task, "bits/byte", *[f"{m[n]['bits_per_byte']:.3f}" for n in names]])
            rows.append([task, f"greedy agree w/ {reference}",
                         *[f"{m[n]['greedy_agreement']:.3f}" for n in names]])
            continue
        rows.append([task, PRIMARY[entry["kind"]],
                     *[f"{100 * m[n][PRIMARY[entry['kind']]]:.1f}" for n in names]])
        if entry["kind"] == mappings.GENERATIVE_QA:
            rows.append([task, "f1", *[f"{100 * m[n]['f1']:.1f}" for n in names]])
    average = average_accuracy(results)
    if any(not math.isnan(v) for v in average.values()):
        rows.append([AVERAGE_ACCURACY, "", *[f"{100 * average[n]:.1f}" for n in names]])
        agreements = {n: [t["metrics"][n]["answer_agreement"] for t in results["tasks"].values()
                          if t["kind"] != "loss"] for n in names}
        rows.append([f"answer agree w/ {reference}", "avg",
                     *[f"{100 * sum(a) / len(a):.1f}" for a in agreements.values()]])
    return headers, rows


def format_table(results: dict, tablefmt: str = "github") -> str:
    headers, rows = table_rows(results)
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def write_results(results: dict, output_dir: str | Path, plots: bool = True) -> list[Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "results.json", output_dir / "results.md"]
    written[0].write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    mixes = [n for n, s in results["submodels"].items() if len(set(s["widths"])) > 1]
    notes = "".join(f"- `{n}`: widths {results['submodels'][n]['widths']}\n" for n in mixes)
    written[1].write_text(
        f"# Evaluation of {results.get('checkpoint', 'a model')} (step {results.get('step')})\n\n"
        f"{format_table(results)}\n\nAccuracies in %, {results['options']['num_shots']}-shot; "
        f"agreement is with the reference submodel {results['reference']}.\n"
        + (f"\n{notes}" if notes else ""))
    if plots:
        written += _plots(results, output_dir)
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
              for task, e in results["tasks"].items() if e["kind"] == "loss"}
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
