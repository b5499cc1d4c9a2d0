"""The scaling-law fit used by scripts/reproduce_matformer.py recovers known coefficients."""
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


def test_analysis_of_synthetic_scores_gives_the_table_the_verdict_and_the_mix_line():
    """analyse()/report() on made-up scores whose answers are known: per-granularity means
    and spreads, who beats whom, greedy agreement, and a Mix'n'Match point's distance to
    the MatLM line (one on it, one 0.05 above)."""
    from matlm.sweep import spec as spec_lib
    script = _reproduce_script()
    trials = spec_lib.expand(spec_lib.spec_from_dict(
        __import__("yaml").safe_load(script.sweep_spec(script.SCALES["quick"], [0, 1]))))
    params = {"S": 100, "M": 200, "L": 400, "XL": 800}
    dense = {"S": 5.0, "M": 4.8, "L": 4.6, "XL": 4.4}
    matlm = {"S": 4.9, "M": 4.75, "L": 4.62, "XL": 4.5}   # Beats S, M; loses L, XL.
    greedy_xl = np.arange(10)

    def sub(loss, g, seed, agree):
        greedy = greedy_xl.copy()
        greedy[:10 - agree] += 1  # `agree` of 10 positions equal XL's.
        return {"loss": loss + 0.01 * seed, "params": params[g], "non_embedding_params":
                params[g] // 2, "widths": [g], "greedy": greedy}

    scores = {}
    for t in trials:
        seed = t.values["TrainConfig.seed"]
        if t.variant.startswith("dense_"):
            g = t.variant[len("dense_"):]
            scores[t.name] = {g: sub(dense[g], g, seed, 10 if g == "XL" else 6)}
        else:
            shift = 0.0 if t.variant == "matlm" else 0.1
            scores[t.name] = {g: sub(matlm[g] + shift, g, seed, 10 if g == "XL" else 8)
                              for g in params}
            if t.variant == "matlm":
                scores[t.name]["L,M"] = sub(4.685, "L", seed, 7)  # On the M-L line at 300.
                scores[t.name]["L,M"]["params"] = 300
                scores[t.name]["M,S"] = sub(4.875, "M", seed, 7)  # 0.05 above it at 150.
                scores[t.name]["M,S"]["params"] = 150
    result = script.analyse(scores, trials, tokens=1000)
    rows = {r["granularity"]: r for r in result["granularities"]}
    for g in params:
        assert rows[g]["dense_loss"] == pytest.approx(dense[g] + 0.005)
        assert rows[g]["matlm_loss"] == pytest.approx(matlm[g] + 0.005)
        assert rows[g]["matlm_v2_loss"] == pytest.approx(matlm[g] + 0.105)
        assert rows[g]["dense_spread"] == pytest.approx(0.01)
        assert rows[g]["dense_agree_own_xl"] == pytest.approx(1.0 if g == "XL" else 0.6)
        assert rows[g]["matlm_agree_own_xl"] == pytest.approx(1.0 if g == "XL" else 0.8)
    mixes = {m["name"]: m for m in result["mixnmatch"]}
    assert mixes["L,M"]["above_line"] == pytest.approx(0.0, abs=1e-9)
    assert mixes["M,S"]["above_line"] == pytest.approx(0.05)
    text = script.report(result, "quick", 60.0, 120.0)
    assert "matches or beats the baseline at 2 of 4 granularities" in text
    assert "more than the seed spread at 2 (S, M)" in text
    assert "1 of 2 within ±0.02 nats, 1 above it" in text


def test_a_subset_of_families_sweeps_only_those_models_with_their_own_bindings(capsys):
    """--families: the subset's trials carry exactly the bindings the full sweep gives them;
    an unknown name is refused before anything runs."""
    import yaml
    from matlm.sweep import spec as spec_lib
    script = _reproduce_script()
    scale = dict(script.SCALES["full"], steps=600)

    def trials(families=script.FAMILIES):
        spec = spec_lib.spec_from_dict(yaml.safe_load(script.sweep_spec(scale, [0], families)))
        return {t.name: t.bindings for t in spec_lib.expand(spec)}

    every, subset = trials(), trials(["matlm", "dense_XL"])
    assert list(subset) == ["seed=0-matlm", "seed=0-dense_XL"]
    assert all(subset[name] == every[name] for name in subset)
    assert "TrainConfig.steps = 600" in subset["seed=0-dense_XL"]
    assert "ModelConfig.d_ff = 768" in subset["seed=0-dense_XL"]
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--families=matlm,dense_XXL", "--out=/nonexistent/never_created"])
    assert exit_info.value.code == 2 and "dense_XXL" in capsys.readouterr().err
