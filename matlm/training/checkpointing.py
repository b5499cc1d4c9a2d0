"""Kept so that existing imports keep working: the model dir's layout, run config, Orbax
manager and checkpoint loading all live in `matlm.training.model_dir` now."""
from matlm.training.model_dir import (ITEMS, CheckpointError, LoadedCheckpoint,  # noqa: F401
                                      ModelDir, RunCheckpointer, load_checkpoint_for_inference,
                                      model_config_from_dict, model_config_to_dict,
                                      read_run_config, save_for_inference)


def checkpoints_dir(model_dir):
    return ModelDir(model_dir).checkpoints
