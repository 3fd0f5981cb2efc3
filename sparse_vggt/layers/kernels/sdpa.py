"""Portable sparse-attention kernel: chunked gather + SDPA (every device).

Query frames are grouped by neighbour-set size and processed in chunks; for a chunk the keys/values of its
neighbour frames are gathered and passed, unmasked, to ``F.scaled_dot_product_attention`` (so its fused
kernels apply). The chunk size comes from a memory budget (``SparseContext.memory_budget_mb``). With global
special tokens, each chunk also gathers the special tokens of the frames outside its sets (|outside| is the
same for every frame of a chunk, so still no mask). It takes query chunks (``query_frames``), so
`Block.forward_global` can bound its temporaries by the chunk. The planner charges what the kernel allocates:
gathered K/V in the compute dtype, plus fp32 scores only where SDPA has no fused kernel (not on CPU or CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..neighbor_sets import NeighborSets
from . import Kernel

if TYPE_CHECKING:
    from ..sparse_attention import SparseContext


@dataclass
class _Chunk:
    queries: Tensor  # (c,) query frame indices
    keys: Tensor  # (c, K) key frame indices: N(i) for each query frame i (all of size K)
    complement: Tensor | None = None  # (c, S-K) frames outside N(i), for global special tokens
    local: Tensor | None = None  # (c,) query positions inside the caller's query chunk (None: = queries)


def plan_chunks(
    sets: NeighborSets, frame_bytes_per_key: int, budget_bytes: int, device: torch.device, special_frame_bytes: int = 0,
    frames: Sequence[int] | None = None, query_bytes: int = 0,
) -> list[_Chunk]:
    """Group query frames into chunks of equal set size whose gathered keys/values fit ``budget_bytes``.

    Grouping by size means no padding and no attention mask, so SDPA can use its fused kernels; the
    number of extra chunks is at most the number of distinct set sizes (a handful for kNN sets).
    ``frame_bytes_per_key`` is the memory one (query frame, key frame) pair costs; with
    ``special_frame_bytes`` > 0 every frame outside N(i) costs that much too (its special tokens are added)
    and each chunk carries its complement frames. ``frames``: plan only these query frames (default all);
    ``query_bytes``: what one query frame costs besides its keys (its gathered queries and output).
    Index tensors are built here, once per plan, directly on ``device``.
    """
    by_size: dict[int, list[int]] = {}
    for i in range(sets.num_frames) if frames is None else frames:
        by_size.setdefault(len(sets.sets[i]), []).append(i)
    chunks: list[_Chunk] = []
    for K in sorted(by_size):
        frames = by_size[K]
        per_frame = K * frame_bytes_per_key + (sets.num_frames - K) * special_frame_bytes + query_bytes
        per_chunk = max(1, budget_bytes // max(1, per_frame))
        for start in range(0, len(frames), per_chunk):
            members = frames[start : start + per_chunk]
            keys = torch.tensor([sets.sets[i] for i in members], dtype=torch.long, device=device)
            comp = None
            if special_frame_bytes:
                rows = [sorted(set(range(sets.num_frames)) - set(sets.sets[i])) for i in members]
                comp = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(members), -1)
            chunks.append(_Chunk(torch.tensor(members, dtype=torch.long, device=device), keys, comp))
    return chunks


def sdpa_materialises_scores(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.scaled_dot_product_attention`` on ``device`` builds the full score matrix.

    CPU (flash kernel for fp32/bf16/fp16) and CUDA (flash / memory-efficient kernels, fp32 included via the
    memory-efficient one) work on tiles; other devices (MPS) may take the math path, so scores are charged."""
    return device.type not in ("cpu", "cuda")


def pair_bytes(B: int, H: int, P: int, D: int, elt: int, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes one (query frame, key frame) pair costs the chunked kernel: gathered K and V in the compute
    dtype, plus fp32 scores and probabilities only where SDPA materialises them."""
    scores = 2 * P * 4 if sdpa_materialises_scores(device, dtype) else 0
    return B * H * P * (2 * D * elt + scores)


def chunked_sparse(
    q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int, scale: float, ctx: SparseContext,
    query_frames: tuple[int, int] | None = None,
) -> Tensor:
    """q (B, H, n·P, D) of query frames ``query_frames`` (default all), k, v (B, H, S·P, D) -> (B, H, n·P, D),
    each query frame attending to its neighbour frames."""
    B, H, _, D = q.shape
    S = sets.num_frames
    N = S * P
    first, stop = query_frames if query_frames is not None else (0, S)
    if k.dtype != q.dtype or v.dtype != q.dtype:  # gather in the compute dtype, once per layer
        k, v = k.to(q.dtype), v.to(q.dtype)
    elt = q.element_size()
    pair = pair_bytes(B, H, P, D, elt, q.device, q.dtype)
    key = ("plan", P, pair, num_special, str(q.device), first, stop)
    chunks = ctx._cache.get(key)
    if chunks is None:  # built once per forward (every layer has the same plan)
        budget = int(ctx.memory_budget_mb * 2**20)
        scores = 2 * P * 4 if sdpa_materialises_scores(q.device, q.dtype) else 0
        special_bytes = B * H * num_special * (2 * D * elt + scores) if num_special else 0
        chunks = plan_chunks(sets, pair, budget, q.device, special_bytes, frames=range(first, stop),
                             query_bytes=2 * B * H * P * D * elt)
        if first:
            chunks = [_Chunk(c.queries, c.keys, c.complement, c.queries - first) for c in chunks]
        ctx._cache[key] = chunks
    q5 = q.reshape(B, H, stop - first, P, D)
    k5, v5 = (t.reshape(B, H, S, P, D) for t in (k, v))
    out = torch.empty_like(q5)
    # On CPU, gathers write into buffers reused across chunks and layers: fresh multi-MB allocations are
    # fresh pages, and page faults cost several times the copy itself. On GPUs the caching allocator reuses
    # blocks anyway, and a kept workspace would stay allocated through the heads. (Autograd needs fresh tensors.)
    reuse = q.device.type == "cpu" and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))

    def gather(name: str, src: Tensor, index: Tensor, shape: tuple[int, ...]) -> Tensor:
        if not reuse:
            return src.index_select(2, index).reshape(shape)
        buf = _workspace(ctx, name, (B, H, index.numel()) + tuple(src.shape[3:]), src)
        torch.index_select(src, 2, index, out=buf)
        return buf.view(shape)

    if num_special:
        k_sp = k5[:, :, :, :num_special]  # (B, H, S, ns, D): views, gathered per chunk below
        v_sp = v5[:, :, :, :num_special]
    for ch in chunks:
        c, K = ch.keys.shape
        local = ch.local if ch.local is not None else ch.queries
        qc = gather("q", q5, local, (B, H * c, P, D))
        flat = ch.keys.reshape(-1)
        kc = gather("k", k5, flat, (B, H, c, K * P, D))
        vc = gather("v", v5, flat, (B, H, c, K * P, D))
        comp = ch.complement
        if num_special and comp is not None and comp.shape[1]:
            # Special tokens of frames outside N(i) (those inside are already there, once).
            n_extra = comp.shape[1] * num_special
            ks = gather("ks", k_sp, comp.reshape(-1), (B, H, c, n_extra, D))
            vs = gather("vs", v_sp, comp.reshape(-1), (B, H, c, n_extra, D))
            kc = torch.cat([kc, ks], dim=3)
            vc = torch.cat([vc, vs], dim=3)
        # 4-D (B, H·c, L, D): the fused CPU/CUDA kernels take 4-D inputs only (5-D falls back to math).
        L = kc.shape[3]
        oc = F.scaled_dot_product_attention(qc, kc.reshape(B, H * c, L, D), vc.reshape(B, H * c, L, D), scale=scale)
        out.index_copy_(2, local, oc.reshape(B, H, c, P, D))
    return out.reshape(B, H, (stop - first) * P, D)


def _workspace(ctx: SparseContext, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A contiguous tensor of ``shape`` backed by a buffer kept for the current forward call."""
    numel = math.prod(shape)
    key = ("workspace", name, like.dtype, str(like.device))
    buf = ctx._cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        ctx._cache[key] = buf
    return buf[:numel].view(shape)


KERNEL = Kernel("sdpa", chunked_sparse, all_queries=False)
