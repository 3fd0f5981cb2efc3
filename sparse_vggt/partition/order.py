"""Each cluster's frame order and per-frame attention neighbours (step 8 of the algorithm).

Position 0 is the reference frame VGGT puts at the origin: the core frame with the largest in-cluster weighted
degree; the other frames follow by hop distance from it. Each frame's neighbour set (its top-k in-cluster
neighbours by edge weight) becomes the sparse global attention mask of reconstruct. Vectorised over all clusters
in blocks of rows, which bounds memory on million-frame graphs.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra

from ..progress import track
from .clusters import Clusters, PartitionError, group_rank, ranges

_ROWS_PER_CHUNK = 262_144  # membership rows per vectorised order/neighbour block (bounds memory)


def _order_block(mc: np.ndarray, mg: np.ndarray, core: np.ndarray, A: sp.csr_matrix, k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For rows sorted by (cluster, frame): output order, positions, neighbour offsets and values."""
    R = mc.size
    n = A.shape[0]
    deg = np.diff(A.indptr)[mg].astype(np.int64)
    # in-cluster edges of each row: through the frame's graph neighbours, or, for hub frames with more
    # neighbours than their cluster has frames, through the cluster's frames (bounds the work by R * M)
    cstart = np.flatnonzero(np.r_[True, mc[1:] != mc[:-1]])
    csize = np.diff(np.r_[cstart, R])
    row_start = np.repeat(cstart, csize)
    row_size = np.repeat(csize, csize)
    low = deg <= row_size
    rl = np.flatnonzero(low)
    rep = np.repeat(rl, deg[rl])
    eidx = ranges(A.indptr[mg[rl]], deg[rl])
    h = A.indices[eidx].astype(np.int64)
    w = A.data[eidx]
    rkey = mc * n + mg
    key = mc[rep] * n + h
    pos = np.minimum(np.searchsorted(rkey, key), R - 1)
    ok = rkey[pos] == key
    i, j, w = rep[ok], pos[ok], w[ok]
    del rep, eidx, h, key, pos, ok
    rh = np.flatnonzero(~low)
    if rh.size:
        gkeys = np.repeat(np.arange(n, dtype=np.int64), np.diff(A.indptr)) * n + A.indices
        rep = np.repeat(rh, row_size[rh])
        jj = ranges(row_start[rh], row_size[rh])
        key = mg[rep] * n + mg[jj]
        pos = np.minimum(np.searchsorted(gkeys, key), max(gkeys.size - 1, 0))
        ok = (gkeys[pos] == key) & (rep != jj) if gkeys.size else np.zeros(key.size, bool)
        i, j, w = np.r_[i, rep[ok]], np.r_[j, jj[ok]], np.r_[w, A.data[pos[ok]]]
    strength = np.bincount(i, weights=w, minlength=R)
    # reference: core frame with the largest in-cluster weighted degree
    o = np.lexsort((mg, -strength, ~core, mc))
    first = np.r_[True, mc[o][1:] != mc[o][:-1]]
    refs = o[first]
    G = sp.csr_matrix((np.ones(i.size + refs.size, np.int8),
                       (np.r_[i, np.full(refs.size, R)], np.r_[j, refs])), shape=(R + 1, R + 1))
    dist = dijkstra(G, directed=True, indices=R, unweighted=True)[:R]
    if not np.all(np.isfinite(dist)):
        raise PartitionError("internal error: a cluster is not connected")  # pragma: no cover
    out = np.lexsort((mg, -strength, dist, mc))
    position = np.empty(R, np.int64)
    position[out] = group_rank(mc[out])
    inv = np.empty(R, np.int64)
    inv[out] = np.arange(R)
    e = np.lexsort((mg[j], -w, inv[i]))
    ie = inv[i][e]
    keep = group_rank(ie) < k
    ie, vals = ie[keep], mg[j][e][keep]
    offsets = np.zeros(R + 1, np.int64)
    np.cumsum(np.bincount(ie, minlength=R), out=offsets[1:])
    return out, position[out], offsets, vals


def order_and_neighbors(mc: np.ndarray, mg: np.ndarray, core: np.ndarray, comp: np.ndarray,
                         A: sp.csr_matrix, k: int) -> Clusters:
    """Clusters rows (sorted by cluster, position) from membership arrays (any order)."""
    o = np.lexsort((mg, mc))
    mc, mg, core = mc[o], mg[o], core[o]
    R = mc.size
    bounds = np.flatnonzero(np.r_[True, mc[1:] != mc[:-1]]) if R else np.zeros(0, np.int64)
    cuts = [0]
    for b in bounds.tolist():
        if b - cuts[-1] >= _ROWS_PER_CHUNK:
            cuts.append(b)
    cuts.append(R)
    parts: list[Clusters] = []
    spans = list(zip(cuts[:-1], cuts[1:]))
    for s, e in track(spans, total=len(spans), description="cluster order + neighbours"):
        if e <= s:
            continue
        out, position, offsets, vals = _order_block(mc[s:e], mg[s:e], core[s:e], A, k)
        g = mg[s:e][out]
        parts.append(Clusters(mc[s:e][out], g, core[s:e][out], comp[g], position, offsets, vals))
    if not parts:
        z = np.zeros(0, np.int64)
        return Clusters(z, z, np.zeros(0, bool), z, z, np.zeros(1, np.int64), z)
    return Clusters.concat(parts)
