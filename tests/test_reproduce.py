"""The scaling-law fit used by scripts/reproduce_matformer.py recovers known coefficients."""
import json

import numpy as np
import pytest

from matlm.sweep.scaling import fit_scaling_law


@pytest.mark.parametrize("a, b, c", [(40.0, -0.08, 2.5), (2.0e3, -0.25, 3.1), (7.0, -0.05, 0.0)])
def test_fit_recovers_known_coefficients(a, b, c):
    n = np.array([1.4e6, 1.5e6, 1.7e6, 2.1e6, 4.0e6, 9.0e6])
    d = np.array([4e6, 4e6, 4e6, 4e6, 8e6, 8e6])
    loss = a * (n * d) ** b + c
    fit = fit_scaling_law(n, d, loss)
    np.testing.assert_allclose([fit.a, fit.b, fit.c], [a, b, c], rtol=1e-4, atol=1e-6)
    assert fit.rmse < 1e-8


def test_fit_under_noise_stays_close_and_needs_three_points():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e6, 1e9, 12)
    d = np.full_like(n, 1e8)
    loss = 300.0 * (n * d) ** -0.12 + 1.8 + rng.normal(0, 1e-3, n.size)
    fit = fit_scaling_law(n, d, loss)
    assert abs(fit.b + 0.12) < 0.02 and abs(fit.c - 1.8) < 0.1
    assert fit.rmse < 2e-3
    with pytest.raises(ValueError, match="needs >= 3 distinct"):
        fit_scaling_law([1e6, 1e6, 2e6], [1e8] * 3, [3.0, 3.0, 2.9])


def _reproduce_script():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_matformer.py"
    spec = importlib.util.spec_from_file_location("reproduce_matformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- The ablation script: spec generation and analysis (no training). --------------------
def _todays_sweep_spec(scale: dict, seeds, families) -> str:
    """Frozen copy of the script's sweep_spec before the objective ablation: the dense
    baselines of runs/ablation/sweep were started with it, and a sweep refuses (or would
    rerun) a trial dir recorded with other bindings. Do not update it."""
    NAMES = ("S", "M", "L", "XL")  # noqa: N806 — as the script spelled it.
    all_families = ("matlm", "matlm_v2", "dense_S", "dense_M", "dense_L", "dense_XL")
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
    keep = [all_families.index(f) for f in families]
    axes = {"ModelConfig.d_ff": d_ff, "ModelConfig.granularity_names": names,
            "TrainConfig.granularity_weights": weights, "TrainConfig.granularity_mode": modes}
    return yaml.safe_dump({
        "fixed": fixed,
        "grid": {"TrainConfig.seed": list(seeds)},
        "list": {k: [v[i] for i in keep] for k, v in axes.items()},
        "list_names": [all_families[i] for i in keep],
    }, sort_keys=False)


# seed=0-dense_XL at the full scale as the script gave it before the ablation (captured).
DENSE_XL_SEED0_BINDINGS = [
    "ModelConfig.d_model = 192", "ModelConfig.n_layers = 4", "ModelConfig.n_heads = 6",
    "ModelConfig.vocab_size = 8192", "TrainConfig.steps = 300", "TrainConfig.seq_len = 128",
    "TrainConfig.global_batch_size = 16", "TrainConfig.learning_rate = 0.003",
    "TrainConfig.warmup_steps = 30", "TrainConfig.eval_every = 0", "TrainConfig.eval_batches = 2",
    "TrainConfig.checkpoint_every = 300", "TrainConfig.log_every = 10",
    "TrainConfig.mesh_shape = (1, 1, 1)", "TrainConfig.sample_k = 1", "TrainConfig.seed = 0",
    "ModelConfig.d_ff = 768", "ModelConfig.granularity_names = ('XL',)",
    "TrainConfig.granularity_weights = (1.0,)", "TrainConfig.granularity_mode = 'all'"]


def _trials(text: str):
    import yaml
    from matlm.sweep import spec as spec_lib
    return spec_lib.expand(spec_lib.spec_from_dict(yaml.safe_load(text)))


def _all_trials(script, scale, seeds, families):
    return [t for text in script.sweep_specs(scale, seeds, families).values()
            for t in _trials(text)]


# Synthetic scores with known answers. Baseline loss at seed s: BASE[g] + 0.01 s; a
# recipe's loss at seed s: the baseline's + DIFFS[recipe][g][s] (paired differences).
PARAMS = {"S": 100, "M": 200, "L": 400, "XL": 800}
BASE = {"S": 5.0, "M": 4.8, "L": 4.6, "XL": 4.4}
DIFFS = {
    # S: all below -> better; M: seed 2 flips sign -> tie; L, XL: all above -> worse.
    "matlm": {"S": [-0.05] * 3, "M": [-0.03, -0.02, 0.01], "L": [0.02] * 3, "XL": [0.04] * 3},
    "matlm_t6": {"S": [-0.02] * 3, "M": [-0.01] * 3, "L": [-0.01] * 3, "XL": [-0.005] * 3},
    "sandwich_kd": {g: [0.1] * 3 for g in PARAMS},
}
# Mix'n'Match points: name -> (params, between which granularities (midpoint), offset above
# the family's own line). matlm: on it and 0.05 above; matlm_t6: 0.03 below and 0.01 above.
MIXES = {"matlm": {"L,M": (300, ("M", "L"), 0.0), "M,S": (150, ("S", "M"), 0.05)},
         "matlm_t6": {"L,M": (300, ("M", "L"), -0.03), "M,S": (150, ("S", "M"), 0.01)}}
FLOPS = {"dense_S": 1.0, "dense_M": 2.0, "dense_L": 4.0, "dense_XL": 8.0, "matlm": 15.0,
         "matlm_t6": 15.0, "sandwich_kd": 12.0}
WALL = {"dense_S": 10.0, "dense_M": 20.0, "dense_L": 40.0, "dense_XL": 100.0, "matlm": 180.0,
        "matlm_t6": 190.0, "sandwich_kd": 150.0}


def _synthetic(script):
    seeds = [0, 1, 2]
    trials = _all_trials(script, script.SCALES["quick"], seeds,
                         [*script.DENSE, "matlm", "matlm_t6", "sandwich_kd"])
    greedy_xl = np.arange(10)

    def sub(loss, params, agree):
        greedy = greedy_xl.copy()
        greedy[:10 - agree] += 1  # `agree` of 10 positions equal XL's.
        return {"loss": loss, "params": params, "non_embedding_params": params // 2,
                "widths": [params], "greedy": greedy}

    scores, costs = {}, {}
    for t in trials:
        s, fam = t.values["TrainConfig.seed"], t.variant
        costs[t.name] = {"flops_per_token": FLOPS[fam], "wall_s": WALL[fam]}
        if fam in script.DENSE:
            g = fam[len("dense_"):]
            scores[t.name] = {g: sub(BASE[g] + 0.01 * s, PARAMS[g], 10 if g == "XL" else 6)}
            continue
        agree = {"matlm": 8, "matlm_t6": 9, "sandwich_kd": 7}[fam]
        own = {g: BASE[g] + 0.01 * s + DIFFS[fam][g][s] for g in PARAMS}
        scores[t.name] = {g: sub(own[g], PARAMS[g], 10 if g == "XL" else agree) for g in PARAMS}
        for name, (params, (a, b), offset) in MIXES.get(fam, {}).items():
            scores[t.name][name] = sub((own[a] + own[b]) / 2 + offset, params, 5)
    return scores, trials, costs


def test_analysis_of_synthetic_scores_gives_the_table_the_verdicts_the_price_and_mixes():
    """analyse()/report() on made-up scores whose answers are known: means, spreads and
    sample std over 3 seeds, paired differences (one seed flipping sign is a tie), the
    verdict per cell and per recipe, the best recipe, Mix'n'Match against each family's
    own line, and the price columns from the injected FLOPs and wall times."""
    script = _reproduce_script()
    scores, trials, costs = _synthetic(script)
    result = script.analyse(scores, trials, tokens=1000, costs=costs)
    for g in PARAMS:
        base = result["baseline"][g]
        assert base["loss"]["mean"] == pytest.approx(BASE[g] + 0.01)
        assert base["loss"]["spread"] == pytest.approx(0.02)
        assert base["loss"]["std"] == pytest.approx(0.01)
        assert base["agree_dense_xl"] == pytest.approx(1.0 if g == "XL" else 0.6)
    assert list(result["families"]) == ["matlm", "matlm_t6", "sandwich_kd"]
    matlm = result["families"]["matlm"]["granularities"]
    assert matlm["S"]["loss"]["mean"] == pytest.approx(4.96)
    assert matlm["M"]["diff"]["per_seed"] == pytest.approx([-0.03, -0.02, 0.01])
    assert matlm["M"]["diff"]["mean"] == pytest.approx(-0.04 / 3)
    assert (matlm["M"]["diff"]["min"], matlm["M"]["diff"]["max"]) == pytest.approx((-0.03, 0.01))
    assert matlm["M"]["loss"]["spread"] == pytest.approx(0.06)  # 4.77, 4.79, 4.83
    assert matlm["M"]["seeds_at_or_below"] == 2
    assert [matlm[g]["verdict"] for g in PARAMS] == [
        "better", "tie (within seed noise)", "worse", "worse"]
    assert matlm["S"]["agree_own_xl"] == pytest.approx(0.8)
    assert matlm["XL"]["agree_own_xl"] == pytest.approx(1.0)
    assert matlm["S"]["agree_dense_xl"] == pytest.approx(0.8)
    counts = {f: e["counts"] for f, e in result["families"].items()}
    assert counts["matlm"] == {"better": 1, "tie (within seed noise)": 1, "worse": 2}
    assert counts["matlm_t6"] == {"better": 4, "tie (within seed noise)": 0, "worse": 0}
    assert counts["sandwich_kd"] == {"better": 0, "tie (within seed noise)": 0, "worse": 4}
    assert result["best"] == "matlm_t6"
    t6 = result["families"]["matlm_t6"]
    assert t6["mean_diff"] == pytest.approx(-0.01125)
    assert t6["worst"] == {"granularity": "XL", "diff": pytest.approx(-0.005)}
    # Mix'n'Match: each against its own family's line (not the baselines').
    for fam, mixes in MIXES.items():
        got = {m["name"]: m["above_line"] for m in result["families"][fam]["mixnmatch"]}
        assert got == pytest.approx({n: offset for n, (_, _, offset) in mixes.items()})
    assert result["families"]["matlm"]["mix_median"] == pytest.approx(0.025)
    assert result["families"]["matlm_t6"]["mix_median"] == pytest.approx(-0.01)
    assert result["families"]["matlm"]["mix_within_002"] == 1
    assert result["families"]["matlm_t6"]["mix_above_002"] == 0
    assert result["families"]["sandwich_kd"]["mixnmatch"] == []
    # The price: FLOPs per token vs one dense XL (8), wall summed over 3 seeds vs dense_XL's.
    price = result["price"]
    assert price["dense_XL"]["flops_vs_dense_xl"] == pytest.approx(1.0)
    assert price["matlm"]["flops_vs_dense_xl"] == pytest.approx(15 / 8)
    assert price["sandwich_kd"]["flops_vs_dense_xl"] == pytest.approx(1.5)
    assert price["dense (all four)"]["flops_vs_dense_xl"] == pytest.approx(15 / 8)
    assert price["matlm"]["wall_s"] == pytest.approx(540.0)
    assert price["matlm"]["wall_vs_dense_xl"] == pytest.approx(1.8)
    assert price["dense (all four)"]["wall_vs_dense_xl"] == pytest.approx(510 / 300)
    text = script.report(result, "quick", 60.0, 120.0)
    assert script.RULE in text
    assert ("- matlm: better at 1, tie at 1, worse at 2 of 4 granularities; mean recipe - "
            "baseline -0.001") in text
    assert "- sandwich_kd: better at 0, tie at 0, worse at 4" in text
    assert "matlm_t6 (-0.011; its worst granularity XL at -0.005)" in text
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")}

    def row(section, *cells):  # The first table row of `section` starting with `cells`.
        return next(line for line in sections[section].splitlines()
                    if [c.strip() for c in line.split("|")[1:1 + len(cells)]] == list(cells))

    first = next(iter(sections))
    # The summary table (first): one row per recipe, the paired difference per granularity.
    assert "| -0.013 [-0.030..+0.010] tie " in row(first, "matlm")
    assert row(first, "matlm_t6").rstrip().endswith("| -0.011 |")
    assert "-0.013 [-0.030..+0.010] " in row(first, "matlm", "M")
    assert "| 2/3 " in row(first, "matlm", "M")
    assert "tie (within seed noise)" in row(first, "matlm", "M")
    assert "| better " in row(first, "matlm_t6", "XL") and "| worse " in row(first, "matlm", "L")
    assert "| 1.88 " in row("Price", "dense (all four)")
    assert "| 1.70 " in row("Price", "dense (all four)")
    assert "| 1.50 " in row("Price", "sandwich_kd")
    assert "| 9.0 " in row("Price", "matlm")  # 540 s summed over 3 seeds
    assert "| +0.025 " in row("Mix'n'Match", "matlm", "2")
    assert "| -0.010 " in row("Mix'n'Match", "matlm_t6", "2")
    json.dumps(result)  # reproduce.json: machine readable as is.


def test_a_failing_cost_read_is_a_blank_not_a_crash(tmp_path):
    """A trial whose saved train config does not build gives FLOPs None and says why."""
    script = _reproduce_script()
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"model": {"d_model": 64}, "train": {"granularity_weights": "no_such_preset",
                                             "field_from_the_future": 1}}))
    flops, note = script.train_flops_per_token(tmp_path, 64)
    assert flops is None and "FLOPs not computed" in note
    scores, trials, costs = _synthetic(script)
    for name in costs:
        if "sandwich_kd" in name:
            costs[name]["flops_per_token"] = None
    result = script.analyse(scores, trials, tokens=1000, costs=costs)
    assert result["price"]["sandwich_kd"]["flops_vs_dense_xl"] is None
    assert "| sandwich_kd " in script.report(result, "quick", 1.0, 1.0)


@pytest.mark.parametrize("scale_name", ["full", "quick"])
def test_the_baselines_keep_todays_bindings_and_the_recipes_carry_theirs(scale_name):
    """The dense baselines' spec is byte for byte what the script wrote before the ablation
    (the running sweep in runs/ablation/sweep depends on it); the recipes sweep apart with
    the same fixed bindings but sample_k, and each trial carries its recipe."""
    script = _reproduce_script()
    scale = script.SCALES[scale_name]
    specs = script.sweep_specs(scale, [0, 1, 2], script.DEFAULT_FAMILIES)
    assert list(specs) == ["sweep", "sweep_recipes"]
    assert specs["sweep"] == _todays_sweep_spec(scale, [0, 1, 2], script.DENSE)
    before = {t.name: t.bindings for t in _trials(_todays_sweep_spec(scale, [0, 1, 2],
                                                                     script.DENSE))}
    baselines = {t.name: t.bindings for t in _trials(specs["sweep"])}
    assert list(baselines) == list(before) and baselines == before
    if scale_name == "full":
        assert baselines["seed=0-dense_XL"] == DENSE_XL_SEED0_BINDINGS
    recipes = {t.name: t for t in _trials(specs["sweep_recipes"])}
    assert list(recipes)[:6] == ["seed=0-matlm", "seed=0-matlm_t6", "seed=0-matlm_kd",
                                 "seed=0-matlm_t6_kd", "seed=0-matlm_t6_kd1",
                                 "seed=0-sandwich_kd"] and len(recipes) == 18
    dense_fixed = _trials(specs["sweep"])[0].fixed
    assert recipes["seed=1-matlm"].fixed == {k: v for k, v in dense_fixed.items()
                                             if k != "TrainConfig.sample_k"}
    kd, sandwich = recipes["seed=0-matlm_t6_kd"].bindings, recipes["seed=2-sandwich_kd"].bindings
    assert "TrainConfig.granularity_weights = 'paper_table6'" in kd
    assert "TrainConfig.distill_weight = 0.5" in kd and "TrainConfig.seed = 0" in kd
    assert "TrainConfig.distill_weight = 0.0" in recipes["seed=0-matlm_t6"].bindings
    assert "TrainConfig.granularity_mode = 'sandwich'" in sandwich
    assert "TrainConfig.sample_k = 3" in sandwich and "TrainConfig.seed = 2" in sandwich
    assert "TrainConfig.granularity_weights = 'uniform'" in sandwich
    assert "TrainConfig.granularity_weights = (0.25, 0.25, 0.25, 0.25)" in \
        recipes["seed=0-matlm"].bindings
    assert f"ModelConfig.d_ff = {scale['d_ff']}" in sandwich
    assert "ModelConfig.granularity_names = ('S', 'M', 'L', 'XL')" in sandwich
    assert "matlm_v2" in script.FAMILIES and "matlm_v2" not in script.DEFAULT_FAMILIES


def test_a_subset_of_families_sweeps_only_those_models_with_their_own_bindings(capsys):
    """--families: the subset's trials carry exactly the bindings the full sweep gives them;
    an unknown name is refused before anything runs."""
    script = _reproduce_script()
    scale = dict(script.SCALES["full"], steps=600)

    def trials(families):
        return {t.name: t.bindings for t in _all_trials(script, scale, [0], families)}

    every = trials(script.FAMILIES)
    subset = trials(["matlm_t6_kd", "dense_XL"])
    assert list(subset) == ["seed=0-dense_XL", "seed=0-matlm_t6_kd"]
    assert all(subset[name] == every[name] for name in subset)
    assert "TrainConfig.steps = 600" in subset["seed=0-dense_XL"]
    assert "ModelConfig.d_ff = 768" in subset["seed=0-dense_XL"]
    assert list(script.sweep_specs(scale, [0], ["dense_S"])) == ["sweep"]
    assert list(script.sweep_specs(scale, [0], ["matlm_v2"])) == ["sweep_recipes"]
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--families=matlm,dense_XXL", "--out=/nonexistent/never_created"])
    assert exit_info.value.code == 2 and "dense_XXL" in capsys.readouterr().err


def test_main_runs_the_baseline_sweep_as_today_then_the_recipes_and_stops_on_a_failure(
        tmp_path, monkeypatch, capsys):
    """The baselines go through the very `matlm sweep` command of before (spec OUT/sweep.yaml,
    trials in OUT/sweep); the recipes' sweep follows; a failing sweep's exit code returns."""
    import matlm.cli.main as cli
    script = _reproduce_script()
    calls = []

    def fake_sweep(argv):
        calls.append(argv)
        return 0 if len(calls) == 1 else 7

    monkeypatch.setattr(cli, "main", fake_sweep)
    assert script.main([f"--out={tmp_path}", "--quick", "--parallel=2"]) == 7
    assert calls == [
        ["sweep", "--gin_file=configs/runs/default.gin", f"--sweep={tmp_path / 'sweep.yaml'}",
         f"--base_dir={tmp_path / 'sweep'}", "--parallel=2"],
        ["sweep", "--gin_file=configs/runs/default.gin",
         f"--sweep={tmp_path / 'sweep_recipes.yaml'}",
         f"--base_dir={tmp_path / 'sweep_recipes'}", "--parallel=2"]]
    assert (tmp_path / "sweep.yaml").read_text() == _todays_sweep_spec(
        script.SCALES["quick"], [0, 1, 2], script.DENSE)
    assert "sweep_recipes.yaml did not finish (exit 7)" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 3)
    assert script.main([f"--out={tmp_path}", "--quick"]) == 3 and len(calls) == 1
