"""Neighbour lists for sparse global attention when no covisibility graph gives them.

The pipeline takes each cluster's neighbour lists from the partition stage; this module serves direct use
of a sparse VGGT (``model(images, neighbors=Retriever(k=10))``) and benchmarks: retrieval descriptors of the
input frames -> k nearest frames by cosine similarity. Frames take the describe stage's MegaLoc input path
(`sparse_vggt.models.inputs`): 8-bit RGB, PIL bilinear to 322x322, ImageNet normalisation.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.inputs import MEGALOC_INPUT, megaloc_batch, resize_square, tensor_to_pil

log = logging.getLogger(__name__)

__all__ = ["Retriever", "knn_neighbors", "retrieve_neighbors"]

DEFAULT_RETRIEVAL = "gberton/MegaLoc"


def knn_neighbors(descriptors: Tensor | np.ndarray, k: int) -> list[list[int]]:
    """k nearest frames by cosine similarity (excluding the frame itself), one list per frame."""
    d = torch.as_tensor(np.asarray(descriptors) if not torch.is_tensor(descriptors) else descriptors).float()
    if d.dim() != 2:
        raise ValueError(f"descriptors must be (S, D), got {tuple(d.shape)}")
    S = d.shape[0]
    d = F.normalize(d, dim=1)
    sim = d @ d.T  # S x S floats: one per frame pair, fine for a cluster
    sim.fill_diagonal_(-float("inf"))
    kk = max(0, min(k, S - 1))
    if kk == 0:
        return [[] for _ in range(S)]
    return sim.topk(kk, dim=1).indices.tolist()


def retrieval_input(images: Tensor) -> Tensor:
    """(S, 3, H, W) or (1, S, 3, H, W) in [0, 1] -> MegaLoc input (S, 3, 322, 322) on the images' device,
    through the same 8-bit PIL resize and normalisation as the describe stage."""
    if images.dim() == 5 and images.shape[0] != 1:
        raise ValueError(f"retrieval takes one sequence, got a batch of {images.shape[0]}")
    frames = images if images.dim() == 4 else images[0]
    side = MEGALOC_INPUT.size
    x = megaloc_batch([resize_square(tensor_to_pil(f), side) for f in frames])
    return x.to(images.device)


def retrieve_neighbors(images: Tensor, k: int, retrieval: Any = None) -> list[list[int]]:
    """Retrieval descriptors of the input frames -> k nearest neighbours per frame.

    ``retrieval``: a MegaLoc-like model or callable (normalised images -> descriptors), a checkpoint source
    for ``MegaLoc.from_pretrained``, or None for the default MegaLoc checkpoint."""
    return Retriever(k, retrieval)(images)


class Retriever:
    """``neighbors=`` callable for a sparse VGGT: images -> k nearest frames per frame.

    ``retrieval`` as in `retrieve_neighbors`; a checkpoint is loaded lazily on first use and then kept."""

    def __init__(self, k: int = 10, retrieval: Any = None):
        self.k = k
        self.retrieval = retrieval

    def model(self, device: torch.device) -> Any:
        source = self.retrieval
        if isinstance(source, nn.Module):
            return source.to(device)
        if callable(source) and not isinstance(source, str):
            return source
        from .models.megaloc import MegaLoc  # lazy: only needed when neighbours are not given

        self.retrieval = MegaLoc.from_pretrained(source or DEFAULT_RETRIEVAL).to(device).eval()
        return self.retrieval

    def __call__(self, images: Tensor) -> list[list[int]]:
        x = retrieval_input(images)
        model = self.model(images.device)
        with torch.no_grad():
            desc = model(x)
        return knn_neighbors(desc.float().cpu(), self.k)
