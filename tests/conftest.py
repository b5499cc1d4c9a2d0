"""Shared fixtures. The data fixtures import TensorFlow only when a data test asks for them."""
import os

# Sharding tests need several devices: 8 fake CPU devices, set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def wiki_vocab(tmp_path_factory):
    """The default (matlm_wiki) vocabulary, small and trained fresh into a temp dir (~3 s)."""
    from matlm import data
    return data.default_vocabulary(vocab_size=2048, cache=tmp_path_factory.mktemp("vocab"))
