"""Recall of a kNN result against exact search, measured on a sample of queries.

Why: the reduced searches (pca, faiss) can miss true neighbours, and a graph missing covisible pairs degrades
every later stage silently. The stage measures recall for every method and warns below ``graph.min_recall``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .source import DescriptorSource, pair_similarity
from .topk import merge_topk


def measure_recall(src: DescriptorSource, idx: np.ndarray, k: int, sample: int, block_size: int,
                   seed: int = 0) -> float:
    """Recall@k of ``idx`` against exact search on ``sample`` random queries (one streaming pass over the db).

    A returned neighbour counts as a hit when its exact cosine reaches the query's exact k-th best (within
    1e-5): neighbours tied with the k-th are equally correct, so an exact search scores 1.0 whatever its tie order.
    """
    if sample <= 0 or src.n < 2 or k == 0:
        return float("nan")
    rng = np.random.default_rng(seed + 1)
    q_idx = np.sort(rng.choice(src.n, size=min(sample, src.n), replace=False))
    q = src.take(q_idx)
    best_s = torch.full((q.shape[0], 0), -math.inf)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    for d_start, d in src.blocks(block_size):
        s = q @ d.T
        inside = (q_idx >= d_start) & (q_idx < d_start + d.shape[0])
        rows = np.flatnonzero(inside)
        s[rows, q_idx[rows] - d_start] = -math.inf
        ids = torch.arange(d_start, d_start + d.shape[0]).expand(q.shape[0], -1)
        best_s, best_i = merge_topk(best_s, best_i, s, ids, k)
    kth = best_s[:, -1].numpy()
    got = idx[q_idx, :k]
    valid = (got >= 0) & (got != q_idx[:, None])
    sims = np.full(got.shape, -np.inf, np.float32)
    if valid.any():
        qi, pj = np.nonzero(valid)
        sims[qi, pj] = pair_similarity(src, q_idx[qi], got[qi, pj])
    hits = np.minimum((sims >= kth[:, None] - 1e-5).sum(1), k)
    return float(np.mean(hits) / k)

