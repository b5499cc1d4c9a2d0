"""The MatFormer claim at CPU scale as an objective ablation, in one command, built on
`matlm sweep`.

    python scripts/reproduce_matformer.py            # the full setting (~2 h for 3 seeds, estimate)
    python scripts/reproduce_matformer.py --quick    # the same pipeline at a few-minute scale

The claim (arXiv 2310.07707, Fig. 2 / Table): every MatLM granularity matches or beats an
independently trained model of the same size on the same tokens, and Mix'n'Match
submodels lie on the line between the granularities. Per seed (default 0, 1, 2) two
sweeps train:
  OUT/sweep/          dense_S/M/L/XL: four dense baselines with d_ff = the S/M/L/XL widths
  OUT/sweep_recipes/  one MatLM per recipe of RECIPES below (default: matlm = paper v1,
                      matlm_t6 = v1 with the paper's Table-6 weights, matlm_t6_kd = that
                      plus in-place distillation, sandwich_kd = largest + smallest + one
                      sampled granularity per step with distillation; matlm_v2 on request)
all on the same data order and the same number of steps (same tokens per model). Then each
checkpoint is scored on the same held-out sequences: loss of every granularity (and of 20
seeded Mix'n'Match configurations of each MatLM), and greedy next-token agreement
(consistency) of each submodel with its own family's XL and with the baseline XL. Each
recipe is compared with the baselines seed by seed (same seed = same data order), and its
price is shown: training FLOPs per token and wall time relative to one dense XL. The
paper's scaling form loss = a (N D)^b + c is fitted to each family.

Time (estimate, 2 CPU cores, --parallel=2): a baseline trial ~6.5 min, a v1-style recipe
trial ~11 min, so 12 baseline + 12 recipe trials for 3 seeds are ~2 h, plus scoring.

Writes OUT/reproduce.md (tables), OUT/reproduce.json, OUT/loss_vs_params.png; the sweeps'
trials and sweep_results.csv/.md live in OUT/sweep/ and OUT/sweep_recipes/ (specs
OUT/sweep.yaml, OUT/sweep_recipes.yaml). Rerunning resumes (a sweep skips finished trials).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NAMES = ("S", "M", "L", "XL")
# Model and run per scale. `full`: a little larger than tiny (d_model 192 vs 128, d_ff 768
# vs 512) and long enough for losses to separate beyond seed noise. `quick`: the pipeline
# end to end in minutes (losses still falling: a smoke run, not evidence).
SCALES = {
    "full": dict(d_model=192, n_layers=4, n_heads=6, d_ff=768, vocab_size=8192, steps=300,
                 seq_len=128, batch=16, lr=3e-3, warmup=30, eval_sequences=128),
    "quick": dict(d_model=64, n_layers=2, n_heads=2, d_ff=256, vocab_size=8192, steps=60,
                  seq_len=64, batch=8, lr=3e-3, warmup=6, eval_sequences=32),
}
DENSE = ("dense_S", "dense_M", "dense_L", "dense_XL")
# The MatLM recipes compared with the dense baselines: adding one is one entry. `weights`
# is a list (one λ per granularity in mode "all", per slot otherwise) or a preset name
# that TrainConfig.granularity_weights resolves ('uniform', 'paper_table6'). Mode
# "sandwich" trains the largest + the smallest + sample_k - 2 sampled others every step.
RECIPES = {
    "matlm": dict(about="paper v1: all four granularities every step, equal weights",
                  weights=[0.25] * 4, mode="all", sample_k=1, distill=0.0, temperature=1.0),
    "matlm_v2": dict(about="paper v2: one granularity sampled per step", default=False,
                     weights=[1.0], mode="sample", sample_k=1, distill=0.0, temperature=1.0),
    "matlm_t6": dict(about="v1 with the paper's Table-6 granularity weights",
                     weights="paper_table6", mode="all", sample_k=1, distill=0.0,
                     temperature=1.0),
    "matlm_kd": dict(about="v1 (equal weights) + in-place distillation from XL (weight 0.5)",
                     weights=[0.25] * 4, mode="all", sample_k=1, distill=0.5, temperature=1.0),
    "matlm_t6_kd": dict(about="matlm_t6 + in-place distillation from XL (weight 0.5)",
                        weights="paper_table6", mode="all", sample_k=1, distill=0.5,
                        temperature=1.0),
    "matlm_t6_kd1": dict(about="matlm_t6, students learn from XL only (weight 1: the "
                               "in-place distillation of US-Nets/BigNAS)",
                         weights="paper_table6", mode="all", sample_k=1, distill=1.0,
                         temperature=1.0),
    "sandwich_kd": dict(about="XL + S + 1 sampled other per step, distillation 0.5",
                        weights="uniform", mode="sandwich", sample_k=3, distill=0.5,
                        temperature=1.0),
}
# Recipe key -> the binding it sets (the recipe sweep's list axes after d_ff and names).
RECIPE_BINDINGS = {"weights": "TrainConfig.granularity_weights",
                   "mode": "TrainConfig.granularity_mode", "sample_k": "TrainConfig.sample_k",
                   "distill": "TrainConfig.distill_weight",
                   "temperature": "TrainConfig.distill_temperature"}
FAMILIES = (*DENSE, *RECIPES)
DEFAULT_FAMILIES = (*DENSE, *(r for r, spec in RECIPES.items() if spec.get("default", True)))
VERDICTS = ("better", "tie (within seed noise)", "worse")
RULE = ("A cell is `better` if the recipe's loss is below the baseline's at every seed "
        "(paired: same seed, same data order), `worse` if above at every seed, else "
        "`tie (within seed noise)`.")


def _fixed(scale: dict) -> dict:
    """The bindings every trial of both sweeps shares (the baselines' also fix sample_k)."""
    return {
        "ModelConfig.d_model": scale["d_model"], "ModelConfig.n_layers": scale["n_layers"],
        "ModelConfig.n_heads": scale["n_heads"], "ModelConfig.vocab_size": scale["vocab_size"],
        "TrainConfig.steps": scale["steps"], "TrainConfig.seq_len": scale["seq_len"],
        "TrainConfig.global_batch_size": scale["batch"], "TrainConfig.learning_rate": scale["lr"],
        "TrainConfig.warmup_steps": scale["warmup"], "TrainConfig.eval_every": 0,
        "TrainConfig.eval_batches": 2,
        "TrainConfig.checkpoint_every": scale["steps"], "TrainConfig.log_every": 10,
        "TrainConfig.mesh_shape": [1, 1, 1], "TrainConfig.sample_k": 1,
    }


def _spec_yaml(fixed: dict, seeds, axes: dict, names) -> str:
    import yaml
    return yaml.safe_dump({"fixed": fixed, "grid": {"TrainConfig.seed": list(seeds)},
                           "list": axes, "list_names": list(names)}, sort_keys=False)


def baseline_spec(scale: dict, seeds, families=DENSE) -> str:
    """The dense baselines' sweep: seeds (grid) x the models (a named list axis). Its
    trials' bindings must not change: a sweep refuses a trial dir run with other ones."""
    widths = [scale["d_ff"] // 8, scale["d_ff"] // 4, scale["d_ff"] // 2, scale["d_ff"]]
    axes = {"ModelConfig.d_ff": widths, "ModelConfig.granularity_names": [[n] for n in NAMES],
            "TrainConfig.granularity_weights": [[1.0]] * 4,
            "TrainConfig.granularity_mode": ["all"] * 4}
    keep = [DENSE.index(f) for f in families]
    return _spec_yaml(_fixed(scale), seeds, {k: [v[i] for i in keep] for k, v in axes.items()},
                      [DENSE[i] for i in keep])


def recipe_spec(scale: dict, seeds, families) -> str:
    """The MatLM recipes' sweep: the baselines' fixed bindings, sample_k among the axes."""
    fixed = {k: v for k, v in _fixed(scale).items() if k != "TrainConfig.sample_k"}
    axes = {"ModelConfig.d_ff": [scale["d_ff"]] * len(families),
            "ModelConfig.granularity_names": [list(NAMES) for _ in families]}
    for key, binding in RECIPE_BINDINGS.items():
        axes[binding] = [RECIPES[f][key] for f in families]
    return _spec_yaml(fixed, seeds, axes, families)


def sweep_specs(scale: dict, seeds, families) -> dict[str, str]:
    """{name: spec YAML} of the sweeps a selection needs; spec OUT/<name>.yaml, trials in
    OUT/<name>/: `sweep` (the baselines, where today's runs live), `sweep_recipes`."""
    dense = [f for f in DENSE if f in families]
    recipes = [f for f in RECIPES if f in families]
    return {**({"sweep": baseline_spec(scale, seeds, dense)} if dense else {}),
            **({"sweep_recipes": recipe_spec(scale, seeds, recipes)} if recipes else {})}


def loss_table(scores, trials) -> str:
    """Each trial's held-out loss per granularity (what a run of a subset of the families
    reports: the comparison needs the four baselines and a recipe)."""
    from tabulate import tabulate
    rows = [[t.name, *(f"{scores[t.name][g]['loss']:.3f}" if g in scores[t.name] else ""
                       for g in NAMES)] for t in trials]
    return tabulate(rows, headers=["trial", *NAMES], tablefmt="github", disable_numparse=True)


def score_checkpoints(base_dir: Path, trials, eval_sequences: int, seq_len: int, mixes: int):
    """Every trial's submodels on the same held-out sequences: {trial: {submodel: {loss,
    params, widths, greedy}}} (greedy: the next-token argmax at every scored position).
    Recipes (all four granularities) also score `mixes` Mix'n'Match configurations."""
    from matlm.evaluation import runner
    from matlm.evaluation.scoring import SubmodelScorer
    from matlm.evaluation.submodels import resolve_submodels
    import matlm.model_dir as model_dir_lib

    first = model_dir_lib.ModelDir(base_dir / trials[0].name)
    run_config = first.run_config()
    vocab = first.vocabulary(fallback=lambda: run_config.data.vocabulary())
    options = runner.EvalOptions(max_examples=eval_sequences, batch_size=8, max_len=seq_len,
                                 loss_seq_len=seq_len, data_task=run_config.data.task)
    task, = runner.prepare(["loss"], vocab, options)
    out = {}
    for trial in trials:
        loaded = model_dir_lib.load_checkpoint_for_inference(base_dir / trial.name)
        config = loaded.model_config
        # At most the non-uniform vectors that exist (g^L - g: 12 for the quick scale's 2
        # layers, 252 for the full scale's 4).
        available = len(config.granularities.names) ** config.n_layers - \
            len(config.granularities.names)
        extra = [f"mixnmatch:{min(mixes, available)}:0"] if trial.variant in RECIPES else []
        submodels, _ = resolve_submodels(config, None, extra, None)
        scorer = SubmodelScorer(config, loaded.params, options.batch_size, seq_len, masked=True)
        out[trial.name] = {}
        for sub in submodels:
            nll, tokens, greedy = 0.0, 0.0, []
            for batch in task.batches:
                logp_BT, greedy_BT = scorer.token_logprobs(batch, sub.widths)
                mask_BT = batch["loss_mask"] > 0
                nll -= float(logp_BT[mask_BT].sum(dtype=np.float64))
                tokens += float(mask_BT.sum())
                greedy.append(greedy_BT[mask_BT])
            out[trial.name][sub.name] = {"loss": nll / tokens, "params": sub.params,
                                         "non_embedding_params": sub.non_embedding_params,
                                         "widths": list(sub.widths),
                                         "greedy": np.concatenate(greedy)}
    return out


def train_flops_per_token(model_dir: Path, seq_len: int) -> tuple[float | None, str]:
    """(training FLOPs per token of the trial's objective, a note): the library's count
    from the saved configs; None and why where the saved train config does not build."""
    from matlm.model_dir import ModelDir
    from matlm.training.objective import build_objective
    try:
        run_config = ModelDir(model_dir).run_config()
        model_config, train_config = run_config.model, run_config.train
        dropped = [name for name in run_config.unknown_fields if name.startswith("train.")]
        note = (f"saved fields this TrainConfig lacks, ignored: {', '.join(dropped)}"
                if dropped else "")
        objective = build_objective(model_config, train_config)
        return float(objective.train_flops_per_token(model_config, seq_len)), note
    except Exception as e:  # noqa: BLE001 — a report column, not worth failing the run.
        return None, f"FLOPs not computed ({type(e).__name__}: {e})"


def trial_costs(base_dir: Path, trials, seq_len: int) -> dict:
    """{trial: {flops_per_token, wall_s, note}} from each trial's model dir and trial.json."""
    out = {}
    for t in trials:
        flops, note = train_flops_per_token(base_dir / t.name, seq_len)
        record = json.loads((base_dir / t.name / "trial.json").read_text())
        out[t.name] = {"flops_per_token": flops, "wall_s": record.get("wall_s", 0.0),
                       "note": note}
    return out


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.max(values) - np.min(values)) if len(values) > 1 else 0.0


def _stats(values) -> dict:
    """Mean, spread (max - min), sample std (None for one value), min, max."""
    mean, spread = _mean_spread(values)
    return {"mean": mean, "spread": spread,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "min": float(np.min(values)), "max": float(np.max(values))}


def distance_to_line(line_params, line_losses, params, loss) -> float:
    """loss minus the piecewise-linear loss-vs-params line through the granularities, at
    `params` (the paper: Mix'n'Match submodels lie on that line); > 0 is above it (worse)."""
    order = np.argsort(line_params)
    return float(loss - np.interp(params, np.asarray(line_params)[order],
                                  np.asarray(line_losses)[order]))


def _agreement(a, b) -> float:
    return float(np.mean(a["greedy"] == b["greedy"]))


def verdict(diffs) -> str:
    """RULE: better / worse only when every seed's paired difference says so."""
    if all(d < 0 for d in diffs):
        return VERDICTS[0]
    if all(d > 0 for d in diffs):
        return VERDICTS[2]
    return VERDICTS[1]


def compare_cell(own, dense) -> dict:
    """One (recipe, granularity) cell: the recipe's submodels and the baselines, one per
    seed in the same seed order, so the differences are paired."""
    diffs = [o["loss"] - d["loss"] for o, d in zip(own, dense)]
    return {"params": own[0]["params"], "loss": _stats([o["loss"] for o in own]),
            "diff": {"mean": float(np.mean(diffs)), "min": float(min(diffs)),
                     "max": float(max(diffs)), "per_seed": [float(d) for d in diffs]},
            "seeds_at_or_below": int(sum(d <= 0 for d in diffs)), "verdict": verdict(diffs)}


def mixnmatch(by, seeds, family, cells) -> dict:
    """The family's Mix'n'Match submodels (mean loss over seeds) and their distance to the
    family's own S-M-L-XL loss-vs-params line."""
    line = ([cells[g]["params"] for g in NAMES], [cells[g]["loss"]["mean"] for g in NAMES])
    mixes = {}
    for s in seeds:
        for name, sub in by[(s, family)].items():
            if name not in NAMES:
                mixes.setdefault(name, {"params": sub["params"], "widths": sub["widths"],
                                        "losses": []})["losses"].append(sub["loss"])
    points = []
    for name, m in mixes.items():
        loss = float(np.mean(m["losses"]))
        points.append({"name": name, "params": m["params"], "widths": m["widths"],
                       "loss": loss, "above_line": distance_to_line(*line, m["params"], loss)})
    distances = np.array([p["above_line"] for p in points])
    return {"mixnmatch": points,
            "mix_median": float(np.median(distances)) if points else None,
            "mix_within_002": int(np.sum(np.abs(distances) <= 0.02)),
            "mix_above_002": int(np.sum(distances > 0.02))}


def analyse_family(by, seeds, family) -> dict:
    """A recipe against the baselines: per granularity its loss, the paired differences
    and their verdict, consistency; then its counts, mean difference and Mix'n'Match."""
    dense = lambda s, g: by[(s, f"dense_{g}")][g]  # noqa: E731
    own = lambda s, g: by[(s, family)][g]  # noqa: E731
    cells = {}
    for g in NAMES:
        cells[g] = compare_cell([own(s, g) for s in seeds], [dense(s, g) for s in seeds])
        cells[g]["agree_own_xl"] = float(np.mean([_agreement(own(s, g), own(s, "XL"))
                                                  for s in seeds]))
        cells[g]["agree_dense_xl"] = float(np.mean([_agreement(own(s, g), dense(s, "XL"))
                                                    for s in seeds]))
    diffs = {g: cells[g]["diff"]["mean"] for g in NAMES}
    worst = max(diffs, key=diffs.get)
    return {"about": RECIPES[family]["about"], "granularities": cells,
            "counts": {v: sum(c["verdict"] == v for c in cells.values()) for v in VERDICTS},
            "mean_diff": float(np.mean(list(diffs.values()))),
            "worst": {"granularity": worst, "diff": diffs[worst]},
            **mixnmatch(by, seeds, family, cells)}


def price(costs: dict, trials) -> dict:
    """Per family: training FLOPs per token relative to one dense XL, and the training
    wall time summed over its trials (seeds) with its ratio to dense_XL's. `dense (all
    four)`: the four baselines together, the alternative a MatLM replaces."""
    groups = {}
    for t in trials:
        groups.setdefault(t.variant, []).append(costs[t.name])
    out = {}
    for family, group in groups.items():
        flops = [c["flops_per_token"] for c in group]  # The same for every seed.
        out[family] = {"flops_per_token": None if None in flops else float(np.mean(flops)),
                       "wall_s": float(sum(c["wall_s"] for c in group)),
                       "notes": sorted({c.get("note", "") for c in group} - {""})}
    dense = [out[f] for f in DENSE]
    out["dense (all four)"] = {
        "flops_per_token": None if any(d["flops_per_token"] is None for d in dense)
        else sum(d["flops_per_token"] for d in dense),
        "wall_s": sum(d["wall_s"] for d in dense), "notes": []}
    xl = out["dense_XL"]
    for entry in out.values():
        entry["flops_vs_dense_xl"] = (None if entry["flops_per_token"] is None
                                      or not xl["flops_per_token"]
                                      else entry["flops_per_token"] / xl["flops_per_token"])
        entry["wall_vs_dense_xl"] = entry["wall_s"] / xl["wall_s"] if xl["wall_s"] else None
    return out


def scaling_fits(by, seeds, tokens, recipes) -> dict:
    from matlm.sweep.scaling import fit_scaling_law
    fits = {}
    for fam in ("dense", *recipes):
        points = [by[(s, f"dense_{g}" if fam == "dense" else fam)][g]
                  for s in seeds for g in NAMES]
        try:
            # N = non-embedding parameters (Kaplan et al.): at this scale the shared
            # embedding is most of every model and would squeeze the S..XL range of N.
            fit = fit_scaling_law([p["non_embedding_params"] for p in points],
                                  [tokens] * len(points), [p["loss"] for p in points])
            fits[fam] = {"a": fit.a, "b": fit.b, "c": fit.c, "rmse": fit.rmse,
                         "points": fit.points}
        except (ValueError, RuntimeError) as e:  # curve_fit: RuntimeError if no convergence.
            fits[fam] = {"error": str(e)}
    return fits


def analyse(scores, trials, tokens: int, costs: dict) -> dict:
    """The comparison, from every trial's scores and its costs ({trial: {flops_per_token,
    wall_s}}, injectable so that the analysis needs no checkpoints)."""
    by = {(t.values["TrainConfig.seed"], t.variant): scores[t.name] for t in trials}
    seeds = sorted({s for s, _ in by})
    recipes = [f for f in RECIPES if any(v == f for _, v in by)]
    dense = lambda s, g: by[(s, f"dense_{g}")][g]  # noqa: E731
    baseline = {g: {"params": dense(seeds[0], g)["params"],
                    "loss": _stats([dense(s, g)["loss"] for s in seeds]),
                    "agree_dense_xl": float(np.mean([_agreement(dense(s, g), dense(s, "XL"))
                                                     for s in seeds]))} for g in NAMES}
    families = {f: analyse_family(by, seeds, f) for f in recipes}
    return {"seeds": seeds, "tokens_per_model": tokens, "rule": RULE, "baseline": baseline,
            "families": families, "best": min(families, key=lambda f: families[f]["mean_diff"]),
            "price": price(costs, trials), "fits": scaling_fits(by, seeds, tokens, recipes)}


def _f(v, d=3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def _loss_cell(stats) -> str:
    return f"{_f(stats['mean'])} ± {_f(stats['spread'])} (sd {_f(stats['std'])})"


def _comparison_table(result) -> str:
    from tabulate import tabulate
    n = len(result["seeds"])
    rows = []
    for fam, entry in result["families"].items():
        for g, c in entry["granularities"].items():
            d = c["diff"]
            rows.append([fam, g, f"{c['params']:,}", _loss_cell(result["baseline"][g]["loss"]),
                         _loss_cell(c["loss"]),
                         f"{d['mean']:+.3f} [{d['min']:+.3f}..{d['max']:+.3f}]",
                         f"{c['seeds_at_or_below']}/{n}", c["verdict"]])
    return tabulate(rows, headers=["recipe", "granularity", "params", "baseline loss",
                                   "recipe loss", "recipe - baseline (paired) [min..max]",
                                   "seeds recipe <= baseline", "verdict"],
                    tablefmt="github", disable_numparse=True)


def summary_table(result) -> str:
    """One row per recipe, one column per granularity: the paired difference to the
    baseline (mean [min..max] over seeds) and the cell's verdict; the baselines' losses
    first. The comparison at a glance, as the README shows it."""
    from tabulate import tabulate
    mark = {VERDICTS[0]: "better", VERDICTS[1]: "tie", VERDICTS[2]: "worse"}
    rows = [["dense baselines (loss)", *(_loss_cell(result["baseline"][g]["loss"])
                                         for g in NAMES), ""]]
    for fam, entry in result["families"].items():
        cells = entry["granularities"]
        rows.append([fam, *(f"{_signed(cells[g]['diff']['mean'])} "
                            f"[{_signed(cells[g]['diff']['min'])}..{_signed(cells[g]['diff']['max'])}]"
                            f" {mark[cells[g]['verdict']]}" for g in NAMES),
                     _signed(entry["mean_diff"])])
    return tabulate(rows, headers=["recipe − baseline", *NAMES, "mean"], tablefmt="github",
                    disable_numparse=True)


def _consistency_table(result) -> str:
    from tabulate import tabulate
    families = result["families"]
    rows = [[g, _f(result["baseline"][g]["agree_dense_xl"]),
             *(f"{_f(e['granularities'][g]['agree_own_xl'])} "
               f"({_f(e['granularities'][g]['agree_dense_xl'])})" for e in families.values())]
            for g in NAMES]
    return tabulate(rows, headers=["granularity", "baseline w/ baseline XL",
                                   *(f"{f} w/ own XL (w/ baseline XL)" for f in families)],
                    tablefmt="github", disable_numparse=True)


def _price_table(result) -> str:
    from tabulate import tabulate
    rows = [[fam, _f(p["flops_vs_dense_xl"], 2), f"{p['wall_s'] / 60:.1f}",
             _f(p["wall_vs_dense_xl"], 2), "; ".join(p["notes"])]
            for fam, p in result["price"].items()]
    return tabulate(rows, headers=["family", "train FLOPs/token vs one dense XL",
                                   "train wall (min, all seeds)", "wall vs dense_XL", "note"],
                    tablefmt="github", disable_numparse=True)


def _mix_tables(result) -> tuple[str, str]:
    """Per family: the Mix'n'Match summary; the best recipe's points one by one."""
    from tabulate import tabulate
    summary = tabulate(
        [[fam, len(e["mixnmatch"]), _signed(e["mix_median"]), e["mix_within_002"],
          e["mix_above_002"]]
         for fam, e in result["families"].items()],
        headers=["recipe", "Mix'n'Match submodels", "median vs own S-M-L-XL line",
                 "within ±0.02", "above +0.02"], tablefmt="github", disable_numparse=True)
    best = result["families"][result["best"]]
    points = tabulate([[m["name"], f"{m['params']:,}", f"{m['loss']:.3f}",
                        f"{m['above_line']:+.3f}"]
                       for m in sorted(best["mixnmatch"], key=lambda m: m["above_line"])],
                      headers=["Mix'n'Match (layer granularities)", "params", "loss",
                               "vs the S-M-L-XL line"], tablefmt="github",
                      disable_numparse=True)
    return summary, points


def _fits_table(result) -> str:
    from tabulate import tabulate
    # b pinned at a bound of the fit (0 or -10) means the points do not determine a, b, c.
    return tabulate([[fam, *(f"{fit[k]:.4g}" for k in ("a", "b", "c", "rmse")),
                      "b at its bound: not determined" if fit["b"] > -1e-6 or fit["b"] < -9.999
                      else ""]
                     if "error" not in fit else [fam, fit["error"], "", "", "", ""]
                     for fam, fit in result["fits"].items()],
                    headers=["family", "a", "b", "c", "rmse", "note"], tablefmt="github",
                    disable_numparse=True)


def verdict_text(result) -> str:
    lines = [f"- {fam}: better at {e['counts'][VERDICTS[0]]}, tie at {e['counts'][VERDICTS[1]]}, "
             f"worse at {e['counts'][VERDICTS[2]]} of 4 granularities; mean recipe - baseline "
             f"{e['mean_diff']:+.3f}" for fam, e in result["families"].items()]
    best = result["families"][result["best"]]
    return ("\n".join(lines) + f"\n\nBest recipe by recipe - baseline averaged over the four "
            f"granularities: {result['best']} ({best['mean_diff']:+.3f}; its worst granularity "
            f"{best['worst']['granularity']} at {best['worst']['diff']:+.3f}).")


def report(result: dict, scale_name: str, wall_s: float, train_s: float) -> str:
    mix_summary, mix_points = _mix_tables(result)
    return (f"# MatFormer objective ablation ({scale_name} scale)\n\n"
            f"Seeds {result['seeds']}, {result['tokens_per_model']:,} training tokens per model, "
            f"trials' training wall time {train_s / 60:.1f} min (summed over trials), this "
            f"invocation {wall_s / 60:.1f} min. Loss: held-out cross entropy (nats/token), mean "
            f"± spread (max - min) over seeds, sd the sample standard deviation. "
            f"{result['rule']}\n\n{summary_table(result)}\n\n{_comparison_table(result)}"
            f"\n\n## Verdict\n\n"
            f"{verdict_text(result)}\n\n## Price\n\nTraining FLOPs per token of each family's "
            f"objective (the library's count: one joint pass for mode 'all', the expected "
            f"passes of a sampled or sandwich step, distillation included) relative to one "
            f"dense XL; `dense (all four)` is the four baselines together, what one MatLM "
            f"replaces. Wall: the trials' training time summed over seeds (trials shared the "
            f"cores, so it is indicative).\n\n{_price_table(result)}\n\n"
            f"## Consistency\n\nFraction of held-out positions with the same greedy next token "
            f"(mean over seeds):\n\n{_consistency_table(result)}\n\n## Mix'n'Match\n\n"
            f"Each recipe's Mix'n'Match submodels (mean loss over seeds) minus its own "
            f"granularities' loss-vs-params line at their size (> 0: above, worse):\n\n"
            f"{mix_summary}\n\nThose of {result['best']} (loss_vs_params.png):\n\n"
            f"{mix_points}\n\n## Scaling fits\n\n"
            f"loss = a (N D)^b + c per family (N non-embedding params, D tokens; every point "
            f"has the same D here, so the fit is in N alone; 4 sizes x seeds for 3 "
            f"coefficients):\n\n{_fits_table(result)}\n")


def _errorbar(ax, params, stats, fmt, label) -> str:
    """Means with min..max bars; returns the line's colour."""
    bars = ax.errorbar(params, [s["mean"] for s in stats],
                yerr=[[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]],
                fmt=fmt, capsize=3, label=label)
    return bars.lines[0].get_color()


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    base = result["baseline"]
    _errorbar(ax, [base[g]["params"] for g in NAMES], [base[g]["loss"] for g in NAMES], "ks-",
              "dense baselines")
    colours = {}
    for fam, entry in result["families"].items():
        cells = entry["granularities"]
        colours[fam] = _errorbar(ax, [cells[g]["params"] for g in NAMES],
                                 [cells[g]["loss"] for g in NAMES], "o--", fam)
    for g in NAMES:
        ax.annotate(g, (base[g]["params"], base[g]["loss"]["mean"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    mixes = result["families"][result["best"]]["mixnmatch"]
    ax.scatter([m["params"] for m in mixes], [m["loss"] for m in mixes], marker="x",
               color=colours[result["best"]], label=f"{result['best']} Mix'n'Match")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out loss")
    ax.set_title("MatLM recipes vs independently trained baselines (mean, min..max over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_families(parser, text: str) -> list[str]:
    families = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        parser.error(f"--families: unknown {unknown or 'empty'}; expected names from "
                     f"{', '.join(FAMILIES)}")
    return [f for f in FAMILIES if f in families]


def run_sweeps(specs: dict, out: Path, parallel: int,
               gin_file: str = "configs/runs/default.gin") -> tuple[int, dict]:
    """Each sweep in turn (baselines first) through `matlm sweep` on the run `gin_file`:
    (exit code, {sweep name: its trials}); the first failing sweep's code stops the rest."""
    from matlm.cli.main import main as matlm_main
    from matlm.sweep import spec as spec_lib
    trials = {}
    for name, text in specs.items():
        spec_file = out / f"{name}.yaml"
        spec_file.write_text(text)
        code = matlm_main(["sweep", f"--gin_file={gin_file}",
                           f"--sweep={spec_file}", f"--base_dir={out / name}",
                           f"--parallel={parallel}"])
        if code != 0:
            print(f"reproduce: the sweep {spec_file.name} did not finish (exit {code}); see "
                  f"{out / name}", file=sys.stderr)
            return code, trials
        trials[name] = spec_lib.expand(spec_lib.load_spec(spec_file))
    return 0, trials


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute scale")
    parser.add_argument("--out", default=None, help="output dir (default runs/reproduce[_quick])")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds (>= 2 for a spread)")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time")
    parser.add_argument("--mixes", type=int, default=20,
                        help="Mix'n'Match configurations per recipe")
    parser.add_argument("--steps", type=int, default=None,
                        help="train steps per model (default: the scale's); use a new --out")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                        help=f"comma-separated models, from {', '.join(FAMILIES)}; without "
                             "the four dense baselines and a recipe it reports each trial's "
                             "losses instead of the comparison")
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = dict(SCALES[scale_name])
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        scale.update(steps=args.steps)
    families = parse_families(parser, args.families)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out or REPO / "runs" / f"reproduce{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.time()
    code, trials = run_sweeps(sweep_specs(scale, seeds, families), out, args.parallel)
    if code != 0:
        return code
    print("\nscoring every checkpoint on the same held-out sequences ...", flush=True)
    scores, costs = {}, {}
    for name, sweep_trials in trials.items():
        scores.update(score_checkpoints(out / name, sweep_trials, scale["eval_sequences"],
                                        scale["seq_len"], args.mixes))
        costs.update(trial_costs(out / name, sweep_trials, scale["seq_len"]))
    every = [t for sweep_trials in trials.values() for t in sweep_trials]
    tokens = scale["steps"] * scale["batch"] * scale["seq_len"]
    if not (set(DENSE) <= set(families) and set(RECIPES) & set(families)):
        text = (f"# MatFormer reproduction ({scale_name} scale, {', '.join(families)} only)\n\n"
                f"{tokens:,} training tokens per model; held-out loss (nats/token):\n\n"
                f"{loss_table(scores, every)}\n")
        (out / "reproduce.md").write_text(text)
        print("\n" + text)
        return 0
    result = analyse(scores, every, tokens, costs)
    wall = time.time() - start
    (out / "reproduce.json").write_text(json.dumps({"scale": scale_name, **scale, **result,
                                                    "wall_s": wall}, indent=2) + "\n")
    plot(result, out / "loss_vs_params.png")
    text = report(result, scale_name, wall, sum(c["wall_s"] for c in costs.values()))
    (out / "reproduce.md").write_text(text)
    print("\n" + text)
    print(f"wrote reproduce.md, reproduce.json, loss_vs_params.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
