"""The model dir: the one package that knows its layout, used by training and eval alike.

    MODEL_DIR/
      run_config.json        {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
      vocab.model            the SentencePiece model the run trained with (copied in)
      checkpoints/<step>/    Orbax items: params, opt_state, data (pipeline state), meta
      metrics.jsonl          one JSON object per log/eval step (process 0)
      tensorboard/           event files
      eval/<step>/           written by `matlm eval`
      writer.lock            while a job writes the dir (lock.py)

One module per job:

- `layout`: `ModelDir(path)`, the paths and the files at them;
- `run_config`: run_config.json, read back typed (`ModelDir.run_config()` -> `RunConfig`);
- `restore`: the one restore-and-verify path every reader of a checkpoint goes through;
- `checkpoints`: `RunCheckpointer`, a training run's state;
- `inference`: `load_checkpoint_for_inference` / `save_for_inference` (parameters only);
- `verify`: `verify_checkpoint` (`matlm verify`);
- `integrity`: the content checksums; `lock`: the writer lock (a file, or on a bucket an
  object with generation preconditions);
- `storage`: where the dir lives, a local path or a `gs://bucket/path` URL (one path
  type, `etils.epath`, for URLs), and the one-line checks of a bucket.

Saves are asynchronous (training continues while files are written); a step dir only
appears once complete (Orbax writes to a temporary dir and renames it). Every checkpoint
records a content checksum per array (and of the data pipeline state) in its `meta` item,
in the same atomic save. A newest checkpoint that fails to restore or whose contents do not
match its checksums is moved aside to `<step>.corrupt` — never deleted or overwritten — with
a warning naming it (and the arrays that differ), and the previous one is restored. Readers
(`load_checkpoint_for_inference`, `matlm verify`) verify too but never move or write
anything. run_config.json and vocab.model are written to a temporary file and renamed, so a
reader never sees them half-written.

On a bucket (`gs://`) nothing is renamed: small files are written as whole objects (an
object write is atomic), a checkpoint is complete once Orbax has written its
`commit_success.txt` object, and a corrupt one is set aside by copy + delete (markers
first). See docs/checkpoints.md, "Model dirs on GCS".

TensorFlow-free: the vocabulary loader and `DataConfig` (`matlm.data`) are imported only
when a vocabulary is loaded or `RunConfig.data` is read.
"""
from matlm.model_dir.checkpoints import RunCheckpointer
from matlm.model_dir.errors import CheckpointError
from matlm.model_dir.inference import (LoadedCheckpoint, load_checkpoint_for_inference,
                                       open_run, save_for_inference)
from matlm.model_dir.layout import ITEMS, ModelDir, as_model_dir
from matlm.model_dir.run_config import (EXECUTION_ONLY_FIELDS, RunConfig,
                                        data_config_from_dict, model_config_from_dict,
                                        model_config_to_dict, train_config_from_dict)
from matlm.model_dir.verify import VerifyResult, verify_checkpoint

__all__ = [
    "CheckpointError", "EXECUTION_ONLY_FIELDS", "ITEMS", "LoadedCheckpoint", "ModelDir",
    "RunCheckpointer", "RunConfig", "VerifyResult", "as_model_dir", "data_config_from_dict",
    "load_checkpoint_for_inference", "model_config_from_dict", "model_config_to_dict",
    "open_run", "save_for_inference", "train_config_from_dict",
    "verify_checkpoint",
]
