"""Imports TensorFlow for the data layer only, with every accelerator hidden from it.

TensorFlow is used for tf.data/seqio/TFDS on the host CPU. If it saw the GPUs or TPUs
it would reserve their memory (or lock the TPU), which belongs to JAX. This module is
imported first by `matlm.data`; nothing outside `matlm/data/` imports TensorFlow.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's C++ start-up noise quiet.

import tensorflow as tf  # noqa: E402

for _device_type in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _device_type)
    except (RuntimeError, ValueError):
        # RuntimeError: TF's runtime was initialised earlier (someone imported and used TF
        # first); ValueError: this TF build does not know the device type. Either way
        # there is nothing more we can hide.
        pass

__all__ = ["tf"]
