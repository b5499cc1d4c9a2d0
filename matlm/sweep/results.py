"""A sweep's results: one row per trial from its trial.json, run_config.json and
metrics.jsonl (and eval results when the sweep evaluated), written as sweep_results.csv,
sweep_results.md (tabulate) and PNG plots (matplotlib) of a metric against each swept axis
and against parameters."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from tabulate import tabulate

from matlm.sweep.runner import read_trial
from matlm.sweep.spec import SweepSpec, Trial, format_value, labels_of

CSV_FILE, MD_FILE = "sweep_results.csv", "sweep_results.md"


def read_metrics(model_dir: Path) -> list[dict]:
    """metrics.jsonl's rows (a line cut short by a kill is skipped)."""
    from matlm.model_dir import ModelDir
    path = ModelDir(model_dir).metrics_file
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def final_val_losses(rows: Sequence[dict]) -> tuple[Optional[int], dict[str, float]]:
    """(step, {granularity: loss}) of the newest row holding validation losses."""
    for row in reversed(rows):
        losses = {k.split("/")[1]: v for k, v in row.items()
                  if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2}
        if losses:
            return row["step"], losses
    return None, {}


def trial_row(trial: Trial, model_dir: Path, labels: dict,
              configured_steps: Optional[int] = None) -> dict:
    """One trial's row: swept values, status, params and final val loss per granularity,
    the step reached, tokens trained, wall time, the error's last line."""
    from matlm.model.counting import param_count
    from matlm.model_dir import ModelDir
    record = read_trial(model_dir)
    row = {"trial": trial.name, **({"variant": trial.variant} if trial.variant else {})}
    row.update({labels[b]: v for b, v in trial.values.items()})
    row["status"] = record.get("status") or _status_from_checkpoints(model_dir,
                                                                     configured_steps)
    trial_dir = ModelDir(model_dir)  # The model-dir layout lives there.
    has_run_config = trial_dir.run_config_file.is_file()
    metrics = read_metrics(model_dir)
    if has_run_config:
        run_config = trial_dir.run_config()
        config = run_config.model
        spec = config.granularities
        for name in spec.names:
            row[f"params_{name}"] = param_count(config, spec.uniform(name))
        train = run_config.train
        steps = [r["step"] for r in metrics if "train/loss" in r]
        row["step"] = max(steps) if steps else 0
        # A ViT's tokens are its images' patches (and class token).
        per_example = getattr(config, "num_tokens", None) or (train.seq_len if train else 0)
        row["tokens"] = (row["step"] * train.global_batch_size * per_example
                         if train is not None else 0)
    val_step, losses = final_val_losses(metrics)
    order = list(spec.names) if has_run_config else []
    # In the model's granularity order (metrics.jsonl keys are sorted by name: L, M, S, XL).
    for name in sorted(losses, key=lambda n: order.index(n) if n in order else len(order)):
        row[f"val_loss_{name}"] = losses[name]
    if losses:
        row["val_step"] = val_step
        # A classifier's top-1 from the same eval row (MatViT).
        same_row = next((r for r in reversed(metrics) if r.get("step") == val_step
                         and any(k.endswith("/loss") for k in r if k.startswith("eval/"))), {})
        for name in losses:
            if f"eval/{name}/top1" in same_row:
                row[f"val_top1_{name}"] = same_row[f"eval/{name}/top1"]
    row.update(_eval_columns(model_dir) if record.get("eval_status") == "done" else {})
    row["wall_s"] = round(record.get("wall_s", 0.0), 1)
    error = (record.get("error") or "").strip().splitlines()
    row["error"] = error[-1][:300] if error and row["status"] != "done" else ""
    return row


def _eval_columns(model_dir: Path) -> dict:
    """From the newest `matlm eval` results, per submodel: each task's primary metric (the
    number results.md shows first: `eval_<loss task>_<G>` for held-out loss,
    `eval_<task>_<metric>_<G>` otherwise; members of large groups left out, as there) and
    the average accuracy."""
    from matlm.evaluation import report, task_metrics
    from matlm.model_dir import ModelDir
    results_file = ModelDir(model_dir).latest_eval_results()
    if results_file is None:
        return {}
    results = json.loads(results_file.read_text())
    out = {}
    for task in report.shown_tasks(results):
        entry = results["tasks"][task]
        metric = task_metrics.result_primary(entry)
        # A held-out-loss task's name already says "loss" (loss:matlm_wiki).
        prefix = f"eval_{task}_" if entry["kind"] == task_metrics.LOSS else \
            f"eval_{task}_{metric}_"
        out.update({prefix + n: m[metric] for n, m in entry["metrics"].items()})
    out.update({f"eval_acc_{n}": v for n, v in report.average_accuracy(results).items()
                if not math.isnan(v)})
    return out


def _status_from_checkpoints(model_dir: Path, steps: Optional[int]) -> str:
    """The status of a trial that has no trial.json (trained by a launcher on other machines,
    not by this sweep's runner): done once its final checkpoint is saved."""
    from matlm.sweep.runner import DONE, INTERRUPTED, PENDING, final_checkpoint_step
    final = final_checkpoint_step(model_dir)  # None without a checkpoints dir.
    if final is None or steps is None:
        return PENDING
    return DONE if final >= steps else INTERRUPTED


def collect(spec: SweepSpec, trials: Sequence[Trial], base_dir: Path,
            steps_of: Optional[dict] = None) -> list[dict]:
    """Every trial's row; `steps_of` ({trial name: configured steps}) tells a trial run
    elsewhere (no trial.json) that finished from one that stopped early."""
    labels = labels_of(spec)
    return [trial_row(t, base_dir / t.name, labels, (steps_of or {}).get(t.name))
            for t in trials]


def _columns(rows: Sequence[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    # Errors last: they are long.
    return [c for c in columns if c != "error"] + ["error"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}" if abs(value) < 1e6 \
            else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    if isinstance(value, tuple):
        return format_value(value)
    return str(value)


def write_results(rows: Sequence[dict], base_dir: Path, metric: str,
                  axes_labels: Sequence[str], plots: bool = True,
                  sweep_dir=None) -> list[Path]:
    """The CSV, MD and plots, written into the local dir `base_dir`; `sweep_dir` (default
    `base_dir`) is the sweep's dir as the table's heading names it (a gs:// base dir's
    results are staged locally, then uploaded)."""
    base_dir = Path(base_dir)
    columns = _columns(rows)
    written = [base_dir / CSV_FILE, base_dir / MD_FILE]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: (format_value(row[c]) if isinstance(row.get(c), tuple)
                                 else row.get(c, "")) for c in columns})
    written[1].write_text(
        f"# Sweep results ({sweep_dir or base_dir})\n\n{format_table(rows)}\n\n"
        f"Validation losses are each trial's last held-out evaluation (column val_step); "
        f"params per granularity are exact counts (matlm.model.counting).\n")
    if plots:
        written += _plots(rows, base_dir, metric, axes_labels)
    return written


def format_table(rows: Sequence[dict], tablefmt: str = "github") -> str:
    columns = _columns(rows)
    return tabulate([[_cell(r.get(c)) for c in columns] for r in rows], headers=columns,
                    tablefmt=tablefmt, disable_numparse=True)


def metric_value(row: dict, metric: str) -> Optional[float]:
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) and row["status"] == "done" else None


def _plots(rows: Sequence[dict], base_dir: Path, metric: str,
           axes_labels: Sequence[str]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")  # No display on servers.
    import matplotlib.pyplot as plt

    done = [r for r in rows if metric_value(r, metric) is not None]
    written = []
    for label in axes_labels:
        fig, ax = plt.subplots(figsize=(6, 4))
        values = [r[label] for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = values
        else:  # Categorical axis: one tick per distinct value, in first-seen order.
            ticks = list(dict.fromkeys(_cell(v) for v in values))
            xs = [ticks.index(_cell(v)) for v in values]
            ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right")
        ax.scatter(xs, [metric_value(r, metric) for r in done])
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs {label} ({len(done)} trials)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = base_dir / f"{metric}_vs_{label.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    # Against parameters: each trial's granularities as one line (loss of G vs params of G).
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in done:
        names = [k[len("val_loss_"):] for k in row if k.startswith("val_loss_")
                 and f"params_{k[len('val_loss_'):]}" in row]
        names.sort(key=lambda n: row[f"params_{n}"])
        ax.plot([row[f"params_{n}"] for n in names], [row[f"val_loss_{n}"] for n in names],
                "o-", label=row["trial"])
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation loss")
    ax.set_title("final validation loss per granularity vs parameters")
    ax.grid(alpha=0.3)
    if 0 < len(done) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = base_dir / "val_loss_vs_params.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written
