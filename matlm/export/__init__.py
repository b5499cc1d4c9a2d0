"""Submodels written for other tools: `hf` (a Hugging Face model dir, docs/export.md).

Nothing here imports torch or transformers at import time: the `export` extra
(`pip install -e ".[export]"`) is needed only when an export runs.
"""
from matlm.export.hf import ExportError, Exported, export_hf

__all__ = ["ExportError", "Exported", "export_hf"]
