"""Retrieval neighbours: cosine kNN over the kept images, exact or through a reduced candidate search.

Three methods: ``exact`` (blocked search on the full descriptors), ``pca`` (blocked search on a PCA projection
fitted on a sample, then exact re-ranking of the best candidates) and ``faiss`` (HNSW over the same projection,
sub-quadratic, then the same re-ranking). ``auto`` picks exact wherever a cost model fitted to
benchmarks/graph.py predicts it is not slower; recall is measured for every method (``recall.py``).
Indices are local (0..n-1 of the descriptor source).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import GraphConfig
from ..progress import track
from .source import DescriptorSource, GraphError, pair_similarity
from .topk import symmetric_topk


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

