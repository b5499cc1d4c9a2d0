"""matlm: MatFormer language models in JAX/Flax.

The core (``matlm.model``, ``matlm.sharding``) imports and runs without TensorFlow;
only ``matlm.data`` touches TensorFlow/seqio.
"""

__version__ = "0.1.0"
