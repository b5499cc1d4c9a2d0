"""matlm sweep: spec expansion and naming, bad specs refused before any trial runs, and one
4-trial sweep of tiny runs (one failing) with its results and a rerun that runs nothing."""
import csv
import itertools
import json
import math
import re

import pytest

from matlm.cli.main import main as matlm_main
from matlm.sweep import spec as spec_lib
from matlm.sweep.spec import SweepSpecError

YAML = """
base_dir: runs/sweeps/x
seed: 3
fixed: {TrainConfig.steps: 4}
grid:
  TrainConfig.learning_rate: [1e-3, 3.0e-3]
  ModelConfig.d_ff: [256, 512]
list:
  ModelConfig.d_model: [64, 128, 256]
  ModelConfig.n_heads: [2, 4, 8]
random:
  TrainConfig.weight_decay: {uniform: [0.0, 0.1]}
  TrainConfig.warmup_steps: {choice: [1, 2]}
  TrainConfig.clip_grad_norm: {log_uniform: [0.1, 10.0]}
num_random: 2
labels: {TrainConfig.learning_rate: lr}
"""

GIN = """
# The same spec, gin-style.
base_dir = 'runs/sweeps/x'
seed = 3
fixed.TrainConfig.steps = 4
grid.TrainConfig.learning_rate = [1e-3, 3e-3]
grid.ModelConfig.d_ff = [256,
                         512]   # values may span lines
list.ModelConfig.d_model = [64, 128, 256]
list.ModelConfig.n_heads = [2, 4, 8]
random.TrainConfig.weight_decay = {'uniform': (0.0, 0.1)}
random.TrainConfig.warmup_steps = {'choice': [1, 2]}
random.TrainConfig.clip_grad_norm = {'log_uniform': (0.1, 10.0)}
num_random = 2
labels.TrainConfig.learning_rate = 'lr'
"""


def load(tmp_path, text, suffix=".yaml"):
    path = tmp_path / f"sweep{suffix}"
    path.write_text(text)
    return spec_lib.load_spec(path)


def test_grid_list_random_expand_into_the_product_with_readable_names(tmp_path):
    spec = load(tmp_path, YAML)
    trials = spec_lib.expand(spec)
    assert len(trials) == 2 * 2 * 3 * 2
    # Independent enumeration of the product: grid outermost, list zipped, random draws last.
    expected = [(lr, dff, dm, nh, k) for lr, dff in itertools.product([1e-3, 3e-3], [256, 512])
                for dm, nh in [(64, 2), (128, 4), (256, 8)] for k in range(2)]
    for trial, (lr, dff, dm, nh, k) in zip(trials, expected):
        v = trial.values
        assert (v["TrainConfig.learning_rate"], v["ModelConfig.d_ff"], v["ModelConfig.d_model"],
                v["ModelConfig.n_heads"]) == (lr, dff, dm, nh)
        assert 0.0 <= v["TrainConfig.weight_decay"] <= 0.1
        assert v["TrainConfig.warmup_steps"] in (1, 2)
        assert 0.1 <= v["TrainConfig.clip_grad_norm"] <= 10.0
        assert trial.name == (f"r{k}-lr={lr:g}-d_ff={dff}-d_model={dm}-n_heads={nh}-"
                              f"weight_decay={v['TrainConfig.weight_decay']:.4g}-"
                              f"warmup_steps={v['TrainConfig.warmup_steps']}-"
                              f"clip_grad_norm={v['TrainConfig.clip_grad_norm']:.4g}")
        assert trial.bindings[0] == "TrainConfig.steps = 4"
    # Each (grid, list) point sees the same two random draws, made from the seed.
    draws = [tuple(t.values[b] for b in spec.random) for t in trials]
    assert draws[0:2] == draws[2:4] and draws[0] != draws[1]
    again = spec_lib.expand(spec)
    assert [t.name for t in again] == [t.name for t in trials]
    other = spec_lib.expand(spec_lib.spec_from_dict({**_raw(spec), "seed": 4}))
    assert [t.values for t in other] != [t.values for t in trials]
    # The gin-style file says the same thing.
    assert load(tmp_path, GIN, ".gin") == spec
    assert spec.base_dir == "runs/sweeps/x"


def _raw(spec):
    return {"grid": spec.grid, "list": spec.list, "random": spec.random,
            "num_random": spec.num_random, "fixed": spec.fixed, "labels": spec.labels}


def test_list_names_name_the_list_positions():
    spec = spec_lib.spec_from_dict({
        "grid": {"TrainConfig.seed": [0, 1]},
        "list": {"ModelConfig.d_ff": [256, 32], "ModelConfig.granularity_names": [
            ["S", "M", "L", "XL"], ["S"]]},
        "list_names": ["matlm", "dense_S"]})
    trials = spec_lib.expand(spec)
    assert [t.name for t in trials] == ["seed=0-matlm", "seed=0-dense_S", "seed=1-matlm",
                                        "seed=1-dense_S"]
    assert [t.variant for t in trials] == ["matlm", "dense_S"] * 2
    assert trials[1].values == {"TrainConfig.seed": 0, "ModelConfig.d_ff": 32,
                                "ModelConfig.granularity_names": ("S",)}
    with pytest.raises(SweepSpecError, match="list_names must be 2 short names"):
        spec_lib.spec_from_dict({"list": {"TrainConfig.seed": [0, 1]}, "list_names": ["a"]})


def test_log_uniform_draws_are_uniform_in_log_space():
    spec = spec_lib.spec_from_dict({"random": {"TrainConfig.learning_rate":
                                               {"log_uniform": [1e-4, 1e-2]}},
                                    "num_random": 400})
    logs = [math.log10(t.values["TrainConfig.learning_rate"]) for t in spec_lib.expand(spec)]
    assert -4 <= min(logs) and max(logs) <= -2
    below = sum(l < -3 for l in logs) / len(logs)  # Half the mass below the log midpoint.
    assert 0.4 < below < 0.6


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"TrainConfig.learning_rate": []}}, "grid.TrainConfig.learning_rate is an empty axis"),
    ({"list": {"ModelConfig.d_ff": [1, 2], "ModelConfig.d_model": [3]}}, "must have one length"),
    ({"grid": {"TrainConfig.seed": [1, 1]}}, "duplicate trial name 'seed=1'"),
    ({"grid": {"learning_rate": [1]}}, "'learning_rate' is not a gin binding name"),
    ({"grid": {"TrainConfig.seed": [1]}, "fixed": {"TrainConfig.seed": 2}}, "in both fixed and grid"),
    ({"random": {"TrainConfig.seed": {"uniform": [1, 2]}}}, "num_random must be an integer >= 1"),
    ({"random": {"TrainConfig.seed": {"normal": [1, 2]}}, "num_random": 2}, "one distribution"),
    ({"random": {"TrainConfig.seed": {"log_uniform": [0, 2]}}, "num_random": 2}, "lo > 0"),
    ({"axes": {}}, "unknown key 'axes'"),
    ({"fixed": {"TrainConfig.seed": 1}}, "no axes"),
])
def test_bad_spec_shapes_are_one_line_errors(raw, message):
    with pytest.raises(SweepSpecError, match=re.escape(message)):
        spec_lib.expand(spec_lib.spec_from_dict(raw))


def test_yaml_reads_exponent_floats_as_floats(tmp_path):
    # YAML 1.1 would read 1e-3 as the string '1e-3' (and the trainer would refuse it).
    spec = load(tmp_path, "grid: {TrainConfig.learning_rate: [1e-3, 2E+1, 5]}")
    assert spec.grid["TrainConfig.learning_rate"] == [1e-3, 20.0, 5]
    assert [type(v) for v in spec.grid["TrainConfig.learning_rate"]] == [float, float, int]


@pytest.mark.parametrize("axis, message", [
    ("grid: {ModelConfig.d_modl: [64]}", "trial 'd_modl=64': cannot apply gin binding "
                                         "--gin.ModelConfig.d_modl=64"),
    ("grid: {Nope.d_model: [64]}", "No configurable matching 'Nope'"),
    ("grid: {TrainConfig.steps: [2, 2.5]}",
     "trial 'steps=2.5': TrainConfig.steps must be an integer >= 1, got 2.5"),
    ("list: {TrainConfig.decay: [cosine, cosign]}", "trial 'decay=cosign': TrainConfig.decay"),
])
def test_bad_bindings_stop_the_sweep_before_any_trial_runs(tmp_path, capsys, axis, message):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(axis)
    base = tmp_path / "base"
    assert matlm_main(["sweep", f"--sweep={sweep}", f"--base_dir={base}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not base.exists()  # Nothing written.


def _loss_table(train_log):
    """{granularity: val loss at the last step} from the table `matlm train` prints."""
    out = {}
    for line in train_log.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 6 and cells[0] in ("S", "M", "L", "XL"):
            out[cells[0]] = float(cells[3])
    return out


# Tiny 2-step runs: what every end-to-end sweep test trains (each may override a binding).
TINY_FIXED = {"TrainConfig.steps": 2, "TrainConfig.seq_len": 16,
              "TrainConfig.global_batch_size": 2, "TrainConfig.eval_batches": 1,
              "TrainConfig.checkpoint_every": 2, "ModelConfig.vocab_size": 2048}


def tiny_sweep_file(tmp_path, wiki_vocab, fixed: dict, axes: str):
    """tmp_path/sweep.yaml: TINY_FIXED updated by `fixed`, the test vocabulary, then `axes`
    (the spec's list/labels YAML text)."""
    import yaml
    path = tmp_path / "sweep.yaml"
    bindings = {**TINY_FIXED, **fixed,
                "DataConfig.vocab_path": str(wiki_vocab.sentencepiece_model_file)}
    path.write_text(yaml.safe_dump({"fixed": bindings}, sort_keys=False) + axes)
    return path


@pytest.mark.slow
def test_four_trial_sweep_isolates_a_failure_and_a_rerun_runs_nothing(tmp_path, capsys,
                                                                      one_device_subprocesses, wiki_vocab):
    sweep = tiny_sweep_file(tmp_path, wiki_vocab, {"TrainConfig.log_every": 1,
                                                   "ModelConfig.n_layers": 2}, """
list:
  TrainConfig.learning_rate: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]
  # (3, 1, 1) needs 3 devices: this trial passes the spec checks and fails when it runs.
  TrainConfig.mesh_shape: [[1, 1, 1], [1, 1, 1], [3, 1, 1], [1, 1, 1]]
labels: {TrainConfig.learning_rate: lr, TrainConfig.mesh_shape: mesh}
""")
    base = tmp_path / "base"
    command = ["sweep", "--gin_file=configs/runs/default.gin", f"--sweep={sweep}",
               f"--base_dir={base}", "--parallel=2"]
    assert matlm_main(command) == 1  # One trial failed.
    out = capsys.readouterr().out
    names = ["lr=0.001-mesh=1x1x1", "lr=0.002-mesh=1x1x1", "lr=0.003-mesh=3x1x1",
             "lr=0.004-mesh=1x1x1"]
    assert out.count("started (attempt 1)") == 4
    assert "[sweep 4/4: 3 done, 1 failed, 0 running]" in out
    with open(base / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == names
    assert [r["status"] for r in rows] == ["done", "done", "failed", "done"]
    assert [float(r["lr"]) for r in rows] == [1e-3, 2e-3, 3e-3, 4e-3]
    assert "mesh" in rows[2]["error"] and rows[2]["val_loss_XL"] == ""
    for row, name in zip(rows, names):
        if row["status"] != "done":
            continue
        # Against the table the trial's own `matlm train` printed (3 decimals).
        printed = _loss_table((base / name / "train.log").read_text())
        assert set(printed) == {"S", "M", "L", "XL"}
        for g, loss in printed.items():
            assert abs(float(row[f"val_loss_{g}"]) - loss) <= 5e-4
        # tiny.gin at 2 layers, vocab 2048: tied embeddings + per layer (q, k, v, o of 128x128,
        # SwiGLU 3 x 128x512, 2 norms) + the final norm.
        assert int(row["params_XL"]) == 2048 * 128 + 2 * (4 * 128 * 128 + 3 * 128 * 512 + 256) + 128
        assert int(row["tokens"]) == 2 * 2 * 16 and int(row["step"]) == 2
    md = (base / "sweep_results.md").read_text()
    assert all(f"| {n}" in md for n in names)
    assert (base / "val_loss_XL_vs_lr.png").stat().st_size > 0
    assert (base / "val_loss_vs_params.png").stat().st_size > 0
    attempts = {n: json.loads((base / n / "trial.json").read_text())["attempts"] for n in names}

    # A rerun skips the finished trials (the failed one too: it would fail again).
    assert matlm_main(command) == 1
    out = capsys.readouterr().out
    assert "started" not in out and "skipping 4 finished trial(s)" in out
    assert {n: json.loads((base / n / "trial.json").read_text())["attempts"]
            for n in names} == attempts
    with open(base / "sweep_results.csv") as f:
        assert list(csv.DictReader(f)) == rows

    # A trial the sweep was killed in (left `running`) is rerun, and resumes: its dir
    # already holds the final checkpoint, so it trains no step twice.
    record_file = base / names[0] / "trial.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "status": "running", "train_status": "running"}))
    metrics = (base / names[0] / "metrics.jsonl").read_text()
    assert matlm_main(command) == 1
    out = capsys.readouterr().out
    assert out.count("started") == 1 and f"{names[0]}: started (attempt 2)" in out
    assert json.loads(record_file.read_text())["status"] == "done"
    assert (base / names[0] / "metrics.jsonl").read_text() == metrics


def test_a_base_dir_of_another_sweep_is_refused(tmp_path, capsys):
    from matlm.sweep import runner
    trial = spec_lib.expand(spec_lib.spec_from_dict({"grid": {"TrainConfig.seed": [1]}}))[0]
    options = runner.SweepOptions(gin_files=["configs/runs/default.gin"], bindings=[],
                                  base_dir=tmp_path)
    (tmp_path / trial.name).mkdir()
    (tmp_path / trial.name / runner.TRIAL_FILE).write_text(json.dumps(
        {"identity": {"gin_files": ["other.gin"], "bindings": ["TrainConfig.seed = 1"]}}))
    with pytest.raises(SweepSpecError, match="was run with other gin files/bindings"):
        runner.check_base_dir([trial], options)


@pytest.mark.slow
def test_eval_after_training_fills_eval_columns_and_a_failing_eval_keeps_the_training(
        tmp_path, capsys, one_device_subprocesses, wiki_vocab):
    """--eval on a trained sweep evaluates without retraining; a failing eval is recorded as
    the trial's error, --retry_failed reruns only the eval, and the eval_* columns are the
    trial's own results.json."""
    sweep = tiny_sweep_file(tmp_path, wiki_vocab, {"TrainConfig.mesh_shape": [1, 1, 1],
                                                   "ModelConfig.n_layers": 1}, """
list: {TrainConfig.learning_rate: [1.0e-3]}
labels: {TrainConfig.learning_rate: lr}
""")
    base = tmp_path / "base"
    name = "lr=0.001"
    command = ["sweep", "--gin_file=configs/runs/default.gin", f"--sweep={sweep}",
               f"--base_dir={base}"]
    assert matlm_main(command) == 0
    capsys.readouterr()
    train_log = (base / name / "train.log").read_text()

    # An eval that fails (an unknown task): the trial is failed with the eval's error.
    assert matlm_main([*command, "--eval", "--eval_flags=--tasks=no_such_task"]) == 1
    out = capsys.readouterr().out
    record = json.loads((base / name / "trial.json").read_text())
    assert record["status"] == "failed" and record["eval_status"] == "failed"
    assert record["train_status"] == "done" and record["error"].startswith("matlm eval:")
    assert "no_such_task" in record["error"]
    assert f"{name}: failed" in out

    # --retry_failed with a good eval: only the eval runs (training is not repeated).
    flags = "--eval_flags=--tasks=loss --max_examples=4 --batch_size=2 --max_len=16 --no_plots"
    assert matlm_main([*command, "--eval", flags, "--retry_failed",
                       "--metric=eval_loss:matlm_wiki_XL"]) == 0
    assert "no trial has this column" not in capsys.readouterr().err
    assert (base / name / "train.log").read_text() == train_log
    results = json.loads((base / name / "eval" / "2" / "results.json").read_text())
    with open(base / "sweep_results.csv") as f:
        row, = list(csv.DictReader(f))
    assert row["status"] == "done"
    losses = results["tasks"]["loss:matlm_wiki"]["metrics"]
    assert set(losses) == {"S", "M", "L", "XL"}
    for g, metrics in losses.items():
        assert float(row[f"eval_loss:matlm_wiki_{g}"]) == pytest.approx(metrics["loss"], rel=1e-9)
    assert (base / "eval_loss:matlm_wiki_XL_vs_lr.png").stat().st_size > 0  # --metric plotted.

    # Evaluated and trained: a rerun with --eval runs nothing. A metric no eval produced is
    # named, with the columns that exist.
    assert matlm_main([*command, "--eval", flags, "--metric=eval_loss_XL"]) == 0
    captured = capsys.readouterr()
    assert "started" not in captured.out
    assert "--metric=eval_loss_XL: no trial has this column" in captured.err
    assert "eval_loss:matlm_wiki_XL" in captured.err


@pytest.mark.slow
def test_collect_only_reports_trials_trained_elsewhere(tmp_path, capsys, wiki_vocab):
    """--collect_only runs nothing and reads what a launcher's trials left in BASE_DIR (no
    trial.json there): a trial with its final checkpoint is done, with the losses its own
    training logged; one preempted early is interrupted; one never started is pending."""
    from matlm.sweep import runner
    from matlm.model_dir import ModelDir
    # Batch 8: these trials train in this process, on the tests' 8 devices.
    sweep = tiny_sweep_file(tmp_path, wiki_vocab, {"TrainConfig.global_batch_size": 8,
                                                   "TrainConfig.checkpoint_every": 1,
                                                   "ModelConfig.n_layers": 1}, """
list: {TrainConfig.learning_rate: [1.0e-3, 2.0e-3, 3.0e-3]}
labels: {TrainConfig.learning_rate: lr}
""")
    base = tmp_path / "base"
    command = ["sweep", "--gin_file=configs/runs/default.gin", f"--sweep={sweep}",
               f"--base_dir={base}", "--collect_only"]
    assert matlm_main(command) == 2  # Nothing to collect: one line, nothing created.
    assert "no such directory" in capsys.readouterr().err and not base.exists()
    trials = spec_lib.expand(spec_lib.load_spec(sweep))
    options = runner.SweepOptions(gin_files=["configs/runs/default.gin"], bindings=[],
                                  base_dir=base)
    # What `--launcher=tpu` runs on the workers: the trial's train job, here in-process.
    assert matlm_main(runner.train_job(trials[0], options).train_args(())) == 0
    assert matlm_main([*runner.train_job(trials[1], options).train_args(()),
                       "--gin.TrainConfig.steps=1"]) == 0  # "Preempted" after step 1.
    capsys.readouterr()
    assert matlm_main(command) == 1  # Not every trial is done.
    out = capsys.readouterr().out
    assert "started" not in out and not (base / trials[2].name).exists()
    with open(base / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["done", "interrupted", "pending"]
    logged = [json.loads(line) for line in
              ModelDir(base / trials[0].name).metrics_file.read_text().splitlines()]
    last_eval = [r for r in logged if "eval/XL/loss" in r][-1]
    assert int(rows[0]["step"]) == 2 and int(rows[0]["tokens"]) == 2 * 8 * 16
    assert float(rows[0]["val_loss_XL"]) == pytest.approx(last_eval["eval/XL/loss"], rel=1e-9)
    assert int(rows[1]["step"]) == 1 and rows[2]["val_loss_XL"] == ""
