"""CUDA sparse-attention kernel: FlexAttention with a block mask built from the neighbour sets.

One ``flex_attention`` call over all queries, frames padded to the block size (so each block belongs to
exactly one frame), q, k, v in one dtype, compiled once with dynamic shapes. No dense mask is ever built.
On CPU eager FlexAttention materialises the full score matrix, so there it serves the tests of the block
mask unless ``SparseContext.compile_cpu_flex`` is set (compiled CPU flex needs the key-block index as wide
as the sequence; `build_block_mask` does that).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..neighbor_sets import NeighborSets
from . import Kernel

if TYPE_CHECKING:
    from ..sparse_attention import SparseContext

FLEX_BLOCK = 128

_COMPILED_FLEX: Any = None


def _flex_fn(device: torch.device, compile_cpu: bool = False) -> Any:
    """Compiled flex on CUDA (and on CPU when asked), else the eager reference path (small inputs, tests).

    Compiled with dynamic shapes: clusters differ in frame count, and a static compile would recompile for
    each one and, past torch.compile's recompile limit, fall back to the eager path that materialises all
    scores. (On CPU, one dynamic compile served 4, 6 and 9 frames without recompiling: tests/test_sparse.py.)
    """
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device.type != "cuda" and not compile_cpu:
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def build_block_mask(
    sets: NeighborSets, P: int, num_special: int, device: torch.device, block: int = FLEX_BLOCK
) -> Any:
    """A FlexAttention BlockMask for frames padded to ``Pp`` = ceil(P / block)·block tokens.

    Built from per-block key lists (size S·nb × |N|·nb), so no dense token mask is ever formed.
    Blocks entirely made of real tokens of a neighbour frame are "full"; blocks that hold padding (the
    last block of a frame when P is not a multiple of ``block``) or special tokens of a non-neighbour
    frame are "partial" and resolved by ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    S = sets.num_frames
    nb = math.ceil(P / block)
    Pp = nb * block
    last_partial = P % block != 0
    member = sets.membership(device)
    full_rows: list[list[int]] = []
    part_rows: list[list[int]] = []
    for i, s in enumerate(sets.sets):
        full_blocks: list[int] = []
        part_blocks: list[int] = []
        for j in s:
            for b in range(nb):
                (part_blocks if (last_partial and b == nb - 1) else full_blocks).append(j * nb + b)
        if num_special:
            part_blocks += [j * nb for j in range(S) if j not in s]
        for _ in range(nb):  # every query block of frame i has the same key blocks
            full_rows.append(full_blocks)
            part_rows.append(part_blocks)

    # Compiled CPU flex checks that the key-block index spans every key block of the sequence; GPU kernels
    # read only the first ``count`` entries per row, so there the index stays as narrow as the widest set.
    full_width = S * nb if device.type == "cpu" else 0

    def pack(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        width = max(1, full_width, max(len(r) for r in rows))
        idx = torch.zeros(len(rows), width, dtype=torch.int32)
        for r, row in enumerate(rows):
            if row:
                idx[r, : len(row)] = torch.tensor(sorted(row), dtype=torch.int32)
        counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
        return counts[None, None].to(device), idx[None, None].to(device)

    full_n, full_i = pack(full_rows)
    part_n, part_i = pack(part_rows)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        fq = q_idx // Pp
        fk = kv_idx // Pp
        tk = kv_idx % Pp
        allowed = member[fq, fk] & (tk < P)
        if num_special:
            allowed = allowed | (tk < num_special)
        return allowed

    # compute_q_blocks=False: the transposed (query-block) index is only needed for backward, and
    # building it goes through a dense (S·nb)² block matrix.
    return BlockMask.from_kv_blocks(part_n, part_i, full_n, full_i, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(S * Pp, S * Pp), compute_q_blocks=False)


def flex_sparse(
    q: Tensor, k: Tensor, v: Tensor, sets: NeighborSets, P: int, num_special: int, scale: float, ctx: SparseContext
) -> Tensor:
    B, H, N, D = q.shape
    S = sets.num_frames
    nb = math.ceil(P / FLEX_BLOCK)
    Pp = nb * FLEX_BLOCK
    key = ("block_mask", P, num_special, str(q.device))
    block_mask = ctx._cache.get(key)
    if block_mask is None:
        block_mask = build_block_mask(sets, P, num_special, q.device)
        ctx._cache[key] = block_mask

    def pad(t: Tensor) -> Tensor:
        t = t.reshape(B, H, S, P, D)
        if Pp != P:
            t = F.pad(t, (0, 0, 0, Pp - P))
        return t.reshape(B, H, S * Pp, D)

    out = _flex_fn(q.device, ctx.compile_cpu_flex)(pad(q), pad(k), pad(v), block_mask=block_mask, scale=scale)
    return out.reshape(B, H, S, Pp, D)[:, :, :, :P].reshape(B, H, N, D)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


KERNEL = Kernel("flex", flex_sparse, all_queries=True, available=flex_available,
                requirement="torch.nn.attention.flex_attention (PyTorch >= 2.5)")
