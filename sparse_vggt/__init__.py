"""sparse-vggt: city-scale reconstruction with VGGT and sparse covisibility attention."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["make_sparse", "make_dense", "PipelineConfig", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import torch models (the CLI and Prefect workers start fast).
    if name in ("make_sparse", "make_dense"):
        from . import sparse

        return getattr(sparse, name)
    if name == "PipelineConfig":
        from .config import PipelineConfig

        return PipelineConfig
    raise AttributeError(f"module 'sparse_vggt' has no attribute {name!r}")
