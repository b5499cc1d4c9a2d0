"""Imports TensorFlow for the data layer only, with every accelerator hidden from it.

TensorFlow is used for tf.data/seqio/TFDS on the host CPU. If it saw the GPUs or TPUs
it would reserve their memory (or lock the TPU), which belongs to JAX. This module is
imported first by `matlm.data`; nothing outside `matlm/data/` imports TensorFlow.

TensorFlow's C++ start-up lines (oneDNN, CPU features, "failed call to cuInit" on
machines without CUDA) are written by absl before logging is configured, so
TF_CPP_MIN_LOG_LEVEL no longer silences them; they alarm users and say nothing about
the data. Unless TF_CPP_MIN_LOG_LEVEL is 0, the import and the device hiding run with
file descriptor 2 pointed at /dev/null (JAX's import sets the variable to 1, so "set
by the user" cannot be told apart from it). Python exceptions still propagate and are
printed after stderr is restored. Set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
"""
import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_QUIET = os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"


@contextlib.contextmanager
def _stderr_silenced(enabled: bool):
    """Points file descriptor 2 (C++ and Python stderr alike) at /dev/null."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    devnull_fd = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull_fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull_fd)


with _stderr_silenced(_QUIET):
    import tensorflow as tf

    for _device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], _device_type)
        except (RuntimeError, ValueError):
            # RuntimeError: TF's runtime was initialised earlier (someone imported and used
            # TF first); ValueError: this TF build does not know the device type. Either
            # way there is nothing more we can hide.
            pass

__all__ = ["tf"]
