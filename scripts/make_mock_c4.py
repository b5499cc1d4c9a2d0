"""Writes a prepared TFDS dataset shaped like `c4/en:3.1.0` (text, url, timestamp; train and
validation splits in many shards) from generated text, for trying and testing streamed
TFDS training offline:

    python scripts/make_mock_c4.py --data_dir=/tmp/mock_tfds --num_docs=20000 --num_shards=64
    matlm train --gin_file=configs/runs/default.gin --gin_file=configs/data/c4_en.gin \\
        --gin.c4/tfds_task.data_dir="'/tmp/mock_tfds'" --model_dir=/tmp/c4_run

The documents are words drawn from a small fixed list (not language): the point is the
format, the shard layout and the size. TFDS prepares it the way it prepares real C4
(examples shuffled across the split by key hash, then written in `--num_shards` shards).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Optional

import numpy as np

WORDS = ("the of and in to a was is for on as by with he from at that his it an were are "
         "which this be first also new after had one two river city team film album").split()


def make_builder_class(num_docs: int, num_validation_docs: int, seed: int,
                       train_texts: Optional[Iterable[str]] = None):
    import tensorflow_datasets as tfds

    class MockC4(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """c4/en:3.1.0's features and splits; generated text."""
        name = "c4"
        VERSION = tfds.core.Version("3.1.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": text, "url": tfds.features.Text(), "timestamp": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            del dl_manager  # Nothing is downloaded.
            if train_texts is not None:
                return {"train": self._given_examples(train_texts),
                        "validation": self._generate_examples("validation",
                                                              num_validation_docs, seed + 1)}
            return {"train": self._generate_examples("train", num_docs, seed),
                    "validation": self._generate_examples("validation", num_validation_docs,
                                                          seed + 1)}

        def _generate_examples(self, split, n, split_seed):
            rng = np.random.default_rng(split_seed)
            words = np.asarray(WORDS, dtype=object)
            for i in range(n):
                body = " ".join(words[rng.integers(0, len(words), int(rng.integers(8, 120)))])
                yield f"{split}-{i}", {"text": f"{split} document {i}. {body}",
                                       "url": f"https://example.com/{split}/{i}",
                                       "timestamp": "2019-04-25T00:00:00Z"}

        def _given_examples(self, texts):
            for i, text in enumerate(texts):
                yield f"train-{i}", {"text": text, "url": f"https://example.com/train/{i}",
                                     "timestamp": "2019-04-25T00:00:00Z"}

    return MockC4


def build_mock_c4(data_dir: str, num_docs: int, num_shards: int,
                  num_validation_docs: int = 0, file_format: str = "tfrecord",
                  seed: int = 0, train_texts: Optional[Iterable[str]] = None) -> str:
    """Prepares the dataset under `data_dir` (TFDS's layout: c4/en/3.1.0/); returns the
    dataset's directory. `num_validation_docs=0` makes it a tenth of `num_docs` (≥ 1).
    `train_texts` (num_docs of them) replaces the generated train text."""
    import tensorflow_datasets as tfds
    num_validation_docs = num_validation_docs or max(num_docs // 10, 1)
    builder = make_builder_class(num_docs, num_validation_docs, seed, train_texts)(
        config="en", data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        num_shards=num_shards, download_mode=tfds.GenerateMode.REUSE_DATASET_IF_EXISTS))
    return str(builder.data_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="TFDS data dir to write into")
    parser.add_argument("--num_docs", type=int, default=20_000, help="train documents")
    parser.add_argument("--num_validation_docs", type=int, default=0,
                        help="validation documents (default: a tenth of --num_docs)")
    parser.add_argument("--num_shards", type=int, default=64, help="shards per split")
    parser.add_argument("--file_format", choices=["tfrecord", "array_record"],
                        default="tfrecord")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_docs < 1 or args.num_shards < 1:
        parser.error("--num_docs and --num_shards must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path = build_mock_c4(args.data_dir, args.num_docs, args.num_shards,
                         args.num_validation_docs, args.file_format, args.seed)
    print(f"wrote c4/en:3.1.0 ({args.num_docs:,} train documents, {args.num_shards} shards, "
          f"{args.file_format}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
