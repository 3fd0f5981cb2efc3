"""Blocked top-k by inner product: the one primitive behind the exact search, the reduced candidate search and
the recall check.

Why blocked: at city scale an n x n score matrix can never exist, so scores are computed tile by tile and
merged into per-row top-k lists; memory stays O(block^2 + n k).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..progress import track


def merge_topk(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge new scores ``s`` (ids ``i``) into the per-row top-k lists; returns the new (scores, ids)."""
    cs = torch.cat([best_s, s], dim=1)
    ci = torch.cat([best_i, i], dim=1)
    top_s, pos = torch.topk(cs, k=min(k, cs.shape[1]), dim=1)
    return top_s, torch.gather(ci, 1, pos)


def _full_merge(best_s: torch.Tensor, best_i: torch.Tensor, sim: torch.Tensor, col0: int, k: int) -> None:
    ids = torch.arange(col0, col0 + sim.shape[1]).expand(sim.shape[0], -1)
    top_s, top_i = merge_topk(best_s, best_i, sim.contiguous(), ids, k)
    best_s.copy_(top_s)
    best_i.copy_(top_i)


def _update_topk(best_s: torch.Tensor, best_i: torch.Tensor, sim: torch.Tensor, col0: int, k: int) -> None:
    """Merge a score tile (rows x cols, column ids col0..) into sorted per-row top-k lists, in place.

    Only scores above a row's current k-th best can enter, and after the first tiles almost none do, so the
    tile is filtered with one comparison pass and only the surviving entries are merged (a full top-k over
    every tile would dominate the search cost).
    """
    thr = best_s[:, -1]
    if bool(torch.isinf(thr).any()):  # rows not full yet: everything may enter
        _full_merge(best_s, best_i, sim, col0, k)
        return
    if sim.is_contiguous():
        r, c = (sim > thr[:, None]).nonzero(as_tuple=True)
    else:  # a transposed view: compare and scan in memory order, then group by row
        c, r = (sim.T > thr[None, :]).nonzero(as_tuple=True)
        order = torch.argsort(r, stable=True)
        r, c = r[order], c[order]
    if r.numel() == 0:
        return
    if r.numel() > sim.numel() // 8:
        _full_merge(best_s, best_i, sim, col0, k)
        return
    rows, counts = torch.unique_consecutive(r, return_counts=True)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(r.numel()) - torch.repeat_interleave(starts, counts)
    slot = torch.repeat_interleave(torch.arange(rows.numel()), counts)
    new_s = torch.full((rows.numel(), width), -math.inf, dtype=best_s.dtype)
    new_i = torch.full((rows.numel(), width), -1, dtype=torch.int64)
    new_s[slot, pos] = sim[r, c]
    new_i[slot, pos] = c + col0
    top_s, top_i = merge_topk(best_s[rows], best_i[rows], new_s, new_i, k)
    best_s[rows] = top_s
    best_i[rows] = top_i


def symmetric_topk(block: Any, n: int, k: int, block_size: int, bias: torch.Tensor | None = None,
                   desc: str = "kNN") -> tuple[np.ndarray, np.ndarray]:
    """Top-k of score(i, j) = <x_i, x_j> + bias_j over j != i, for all i, one upper-triangle tile at a time.

    The Gram part is symmetric, so only tiles (a, b) with b >= a are multiplied and each tile updates the top-k
    of both its row block and its column block (half the flops of a plain blocked search); the per-column bias
    is added separately for each direction. Memory: O(block^2 + n k), never n x n.
    """
    k = min(k, max(n - 1, 0))
    best_s = torch.full((n, k), -math.inf)
    best_i = torch.full((n, k), -1, dtype=torch.int64)
    starts = list(range(0, n, block_size))
    for ai in track(range(len(starts)), total=len(starts), description=desc):
        a0 = starts[ai]
        a1 = min(n, a0 + block_size)
        blk_a = block(a0, a1)
        for b0 in starts[ai:]:
            b1 = min(n, b0 + block_size)
            blk_b = blk_a if b0 == a0 else block(b0, b1)
            gram = blk_a @ blk_b.T
            sim = gram if bias is None else gram + bias[b0:b1][None, :]
            if b0 == a0:
                sim.fill_diagonal_(-math.inf)
            _update_topk(best_s[a0:a1], best_i[a0:a1], sim, b0, k)
            if b0 != a0:
                sim_t = gram.T
                if bias is not None:
                    sim_t = sim_t + bias[a0:a1][None, :]
                _update_topk(best_s[b0:b1], best_i[b0:b1], sim_t, a0, k)
    return best_i.numpy(), best_s.numpy().astype(np.float32)


