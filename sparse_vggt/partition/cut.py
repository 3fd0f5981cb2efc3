"""Cutting one connected component into core parts: METIS k-way, connectivity repair and the core-size cap.

METIS (pymetis) gives balanced, low-cut parts but neither connected parts nor a hard size bound; ``_repair``
makes every part induce a connected subgraph and ``_enforce_cap`` re-cuts parts above the cap, falling back to
breadth-first runs where METIS cannot shrink a part (star-like graphs). Steps 2-4 of the algorithm in
:mod:`sparse_vggt.partition.algorithm`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, connected_components

from ..config import PartitionConfig
from .clusters import PartitionError

log = logging.getLogger(__name__)

WEIGHT_SCALE = 1000  # integer resolution of METIS edge weights


def _int_weights(data: np.ndarray, wmax: float) -> np.ndarray:
    if wmax <= 0:
        return np.ones(data.size, np.int64)
    return np.clip(np.rint(data / wmax * WEIGHT_SCALE), 1, WEIGHT_SCALE).astype(np.int64)


def _metis(A: sp.csr_matrix, nparts: int, wmax: float, tol: float, seed: int) -> np.ndarray:
    """METIS k-way labels (compacted to 0..p-1); contiguity requested, dropped if METIS refuses it."""
    n = A.shape[0]
    if nparts <= 1 or n <= 1:
        return np.zeros(n, np.int64)
    import pymetis

    dt = pymetis.zero_copy_dtype()
    adj = pymetis.CSRAdjacency(A.indptr.astype(dt), A.indices.astype(dt))
    ew = _int_weights(A.data, wmax).astype(dt)
    labels = None
    for contig in (1, 0):
        opts = pymetis.Options(seed=int(seed), ufactor=max(1, int(round(tol * 1000))), contig=contig)
        try:
            res = pymetis.part_graph(int(nparts), adjacency=adj, eweights=ew, options=opts)
            labels = np.asarray(res.vertex_part, dtype=np.int64)
            break
        except Exception as exc:  # METIS refuses contig on some inputs; retry without
            log.debug("METIS (contig=%d) failed: %s", contig, exc)
    if labels is None:
        raise PartitionError(f"METIS failed to cut a component of {n} frames into {nparts} parts")
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)


def _repair(A: sp.csr_matrix, labels: np.ndarray, cap: int, stats: dict[str, int]) -> np.ndarray:
    """Make every part induce a connected subgraph (the graph A itself must be connected).

    The largest piece of each part keeps the part; each other piece moves to the adjacent part (via that part's
    kept piece) it is most tied to that has room under ``cap``, else becomes a new part. Pieces touching only
    other moving pieces wait for the next round. Each round resolves at least one piece, so this terminates.
    """
    labels = labels.astype(np.int64).copy()
    n = labels.size
    coo = A.tocoo()
    u, v, w = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    for _ in range(n + 1):
        same = labels[u] == labels[v]
        G = sp.csr_matrix((np.ones(int(same.sum()), np.int8), (u[same], v[same])), shape=(n, n))
        npc, piece = connected_components(G, directed=False)
        nparts = int(labels.max()) + 1
        if npc == nparts:
            return labels
        psize = np.bincount(piece, minlength=npc)
        ppart = np.empty(npc, np.int64)
        ppart[piece] = labels
        order = np.lexsort((np.arange(npc), -psize, ppart))
        first = np.r_[True, ppart[order][1:] != ppart[order][:-1]]
        is_main = np.zeros(npc, bool)
        is_main[order[first]] = True
        pu, pv = piece[u], piece[v]
        sel = ~is_main[pu] & is_main[pv]
        key = pu[sel] * nparts + labels[v[sel]]
        uk, inv = np.unique(key, return_inverse=True)
        tie = np.bincount(inv, weights=w[sel])
        op, tp = uk // nparts, uk % nparts
        o = np.lexsort((tp, -tie, op))
        op, tp = op[o], tp[o]
        size = np.bincount(labels, minlength=nparts).tolist()
        target = np.full(npc, -1, np.int64)
        starts = np.flatnonzero(np.r_[True, op[1:] != op[:-1]]) if op.size else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], op.size].astype(np.int64)
        for s, e in zip(starts.tolist(), ends.tolist()):
            p = int(op[s])
            sz = int(psize[p])
            dest = -1
            for t in tp[s:e].tolist():
                if size[t] + sz <= cap:
                    dest = t
                    break
            if dest < 0:
                dest = len(size)
                size.append(0)
                stats["orphan_parts"] = stats.get("orphan_parts", 0) + 1
            else:
                stats["pieces_moved"] = stats.get("pieces_moved", 0) + 1
            size[dest] += sz
            size[int(ppart[p])] -= sz
            target[p] = dest
        if not (target >= 0).any():  # cannot happen for a connected graph; guard against an endless loop
            raise PartitionError("connectivity repair made no progress (is the component connected?)")
        moved = target[piece]
        labels = np.where(moved >= 0, moved, labels)
        _, labels = np.unique(labels, return_inverse=True)
        labels = labels.astype(np.int64)
    raise PartitionError("connectivity repair did not converge")  # pragma: no cover


def split_part(A: sp.csr_matrix, nparts: int, cap: int, wmax: float, tol: float, seed: int,
                stats: dict[str, int], use_metis: bool = True) -> np.ndarray:
    """Cut one connected part into ``nparts`` connected pieces of at most ``cap`` frames where possible."""
    n = A.shape[0]
    sub = _metis(A, nparts, wmax, tol, seed) if use_metis else np.zeros(n, np.int64)
    if sub.max(initial=0) > 0:
        sub = _repair(A, sub, cap, stats)
        if np.bincount(sub).max() < n:
            return sub
    # METIS made no progress (one part, or repair folded everything back, e.g. on a star): cut a breadth-first
    # order from a pseudo-peripheral frame into runs of min(cap, n - 1) frames (the first run is connected; repair
    # fixes the others under the cap, so no part exceeds it afterwards)
    stats["bfs_splits"] = stats.get("bfs_splits", 0) + 1
    far = breadth_first_order(A, 0, directed=False, return_predecessors=False)[-1]
    order = breadth_first_order(A, int(far), directed=False, return_predecessors=False)
    sub = np.empty(n, np.int64)
    sub[order] = np.arange(n) // max(1, min(cap, n - 1))
    return _repair(A, sub, cap, stats)


def _enforce_cap(A: sp.csr_matrix, labels: np.ndarray, cap: int, wmax: float, tol: float, seed: int,
                 stats: dict[str, int]) -> np.ndarray:
    """Re-cut parts above the core cap (METIS's ufactor is a target, not a guarantee)."""
    for it in range(8):
        sizes = np.bincount(labels)
        over = np.flatnonzero(sizes > cap)
        if over.size == 0:
            return labels
        order = np.argsort(labels, kind="stable")
        bounds = np.r_[0, np.cumsum(sizes)]
        next_label = int(sizes.size)
        for p in over.tolist():
            idx = order[bounds[p]:bounds[p + 1]]
            sub = A[idx][:, idx]
            k = max(2, math.ceil(idx.size / max(1.0, cap / (1 + tol))))
            # METIS first; parts it cannot shrink (star-like) get breadth-first prefixes of `cap` frames
            sl = split_part(sub, k, cap, wmax, tol, seed, stats, use_metis=it < 3)
            stats["cap_recuts"] = stats.get("cap_recuts", 0) + 1
            new = np.where(sl == 0, p, next_label + sl - 1)
            next_label += int(sl.max())
            labels[idx] = new
    raise PartitionError(f"could not bring core parts under the cap of {cap} frames")  # pragma: no cover


def cut_component(A: sp.csr_matrix, core_target: float, cfg: PartitionConfig, wmax: float,
                   stats: dict[str, int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Cut a connected component of ``n`` frames into connected core parts (labels 0..p-1) and report the cut.

    Guarantee: every part has at most ``core_cap = min(M, floor((1 + tol) * n / parts_requested))`` frames, with
    ``parts_requested = max(2, ceil(n / core_target))``, i.e. no core exceeds ``(1 + tol)`` times the ideal core
    size. Both are computed in floating point: where ``(1 + tol) * n / parts`` (or ``n / core_target``) is exactly
    a whole number, rounding can make ``core_cap`` one smaller (or ``parts_requested`` one larger) than the exact
    value; for a tolerance written with a few decimals it is never larger, so the bound holds in exact arithmetic.
    More parts than requested may come back (repair orphans, re-cuts of parts above the cap); they obey the cap too.
    """
    n = A.shape[0]
    nparts = max(2, math.ceil(n / core_target))
    ideal = n / nparts
    cap = max(1, min(cfg.max_cluster_frames, math.floor(ideal * (1 + cfg.balance_tolerance))))
    t0 = time.perf_counter()
    labels = _metis(A, nparts, wmax, cfg.balance_tolerance, cfg.seed)
    stats["metis_seconds"] = stats.get("metis_seconds", 0.0) + time.perf_counter() - t0
    labels = _repair(A, labels, cap, stats)
    labels = _enforce_cap(A, labels, cap, wmax, cfg.balance_tolerance, cfg.seed, stats)
    return labels, {"frames": n, "parts_requested": nparts, "ideal_core": round(ideal, 2), "core_cap": cap}
