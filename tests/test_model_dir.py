"""The model dir's same-model check: what a resumed job may and may not change."""
import json

import pytest

from matlm.model import ModelConfig
from matlm.training.model_dir import CheckpointError, ModelDir, model_config_to_dict

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
        model_dir.check_same_model(ModelConfig(**{**model_config_to_dict(SAVED),
                                                  "scan_layers": True}))


def test_execution_only_fields_may_change_parameters_may_not(tmp_path):
    model_dir = _dir_with_saved(tmp_path, model_config_to_dict(SAVED))
    as_dict = model_config_to_dict(SAVED)
    model_dir.check_same_model(ModelConfig(**{**as_dict, "remat_policy": "full",
                                              "attention_impl": "xla",
                                              "attention_query_block": 0}))
    with pytest.raises(CheckpointError, match="d_model: saved 32, now 64"):
        model_dir.check_same_model(ModelConfig(**{**as_dict, "d_model": 64}))
