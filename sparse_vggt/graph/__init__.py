"""The covisibility graph (`sparse-vggt graph`): descriptors + priors -> symmetric CSR in store.zarr/graph.

Files, from the bottom up: ``source`` (descriptor access, exact pair cosine), ``topk`` (blocked top-k),
``knn`` (exact / PCA / faiss search and re-ranking), ``recall`` (recall against exact search), ``priors``
(sequence and GPS pairs), ``verify`` (optional RANSAC verification; OpenCV extra), ``csr`` (symmetric CSR,
components, Zarr layout) and ``stage`` (the stage entry ``run``).
"""

from .csr import SRC_GPS, SRC_RETRIEVAL, SRC_SEQUENCE, SRC_VERIFIED
from .source import DescriptorSource, GraphError
from .stage import run

__all__ = ["SRC_GPS", "SRC_RETRIEVAL", "SRC_SEQUENCE", "SRC_VERIFIED", "DescriptorSource", "GraphError", "run"]
