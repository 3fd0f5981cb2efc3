"""Turn a dense VGGT into one whose global attention only spans covisible frames.

``make_sparse(model, k=10)`` swaps every global attention module of ``model.aggregator`` for a
`SparseGlobalAttention` that shares its parameters, and makes ``model(images, neighbors=...)`` accept
per-frame neighbour lists (frame indices into the input sequence). ``neighbors=None`` retrieves k
neighbours per frame with MegaLoc on the input frames themselves. ``make_dense`` restores the original
modules exactly. Works on our `VGGT` and on reference-implementation VGGT objects alike: both are
recognised by structure (``.aggregator.global_blocks[i].attn.qkv``), never by class.

The state dict is unchanged by the conversion, so checkpoints load before or after it.

Note on the camera head: its trunk attends across frames, one camera token per frame (S tokens, so cost
S², negligible next to the aggregator's (S·P)²). It stays dense by default, as in the trained model;
``sparse_camera_head=True`` restricts it to the same neighbour sets, which makes a cluster's poses, not
only its tokens and depth maps, independent of frames it does not list.
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers.sparse_attention import NeighborSets, SparseContext, SparseGlobalAttention

log = logging.getLogger(__name__)

__all__ = ["make_sparse", "make_dense", "is_sparse", "neighbor_context", "knn_neighbors", "retrieve_neighbors",
           "NeighborSets"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RETRIEVAL_SIZE = 322  # MegaLoc input side (multiple of 14), as in the describe stage


@dataclass
class _SparseState:
    context: SparseContext
    k: int
    original_forward: Callable[..., Any]
    wrapped: list[tuple[nn.Module, nn.Module]]  # (block, original attention)
    retrieval: Any  # MegaLoc-like model, source string, or None (default MegaLoc checkpoint)


def _global_blocks(model: nn.Module) -> tuple[nn.Module, Sequence[nn.Module]]:
    agg = getattr(model, "aggregator", None)
    if agg is None and hasattr(model, "global_blocks"):
        agg = model  # an aggregator on its own
    blocks = getattr(agg, "global_blocks", None) if agg is not None else None
    if not blocks or not all(hasattr(getattr(b, "attn", None), "qkv") for b in blocks):
        raise TypeError(
            f"{type(model).__name__} does not look like VGGT: make_sparse needs `.aggregator.global_blocks` whose "
            "blocks have an `.attn` with `qkv` (our sparse_vggt.models.VGGT or the reference implementation)"
        )
    return agg, blocks


def is_sparse(model: nn.Module) -> bool:
    return "_sparse_state" in model.__dict__


def make_sparse(
    model: nn.Module,
    k: int = 10,
    special_tokens_global: bool = False,
    memory_budget_mb: float = 1024.0,
    backend: str = "auto",
    sparse_camera_head: bool = False,
    retrieval: Any = None,
) -> nn.Module:
    """Convert ``model`` in place to sparse global attention and return it.

    Args:
        k: neighbours per frame retrieved when ``model(images)`` is called without ``neighbors``.
        special_tokens_global: every frame also attends to all frames' camera and register tokens.
        memory_budget_mb: bound on gathered keys/values (+ scores) of one query chunk (sdpa backend).
        backend: "auto" (on CUDA: the faster of the two kernels by a one-time timed probe per shape bucket;
            elsewhere "sdpa"), "sdpa" (chunked gather + SDPA) or "flex" (block-sparse FlexAttention; compiled
            with dynamic shapes on CUDA).
        sparse_camera_head: also restrict the camera head trunk's cross-frame attention.
        retrieval: a MegaLoc-like model (images -> unit descriptors), a checkpoint source for
            ``MegaLoc.from_pretrained``, or None for "gberton/MegaLoc"; loaded lazily on first use.
    """
    if is_sparse(model):
        make_dense(model)
    agg, blocks = _global_blocks(model)
    num_special = int(getattr(agg, "patch_start_idx", 0))
    context = SparseContext(
        memory_budget_mb=memory_budget_mb, backend=backend, num_special=num_special,
        special_tokens_global=special_tokens_global,
    )
    wrapped: list[tuple[nn.Module, nn.Module]] = []
    for block in blocks:
        wrapped.append((block, block.attn))
        block.attn = SparseGlobalAttention(block.attn, context, num_special=num_special)
    if sparse_camera_head:
        trunk = getattr(getattr(model, "camera_head", None), "trunk", None)
        if trunk is None:
            raise TypeError("sparse_camera_head=True but the model has no camera_head.trunk")
        for block in trunk:
            wrapped.append((block, block.attn))
            block.attn = SparseGlobalAttention(block.attn, context, num_special=0)
    state = _SparseState(context, k, model.forward, wrapped, retrieval)
    model.__dict__["_sparse_state"] = state
    model.__dict__["forward"] = types.MethodType(_sparse_forward, model)
    log.info("sparse global attention on %d blocks (k=%d, backend=%s)", len(wrapped), k, backend)
    return model


def make_dense(model: nn.Module) -> nn.Module:
    """Undo `make_sparse`: the original attention modules and forward come back (same objects)."""
    state: _SparseState | None = model.__dict__.pop("_sparse_state", None)
    if state is None:
        return model
    for block, attn in state.wrapped:
        block.attn = attn
    model.__dict__.pop("forward", None)
    return model


def _sparse_forward(self: nn.Module, images: Tensor, *args: Any, neighbors: Any = None, **kwargs: Any) -> Any:
    """``model(images, neighbors=None, ...)``: same outputs as the dense model, sparse global attention."""
    state: _SparseState = self.__dict__["_sparse_state"]
    if images.dim() not in (4, 5):
        raise ValueError(f"images must be (S,3,H,W) or (B,S,3,H,W), got shape {tuple(images.shape)}")
    S = images.shape[-4]
    if neighbors is None:
        if images.dim() == 5 and images.shape[0] > 1:
            # One neighbour structure serves every sequence of the batch; retrieval on one sequence would
            # silently impose its covisibility on the others.
            raise ValueError(
                f"neighbors=None with a batch of {images.shape[0]} sequences: neighbour sets are shared by the "
                "whole batch, so pass neighbors= explicitly or run the sequences one at a time"
            )
        neighbors = retrieve_neighbors(images, state.k, state)
    sets = NeighborSets.build(neighbors, S)
    with state.context.use(sets):
        return state.original_forward(images, *args, **kwargs)


@contextlib.contextmanager
def neighbor_context(model: nn.Module, neighbors: Any, num_frames: int) -> Iterator[NeighborSets]:
    """Activate neighbour sets on a sparse model's attention modules without calling ``model`` itself.

    For running a part of the model directly (e.g. ``model.aggregator(images)`` in benchmarks).
    """
    state: _SparseState | None = model.__dict__.get("_sparse_state")
    if state is None:
        raise RuntimeError("neighbor_context needs a model converted with make_sparse")
    sets = NeighborSets.build(neighbors, num_frames)
    with state.context.use(sets):
        yield sets


# ---- neighbours ------------------------------------------------------------------------------------


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


def retrieve_neighbors(images: Tensor, k: int, state: _SparseState | None = None, retrieval: Any = None) -> list[list[int]]:
    """MegaLoc descriptors of the input frames -> k nearest neighbours per frame.

    ``images``: (S, 3, H, W) or (1, S, 3, H, W) in [0, 1]; resized to 322x322 and ImageNet-normalised, as the
    describe stage feeds MegaLoc."""
    if images.dim() == 5 and images.shape[0] != 1:
        raise ValueError(f"retrieve_neighbors takes one sequence, got a batch of {images.shape[0]}")
    model = _retrieval_model(state, retrieval, images.device)
    frames = images if images.dim() == 4 else images[0]
    x = F.interpolate(frames.float(), size=(RETRIEVAL_SIZE, RETRIEVAL_SIZE), mode="bilinear",
                      align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    with torch.no_grad():
        desc = model((x - mean) / std)
    return knn_neighbors(desc.float().cpu(), k)


def _retrieval_model(state: _SparseState | None, retrieval: Any, device: torch.device) -> nn.Module:
    source = retrieval if retrieval is not None else (state.retrieval if state is not None else None)
    if isinstance(source, nn.Module) or callable(source) and not isinstance(source, str):
        return source.to(device) if isinstance(source, nn.Module) else source
    from .models.megaloc import MegaLoc  # lazy: only needed when neighbours are not given

    model = MegaLoc.from_pretrained(source or "gberton/MegaLoc").to(device).eval()
    if state is not None:
        state.retrieval = model  # cache across calls
    return model
