"""`matlm vocab`: train a SentencePiece vocabulary on a task's training text.

    matlm vocab --task=matlm_wiki --vocab_size=8192 --output=/tmp/wiki.model
    matlm vocab --gin_file=configs/data/local_files.gin \
        --gin.local_files_task.pattern="'~/text/*.txt'" --vocab_size=4096 --output=my.model

Gin files are parsed first, so tasks they define (local files, TFDS with a data_dir,
mixtures) can be named with --task; without --task, `DataConfig.task` is used.
"""
from __future__ import annotations

import time

from matlm.cli import flags
from matlm.config_checks import Check, check_flags

# matlm.data.vocabulary.MIN_VOCAB_SIZE, without importing TensorFlow to check a flag
# (tests/test_bad_input.py checks that the two agree).
MIN_VOCAB_SIZE = 300


PARENTS = [flags.output("path of the .model file to write", required=True),
           flags.gin_files("gin file(s) defining tasks (e.g. configs/data/local_files.gin)")]


def add_arguments(parser) -> None:
    parser.add_argument("--task", default=None,
                        help="task or mixture to train on (default: DataConfig.task)")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--max_documents", type=int, default=None,
                        help="train on at most this many documents per task")


def run(args, gin_bindings) -> int:
    # Flags and the output path first: a bad one must fail before minutes of training.
    check_flags(args, {"vocab_size": Check(int, ge=MIN_VOCAB_SIZE),
                       "max_documents": Check(int, ge=1)})
    from matlm import data  # Heavy (TensorFlow): imported only when the command runs.
    from matlm.data.vocabulary import check_output_path
    from matlm.gin_config import parse_gin

    check_output_path(args.output)
    parse_gin(args.gin_file, gin_bindings)
    config = data.data_config_from_gin()  # Registers the tasks gin defines.
    task = args.task or config.task
    start = time.time()
    path = data.train_task_vocabulary(task, args.vocab_size, args.output, args.max_documents)
    vocab = data.load_vocabulary(path)
    # A line break and a run of spaces: both survive (matlm.data.vocabulary keeps text as is).
    sample = "MatFormer models nest smaller models\n  inside a larger one."
    ids = vocab.encode(sample)
    print(f"wrote {path} ({vocab.vocab_size} pieces, trained on {task!r} in "
          f"{time.time() - start:.1f}s)")
    print(f"special ids: pad={vocab.pad_id} eos={vocab.eos_id} unk={vocab.unk_id} "
          f"start={data.start_id(vocab)}")
    print(f"{sample!r} -> {len(ids)} tokens, decodes to {vocab.decode(ids)!r}")
    return 0
