"""Adaptive retrieval with MatViT submodels (MatFormer paper, Table 8 / Figure 6):
embeddings of nested submodels from one joint pass (`embed`), exact k-NN in JAX
(`exact`), optional FAISS indexes (`ann`, needs `pip install -e ".[retrieval]"`), and the
experiments on embeddings (`evaluate`). docs/retrieval.md has the details and timings."""
from matlm.retrieval.embed import (Embeddings, embed_images, load_embeddings,
                                   resolve_widths_by_name, save_embeddings)
from matlm.retrieval.evaluate import (adaptive_retrieval, cascade, cascade_sweep,
                                      one_nn_accuracy)
from matlm.retrieval.exact import METRICS, nearest_neighbors

__all__ = ["Embeddings", "METRICS", "adaptive_retrieval", "cascade", "cascade_sweep",
           "embed_images", "load_embeddings", "nearest_neighbors", "one_nn_accuracy",
           "resolve_widths_by_name", "save_embeddings"]
