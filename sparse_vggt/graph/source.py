"""The descriptors the graph is built from, and the exact cosine of arbitrary pairs of them.

This is the lowest floor of the graph package: every search (``knn``, ``recall``) and the stage read descriptors
through ``DescriptorSource``, which checks them once (NaN/Inf, zero norm) and keeps an fp16 copy in RAM when they
fit the memory budget, otherwise streams them from Zarr. ``GraphError`` lives here because bad input is first
seen here.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch


class GraphError(ValueError):
    """The graph cannot be built from this input; the message says what to fix."""


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

