"""`matlm eval` end to end on a tiny saved checkpoint, its bad-input errors (each named,
each before any model work), the missing-data error, and the trainer's in-loop hook."""
import json

import jax
import pytest

from matlm.cli.main import main
from matlm.model import ModelConfig, init_params
from matlm.model.counting import param_count

CONFIG = ModelConfig(vocab_size=2048, d_model=32, n_layers=4, n_heads=2, d_ff=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, wiki_vocab):
    from matlm.model_dir import save_for_inference
    model_dir = tmp_path_factory.mktemp("model")
    save_for_inference(model_dir, CONFIG, init_params(CONFIG, jax.random.key(0)), 5,
                       wiki_vocab.sentencepiece_model_file,
                       {"task": "matlm_wiki"})
    return model_dir


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_and_empty_checkpoint_dir(tmp_path, capsys, no_model_work, eval_tasks):
    err = _error(capsys, ["eval", f"--model_dir={tmp_path}/nope"])
    assert "nope" in err and "does not exist" in err
    # The old spelling: parsed, with a one-line warning before the error.
    err = _error(capsys, ["eval", f"--checkpoint_dir={tmp_path}/nope"])
    assert err.splitlines()[0] == ("matlm eval: warning: --checkpoint_dir is deprecated; "
                                   "use --model_dir")
    assert "--model_dir=" in err.splitlines()[1] and "does not exist" in err.splitlines()[1]
    err = _error(capsys, ["eval", f"--model_dir={tmp_path}"])
    assert "run_config.json" in err and "not a matlm model dir" in err


def test_unknown_task(checkpoint, capsys, no_model_work, eval_tasks):
    err = _error(capsys, ["eval", f"--model_dir={checkpoint}", "--tasks=copa,helaswag"])
    assert "unknown task 'helaswag'" in err and "hellaswag" in err


def test_field_mapping_that_does_not_match_the_data(checkpoint, capsys, no_model_work, eval_tasks):
    err = _error(capsys, ["eval", f"--model_dir={checkpoint}", "--tasks=piqa",
                          "--gin.piqa/multiple_choice.context='Q: {gaol}'"])
    assert "task 'piqa'" in err and "field 'gaol' is not in the data" in err and "goal" in err


def test_empty_split_of_a_gin_defined_task(checkpoint, tmp_path, capsys, no_model_work, eval_tasks):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "mine.gin").write_text(
        "eval_suite.extra = [@mine/eval_task()]\n"
        "mine/eval_task.name = 'mine'\n"
        "mine/eval_task.source = @mine/jsonl_source()\n"
        f"mine/jsonl_source.splits = {{'validation': '{tmp_path}/empty.jsonl'}}\n"
        "mine/eval_task.mapping = @mine/generative_qa()\n"
        "mine/generative_qa.context = 'Q: {q}'\n"
        "mine/generative_qa.answers_field = 'a'\n")
    err = _error(capsys, ["eval", f"--model_dir={checkpoint}", "--tasks=mine",
                          f"--gin_file={tmp_path}/mine.gin"])
    assert "task 'mine' split 'validation' has no examples" in err


@pytest.mark.parametrize("flag,message", [
    ("--widths=S,M", "width vector has 2 entries but the model has 4 layers"),
    ("--widths=S,M,L,XXL", "unknown granularity 'XXL'"),
    ("--widths=200", "exceeds d_ff=128"),
    ("--granularities=S,XXL", "unknown granularity 'XXL'"),
])
def test_widths_invalid_for_the_checkpoint(checkpoint, capsys, no_model_work, eval_tasks,
                                           flag, message):
    err = _error(capsys, ["eval", f"--model_dir={checkpoint}", "--tasks=copa", flag])
    assert message in err and "S=16, M=32, L=64, XL=128" in err


def test_missing_eval_data_names_the_setup_command(monkeypatch, tmp_path, eval_tasks, wiki_vocab):
    from matlm.evaluation import EvalDataMissingError, runner, tasks
    monkeypatch.setenv("MATLM_CACHE_DIR", str(tmp_path))
    tasks.load_examples.cache_clear()
    with pytest.raises(EvalDataMissingError, match="matlm setup-eval-data") as info:
        runner.prepare(["copa"], wiki_vocab, runner.EvalOptions())
    assert str(tmp_path / "eval_data") in str(info.value)
    monkeypatch.undo()
    tasks.load_examples.cache_clear()


def test_setup_is_idempotent(eval_tasks):
    from matlm.evaluation import setup_data
    directory = setup_data.eval_data_dir()
    before = (directory / ".complete").stat().st_mtime_ns
    assert setup_data.setup_eval_data() == directory  # No download, no rewrite.
    assert (directory / ".complete").stat().st_mtime_ns == before
    for folder in setup_data.DATA_FOLDERS:
        assert any((directory / folder).rglob("*")), folder


@pytest.mark.slow
def test_eval_end_to_end(checkpoint, tmp_path, capsys, eval_tasks):
    out = tmp_path / "out"
    assert main(["eval", f"--model_dir={checkpoint}", "--tasks=loss,copa,lambada,nq_open",
                 "--max_examples=4", "--widths=S,XL,M,L", "--widths=mixnmatch:2",
                 f"--output={out}", "--no_progress", "--max_len=512"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = ["S", "M", "L", "XL", "S,XL,M,L"]
    assert list(results["submodels"])[:5] == names and len(results["submodels"]) == 7
    for name, sub in results["submodels"].items():
        assert sub["params"] == param_count(CONFIG, sub["widths"])
    assert set(results["tasks"]) == {"loss:matlm_wiki", "copa", "lambada", "nq_open"}
    copa = results["tasks"]["copa"]["metrics"]
    assert copa["XL"]["answer_agreement"] == 1.0 and copa["S"]["examples"] == 4
    assert set(results["tasks"]["nq_open"]["metrics"]["M"]) >= {"exact_match", "f1"}
    assert results["tasks"]["loss:matlm_wiki"]["metrics"]["XL"]["greedy_agreement"] == 1.0
    assert results["step"] == 5
    # One compile per bucket and function for all 7 submodels (masked path).
    assert results["compiled_functions"] <= 6
    table = (out / "results.md").read_text()
    for text in ("copa", "lambada", "average accuracy", "S,XL,M,L", "bits/byte"):
        assert text in table and text in printed
    assert (out / "average_accuracy_vs_params.png").stat().st_size > 1000
    assert (out / "loss_matlm_wiki_vs_params.png").stat().st_size > 1000


@pytest.mark.slow
def test_in_loop_eval_reuses_compiled_functions(wiki_vocab, eval_tasks):
    from matlm.evaluation import in_loop, in_loop_eval, runner
    params = init_params(CONFIG, jax.random.key(0))
    widths = {"S": (16,) * 4, "XL": (128,) * 4}
    options = runner.EvalOptions(num_shots=1, max_examples=4, max_len=512)
    first = in_loop_eval(params, CONFIG, wiki_vocab, ["loss", "copa"], widths, options)
    assert first["eval/copa/XL/answer_agreement"] == 1.0
    assert {"eval/loss:matlm_wiki/S/loss", "eval/copa/S/acc"} <= set(first)
    scorer = next(iter(in_loop._SCORERS.values()))
    compiled = scorer.compiled_count()
    other = init_params(CONFIG, jax.random.key(1))
    second = in_loop_eval(other, CONFIG, wiki_vocab, ["loss", "copa"], widths, options)
    assert scorer.compiled_count() == compiled  # New parameters, no recompiling.
    assert second["eval/loss:matlm_wiki/S/loss"] != first["eval/loss:matlm_wiki/S/loss"]


def test_a_batch_size_below_the_device_count_is_rounded_up(checkpoint, tmp_path, eval_tasks):
    """The eval batch is split over every device (8 fake CPU ones here): --batch_size=4
    used to stop with a sharding error. Rounded up, padding rows masked: the losses equal
    those of a run with batches of 16."""
    losses = {}
    for batch_size in (4, 16):
        out = tmp_path / f"b{batch_size}"
        assert main(["eval", f"--model_dir={checkpoint}", "--tasks=loss",
                     "--granularities=S", f"--batch_size={batch_size}", "--max_examples=8",
                     "--no_progress", f"--output={out}"]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["options"]["batch_size"] == max(batch_size, jax.device_count())
        losses[batch_size] = results["tasks"]["loss:matlm_wiki"]["metrics"]
    for name, metrics in losses[16].items():
        assert losses[4][name]["tokens"] == metrics["tokens"] > 0
        assert losses[4][name]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


def test_eval_options_for_a_run_come_from_its_configs():
    """One place derives how a run is scored: held-out loss on its data task and eval
    split at the seq_len it trained at, rows of at most that many tokens; flags win; a
    dir without a train section keeps EvalOptions' defaults."""
    from matlm import data
    from matlm.evaluation import runner
    from matlm.model_dir import RunConfig
    from matlm.training.config import TrainConfig
    run = RunConfig(model=CONFIG, data=data.DataConfig(task="matlm_wiki", eval_split="test"),
                    train=TrainConfig(seq_len=48))
    options = runner.eval_options_for_run(run)
    assert (options.data_task, options.loss_split) == ("matlm_wiki", "test")
    assert (options.loss_seq_len, options.max_len) == (48, 48)
    options = runner.eval_options_for_run(run, max_len=96, batch_size=16, max_examples=None)
    assert (options.loss_seq_len, options.max_len, options.batch_size) == (48, 96, 16)
    assert options.max_examples is None
    params_only = RunConfig(model=CONFIG, data={"task": "matlm_wiki"})
    defaults = runner.EvalOptions()
    options = runner.eval_options_for_run(params_only)
    assert (options.loss_seq_len, options.max_len) == (defaults.loss_seq_len, defaults.max_len)


@pytest.mark.slow
@pytest.mark.usefixtures("one_device", "eval_tasks")
def test_eval_in_loop_eval_and_search_agree_on_held_out_loss(tmp_path, wiki_vocab, capsys):
    """One tiny trained checkpoint (seq_len 32, not EvalOptions' 256): `matlm eval`, the
    trainer's in-loop eval at the last step and `matlm search` score held-out loss on the
    same rows at the run's seq_len and report the same number. `matlm eval`'s rows default
    to the run's context (--max_len = train.seq_len)."""
    import csv
    from matlm import data
    from matlm.evaluation.in_loop import downstream_eval_hook
    from matlm.training.config import TrainConfig
    from matlm.training.trainer import train
    seq_len, rows, model_dir = 32, 8, tmp_path / "run"  # 8 rows: one batch, 8 test devices.
    train(CONFIG, data.DataConfig(task="matlm_wiki"),
          TrainConfig(steps=2, seq_len=seq_len, global_batch_size=8, warmup_steps=1,
                      log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0,
                      mesh_shape=(1, 1, 1), downstream_eval_tasks=("loss",),
                      downstream_eval_examples=rows),
          model_dir, vocab=wiki_vocab, show_progress=False, hooks=[downstream_eval_hook])
    key = "eval/loss:matlm_wiki/XL/loss"
    logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    in_loop = [row for row in logged if key in row]
    assert in_loop[-1]["step"] == 2  # The final parameters: the saved checkpoint's.
    assert main(["eval", f"--model_dir={model_dir}", "--tasks=loss", "--granularities=XL",
                 f"--max_examples={rows}", "--no_progress", "--no_plots",
                 f"--output={tmp_path / 'eval'}"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["options"]["loss_seq_len"] == results["options"]["max_len"] == seq_len
    assert main(["search", f"--model_dir={model_dir}", "--budget_params=1e9", "--max_evals=1",
                 "--eval_batches=1", "--no_progress", "--no_plots",
                 f"--output={tmp_path / 'search'}"]) == 0
    xl = ",".join(map(str, CONFIG.granularities.uniform("XL")))
    searched = [float(r["metric"]) for r in csv.DictReader((tmp_path / "search" /
                                                            "candidates.csv").open())
                if r["widths"] == xl]
    evaluated = results["tasks"]["loss:matlm_wiki"]["metrics"]["XL"]["loss"]
    assert in_loop[-1][key] == evaluated == searched[0], (in_loop[-1][key], evaluated, searched)
