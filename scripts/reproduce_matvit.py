"""The MatViT claims at CPU scale, in one command, built on `matlm sweep` like
scripts/reproduce_matformer.py.

    python scripts/reproduce_matvit.py            # 3 seeds, 300 steps per model (~25 min, 2 CPU cores)
    python scripts/reproduce_matvit.py --quick    # the same pipeline in a few minutes (smoke)

The claims (MatFormer, arXiv 2310.07707, MatViT): every granularity of one MatViT
classifies about as well as an independently trained ViT of that size; Mix'n'Match
submodels lie on the accuracy-vs-parameters line; submodels "preserve the metric-space
structure" for retrieval (Table 8: 1-NN with each model encoding both database and
queries), and so **adaptive retrieval** works: the database encoded once by XL, queries
by a smaller submodel, loses little, while independently trained ViTs used as query
encoders against another model's database fall to near chance.

Per seed (default 0, 1, 2), on the offline mnist_5k (4,000 train / 500 validation
images; configs/runs/matvit_default.gin: 4 layers, d_model 64, 7×7 patches):
  OUT/sweep/          dense_S/M/L/XL: four dense ViTs with d_ff = the S/M/L/XL widths
  OUT/sweep_recipes/  matvit (the paper's joint training, equal weights) and
                      matvit_kd (the same + in-place distillation from XL, weight 0.5)
all on the same images in the same order for the same steps. Then every checkpoint is
scored on the validation images: top-1 of each granularity (and 8 seeded Mix'n'Match
vectors of each MatViT), 1-NN retrieval with the train split as database (cosine,
exact), adaptive retrieval (database by the family's XL: MatViT's own XL, or dense_XL
for the baselines), and the cascade (shortlist with S, re-rank the top k with XL). Each
recipe is compared with the baselines seed by seed (same seed = same data order); the
price is the training FLOPs per image and wall time.

Writes OUT/reproduce.md, OUT/reproduce.json and OUT/top1_vs_params.png; rerunning
resumes (a sweep skips finished trials).
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
sys.path.insert(0, str(REPO / "scripts"))

from reproduce_matformer import _stats, run_sweeps  # noqa: E402  (shared sweep plumbing)

GIN_FILE = "configs/runs/matvit_default.gin"
NAMES = ("S", "M", "L", "XL")
DENSE = tuple(f"dense_{n}" for n in NAMES)
D_FF = 256  # matvit_default's: S/M/L/XL = 32/64/128/256.
SCALES = {
    "full": dict(steps=300, mixes=8, shortlist_ks=(5, 20, 100)),
    "quick": dict(steps=60, mixes=4, shortlist_ks=(5, 20)),
}
RECIPES = {
    "matvit": dict(about="the paper's MatViT: all four granularities every step, equal weights",
                   distill=0.0),
    "matvit_kd": dict(about="matvit + in-place distillation from XL (weight 0.5)", distill=0.5),
}
RULE = ("`better` if the recipe's accuracy is above the baseline's at every seed (paired: "
        "same seed, same data order), `worse` if below at every seed, else `tie`.")


def _spec_yaml(fixed: dict, seeds, axes: dict, names) -> str:
    import yaml
    return yaml.safe_dump({"fixed": fixed, "grid": {"TrainConfig.seed": list(seeds)},
                           "list": axes, "list_names": list(names)}, sort_keys=False)


def _fixed(scale: dict) -> dict:
    return {"TrainConfig.steps": scale["steps"], "TrainConfig.eval_every": 0,
            "TrainConfig.eval_batches": 0, "TrainConfig.checkpoint_every": scale["steps"],
            "TrainConfig.log_every": 25, "TrainConfig.mesh_shape": [1, 1, 1],
            "TrainConfig.warmup_steps": max(scale["steps"] // 10, 1),
            "TrainConfig.granularity_mode": "all"}


def sweep_specs(scale: dict, seeds) -> dict[str, str]:
    """{sweep name: spec YAML}: the dense baselines and the MatViT recipes."""
    widths = [D_FF // 8, D_FF // 4, D_FF // 2, D_FF]
    dense = {"ViTConfig.d_ff": widths, "ViTConfig.granularity_names": [[n] for n in NAMES],
             "TrainConfig.granularity_weights": [[1.0]] * 4,
             "TrainConfig.distill_weight": [0.0] * 4}
    recipes = {"ViTConfig.d_ff": [D_FF] * len(RECIPES),
               "ViTConfig.granularity_names": [list(NAMES)] * len(RECIPES),
               "TrainConfig.granularity_weights": ["uniform"] * len(RECIPES),
               "TrainConfig.distill_weight": [r["distill"] for r in RECIPES.values()]}
    return {"sweep": _spec_yaml(_fixed(scale), seeds, dense, DENSE),
            "sweep_recipes": _spec_yaml(_fixed(scale), seeds, recipes, list(RECIPES))}


def score_trial(model_dir: Path, mixes: int) -> dict:
    """One checkpoint on the validation images and the train split as database:
    {"submodels": {name: {params, widths, top1, top5, flops}}, "predictions": {name: [Q]},
    "db": {name: [N, D]}, "queries": {name: [Q, D]}, "db_labels", "query_labels"}."""
    from matlm.evaluation import image_classification
    from matlm.evaluation.submodels import resolve_submodels
    from matlm.model.counting import forward_flops_per_image
    import matlm.model_dir as model_dir_lib
    from matlm.retrieval.embed import embed_images

    model_dir, run_config = model_dir_lib.open_run(model_dir)
    config, data = run_config.model, run_config.data
    extra = [f"mixnmatch:{mixes}:0"] if len(config.granularities.names) > 1 and mixes else []
    submodels, reference = resolve_submodels(config, None, extra)
    params = model_dir_lib.load_checkpoint_for_inference(model_dir).params
    batches = lambda split: data.eval_iterator(config.image_shape, 250, split=split)
    classified = image_classification.evaluate(
        config, params, batches(data.eval_split), submodels, reference,
        task="validation", progress=False)["tasks"]["validation"]["metrics"]
    widths = {s.name: s.widths for s in submodels}
    database = embed_images(config, params, batches(data.train_split), widths, progress=False)
    queries = embed_images(config, params, batches(data.eval_split), widths, progress=False)
    return {"submodels": {s.name: {"params": s.params, "widths": list(s.widths),
                                   "top1": classified[s.name]["top1"],
                                   "top5": classified[s.name]["top5"],
                                   "flops": forward_flops_per_image(config, s.widths)}
                          for s in submodels},
            "db": database.vectors, "queries": queries.vectors,
            "db_labels": database.labels, "query_labels": queries.labels}


def one_nn(db, q, db_labels, query_labels) -> float:
    from matlm.retrieval.evaluate import one_nn_accuracy
    return one_nn_accuracy(db, db_labels, q, query_labels, metric="cosine")


def verdict(diffs) -> str:
    if all(d > 0 for d in diffs):
        return "better"
    if all(d < 0 for d in diffs):
        return "worse"
    return "tie"


def paired(own: list, dense: list) -> dict:
    diffs = [o - d for o, d in zip(own, dense)]
    return {"own": _stats(own), "dense": _stats(dense),
            "diff": {"mean": float(np.mean(diffs)), "per_seed": diffs}, "verdict": verdict(diffs)}


def analyse(scores: dict, seeds, recipes, scale: dict, costs: dict) -> dict:
    """Classification, Mix'n'Match, retrieval, adaptive retrieval and cascade per recipe,
    each against the dense baselines seed by seed."""
    from matlm.retrieval.evaluate import cascade
    trial = lambda seed, family: scores[f"{family}_seed{seed}"]  # noqa: E731
    dense_top1 = {g: [trial(s, f"dense_{g}")["submodels"][g]["top1"] for s in seeds]
                  for g in NAMES}
    # The baselines' retrieval: each ViT encodes its own database; adaptive: queries by
    # dense_G into dense_XL's database (another model's metric space).
    dense_same, dense_adaptive = {}, {}
    for g in NAMES:
        same, adaptive = [], []
        for s in seeds:
            t, xl = trial(s, f"dense_{g}"), trial(s, "dense_XL")
            same.append(one_nn(t["db"][g], t["queries"][g], t["db_labels"], t["query_labels"]))
            adaptive.append(one_nn(xl["db"]["XL"], t["queries"][g], xl["db_labels"],
                                   t["query_labels"]))
        dense_same[g], dense_adaptive[g] = same, adaptive
    dense_cascade = {k: [cascade(trial(s, "dense_S")["db"]["S"], trial(s, "dense_S")["queries"]["S"],
                                 trial(s, "dense_XL")["db"]["XL"],
                                 trial(s, "dense_XL")["queries"]["XL"],
                                 trial(s, "dense_S")["db_labels"],
                                 trial(s, "dense_S")["query_labels"], k)["accuracy"]
                         for s in seeds] for k in scale["shortlist_ks"]}
    out = {"dense": {"top1": {g: _stats(v) for g, v in dense_top1.items()},
                     "retrieval_same": {g: _stats(v) for g, v in dense_same.items()},
                     "retrieval_adaptive": {g: _stats(v) for g, v in dense_adaptive.items()},
                     "cascade": {k: _stats(v) for k, v in dense_cascade.items()},
                     "params": {g: trial(seeds[0], f"dense_{g}")["submodels"][g]["params"]
                                for g in NAMES}},
           "recipes": {}}
    for family in recipes:
        own = lambda s: trial(s, family)  # noqa: E731
        subs = own(seeds[0])["submodels"]
        cells = {}
        # XL's own 1-NN per seed: what adaptive retrieval with a smaller query encoder loses.
        xl_same = [one_nn(own(s)["db"]["XL"], own(s)["queries"]["XL"], own(s)["db_labels"],
                          own(s)["query_labels"]) for s in seeds]
        for g in NAMES:
            same = [one_nn(own(s)["db"][g], own(s)["queries"][g], own(s)["db_labels"],
                           own(s)["query_labels"]) for s in seeds]
            adaptive = [one_nn(own(s)["db"]["XL"], own(s)["queries"][g], own(s)["db_labels"],
                               own(s)["query_labels"]) for s in seeds]
            cells[g] = {"params": subs[g]["params"], "gflops": subs[g]["flops"] / 1e9,
                        "top1": paired([own(s)["submodels"][g]["top1"] for s in seeds],
                                       dense_top1[g]),
                        "retrieval_same": paired(same, dense_same[g]),
                        "retrieval_adaptive": paired(adaptive, dense_adaptive[g]),
                        "adaptive_loss_vs_xl": _stats([a - x for a, x in zip(adaptive,
                                                                              xl_same)])}
        # Mix'n'Match: mean top-1 over seeds against the granularities' line (+ = above).
        line_p = [cells[g]["params"] for g in NAMES]
        line_a = [cells[g]["top1"]["own"]["mean"] for g in NAMES]
        mixes = []
        for name, sub in subs.items():
            if name in NAMES:
                continue
            top1 = float(np.mean([own(s)["submodels"][name]["top1"] for s in seeds]))
            adaptive = float(np.mean([one_nn(own(s)["db"]["XL"], own(s)["queries"][name],
                                             own(s)["db_labels"], own(s)["query_labels"])
                                      for s in seeds]))
            mixes.append({"name": name, "params": sub["params"], "top1": top1,
                          "adaptive_1nn": adaptive,
                          "above_line": top1 - float(np.interp(sub["params"], line_p, line_a))})
        casc = {k: paired([cascade(own(s)["db"]["S"], own(s)["queries"]["S"], own(s)["db"]["XL"],
                                   own(s)["queries"]["XL"], own(s)["db_labels"],
                                   own(s)["query_labels"], k)["accuracy"] for s in seeds],
                          dense_cascade[k]) for k in scale["shortlist_ks"]}
        verdicts = [cells[g]["top1"]["verdict"] for g in NAMES]
        out["recipes"][family] = {
            "about": RECIPES[family]["about"], "cells": cells, "mixnmatch": mixes,
            "cascade": casc,
            "cascade_gflops": (subs["S"]["flops"] + subs["XL"]["flops"]) / 1e9,
            "counts": {v: verdicts.count(v) for v in ("better", "tie", "worse")},
            "train_gflops_per_image": costs[f"{family}_seed{seeds[0]}"]["train_gflops"],
            "wall_s": float(np.mean([costs[f"{family}_seed{s}"]["wall_s"] for s in seeds]))}
    out["dense"]["train_gflops_per_image"] = {
        g: costs[f"dense_{g}_seed{seeds[0]}"]["train_gflops"] for g in NAMES}
    out["dense"]["wall_s"] = {g: float(np.mean([costs[f"dense_{g}_seed{s}"]["wall_s"]
                                                for s in seeds])) for g in NAMES}
    return out


def trial_cost(model_dir: Path) -> dict:
    """Training GFLOPs per image of the trial's objective, and its wall time."""
    from matlm.model_dir import ModelDir
    from matlm.training.objective import build_objective
    run_config = ModelDir(model_dir).run_config()
    config, train = run_config.model, run_config.train
    per_token = build_objective(config, train).train_flops_per_token(config, train.seq_len)
    record = json.loads((model_dir / "trial.json").read_text())
    return {"train_gflops": per_token * config.num_tokens / 1e9,
            "wall_s": float(record.get("wall_s", 0.0))}


def _pct(stats, digits=1) -> str:
    if stats["std"] is None:
        return f"{100 * stats['mean']:.{digits}f}"
    return f"{100 * stats['mean']:.{digits}f} ± {100 * stats['std']:.{digits}f}"


def report(result: dict, seeds, scale_name: str, scale: dict, wall: float) -> str:
    from tabulate import tabulate
    d = result["dense"]
    lines = [f"# MatViT reproduction ({scale_name} scale: {scale['steps']} steps × 64 mnist_5k "
             f"images per model, seeds {', '.join(map(str, seeds))})", "",
             "Mean ± sample std over seeds, in %; Δ is the recipe minus the baseline of the "
             f"same seed (paired). {RULE}", ""]
    for family, r in result["recipes"].items():
        rows = []
        for g in NAMES:
            c = r["cells"][g]
            rows.append([g, f"{c['params']:,}", _pct(c["top1"]["own"]), _pct(c["top1"]["dense"]),
                         f"{100 * c['top1']['diff']['mean']:+.1f}", c["top1"]["verdict"],
                         _pct(c["retrieval_same"]["own"]), _pct(c["retrieval_same"]["dense"]),
                         _pct(c["retrieval_adaptive"]["own"]),
                         _pct(c["retrieval_adaptive"]["dense"])])
        lines += [f"## {family}: {r['about']}", "",
                  tabulate(rows, headers=["G", "params", "top-1", "dense top-1", "Δ", "verdict",
                                          "1-NN", "dense 1-NN", "adaptive 1-NN (XL db)",
                                          "dense adaptive (dense_XL db)"],
                           tablefmt="github", disable_numparse=True), ""]
        counts = r["counts"]
        mixes = r["mixnmatch"]
        above = [m["above_line"] for m in mixes]
        lines += [f"Top-1 verdicts: {counts['better']} better, {counts['tie']} tie, "
                  f"{counts['worse']} worse of 4."]
        if mixes:
            lines += [f"Mix'n'Match ({len(mixes)} vectors, mean over seeds): top-1 minus the "
                      f"granularities' line, median {100 * float(np.median(above)):+.1f} points "
                      f"(min {100 * min(above):+.1f}, max {100 * max(above):+.1f}); adaptive 1-NN "
                      f"{100 * min(m['adaptive_1nn'] for m in mixes):.1f}–"
                      f"{100 * max(m['adaptive_1nn'] for m in mixes):.1f} %."]
        casc = r["cascade"]
        lines += ["", f"Cascade (shortlist with S, re-rank the top k with XL; "
                      f"{r['cascade_gflops'] * 1e3:.2f} MFLOPs/query of encoders vs XL alone "
                      f"{r['cells']['XL']['gflops'] * 1e3:.2f}):", "",
                  tabulate([[k, _pct(c["own"]), _pct(c["dense"]), f"{100 * c['diff']['mean']:+.1f}"]
                            for k, c in casc.items()],
                           headers=["k", f"{family} 1-NN", "dense_S → dense_XL 1-NN", "Δ"],
                           tablefmt="github", disable_numparse=True), ""]
        dense_total = sum(d["train_gflops_per_image"].values())
        lines += [f"Price: {r['train_gflops_per_image']:.4f} training GFLOPs per image "
                  f"({r['train_gflops_per_image'] / d['train_gflops_per_image']['XL']:.2f} × "
                  f"dense XL, {r['train_gflops_per_image'] / dense_total:.2f} × the four "
                  f"baselines together); {r['wall_s']:.0f} s per trial vs "
                  f"{d['wall_s']['XL']:.0f} s for dense XL and "
                  f"{sum(d['wall_s'].values()):.0f} s for the four baselines.", ""]
    lines += [verdict_text(result), "", f"Total wall time {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def verdict_text(result: dict) -> str:
    """The plain-words verdict, from the numbers above (nothing hand-written here)."""
    parts = []
    for family, r in result["recipes"].items():
        c = r["counts"]
        adaptive_gap = [100 * r["cells"][g]["adaptive_loss_vs_xl"]["mean"] for g in NAMES[:-1]]
        dense_adaptive = [100 * result["dense"]["retrieval_adaptive"][g]["mean"]
                          for g in NAMES[:-1]]
        parts.append(
            f"**{family}**: top-1 {c['better']} better / {c['tie']} tie / {c['worse']} worse "
            f"than the dense ViTs of the same size. Adaptive retrieval (XL database, smaller "
            f"query encoder) changes 1-NN by {min(adaptive_gap):+.1f} to {max(adaptive_gap):+.1f}"
            f" points against XL queries, while dense S/M/L queries into dense XL's database "
            f"reach {min(dense_adaptive):.1f}–{max(dense_adaptive):.1f} % (chance 10 %).")
    return "Verdict. " + " ".join(parts)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = result["dense"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    params = [d["params"][g] for g in NAMES]
    ax.errorbar(params, [100 * d["top1"][g]["mean"] for g in NAMES],
                yerr=[100 * (d["top1"][g]["std"] or 0) for g in NAMES], fmt="o--", color="k",
                label="dense ViTs")
    for family, r in result["recipes"].items():
        cells = r["cells"]
        line = ax.errorbar([cells[g]["params"] for g in NAMES],
                           [100 * cells[g]["top1"]["own"]["mean"] for g in NAMES],
                           yerr=[100 * (cells[g]["top1"]["own"]["std"] or 0) for g in NAMES],
                           fmt="o-", label=family)
        if r["mixnmatch"]:
            ax.scatter([m["params"] for m in r["mixnmatch"]],
                       [100 * m["top1"] for m in r["mixnmatch"]], marker="x",
                       color=line[0].get_color(), label=f"{family} Mix'n'Match")
        bx.plot([cells[g]["params"] for g in NAMES],
                [100 * cells[g]["retrieval_adaptive"]["own"]["mean"] for g in NAMES], "o-",
                label=f"{family}: queries by G, XL database")
    bx.plot(params, [100 * d["retrieval_adaptive"][g]["mean"] for g in NAMES], "o--", color="k",
            label="dense_G queries, dense_XL database")
    bx.plot(params, [100 * d["retrieval_same"][g]["mean"] for g in NAMES], "s:", color="gray",
            label="dense_G queries, own database")
    ax.set(xlabel="parameters", ylabel="validation top-1 (%)", title="classification")
    bx.set(xlabel="query encoder parameters", ylabel="1-NN accuracy (%)",
           title="adaptive retrieval")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute scale")
    parser.add_argument("--out", default=None,
                        help="output dir (default runs/reproduce_matvit[_quick])")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 2)")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time")
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 2:
        parser.error("give at least 2 seeds: the comparison needs a spread")
    out = Path(args.out or REPO / "runs" / f"reproduce_matvit{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.time()
    code, trials = run_sweeps(sweep_specs(scale, seeds), out, args.parallel, gin_file=GIN_FILE)
    if code != 0:
        return code
    print("\nscoring every checkpoint: top-1, embeddings, retrieval ...", flush=True)
    scores, costs = {}, {}
    for name, sweep_trials in trials.items():
        for t in sweep_trials:  # Keyed "<family>_seed<seed>" (trial dirs: seed=S-family).
            key = f"{t.variant}_seed{t.values['TrainConfig.seed']}"
            scores[key] = score_trial(out / name / t.name, scale["mixes"])
            costs[key] = trial_cost(out / name / t.name)
    result = analyse(scores, seeds, list(RECIPES), scale, costs)
    wall = time.time() - start
    (out / "reproduce.json").write_text(json.dumps(
        {"scale": scale_name, **{k: list(v) if isinstance(v, tuple) else v
                                 for k, v in scale.items()},
         "seeds": seeds, **result, "wall_s": wall}, indent=2, default=float) + "\n")
    plot(result, out / "top1_vs_params.png")
    text = report(result, seeds, scale_name, scale, wall)
    (out / "reproduce.md").write_text(text)
    print("\n" + text)
    print(f"wrote reproduce.md, reproduce.json, top1_vs_params.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
