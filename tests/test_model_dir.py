"""The model dir's same-model check (what a resumed job may and may not change) and its
typed run config (old run_config.json files load)."""
import json
import os
import subprocess
import sys

import pytest

from matlm.model import ModelConfig
from matlm.model_dir import (CheckpointError, ModelDir, model_config_from_dict,
                             model_config_to_dict)

SAVED = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)


def _dir_with_saved(tmp_path, model_dict):
    (tmp_path / "run_config.json").write_text(json.dumps({"model": model_dict}))
    return ModelDir(tmp_path)


def test_a_field_added_after_the_run_started_takes_its_default(tmp_path):
    old = model_config_to_dict(SAVED)
    del old["scan_layers"], old["attention_impl"]  # A run dir from before these existed.
    model_dir = _dir_with_saved(tmp_path, old)
    model_dir.check_same_model(SAVED)  # Same model: accepted.
    with pytest.raises(CheckpointError, match="scan_layers: saved False, now True"):
        model_dir.check_same_model(model_config_from_dict({**model_config_to_dict(SAVED),
                                                         "scan_layers": True}))


def test_execution_only_fields_may_change_parameters_may_not(tmp_path):
    model_dir = _dir_with_saved(tmp_path, model_config_to_dict(SAVED))
    as_dict = model_config_to_dict(SAVED)
    model_dir.check_same_model(model_config_from_dict({**as_dict, "remat_policy": "full",
                                                         "attention_impl": "xla",
                                                         "attention_query_block": 0}))
    with pytest.raises(CheckpointError, match="d_model: saved 32, now 64"):
        model_dir.check_same_model(model_config_from_dict({**as_dict, "d_model": 64}))


# --- The typed run config (ModelDir.run_config). ------------------------------------------
# A run_config.json as an older matlm wrote it, by hand: model fields added since are
# missing, and every section has a field this matlm does not know.
OLD_FORMAT = """{
  "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64},
  "data": {"task": "matlm_wiki", "seed": 3, "vocab_path": null, "old_shuffle_buffer": 1000},
  "train": {"steps": 7, "seq_len": 32, "global_batch_size": 4, "old_knob": true},
  "written_by": "matlm 0.1"
}"""


def test_an_old_run_config_loads_with_defaults_and_names_what_it_left_out(tmp_path):
    from matlm.data.config import DataConfig
    from matlm.training.config import TrainConfig
    (tmp_path / "run_config.json").write_text(OLD_FORMAT)
    run = ModelDir(tmp_path).run_config()
    assert run.model == SAVED  # Missing model fields: today's defaults.
    assert run.train == TrainConfig(steps=7, seq_len=32, global_batch_size=4)
    assert run.data == DataConfig(task="matlm_wiki", seed=3)
    assert run.seq_len == 32
    assert run.unknown_fields == ("data.old_shuffle_buffer", "train.old_knob", "written_by")


def test_a_params_only_run_config_has_no_train_config(tmp_path):
    from matlm.data.config import DataConfig
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"model": model_config_to_dict(SAVED), "data": {}, "train": {}}))
    run = ModelDir(tmp_path).run_config()
    assert run.train is None and run.seq_len is None
    assert run.data == DataConfig() and run.unknown_fields == ()


def test_run_config_round_trips_what_the_run_wrote(tmp_path):
    from matlm.data.config import DataConfig
    from matlm.model_dir import RunConfig
    from matlm.training.config import TrainConfig
    data, train = DataConfig(task="matlm_wiki", seed=5), TrainConfig(steps=9, seq_len=64)
    ModelDir(tmp_path).write_run_files(SAVED, data, train)
    assert ModelDir(tmp_path).run_config() == RunConfig(SAVED, data, train)


def test_a_dir_without_run_config_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'run_config.json'} not found"):
        ModelDir(tmp_path).run_config()


def test_an_unknown_model_field_is_refused(tmp_path):
    _dir_with_saved(tmp_path, {**model_config_to_dict(SAVED), "new_width_knob": 2})
    with pytest.raises(CheckpointError, match=r"unknown fields \['new_width_knob'\]"):
        ModelDir(tmp_path).run_config()


def test_the_model_section_names_its_family_and_one_without_is_the_lm(tmp_path):
    saved = model_config_to_dict(SAVED)
    assert saved["family"] == "lm"  # Written by every run since families exist.
    del saved["family"]  # A run from before.
    _dir_with_saved(tmp_path, saved)
    assert ModelDir(tmp_path).run_config().model == SAVED
    _dir_with_saved(tmp_path, {**saved, "family": "vit_from_the_future"})
    with pytest.raises(CheckpointError, match="unknown model family 'vit_from_the_future'"):
        ModelDir(tmp_path).run_config()


def test_a_bad_train_section_fails_only_where_it_is_read(tmp_path):
    saved = json.loads(OLD_FORMAT)
    saved["train"]["seq_len"] = 1  # Below TrainConfig's minimum.
    (tmp_path / "run_config.json").write_text(json.dumps(saved))
    run = ModelDir(tmp_path).run_config()
    assert run.model == SAVED
    with pytest.raises(CheckpointError, match=r"run_config.json: the saved train config .*seq_len"):
        run.train


def test_reading_the_model_and_train_configs_does_not_import_tensorflow(tmp_path):
    # The core (decoding, `matlm verify`) runs on accelerator images without TensorFlow:
    # only reading `data` may import it.
    (tmp_path / "run_config.json").write_text(OLD_FORMAT)
    code = ("import sys\nfrom matlm.model_dir import ModelDir\n"
            f"run = ModelDir({str(tmp_path)!r}).run_config()\n"
            "assert run.seq_len == 32 and run.model.d_model == 32\n"
            "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
