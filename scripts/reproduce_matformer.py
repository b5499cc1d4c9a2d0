"""The MatFormer paper's central claim at CPU scale, in one command, built on `matlm sweep`.

    python scripts/reproduce_matformer.py            # the full setting (~45-50 min on 2 CPU cores)
    python scripts/reproduce_matformer.py --quick    # the same pipeline at a few-minute scale

The claim (arXiv 2310.07707, Fig. 2 / Table): every MatLM granularity matches or beats an
independently trained model of the same size on the same tokens, and Mix'n'Match
submodels lie on the line between the granularities. One sweep trains, per seed:
  matlm     the MatLM, all four granularities every step (paper v1, loss = mean of 4 CEs)
  matlm_v2  the MatLM, one granularity sampled per step (paper v2)
  dense_S/M/L/XL  four dense baselines with d_ff = the S/M/L/XL widths
all on the same data order and the same number of steps (same tokens per model). Then each
checkpoint is scored on the same held-out sequences: loss of every granularity (and of 20
seeded Mix'n'Match configurations of the MatLM), and greedy next-token agreement
(consistency) of each submodel with its own family's XL and with the baseline XL. The
paper's scaling form loss = a (N D)^b + c is fitted to each family.

Writes OUT/reproduce.md (tables), OUT/reproduce.json, OUT/loss_vs_params.png; the sweep's
trials, sweep_results.csv/.md live in OUT/sweep/. Rerunning resumes (the sweep skips
finished trials).
"""
from __future__ import annotations

import argparse
import json
import math
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
FAMILIES = ("matlm", "matlm_v2", "dense_S", "dense_M", "dense_L", "dense_XL")


def sweep_spec(scale: dict, seeds, families=FAMILIES) -> str:
    """The sweep: seeds (grid) x the models (a named list axis; all six unless `families`
    names a subset), one YAML file."""
    widths = [scale["d_ff"] // 8, scale["d_ff"] // 4, scale["d_ff"] // 2, scale["d_ff"]]
    d_ff = [scale["d_ff"], scale["d_ff"], *widths]
    names = [list(NAMES), list(NAMES), *[[n] for n in NAMES]]
    weights = [[0.25] * 4, [1.0], *[[1.0]] * 4]
    modes = ["all", "sample", *["all"] * 4]
    fixed = {
        "ModelConfig.d_model": scale["d_model"], "ModelConfig.n_layers": scale["n_layers"],
        "ModelConfig.n_heads": scale["n_heads"], "ModelConfig.vocab_size": scale["vocab_size"],
        "TrainConfig.steps": scale["steps"], "TrainConfig.seq_len": scale["seq_len"],
        "TrainConfig.global_batch_size": scale["batch"], "TrainConfig.learning_rate": scale["lr"],
        "TrainConfig.warmup_steps": scale["warmup"], "TrainConfig.eval_every": 0,
        "TrainConfig.eval_batches": 2,
        "TrainConfig.checkpoint_every": scale["steps"], "TrainConfig.log_every": 10,
        "TrainConfig.mesh_shape": [1, 1, 1], "TrainConfig.sample_k": 1,
    }
    import yaml
    keep = [FAMILIES.index(f) for f in families]
    axes = {"ModelConfig.d_ff": d_ff, "ModelConfig.granularity_names": names,
            "TrainConfig.granularity_weights": weights, "TrainConfig.granularity_mode": modes}
    return yaml.safe_dump({
        "fixed": fixed,
        "grid": {"TrainConfig.seed": list(seeds)},
        "list": {k: [v[i] for i in keep] for k, v in axes.items()},
        "list_names": [FAMILIES[i] for i in keep],
    }, sort_keys=False)


def loss_table(scores, trials) -> str:
    """Each trial's held-out loss per granularity (what a run of a subset of the families
    reports: the full comparison needs all six)."""
    from tabulate import tabulate
    rows = [[t.name, *(f"{scores[t.name][g]['loss']:.3f}" if g in scores[t.name] else ""
                       for g in NAMES)] for t in trials]
    return tabulate(rows, headers=["trial", *NAMES], tablefmt="github", disable_numparse=True)


def score_checkpoints(base_dir: Path, trials, eval_sequences: int, seq_len: int, mixes: int):
    """Every trial's submodels on the same held-out sequences: {trial: {submodel: {loss,
    params, widths, greedy}}} (greedy: the next-token argmax at every scored position)."""
    from matlm import data
    from matlm.evaluation import runner
    from matlm.evaluation.scoring import SubmodelScorer
    from matlm.evaluation.submodels import resolve_submodels
    from matlm.training import model_dir as model_dir_lib

    first = model_dir_lib.ModelDir(base_dir / trials[0].name)
    run_config = first.read_run_config()
    vocab = first.vocabulary(fallback=lambda: data.DataConfig(**run_config["data"]).vocabulary())
    options = runner.EvalOptions(max_examples=eval_sequences, batch_size=8, max_len=seq_len,
                                 loss_seq_len=seq_len,
                                 data_task=run_config["data"].get("task", data.DEFAULT_TASK))
    task, = runner.prepare(["loss"], vocab, options)
    out = {}
    for trial in trials:
        loaded = model_dir_lib.load_checkpoint_for_inference(base_dir / trial.name)
        config = loaded.model_config
        # At most the non-uniform vectors that exist (g^L - g: 12 for the quick scale's 2
        # layers, 252 for the full scale's 4).
        available = len(config.granularities.names) ** config.n_layers - \
            len(config.granularities.names)
        extra = [f"mixnmatch:{min(mixes, available)}:0"] if trial.variant == "matlm" else []
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


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.max(values) - np.min(values)) if len(values) > 1 else 0.0


def distance_to_line(line_params, line_losses, params, loss) -> float:
    """loss minus the piecewise-linear loss-vs-params line through the granularities, at
    `params` (the paper: Mix'n'Match submodels lie on that line); > 0 is above it (worse)."""
    order = np.argsort(line_params)
    return float(loss - np.interp(params, np.asarray(line_params)[order],
                                  np.asarray(line_losses)[order]))


def analyse(scores, trials, tokens: int) -> dict:
    from matlm.sweep.scaling import fit_scaling_law
    by = {(t.values["TrainConfig.seed"], t.variant): scores[t.name] for t in trials}
    seeds = sorted({s for s, _ in by})
    rows = []
    for g in NAMES:
        def agree(a, b):
            return float(np.mean(a["greedy"] == b["greedy"]))
        entry = {"granularity": g,
                 "params": by[(seeds[0], f"dense_{g}")][g]["params"]}
        for fam, key in (("dense", lambda s: by[(s, f"dense_{g}")][g]),
                         ("matlm", lambda s: by[(s, "matlm")][g]),
                         ("matlm_v2", lambda s: by[(s, "matlm_v2")][g])):
            entry[f"{fam}_loss"], entry[f"{fam}_spread"] = _mean_spread(
                [key(s)["loss"] for s in seeds])
        entry["matlm_params"] = by[(seeds[0], "matlm")][g]["params"]
        # Consistency: greedy agreement with the family's own XL, and with the baseline XL.
        entry["dense_agree_own_xl"] = _mean_spread(
            [agree(by[(s, f"dense_{g}")][g], by[(s, "dense_XL")]["XL"]) for s in seeds])[0]
        for fam in ("matlm", "matlm_v2"):
            entry[f"{fam}_agree_own_xl"] = _mean_spread(
                [agree(by[(s, fam)][g], by[(s, fam)]["XL"]) for s in seeds])[0]
            entry[f"{fam}_agree_dense_xl"] = _mean_spread(
                [agree(by[(s, fam)][g], by[(s, "dense_XL")]["XL"]) for s in seeds])[0]
        rows.append(entry)
    mixes = {}
    for s in seeds:
        for name, sub in by[(s, "matlm")].items():
            if name not in NAMES:
                mixes.setdefault(name, {"params": sub["params"], "widths": sub["widths"],
                                        "losses": []})["losses"].append(sub["loss"])
    fits = {}
    for fam, key in (("dense", lambda s, g: by[(s, f"dense_{g}")][g]),
                     ("matlm", lambda s, g: by[(s, "matlm")][g]),
                     ("matlm_v2", lambda s, g: by[(s, "matlm_v2")][g])):
        points = [key(s, g) for s in seeds for g in NAMES]
        try:
            # N = non-embedding parameters (Kaplan et al.): at this scale the shared
            # embedding is most of every model and would squeeze the S..XL range of N.
            fit = fit_scaling_law([p["non_embedding_params"] for p in points],
                                  [tokens] * len(points),
                                  [p["loss"] for p in points])
            fits[fam] = {"a": fit.a, "b": fit.b, "c": fit.c, "rmse": fit.rmse,
                         "points": fit.points}
        except (ValueError, RuntimeError) as e:  # curve_fit: RuntimeError if no convergence.
            fits[fam] = {"error": str(e)}
    line = ([r["matlm_params"] for r in rows], [r["matlm_loss"] for r in rows])
    mixnmatch = []
    for name, m in mixes.items():
        loss = float(np.mean(m["losses"]))
        mixnmatch.append({"name": name, "params": m["params"], "widths": m["widths"],
                          "loss": loss, "above_line": distance_to_line(*line, m["params"], loss)})
    return {"seeds": seeds, "tokens_per_model": tokens, "granularities": rows,
            "mixnmatch": mixnmatch, "fits": fits}


def report(result: dict, scale_name: str, wall_s: float, train_s: float) -> str:
    from tabulate import tabulate
    f = lambda v, d=3: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    rows = []
    for r in result["granularities"]:
        rows.append([r["granularity"], f"{r['params']:,}",
                     f"{f(r['dense_loss'])} ± {f(r['dense_spread'])}",
                     f"{f(r['matlm_loss'])} ± {f(r['matlm_spread'])}",
                     f"{f(r['matlm_v2_loss'])} ± {f(r['matlm_v2_spread'])}",
                     f"{r['matlm_loss'] - r['dense_loss']:+.3f}",
                     f(r["dense_agree_own_xl"]), f(r["matlm_agree_own_xl"]),
                     f(r["matlm_agree_dense_xl"])])
    table = tabulate(rows, headers=[
        "granularity", "params", "baseline loss", "MatLM loss", "MatLM-v2 loss",
        "MatLM - baseline", "baseline agree w/ baseline XL", "MatLM agree w/ MatLM XL",
        "MatLM agree w/ baseline XL"], tablefmt="github", disable_numparse=True)
    # b pinned at a bound of the fit (0 or -10) means the points do not determine a, b, c.
    fits = tabulate([[fam, *(f"{fit[k]:.4g}" for k in ("a", "b", "c", "rmse")),
                      "b at its bound: not determined" if fit["b"] > -1e-6 or fit["b"] < -9.999
                      else ""]
                     if "error" not in fit else [fam, fit["error"], "", "", "", ""]
                     for fam, fit in result["fits"].items()],
                    headers=["family", "a", "b", "c", "rmse", "note"], tablefmt="github",
                    disable_numparse=True)
    beats = [r for r in result["granularities"]
             if r["matlm_loss"] <= r["dense_loss"]]
    beyond_noise = [r for r in beats if r["dense_loss"] - r["matlm_loss"]
                    > max(r["dense_spread"] or 0, r["matlm_spread"] or 0)]
    mixes = sorted(result["mixnmatch"], key=lambda m: m["above_line"])
    distances = np.array([m["above_line"] for m in mixes])
    mix_table = tabulate([[m["name"], f"{m['params']:,}", f"{m['loss']:.3f}",
                           f"{m['above_line']:+.3f}"] for m in mixes],
                         headers=["Mix'n'Match (layer granularities)", "params", "MatLM loss",
                                  "vs the S-M-L-XL line"], tablefmt="github",
                         disable_numparse=True)
    verdict = (f"MatLM (v1) matches or beats the baseline at {len(beats)} of 4 granularities, "
               f"by more than the seed spread at {len(beyond_noise)} "
               f"({', '.join(r['granularity'] for r in beyond_noise) or 'none'}).")
    return (f"# MatFormer reproduction ({scale_name} scale)\n\n"
            f"Seeds {result['seeds']}, {result['tokens_per_model']:,} training tokens per model, "
            f"trials' training wall time {train_s / 60:.1f} min (summed over trials), this "
            f"invocation {wall_s / 60:.1f} min. Loss: held-out cross entropy (nats/token), mean "
            f"± spread (max - min) over seeds; agreement: fraction of held-out positions with "
            f"the same greedy next token.\n\n{table}\n\n{verdict}\n\n"
            f"Scaling fit loss = a (N D)^b + c per family (N non-embedding params, D tokens; "
            f"every point has the same D here, so the fit is in N alone; 4 sizes x seeds for "
            f"3 coefficients):\n\n{fits}\n\n"
            f"{len(mixes)} Mix'n'Match submodels of the MatLM: params "
            f"{min(m['params'] for m in mixes):,}–{max(m['params'] for m in mixes):,}, loss "
            f"{min(m['loss'] for m in mixes):.3f}–{max(m['loss'] for m in mixes):.3f} "
            f"(loss_vs_params.png); their loss minus the MatLM granularities' "
            f"loss-vs-params line at their size: median {np.median(distances):+.3f}, "
            f"{int(np.sum(np.abs(distances) <= 0.02))} of {len(mixes)} within ±0.02 nats, "
            f"{int(np.sum(distances > 0.02))} above it:\n\n{mix_table}\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["granularities"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar([r["params"] for r in rows], [r["dense_loss"] for r in rows],
                yerr=[r["dense_spread"] / 2 for r in rows], fmt="s-", label="dense baselines")
    for fam, marker in (("matlm", "o-"), ("matlm_v2", "^--")):
        ax.errorbar([r["matlm_params"] for r in rows], [r[f"{fam}_loss"] for r in rows],
                    yerr=[r[f"{fam}_spread"] / 2 for r in rows], fmt=marker,
                    label="MatLM v1 (all)" if fam == "matlm" else "MatLM v2 (sampled)")
    for r in rows:
        ax.annotate(r["granularity"], (r["params"], r["dense_loss"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    mixes = result["mixnmatch"]
    ax.scatter([m["params"] for m in mixes], [m["loss"] for m in mixes], marker="x",
               color="tab:red", label="MatLM Mix'n'Match")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out loss")
    ax.set_title("MatLM submodels vs independently trained baselines (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute scale")
    parser.add_argument("--out", default=None, help="output dir (default runs/reproduce[_quick])")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (>= 2 for a spread)")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time")
    parser.add_argument("--mixes", type=int, default=20, help="Mix'n'Match configurations")
    parser.add_argument("--steps", type=int, default=None,
                        help="train steps per model (default: the scale's); use a new --out")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="comma-separated subset of the models; fewer than all six "
                             "reports each trial's losses instead of the comparison")
    args = parser.parse_args(argv)
    scale_name = "quick" if args.quick else "full"
    scale = dict(SCALES[scale_name])
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        scale.update(steps=args.steps)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        parser.error(f"--families: unknown {unknown or 'empty'}; expected names from "
                     f"{', '.join(FAMILIES)}")
    families = [f for f in FAMILIES if f in families]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out or REPO / "runs" / f"reproduce{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "sweep.yaml"
    spec_file.write_text(sweep_spec(scale, seeds, families))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.time()
    from matlm.cli.main import main as matlm_main
    code = matlm_main(["sweep", "--gin_file=configs/runs/default.gin", f"--sweep={spec_file}",
                       f"--base_dir={out / 'sweep'}", f"--parallel={args.parallel}"])
    if code != 0:
        print(f"reproduce: the sweep did not finish (exit {code}); see {out / 'sweep'}",
              file=sys.stderr)
        return code
    from matlm.sweep import spec as spec_lib
    trials = spec_lib.expand(spec_lib.load_spec(spec_file))
    print("\nscoring every checkpoint on the same held-out sequences ...", flush=True)
    scores = score_checkpoints(out / "sweep", trials, scale["eval_sequences"], scale["seq_len"],
                               args.mixes)
    tokens = scale["steps"] * scale["batch"] * scale["seq_len"]
    if len(families) < len(FAMILIES):
        text = (f"# MatFormer reproduction ({scale_name} scale, {', '.join(families)} only)\n\n"
                f"{tokens:,} training tokens per model; held-out loss (nats/token):\n\n"
                f"{loss_table(scores, trials)}\n")
        (out / "reproduce.md").write_text(text)
        print("\n" + text)
        return 0
    result = analyse(scores, trials, tokens)
    wall = time.time() - start
    (out / "reproduce.json").write_text(json.dumps({"scale": scale_name, **scale, **result,
                                                    "wall_s": wall}, indent=2) + "\n")
    plot(result, out / "loss_vs_params.png")
    train_s = sum(json.loads((out / "sweep" / t.name / "trial.json").read_text())["wall_s"]
                  for t in trials)
    text = report(result, scale_name, wall, train_s)
    (out / "reproduce.md").write_text(text)
    print("\n" + text)
    print(f"wrote reproduce.md, reproduce.json, loss_vs_params.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
