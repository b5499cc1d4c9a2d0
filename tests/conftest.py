"""Shared fixtures. The data fixtures import TensorFlow only when a data test asks for them."""
import pytest


@pytest.fixture(scope="session")
def wiki_vocab(tmp_path_factory):
    """The default (matlm_wiki) vocabulary, small and trained fresh into a temp dir (~3 s)."""
    from matlm import data
    return data.default_vocabulary(vocab_size=2048, cache=tmp_path_factory.mktemp("vocab"))
