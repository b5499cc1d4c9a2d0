"""Built-in TFDS pretraining tasks, for pod users with prepared TFDS data.

Importing this module registers (data_dir from `TFDS_DATA_DIR`, TFDS's default):
- `matlm_c4_en`: `c4/en:3.1.0` (train / validation)
- `matlm_lm1b`: `lm1b:1.1.0` (train / test as validation)
- `matlm_wiki40b_en`: `wiki40b/en:1.3.0` (train / validation), structure markers → prose

To read from another directory, re-register from gin (see `configs/data/c4_en.gin`):
`tfds_task.data_dir = "gs://bucket/tensorflow_datasets"`.
"""
from matlm.data.tasks import register_tfds_task

BUILTIN_TFDS_TASKS = {
    "matlm_c4_en": dict(tfds_name="c4/en:3.1.0"),
    "matlm_lm1b": dict(tfds_name="lm1b:1.1.0",
                       splits={"train": "train", "validation": "test"}),
    "matlm_wiki40b_en": dict(tfds_name="wiki40b/en:1.3.0", cleaner="wiki40b"),
}

for _name, _kwargs in BUILTIN_TFDS_TASKS.items():
    register_tfds_task(name=_name, **_kwargs)
