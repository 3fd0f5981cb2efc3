"""sparse-vggt: city-scale reconstruction with VGGT and sparse covisibility attention."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["VGGT", "SparseContext", "PipelineConfig", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import torch models (the CLI and Prefect workers start fast).
    if name == "VGGT":
        from .models.vggt import VGGT

        return VGGT
    if name == "SparseContext":
        from .layers.sparse_attention import SparseContext

        return SparseContext
    if name == "PipelineConfig":
        from .config import PipelineConfig

        return PipelineConfig
    raise AttributeError(f"module 'sparse_vggt' has no attribute {name!r}")
