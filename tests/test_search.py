"""`matlm search`: the search finds known optima (exhaustive enumeration is the oracle),
respects the budget, returns a non-dominated front, is reproducible, and refuses bad
input before any model work; end to end on a tiny checkpoint whose later layers' extra
FFN units are zeroed (widening them buys exactly nothing), scored against the dense
reference forward pass."""
import csv
import itertools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.cli.main import main
from matlm.model import ModelConfig, init_params
from matlm.model.counting import forward_flops_per_token, param_count
from matlm.submodels import search as S

# Levels 8/16/32/64 (S/M/L/XL); 4 layers → 256 vectors, small enough to enumerate.
CONFIG = ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, d_ff=64)
LEVELS = (8, 16, 32, 64)


def _depth_weighted(widths_list):
    """A metric (lower is better) whose gains shrink with depth and with width: early
    layers pay most, so the optimum under a budget is front-loaded (decreasing widths),
    which the slowly-growing heuristic family cannot express."""
    weights = np.array([4.0, 2.0, 1.0, 0.5])
    return [float(-(weights * np.log2(np.asarray(w) / 4)).sum()) for w in widths_list]


def _brute_force(budget, metric):
    feasible = [w for w in itertools.product(LEVELS, repeat=4) if budget.fits(CONFIG, w)]
    values = metric(feasible)
    best = min(values)
    return feasible, best, [w for w, v in zip(feasible, values) if v == best]


@pytest.mark.parametrize("kind,limit", [("params", None), ("flops", None)])
def test_evolution_finds_the_known_optimum_and_beats_the_heuristic(kind, limit):
    budget = S.Budget(kind, 0, seq_len=32)
    mid = (64, 32, 16, 8)  # An optimum-shaped vector; its cost is the budget.
    budget = S.Budget(kind, budget.cost(CONFIG, mid), seq_len=32)
    space = S.SearchSpace.build(CONFIG)
    _, best_value, best_vectors = _brute_force(budget, _depth_weighted)
    assert all(list(v) != sorted(v) for v in best_vectors)  # Not in the heuristic's family.
    evo = S.search(space, budget, _depth_weighted, "evolution", max_evals=60, seed=0)
    assert evo.best.metric == best_value and evo.best.widths in best_vectors
    heur = S.search(space, budget, _depth_weighted, "heuristic", max_evals=60, seed=0)
    assert heur.best.metric > best_value
    assert all(list(c.widths) == sorted(c.widths) for c in heur.candidates)


def test_slow_growth_family_matches_its_definition():
    family, truncated = S.slow_growth_family(4, 5)
    expected = [v for v in itertools.product(range(4), repeat=5)
                if all(b - a in (0, 1) for a, b in zip(v, v[1:]))]
    assert sorted(family) == sorted(expected) and not truncated
    assert S.slow_growth_family(64, 30, limit=1000) == (S.slow_growth_family(64, 30, 1000)[0],
                                                         True)


def _dominates(a, b, cost):
    return cost(a) <= cost(b) and a.metric <= b.metric and (cost(a) < cost(b)
                                                           or a.metric < b.metric)


@pytest.mark.parametrize("method", S.METHODS)
@pytest.mark.parametrize("space_name", S.SPACES)
def test_budget_respected_and_front_non_dominated(method, space_name):
    rng = np.random.default_rng(3)
    table = {}

    def noisy(widths_list):  # A metric with no structure: any vector may be on the front.
        return [table.setdefault(w, float(rng.normal())) for w in widths_list]

    space = S.SearchSpace.build(CONFIG, space_name)
    budget = S.Budget("params", param_count(CONFIG, (32, 32, 16, 16)), seq_len=32)
    result = S.search(space, budget, noisy, method, max_evals=40, seed=1)
    assert len(result.candidates) - len(result.uniform) <= 40
    assert len({c.widths for c in result.candidates}) == len(result.candidates)
    for c in result.candidates:
        assert c.params == param_count(CONFIG, c.widths) <= budget.limit
        assert c.flops == forward_flops_per_token(CONFIG, 32, c.widths)
        assert all(w in space.levels for w in c.widths)
    cost = result.cost
    for f in result.front:  # Nothing evaluated beats a front member...
        assert not any(_dominates(c, f, cost) for c in result.candidates)
    for c in result.candidates:  # ... and everything else is dominated or tied by one.
        if c not in result.front:
            assert any(cost(f) <= cost(c) and f.metric <= c.metric for f in result.front)
    best = min(result.candidates, key=lambda c: c.metric)
    assert result.best.metric == best.metric
    assert {c.widths for c in result.uniform} == {(8,) * 4, (16,) * 4}  # 32 does not fit.
    # The wider granularities are scored for the plot only: never candidates or front.
    assert [c.widths for c in result.over_budget] == [(32,) * 4, (64,) * 4]
    assert all(c.params > budget.limit for c in result.over_budget)


def test_same_seed_same_result():
    space = S.SearchSpace.build(CONFIG, "aligned")
    budget = S.Budget("flops", forward_flops_per_token(CONFIG, 32, (40, 24, 16, 8)), 32)

    def run(seed):
        r = S.search(space, budget, _depth_weighted, "evolution", max_evals=30, seed=seed)
        return [(c.widths, c.metric) for c in r.candidates]
    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("call,message", [
    (lambda s: S.search(s, S.Budget("params", param_count(CONFIG, (8,) * 4) - 1, 32),
                        _depth_weighted),
     f"--budget_params={param_count(CONFIG, (8,) * 4) - 1} is below the smallest submodel "
     f"(S in every layer: {param_count(CONFIG, (8,) * 4)} params)"),
    (lambda s: S.search(s, S.Budget("params", 1e9, 32), _depth_weighted, max_evals=0),
     "--max_evals must be an integer >= 1, got 0"),
    (lambda s: S.search(s, S.Budget("params", 1e9, 32), _depth_weighted, method="grid"),
     "--method must be one of heuristic, evolution, got 'grid'"),
    (lambda s: S.SearchSpace.build(CONFIG, "all"), "--space must be one of"),
])
def test_bad_search_input(call, message):
    with pytest.raises(S.SearchError, match=re.escape(message)):
        call(S.SearchSpace.build(CONFIG))


# --- end to end on a checkpoint ----------------------------------------------------------

MODEL = ModelConfig(vocab_size=2048, d_model=32, n_layers=4, n_heads=2, d_ff=64)


def _zero_later_layers(params):
    """Layers 1.. keep only their first S=8 units: wo's rows past 8 are zero, so their
    width changes nothing (exactly: the masked path zeroes the same rows)."""
    params = jax.tree.map(lambda x: x, params)
    for i in range(1, MODEL.n_layers):
        wo = params[f"layer_{i}"]["ffn"]["wo"]
        params[f"layer_{i}"]["ffn"]["wo"] = wo.at[8:].set(0.0)
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, wiki_vocab):
    from matlm.model_dir import save_for_inference
    model_dir = tmp_path_factory.mktemp("model")
    params = _zero_later_layers(init_params(MODEL, jax.random.key(1)))
    save_for_inference(model_dir, MODEL, params, 3, wiki_vocab.sentencepiece_model_file,
                       {"task": "matlm_wiki"})
    return model_dir, params


def _oracle_losses(params, vectors, batches):
    """Held-out loss of each width vector with the dense reference on sliced kernels."""
    from matlm.model.reference import dense_forward, slice_params
    out = {}
    for widths in vectors:
        sliced = slice_params(params, widths)
        nll, count = 0.0, 0.0
        for b in batches:
            logits = dense_forward(MODEL, sliced, jnp.asarray(b["inputs"]),
                                   jnp.asarray(b["segment_ids"]), jnp.asarray(b["positions"]))
            logp = jax.nn.log_softmax(logits, axis=-1)
            logp = np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0]
            mask = b["loss_mask"] > 0
            nll -= float(logp[mask].sum(dtype=np.float64))
            count += float(mask.sum())
        out[widths] = nll / count
    return out


def test_search_end_to_end_finds_the_zeroed_layers_optimum(checkpoint, tmp_path, capsys,
                                                           wiki_vocab):
    from matlm import data
    model_dir, params = checkpoint
    out = tmp_path / "out"
    budget = param_count(MODEL, (64, 8, 8, 8))
    assert main(["search", f"--model_dir={model_dir}", f"--budget_params={budget}",
                 "--max_evals=40", "--eval_batches=2", "--batch_size=3", f"--output={out}",
                 "--no_progress"]) == 0
    printed = capsys.readouterr().out
    # The oracle: the same first 2 validation batches (seq_len 256: the run config has no
    # train section; batch size 3 rounded up to the 8 test devices), every vector (w0, S, S, S) through the dense reference.
    batches = data.make_batch_iterator("matlm_wiki", "validation", 256, 8, wiki_vocab, seed=0,
                                       shuffle=False, repeat=False)
    batches = [batches.batch(s) for s in range(2)]
    vectors = [(w, 8, 8, 8) for w in (8, 16, 32, 64)]
    oracle = _oracle_losses(params, vectors, batches)
    gaps = np.diff(sorted(oracle.values()))
    assert gaps.min() > 1e-4  # Layer 0's width matters: the optimum is not a tie.
    expected_front, best = [], math.inf
    for v in vectors:
        if oracle[v] < best:
            expected_front.append(v)
            best = oracle[v]
    front = list(csv.DictReader((out / "front.csv").open()))
    assert [tuple(int(x) for x in r["widths"].split(",")) for r in front] == expected_front
    for r in front:
        widths = tuple(int(x) for x in r["widths"].split(","))
        assert float(r["metric"]) == pytest.approx(oracle[widths], rel=1e-5)
        assert int(r["params"]) == param_count(MODEL, widths)
    summary = json.loads((out / "best.json").read_text())
    best_vector = min(vectors, key=oracle.get)
    assert summary["best"]["widths"] == ",".join(map(str, best_vector))
    assert summary["compiled_functions"] == 1  # Every candidate through one compile.
    assert "metric_confirm" in summary["best"]
    for r in csv.DictReader((out / "candidates.csv").open()):
        assert int(r["params"]) <= budget
    assert (out / "search.png").stat().st_size > 1000
    assert summary["best"]["widths"] in printed and "--widths=" in printed


@pytest.mark.parametrize("flags,message", [
    (["--budget_params=100"], "--budget_params=100 is below the smallest submodel"),
    (["--budget_params=1e9", "--metric=helaswag"], "--metric='helaswag': unknown task"),
    (["--budget_params=1e9", "--max_evals=0"], "--max_evals must be an integer >= 1, got 0"),
    (["--budget_params=1e9", "--budget_flops=1e9"], "exactly one of --budget_params"),
    ([], "exactly one of --budget_params"),
    (["--budget_flops=-5"], "--budget_flops must be a finite number > 0"),
    (["--budget_params=1e9", "--method=grid"], "--method must be one of heuristic, evolution"),
    (["--budget_params=1e9", "--step=7"], "--step=7: no checkpoint at that step"),
])
def test_bad_input_is_one_line_before_model_work(checkpoint, capsys, no_model_work, eval_tasks,
                                                 flags, message):
    model_dir, _ = checkpoint
    assert main(["search", f"--model_dir={model_dir}", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_and_non_empty_output(checkpoint, tmp_path, capsys, no_model_work):
    assert main(["search", f"--model_dir={tmp_path}/nope", "--budget_params=1e9"]) == 2
    assert "does not exist" in capsys.readouterr().err
    model_dir, _ = checkpoint
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["search", f"--model_dir={model_dir}", "--budget_params=1e9",
                 f"--output={tmp_path}/full"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
