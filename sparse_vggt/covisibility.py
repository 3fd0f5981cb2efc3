"""Covisibility graph: which photos probably see the same place.

Reads ``store.zarr/descriptors`` (N_rows, D) for the ``ok`` rows of ``images.parquet`` and writes a symmetric CSR
graph to ``store.zarr/graph`` (indptr, indices, weights, edge_source, component).

Why this shape: at city scale N is 10^5-10^6, so an N x N similarity matrix (10^10-10^12 entries) can never exist.
Candidate search runs on a reduced projection (PCA fitted on a sample; or faiss HNSW over the same projection),
block by block, keeping only the best ``candidates`` per query; those candidates are then re-ranked by the exact
cosine on the full descriptors. Descriptors are cached in RAM as fp16 when they fit ``graph.memory_mb``,
otherwise streamed from Zarr in super-blocks. ``graph.method=auto`` takes the exact search wherever a cost model
fitted to benchmarks/graph.py predicts it is not slower (~13k images at D=8448). Recall against exact search is
measured on a sample of queries for every method and recorded; below ``graph.min_recall`` it is a WARNING in the
log, the manifest and report.md, so an approximate search never silently degrades the graph.

Edges come from retrieval (kNN by cosine, optional similarity threshold and mutual-kNN, union symmetrisation),
plus priors where metadata exists: sequence neighbours (capture time, else file order) and GPS neighbours within
a radius. Pairs whose GPS positions are farther apart than ``gps_max_distance_m`` are dropped whatever their
similarity. Optional geometric verification (SIFT/ORB + RANSAC fundamental matrix, a process pool over pairs)
removes failed pairs and weights verified ones by their inlier count. Components are reported, never joined.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from .config import GraphConfig, PipelineConfig
from .progress import track
from .store import RunStore

log = logging.getLogger(__name__)

# bits of graph/edge_source
SRC_RETRIEVAL, SRC_SEQUENCE, SRC_GPS, SRC_VERIFIED = 1, 2, 4, 8
_EARTH_RADIUS_M = 6_371_008.8


class GraphError(ValueError):
    """The graph cannot be built from this input; the message says what to fix."""


# ----------------------------------------------------------------------------------------------------------
# descriptor access


class DescriptorSource:
    """The ok rows of a (N_rows, D) descriptor array, as unit-norm float32 blocks.

    ``array`` is a Zarr array (or anything sliceable like a NumPy array). The first pass (constructor) checks
    every row for NaN/Inf and zero norm, records the norms and, if ``n * D * 2`` bytes fit ``memory_bytes``,
    keeps an fp16 copy in RAM so later passes do not decode Zarr again.
    """

    def __init__(self, array: Any, rows: np.ndarray, memory_bytes: int = 2 << 30,
                 names: Sequence[str] | None = None, read_rows: int = 4096):
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.size and np.any(np.diff(self.rows) <= 0):
            raise ValueError("rows must be strictly increasing")
        self.n = int(self.rows.size)
        self.dim = int(array.shape[1])
        self.names = names
        self.read_rows = read_rows
        self.memory_bytes = memory_bytes
        self.cache: torch.Tensor | None = None  # fp16; torch converts to fp32 with F16C, NumPy does not
        cache = self.n * self.dim * 2 <= memory_bytes
        if cache:
            self.cache = torch.empty((self.n, self.dim), dtype=torch.float16)
        self.inv_norm = np.empty(self.n, dtype=np.float32)
        for start, block in self._read_raw_blocks(read_rows):
            stop = start + block.shape[0]
            f = _to_f32(block).numpy()
            bad = ~np.isfinite(f).all(axis=1)
            if bad.any():
                raise GraphError(self._bad_rows_message(start + np.flatnonzero(bad), "NaN or Inf values"))
            norms = np.linalg.norm(f, axis=1)
            zero = norms <= 1e-12
            if zero.any():
                raise GraphError(self._bad_rows_message(start + np.flatnonzero(zero), "all-zero descriptors"))
            self.inv_norm[start:stop] = 1.0 / norms
            if self.cache is not None:
                self.cache[start:stop] = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float16))

    def _bad_rows_message(self, local: np.ndarray, what: str) -> str:
        if self.names is not None:
            shown = ", ".join(str(self.names[i]) for i in local[:5])
        else:
            shown = ", ".join(f"row {int(self.rows[i])}" for i in local[:5])
        return (f"{local.size} kept image(s) have {what} in store.zarr/descriptors (e.g. {shown}). Re-run "
                "`sparse-vggt describe --force`, or fix the bring-your-own descriptor file.")

    def _read_raw_blocks(self, block: int) -> Iterator[tuple[int, np.ndarray]]:
        """Raw (un-normalised) blocks of ok rows, reading contiguous row ranges of the array."""
        for start in range(0, self.n, block):
            sel = self.rows[start:start + block]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            chunk = np.asarray(self.array[lo:hi])
            yield start, chunk[sel - lo]

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Unit-norm float32 rows [start, stop) of the ok rows."""
        if self.cache is not None:
            out = self.cache[start:stop].float()
        else:
            sel = self.rows[start:stop]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            out = _to_f32(np.asarray(self.array[lo:hi])[sel - lo])
        return out.mul_(torch.from_numpy(self.inv_norm[start:stop])[:, None])

    def blocks(self, size: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.n, size):
            yield start, self.block(start, min(self.n, start + size))

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """Unit-norm float32 rows at arbitrary local indices (any order)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.cache is not None:
            out = torch.from_numpy(np.take(self.cache.numpy(), idx, axis=0)).float()  # np.take: ~4x faster
        else:
            order = np.argsort(idx, kind="stable")
            rows = self.rows[idx[order]]
            raw_sorted = _to_f32(_oindex(self.array, rows))
            out = torch.empty_like(raw_sorted)
            out[torch.from_numpy(order)] = raw_sorted
        return out.mul_(torch.from_numpy(self.inv_norm[idx])[:, None])


def _to_f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _oindex(array: Any, rows: np.ndarray) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array[rows]
    uniq, inv = np.unique(rows, return_inverse=True)
    return np.asarray(array.oindex[uniq, :])[inv]


# ----------------------------------------------------------------------------------------------------------
# kNN search (local indices 0..n-1 of the source)


def _merge_topk(best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    cs = torch.cat([best_s, s], dim=1)
    ci = torch.cat([best_i, i], dim=1)
    top_s, pos = torch.topk(cs, k=min(k, cs.shape[1]), dim=1)
    return top_s, torch.gather(ci, 1, pos)


def _full_merge(best_s: torch.Tensor, best_i: torch.Tensor, sim: torch.Tensor, col0: int, k: int) -> None:
    ids = torch.arange(col0, col0 + sim.shape[1]).expand(sim.shape[0], -1)
    top_s, top_i = _merge_topk(best_s, best_i, sim.contiguous(), ids, k)
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
    top_s, top_i = _merge_topk(best_s[rows], best_i[rows], new_s, new_i, k)
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


def knn_exact(src: DescriptorSource, k: int, block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine kNN (self excluded), streaming the descriptors in blocks: O(n^2 D / 2) time."""
    return symmetric_topk(src.block, src.n, k, block_size, desc="exact kNN")


@dataclass
class Projection:
    """PCA of unit descriptors: q.c ~ r(q).r(c) + c.mu + const(q), with r(x) = U^T (x - mu)."""

    mean: torch.Tensor  # (D,)
    basis: torch.Tensor  # (D, r)


def fit_pca(src: DescriptorSource, dim: int, sample: int, seed: int = 0) -> Projection:
    """PCA basis of a random sample of unit-norm descriptors (randomised SVD: never a D x D matrix)."""
    rng = np.random.default_rng(seed)
    m = min(src.n, max(sample, dim + 1))
    idx = np.sort(rng.choice(src.n, size=m, replace=False))
    xc = src.take(idx)
    mean = xc.mean(0)
    xc.sub_(mean)  # in place: the sample is the largest temporary of the graph stage
    r = min(dim, xc.shape[0] - 1, xc.shape[1])
    gen = torch.Generator().manual_seed(seed)
    q = min(r + 16, min(xc.shape))
    omega = torch.randn(xc.shape[1], q, generator=gen)
    y = xc @ omega
    for _ in range(2):  # power iterations sharpen the spectrum (descriptor spectra decay slowly)
        y, _ = torch.linalg.qr(y)
        y, _ = torch.linalg.qr(xc.T @ y)
        y = xc @ y
    qmat, _ = torch.linalg.qr(y)
    _, _, vh = torch.linalg.svd(qmat.T @ xc, full_matrices=False)
    return Projection(mean=mean, basis=vh[:r].T.contiguous())


def _project_all(src: DescriptorSource, proj: Projection, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced coordinates U^T (x - mu) (n, r) and the per-row bias x.mu (n,)."""
    red, bias = [], []
    for _, x in track(src.blocks(block_size), total=math.ceil(src.n / block_size), description="projecting"):
        red.append((x - proj.mean) @ proj.basis)
        bias.append(x @ proj.mean)
    return torch.cat(red), torch.cat(bias)


def candidates_pca(src: DescriptorSource, proj: Projection, c: int, block_size: int) -> np.ndarray:
    """Best ``c`` candidates per query by the reduced score r_i.r_j + x_j.mu (symmetric blocked search)."""
    red, bias = _project_all(src, proj, block_size)
    idx, _ = symmetric_topk(lambda a, b: red[a:b], src.n, c, block_size, bias=bias, desc="candidate search")
    return idx


def candidates_faiss(src: DescriptorSource, proj: Projection, c: int, block_size: int) -> np.ndarray:
    """Best ``c`` candidates per query from a faiss HNSW index over the reduced projection (sub-quadratic)."""
    import faiss

    red, bias = _project_all(src, proj, block_size)
    # database vectors [r_j, x_j.mu], queries [r_i, 1]: inner product = the reduced score of candidates_pca
    xb = torch.cat([red, bias[:, None]], 1).numpy()
    xq = torch.cat([red, torch.ones(red.shape[0], 1)], 1).numpy()
    index = faiss.IndexHNSWFlat(xb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(xb)
    index.hnsw.efSearch = max(2 * (c + 1), 128)
    _, idx = index.search(xq, c + 1)
    out = np.empty((src.n, c), dtype=np.int64)
    for i in range(src.n):  # drop self, keep c
        row = idx[i][(idx[i] != i) & (idx[i] >= 0)][:c]
        if row.size < c:  # HNSW may return fewer; pad with the best we have (re-rank removes duplicates)
            row = np.concatenate([row, np.full(c - row.size, row[0] if row.size else (i + 1) % src.n)])
        out[i] = row
    return out


def rerank(src: DescriptorSource, cand: np.ndarray, k: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each query against its candidates on the full descriptors; keep the best k."""
    n, c = cand.shape
    if src.cached and float(1.0 / src.inv_norm.min()) < 16.0:
        sims = _fp16_scores_exact_near_top(src, cand, k, chunk)
    else:
        sims = pair_similarity(src, np.repeat(np.arange(n), c), cand.reshape(-1), chunk_queries=chunk,
                               per_query=c).reshape(n, c)
    # duplicates among candidates (faiss padding) must not count twice
    order = np.argsort(-sims, axis=1, kind="stable")
    sims_sorted = np.take_along_axis(sims, order, 1)
    cand_sorted = np.take_along_axis(cand, order, 1)
    dup = np.zeros_like(cand_sorted, dtype=bool)
    srt = np.sort(cand_sorted, axis=1)
    if np.any(srt[:, 1:] == srt[:, :-1]):
        for i in np.flatnonzero(np.any(srt[:, 1:] == srt[:, :-1], axis=1)):
            _, first = np.unique(cand_sorted[i], return_index=True)
            mask = np.ones(c, bool)
            mask[first] = False
            dup[i] = mask
    sims_sorted = np.where(dup, -np.inf, sims_sorted)
    order2 = np.argsort(-sims_sorted, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand_sorted, order2, 1), np.take_along_axis(sims_sorted, order2, 1)


def _fp16_scores_exact_near_top(src: DescriptorSource, cand: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Candidate scores: fp16 batched dot products (fp32 accumulation, fp16 result) for all candidates, then
    exact fp32 recomputation of every candidate that could be in the top k.

    Why: converting gathered fp16 rows to fp32 costs ~4x more than the fp16 kernel on CPU. The fp16 result is
    off by at most half an fp16 ulp, so every candidate within a few ulps of the k-th fp16 score is recomputed
    exactly; the returned top-k and their similarities are those of the exact fp32 computation.
    """
    n, c = cand.shape
    cache = src.cache.numpy()
    inv = src.inv_norm
    sims = np.empty((n, c), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        cj = cand[s:e]
        q16 = torch.from_numpy(cache[s:e])
        c16 = torch.from_numpy(np.take(cache, cj.reshape(-1), axis=0)).view(e - s, c, -1)
        raw = torch.bmm(c16, q16[:, :, None])[..., 0].float().numpy()
        sims[s:e] = raw * inv[s:e, None] * inv[cj]
    kk = min(k, c)
    kth = -np.partition(-sims, kk - 1, axis=1)[:, kk - 1]
    raw_kth = np.abs(kth) / (inv.max() ** 2)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(raw_kth, 2.0 ** -14))) - 10)
    margin = 2.0 * ulp * float(inv.max() ** 2)  # 0.5 ulp rounding on each side, doubled for safety
    qi, pj = np.nonzero(sims >= (kth - margin)[:, None])
    sims[qi, pj] = pair_similarity(src, qi, cand[qi, pj])
    return sims


def pair_similarity(src: DescriptorSource, i: np.ndarray, j: np.ndarray, chunk_queries: int = 64,
                    per_query: int | None = None) -> np.ndarray:
    """Exact cosine for arbitrary pairs (i[p], j[p]).

    Cached descriptors: gathered in chunks. Streamed descriptors: pairs are grouped by super-block so every
    super-block pair is decoded once and memory stays bounded by two super-blocks.
    """
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    out = np.empty(i.size, dtype=np.float32)
    if i.size == 0:
        return out
    if src.cached:
        if per_query is not None:  # fixed candidates per query: one query row against its c rows (bmm)
            n = i.size // per_query
            for s in range(0, n, chunk_queries):
                e = min(n, s + chunk_queries)
                q = src.take(i[s * per_query:e * per_query:per_query])
                d = src.take(j[s * per_query:e * per_query]).view(e - s, per_query, -1)
                out[s * per_query:e * per_query] = torch.bmm(d, q[:, :, None]).reshape(-1).numpy()
            return out
        step = chunk_queries * 64
        for s in range(0, i.size, step):
            a = src.take(i[s:s + step])
            b = src.take(j[s:s + step])
            out[s:s + step] = (a * b).sum(1).numpy()
        return out
    # streaming: super-blocks of rows sized so two of them (float32) fit the memory budget
    sb = max(src.read_rows, src.memory_bytes // (4 * src.dim * 4))
    bi, bj = i // sb, j // sb
    lo, hi = np.minimum(bi, bj), np.maximum(bi, bj)
    key = lo * (src.n // sb + 1) + hi
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    for grp in np.split(order, bounds):
        a_id, b_id = int(lo[grp[0]]), int(hi[grp[0]])
        a0, b0 = a_id * sb, b_id * sb
        blk = src.block(a0, min(src.n, a0 + sb))
        na = blk.shape[0]
        if b_id != a_id:
            blk = torch.cat([blk, src.block(b0, min(src.n, b0 + sb))])

        def local(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.where(x // sb == a_id, x - a0, x - b0 + na))

        for s in range(0, grp.size, 8192):
            g = grp[s:s + 8192]
            out[g] = (blk[local(i[g])] * blk[local(j[g])]).sum(1).numpy()
    return out


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
        best_s, best_i = _merge_topk(best_s, best_i, s, ids, k)
    kth = best_s[:, -1].numpy()
    got = idx[q_idx, :k]
    valid = (got >= 0) & (got != q_idx[:, None])
    sims = np.full(got.shape, -np.inf, np.float32)
    if valid.any():
        qi, pj = np.nonzero(valid)
        sims[qi, pj] = pair_similarity(src, q_idx[qi], got[qi, pj])
    hits = np.minimum((sims >= kth[:, None] - 1e-5).sum(1), k)
    return float(np.mean(hits) / k)


# Cost model of the two searches on CPU, in multiply-add equivalents, fitted to the phase timings of
# benchmarks/graph.py (BENCHMARKS.md, "graph.method=auto: where exact search is not slower"):
#   exact  n^2/2 (D + _TOPK_MACS)                        blocked Gram tiles + the per-score top-k filter
#   pca    n^2/2 (r + 1 + _TOPK_MACS)                    candidate search in r dimensions, same filter
#          + _RERANK_SLOWDOWN n c D                       exact re-rank of c candidates (gathered fp16 rows: slow)
#          + _FIT_FACTOR min(n, pca_sample) D (r + 16)    randomised PCA with power iterations
# Exact search is chosen where it is predicted not to be slower; recall is measured either way.
_TOPK_MACS = 1500.0
_RERANK_SLOWDOWN = 64.0
_FIT_FACTOR = 11.0


def exact_is_not_slower(n: int, dim: int, k: int, cfg: GraphConfig) -> bool:
    """True where the exact search is predicted to take no longer than the PCA candidate path."""
    if dim <= cfg.pca_dim or n - 1 <= max(k, cfg.candidates):
        return True
    c = max(k, min(cfg.candidates, n - 1))
    exact = 0.5 * n * n * (dim + _TOPK_MACS)
    approx = (0.5 * n * n * (cfg.pca_dim + 1 + _TOPK_MACS) + _RERANK_SLOWDOWN * n * c * dim
              + _FIT_FACTOR * min(n, cfg.pca_sample) * dim * (cfg.pca_dim + 16))
    return exact <= approx


def knn(src: DescriptorSource, k: int, cfg: GraphConfig, timings: dict[str, float] | None = None
        ) -> tuple[np.ndarray, np.ndarray, str]:
    """kNN by cosine with the configured method; returns (indices, similarities, method used)."""
    timings = timings if timings is not None else {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(now - tick, 2)
        tick = now
    method = cfg.method.lower()
    if method not in {"auto", "exact", "pca", "faiss"}:
        raise GraphError(f"graph.method={cfg.method!r}: use auto, exact, pca or faiss")
    if method == "auto":
        method = "exact" if exact_is_not_slower(src.n, src.dim, k, cfg) else "pca"
    if method == "exact" or src.n - 1 <= max(k, cfg.candidates):
        idx, sim = knn_exact(src, k, cfg.block_size)
        lap("exact_knn")
        return idx, sim, "exact"
    proj = fit_pca(src, cfg.pca_dim, cfg.pca_sample, cfg.seed)
    lap("pca_fit")
    c = max(k, min(cfg.candidates, src.n - 1))
    if method == "faiss":
        cand = candidates_faiss(src, proj, c, cfg.block_size)
    else:
        cand = candidates_pca(src, proj, c, cfg.block_size)
    lap("candidates")
    idx, sim = rerank(src, cand, k)
    lap("rerank")
    return idx, sim, method


# ----------------------------------------------------------------------------------------------------------
# edges


def knn_pairs(idx: np.ndarray, sim: np.ndarray, min_similarity: float, mutual: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected (i < j) retrieval pairs with their cosine; union symmetrisation unless ``mutual``."""
    n, k = idx.shape
    qi = np.repeat(np.arange(n, dtype=np.int64), k)
    qj = idx.reshape(-1).astype(np.int64)
    qs = sim.reshape(-1)
    keep = np.isfinite(qs) & (qs >= min_similarity) & (qj != qi)
    qi, qj, qs = qi[keep], qj[keep], qs[keep]
    a, b = np.minimum(qi, qj), np.maximum(qi, qj)
    key = a * n + b
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    if mutual:
        sel = counts >= 2  # found from both ends
        uniq, first = uniq[sel], first[sel]
    return a[first], b[first], qs[first].astype(np.float32)


def sequence_pairs(order: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image linked to the next ``window`` images of ``order`` (local indices)."""
    if window <= 0 or order.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = [], []
    for w in range(1, window + 1):
        a.append(order[:-w])
        b.append(order[w:])
    a_, b_ = np.concatenate(a), np.concatenate(b)
    return np.minimum(a_, b_), np.maximum(a_, b_)


def _ecef(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    return _EARTH_RADIUS_M * np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)


def gps_pairs(lat: np.ndarray, lon: np.ndarray, radius_m: float, max_neighbors: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of images with GPS within ``radius_m`` (chord distance; at most ``max_neighbors`` per image)."""
    from scipy.spatial import cKDTree

    has = np.flatnonzero(np.isfinite(lat) & np.isfinite(lon))
    if radius_m <= 0 or has.size < 2 or max_neighbors <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    xyz = _ecef(lat[has], lon[has])
    tree = cKDTree(xyz)
    kq = min(max_neighbors + 1, has.size)
    dist, nb = tree.query(xyz, k=kq, distance_upper_bound=radius_m)
    dist, nb = dist.reshape(has.size, kq), nb.reshape(has.size, kq)
    rows = np.repeat(np.arange(has.size), kq)
    ok = np.isfinite(dist.reshape(-1)) & (nb.reshape(-1) != rows) & (nb.reshape(-1) < has.size)
    a = has[rows[ok]]
    b = has[nb.reshape(-1)[ok]]
    return np.minimum(a, b), np.maximum(a, b)


def gps_distance(lat: np.ndarray, lon: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle-ish (chord) distance in metres; NaN where either image has no GPS."""
    pa_, pb_ = _ecef(lat[a], lon[a]), _ecef(lat[b], lon[b])
    return np.linalg.norm(pa_ - pb_, axis=1)


# ----------------------------------------------------------------------------------------------------------
# geometric verification (runs in worker processes)

_VERIFY: dict[str, Any] = {}


def _verify_init(root: str, paths: list[str], features: str, max_side: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _VERIFY.update(root=root, paths=paths, features=features, max_side=max_side)
    _features.cache_clear()


@lru_cache(maxsize=128)
def _features(i: int) -> tuple[np.ndarray, np.ndarray | None]:
    import cv2

    from .ingest import load_image

    img = load_image(Path(_VERIFY["root"]) / _VERIFY["paths"][i]).convert("L")
    scale = _VERIFY["max_side"] / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    gray = np.asarray(img)
    if _VERIFY["features"] == "orb":
        det = cv2.ORB_create(nfeatures=4000)
    else:
        det = cv2.SIFT_create(nfeatures=2048)
    kps, desc = det.detectAndCompute(gray, None)
    pts = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
    return pts, desc


def _verify_pair(i: int, j: int) -> int:
    import cv2

    pi, di = _features(i)
    pj, dj = _features(j)
    if di is None or dj is None or len(pi) < 8 or len(pj) < 8:
        return 0
    norm = cv2.NORM_HAMMING if _VERIFY["features"] == "orb" else cv2.NORM_L2
    matcher = cv2.BFMatcher(norm)
    fwd = matcher.knnMatch(di, dj, k=2)
    back = {m.queryIdx: m.trainIdx for m in matcher.match(dj, di)}
    # Lowe ratio test + mutual nearest neighbour: keeps random matches (and thus chance F fits) rare
    good = [m[0] for m in fwd
            if len(m) == 2 and m[0].distance < 0.8 * m[1].distance and back.get(m[0].trainIdx) == m[0].queryIdx]
    if len(good) < 8:
        return 0
    a = pi[[m.queryIdx for m in good]]
    b = pj[[m.trainIdx for m in good]]
    _, mask = cv2.findFundamentalMat(a, b, cv2.USAC_MAGSAC, 1.5, 0.999, 10000)
    return 0 if mask is None else int(mask.sum())


def _verify_batch(pairs: np.ndarray) -> np.ndarray:
    out = np.zeros(len(pairs), dtype=np.int32)
    for n, (i, j) in enumerate(pairs):
        try:
            out[n] = _verify_pair(int(i), int(j))
        except Exception as exc:  # one unreadable photo must not kill the stage; the pair is just unverified
            log.warning("verification of %s / %s failed: %s", _VERIFY["paths"][i], _VERIFY["paths"][j], exc)
            out[n] = -1
    return out


def verify_pairs(root: Path, paths: Sequence[str], a: np.ndarray, b: np.ndarray, cfg: GraphConfig
                 ) -> np.ndarray:
    """RANSAC inlier count per pair (-1 = an image could not be read), parallel over pairs.

    Pairs are sorted by first image and split into contiguous batches so each worker's feature cache is
    reused; features are never held for all images at once (city scale).
    """
    if cfg.verify_features not in {"sift", "orb"}:
        raise GraphError(f"graph.verify_features={cfg.verify_features!r}: use sift or orb")
    pairs = np.stack([a, b], 1)
    order = np.lexsort((b, a))
    pairs = pairs[order]
    workers = cfg.verify_workers or (os.cpu_count() or 1)
    batch = max(1, min(256, math.ceil(len(pairs) / (workers * 4))))
    batches = [pairs[s:s + batch] for s in range(0, len(pairs), batch)]
    init = (str(root), list(paths), cfg.verify_features, cfg.verify_max_side)
    results: list[np.ndarray] = []
    if workers <= 1:
        _verify_init(*init)
        for bt in track(batches, total=len(batches), description="verifying pairs"):
            results.append(_verify_batch(bt))
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch/zarr threads started is unsafe
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_verify_init,
                                 initargs=init) as pool:
            for r in track(pool.map(_verify_batch, batches), total=len(batches), description="verifying pairs"):
                results.append(r)
    inl = np.concatenate(results) if results else np.zeros(0, np.int32)
    out = np.empty_like(inl)
    out[order] = inl
    return out


# ----------------------------------------------------------------------------------------------------------
# assembly


def to_csr(n_rows: int, a: np.ndarray, b: np.ndarray, w: np.ndarray, src_bits: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric CSR (indptr, indices, weights, edge_source) over all rows from undirected pairs a < b."""
    rows = np.concatenate([a, b])
    cols = np.concatenate([b, a])
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    ww = np.concatenate([w, w])[order].astype(np.float32)
    ss = np.concatenate([src_bits, src_bits])[order].astype(np.uint8)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), cols.astype(np.int64), ww, ss


def components(n_rows: int, ok_rows: np.ndarray, indptr: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Connected-component id per row (0 = largest), -1 for rows that are not ok."""
    mat = sp.csr_matrix((np.ones(indices.size, np.int8), indices, indptr), shape=(n_rows, n_rows))
    sub = mat[ok_rows][:, ok_rows]
    ncomp, lab = connected_components(sub, directed=False)
    sizes = np.bincount(lab, minlength=ncomp)
    rank = np.empty(ncomp, dtype=np.int64)
    # largest first; ties by smallest member for determinism
    first = np.full(ncomp, np.iinfo(np.int64).max)
    np.minimum.at(first, lab, np.arange(lab.size))
    rank[np.lexsort((first, -sizes))] = np.arange(ncomp)
    out = np.full(n_rows, -1, dtype=np.int64)
    out[ok_rows] = rank[lab]
    return out


def _degree_stats(indptr: np.ndarray, ok_rows: np.ndarray) -> dict[str, float]:
    deg = np.diff(indptr)[ok_rows]
    if deg.size == 0:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0, "isolated": 0}
    return {"min": int(deg.min()), "mean": round(float(deg.mean()), 3), "median": float(np.median(deg)),
            "max": int(deg.max()), "isolated": int((deg == 0).sum())}


def _sequence_order(table: pa.Table, ok_rows: np.ndarray) -> tuple[np.ndarray, str]:
    names = table.column("path").to_pylist()
    ts = table.column("timestamp") if "timestamp" in table.column_names else None
    if ts is not None:
        vals = ts.to_pylist()
        sub = [vals[r] for r in ok_rows]
        if sub and all(v is not None for v in sub):
            keys = [(v, names[r]) for v, r in zip(sub, ok_rows)]
            return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64), "capture_time"
    keys = [names[r] for r in ok_rows]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64), "file_order"


def _float_col(table: pa.Table, name: str, rows: np.ndarray) -> np.ndarray:
    if name not in table.column_names:
        return np.full(rows.size, np.nan)
    col = table.column(name).to_numpy(zero_copy_only=False)
    return np.asarray(col, dtype=np.float64)[rows]


def _descriptors_version(store: RunStore) -> str | None:
    """Changes whenever describe rewrites the descriptors, so a stale graph is never reused."""
    return store.zarr["descriptors"].attrs.get("version") if "descriptors" in store.zarr else None


def build_graph(run_dir: Path, config: PipelineConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The graph stage: kNN + priors (+ verification) -> symmetric CSR and components in store.zarr/graph."""
    t0 = time.perf_counter()
    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg = config.graph
    settings = config.result_affecting()["graph"]
    if (not force and store.is_stage_complete("graph") and store.is_unit_complete("graph")
            and store.zarr["graph"].attrs.get("config") == settings
            and store.zarr["graph"].attrs.get("descriptors_version") == _descriptors_version(store)):
        log.info("graph stage already finished in %s with the same settings; nothing to do", store.root)
        return store.stage_manifest("graph")
    store.require_stage("describe", "graph")
    if cfg.k < 0:
        raise GraphError(f"graph.k={cfg.k} must be >= 0")
    table = store.read_table("images")
    status = np.array(table.column("status").to_pylist(), dtype=object)
    n_rows = len(status)
    ok_rows = np.flatnonzero(status == "ok").astype(np.int64)
    if ok_rows.size == 0:
        raise GraphError(f"{store.root}: zero kept images (all {n_rows} were skipped at scan); nothing to "
                         "connect. Check `sparse-vggt status` / images.parquet status column.")
    if "descriptors" not in store.zarr:
        raise GraphError(f"{store.root}: store.zarr/descriptors is missing; run `sparse-vggt describe` first.")
    arr = store.zarr["descriptors"]
    if arr.shape[0] != n_rows:
        raise GraphError(f"store.zarr/descriptors has {arr.shape[0]} rows but images.parquet has {n_rows}; "
                         "re-run `sparse-vggt describe --force`.")
    names = table.column("path").to_pylist()
    store.stage_started("graph")
    ok_names = [names[r] for r in ok_rows]
    timings: dict[str, float] = {}
    t_read = time.perf_counter()
    src = DescriptorSource(arr, ok_rows, memory_bytes=cfg.memory_mb << 20, names=ok_names,
                           read_rows=max(cfg.block_size, 1))
    timings["read_check"] = round(time.perf_counter() - t_read, 2)
    n = src.n
    k = cfg.k
    warnings: list[str] = []
    if k >= n:
        msg = f"graph.k={cfg.k} >= number of kept images {n}: clamped to k={n - 1} (every image links to all)"
        log.warning(msg)
        warnings.append(msg)
        k = n - 1
    priors: list[str] = []

    # retrieval
    recall = float("nan")
    method = "none"
    if k > 0:
        idx, sim, method = knn(src, k, cfg, timings)
        # every method is checked (exact too: a cheap self-check) so a degraded graph never goes unnoticed
        t_rec = time.perf_counter()
        recall = measure_recall(src, idx, k, cfg.recall_sample, cfg.block_size, cfg.seed)
        timings["recall_check"] = round(time.perf_counter() - t_rec, 2)
        if not math.isnan(recall) and recall < cfg.min_recall:
            msg = (f"{method} kNN recall@{k} = {recall:.3f} on {min(cfg.recall_sample, n)} sampled queries is below "
                   f"graph.min_recall = {cfg.min_recall}: covisible pairs are missing from the graph. Use "
                   "graph.method=exact (O(n^2 D) time) or raise graph.candidates / graph.pca_dim.")
            log.warning(msg)
            warnings.append(msg)
        else:
            log.info("%s kNN recall@%d vs exact on %d queries: %.4f", method, k, min(cfg.recall_sample, n), recall)
        ra, rb, rs = knn_pairs(idx, sim, cfg.min_similarity, cfg.mutual)
    else:
        ra = rb = np.zeros(0, np.int64)
        rs = np.zeros(0, np.float32)
    parts_a, parts_b, parts_src = [ra], [rb], [np.full(ra.size, SRC_RETRIEVAL, np.uint8)]

    # priors
    lat = _float_col(table, "gps_lat", ok_rows)
    lon = _float_col(table, "gps_lon", ok_rows)
    seq_basis = None
    if cfg.sequence_neighbors > 0:
        order, seq_basis = _sequence_order(table, ok_rows)
        sa, sb = sequence_pairs(order, cfg.sequence_neighbors)
        parts_a.append(sa), parts_b.append(sb), parts_src.append(np.full(sa.size, SRC_SEQUENCE, np.uint8))
        priors.append(f"sequence:{cfg.sequence_neighbors}:{seq_basis}")
    n_gps = int((np.isfinite(lat) & np.isfinite(lon)).sum())
    if cfg.gps_radius_m > 0:
        ga, gb = gps_pairs(lat, lon, cfg.gps_radius_m, cfg.gps_neighbors)
        parts_a.append(ga), parts_b.append(gb), parts_src.append(np.full(ga.size, SRC_GPS, np.uint8))
        priors.append(f"gps_radius:{cfg.gps_radius_m}m")
    a = np.concatenate(parts_a)
    b = np.concatenate(parts_b)
    bits = np.concatenate(parts_src)
    key = a * n + b
    uniq, inv = np.unique(key, return_inverse=True)
    merged_bits = np.zeros(uniq.size, np.uint8)
    np.bitwise_or.at(merged_bits, inv, bits)
    a, b, bits = uniq // n, uniq % n, merged_bits
    # cosine weight for every pair (retrieval pairs already have it; priors get it computed exactly)
    w = np.empty(a.size, np.float32)
    rkey = ra * n + rb
    pos = np.searchsorted(uniq, rkey)
    w[pos] = rs
    need = (bits & SRC_RETRIEVAL) == 0
    if need.any():
        w[need] = pair_similarity(src, a[need], b[need])
    dropped_gps = 0
    if cfg.gps_max_distance_m > 0:
        d = gps_distance(lat, lon, a, b)
        far = np.isfinite(d) & (d > cfg.gps_max_distance_m)
        dropped_gps = int(far.sum())
        a, b, w, bits = a[~far], b[~far], w[~far], bits[~far]
        priors.append(f"gps_max_distance:{cfg.gps_max_distance_m}m")
    candidates_pairs = int(a.size)

    verify_info: dict[str, Any] = {}
    weight_kind = "cosine"
    if cfg.verify and a.size:
        root = table.schema.metadata.get(b"photos_root") if table.schema.metadata else None
        if root is None:
            raise GraphError("images.parquet has no photos_root metadata; graph.verify needs the photos. "
                             "Re-run `sparse-vggt scan`, or set graph.verify=false.")
        inl = verify_pairs(Path(root.decode()), ok_names, a, b, cfg)
        ok = inl >= cfg.verify_min_inliers
        verify_info = {"pairs_checked": int(a.size), "pairs_verified": int(ok.sum()),
                       "pairs_unreadable": int((inl < 0).sum()),
                       "median_inliers_verified": float(np.median(inl[ok])) if ok.any() else 0.0}
        a, b, w, bits = a[ok], b[ok], inl[ok].astype(np.float32), bits[ok] | SRC_VERIFIED
        weight_kind = "inliers"
        priors.append(f"verified:{cfg.verify_features}>={cfg.verify_min_inliers}")

    ga_, gb_ = ok_rows[a], ok_rows[b]
    indptr, indices, weights, edge_src = to_csr(n_rows, ga_, gb_, w, bits)
    comp = components(n_rows, ok_rows, indptr, indices)
    sizes = np.bincount(comp[ok_rows]) if n else np.zeros(0, np.int64)

    store.remove_group("graph")
    grp = store.group("graph")
    chunk = max(1, min(1 << 20, max(indices.size, 1)))
    store.write_array(grp, "indptr", indptr, chunks=(min(1 << 20, indptr.size),))
    store.write_array(grp, "indices", indices, chunks=(chunk,))
    store.write_array(grp, "weights", weights, chunks=(chunk,))
    store.write_array(grp, "edge_source", edge_src, chunks=(chunk,))
    store.write_array(grp, "component", comp, chunks=(min(1 << 20, comp.size),))
    manifest: dict[str, Any] = {
        "images": int(n), "rows": int(n_rows), "method": method, "k": int(k), "k_requested": int(cfg.k),
        "mutual": bool(cfg.mutual), "min_similarity": float(cfg.min_similarity),
        "recall_at_k": None if math.isnan(recall) else round(recall, 4),
        "recall_sample": int(min(cfg.recall_sample, n)) if method != "none" and not math.isnan(recall) else 0,
        "min_recall": float(cfg.min_recall),
        "recall_ok": None if math.isnan(recall) else bool(recall >= cfg.min_recall),
        "candidate_pairs": candidates_pairs, "edges": int(indices.size // 2), "weights": weight_kind,
        "priors": priors, "images_with_gps": n_gps, "pairs_dropped_by_gps": dropped_gps,
        "degree": _degree_stats(indptr, ok_rows), "components": int(sizes.size),
        "largest_component": int(sizes.max()) if sizes.size else 0,
        "singleton_components": int((sizes == 1).sum()),
        "component_sizes_top": [int(s) for s in sizes[:10]],
        "seconds": round(time.perf_counter() - t0, 2), "timings": timings, "warnings": warnings,
    }
    if verify_info:
        manifest["verification"] = verify_info
    store.mark_unit_complete("graph", config=settings, descriptors_version=_descriptors_version(store),
                             method=method, k=int(k), priors=priors, weights=weight_kind,
                             mutual=bool(cfg.mutual), min_similarity=float(cfg.min_similarity),
                             recall_at_k=manifest["recall_at_k"], recall_ok=manifest["recall_ok"],
                             edge_source_bits={"retrieval": SRC_RETRIEVAL, "sequence": SRC_SEQUENCE,
                                               "gps": SRC_GPS, "verified": SRC_VERIFIED})
    store.stage_finished("graph", manifest)
    log.info("graph: %d images, %d edges, %d components (largest %d)", n, manifest["edges"],
             manifest["components"], manifest["largest_component"])
    return manifest
run = lambda run_dir, config=None, *, force=False, units=None: build_graph(run_dir, config, force=force)  # noqa: E731  # TEMP r18-sched
