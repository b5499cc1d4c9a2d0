"""The PyTorch eager reference of scripts/benchmark_train.py trains the same model as matlm.

Skipped where torch is not installed (it is no matlm dependency; CI does not have it).
"""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

import jax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))
from benchmark_train import TorchEagerReference  # noqa: E402

from matlm.model import ModelConfig  # noqa: E402
from matlm.training import mesh as mesh_lib  # noqa: E402
from matlm.training.config import TrainConfig  # noqa: E402
from matlm.training.objective import build_objective  # noqa: E402
from matlm.training.optimizer import make_optimizer  # noqa: E402
from matlm.training.train_step import init_state  # noqa: E402

CONFIG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                     activation="gelu")
TRAIN = TrainConfig(steps=10, seq_len=16, global_batch_size=2, mesh_shape=(1, 1, 1))


def _inputs(config):
    mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 17)).astype(np.int32)
    batch = mesh_lib.global_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((2, 16), np.int32),
        "positions": np.tile(np.arange(16), (2, 1)).astype(np.int32),
        "loss_mask": np.ones((2, 16), np.float32)}, mesh)
    state = init_state(config, make_optimizer(TRAIN), mesh, seed=0)
    return state.params, batch, tokens


def test_reference_losses_match_matlm():
    params, batch, tokens = _inputs(CONFIG)
    seconds, peak, report = TorchEagerReference(
        sys.executable, CONFIG, TRAIN, build_objective(CONFIG, TRAIN), params, batch,
        tokens).run(1)
    assert len(report["losses"]) == len(CONFIG.granularities.names)
    assert report["max_relative_loss_difference"] < 1e-5
    # Narrower submodels are different models: their losses are not all equal.
    assert len({round(loss, 4) for loss in report["losses"]}) == len(report["losses"])
    assert seconds > 0 and peak > 0


def test_reference_refuses_a_mismatched_comparison():
    params, batch, tokens = _inputs(CONFIG)
    # The reference is handed other tokens than matlm's batch: its losses differ, and the
    # benchmark must refuse to compare the two timings.
    other_tokens = (tokens + 1) % CONFIG.vocab_size
    with pytest.raises(SystemExit, match="different model"):
        TorchEagerReference(sys.executable, CONFIG, TRAIN, build_objective(CONFIG, TRAIN),
                            params, batch, other_tokens).run(1)
