"""Frames shared between clusters: pair overlap, the size bound, and bridging so the cluster graph is connected.

Clusters are merged through the frames they share, so every pair of touching clusters gets overlap from the
boundary of the other core (vectorised over all cross-part edges), and where a component's linked cluster graph
is still disconnected the pairs joining its pieces get bridging frames (Kruskal) or, when clusters are full,
links along a spanning tree. Steps 5-7 of the algorithm in :mod:`sparse_vggt.partition.algorithm`; ``grow`` is
also the breadth-first growth the out-of-memory split uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, connected_components

from .clusters import group_rank


@dataclass
class Candidates:
    frame: np.ndarray  # boundary frame (core in src)
    src: np.ndarray
    dst: np.ndarray  # cluster it may be added to
    tie: np.ndarray  # sum of weights from frame to dst's core
    pair: np.ndarray  # index into pair_lo/pair_hi
    rank: np.ndarray  # interleaved priority within the pair (0 = first)
    pair_lo: np.ndarray
    pair_hi: np.ndarray
    pair_tie: np.ndarray


def candidates(u: np.ndarray, v: np.ndarray, w: np.ndarray, part: np.ndarray, nparts: int) -> Candidates:
    pu, pv = part[u], part[v]
    cross = (pu != pv) & (pu >= 0) & (pv >= 0)
    fu, dst, wc = u[cross], pv[cross], w[cross]
    key = fu * nparts + dst
    uk, inv = np.unique(key, return_inverse=True)
    tie = np.bincount(inv, weights=wc, minlength=uk.size)
    frame, dst = uk // nparts, uk % nparts
    src = part[frame]
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    upk, pidx = np.unique(lo * nparts + hi, return_inverse=True)
    side = (src > dst).astype(np.int64)
    o = np.lexsort((frame, -tie, side, pidx))
    r_side = np.empty(o.size, np.int64)
    r_side[o] = group_rank(pidx[o] * 2 + side[o])
    o2 = np.lexsort((frame, side, -tie, r_side, pidx))
    rank = np.empty(o2.size, np.int64)
    rank[o2] = group_rank(pidx[o2])
    pair_tie = np.bincount(pidx, weights=tie, minlength=upk.size) * 0.5
    return Candidates(frame, src, dst, tie, pidx, rank, upk // nparts, upk % nparts, pair_tie)


def capacity_fill(cand: Candidates, aff_pair: np.ndarray, mc: np.ndarray, mg: np.ndarray, size: np.ndarray,
                   M: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlap for the pairs around overflowing clusters, added greedily under the size bound.

    Runs after bridging, so links between clusters get capacity first. Candidates go round-robin over the pairs
    (every pair's best frame before any pair's second); a candidate is skipped only if it is already in the
    cluster, its pair already shares ``m`` frames, or the receiving cluster is full (and stays full).
    """
    idx = np.flatnonzero(aff_pair[cand.pair])
    if idx.size == 0:
        return mc, mg
    idx = idx[np.lexsort((cand.pair[idx], cand.rank[idx]))]
    nclusters = size.size
    already = np.isin(cand.dst[idx] * n + cand.frame[idx], mc * n + mg)
    aff_ids = np.flatnonzero(aff_pair)
    count = dict(zip(aff_ids.tolist(),
                     pair_shared(mc, mg, nclusters, n, cand.pair_lo[aff_ids], cand.pair_hi[aff_ids]).tolist()))
    add_c: list[int] = []
    add_g: list[int] = []
    for c, dup in zip(idx.tolist(), already.tolist()):
        if dup:
            continue
        p = int(cand.pair[c])
        if count[p] >= m:
            continue
        d = int(cand.dst[c])
        if size[d] >= M:
            continue
        add_c.append(d)
        add_g.append(int(cand.frame[c]))
        size[d] += 1
        count[p] += 1
    return np.r_[mc, np.asarray(add_c, np.int64)], np.r_[mg, np.asarray(add_g, np.int64)]


def pair_shared(mc: np.ndarray, mg: np.ndarray, nclusters: int, n: int, a: np.ndarray, b: np.ndarray
                 ) -> np.ndarray:
    """Shared-frame count of each cluster pair (a[i], b[i]); linear in the pairs' sizes.

    (A full membership product M M^T would be quadratic in how many clusters hold a hub frame, e.g. a star.)
    """
    if a.size == 0:
        return np.zeros(0, np.int64)
    Mm = sp.csr_matrix((np.ones(mc.size, np.int32), (mc, mg)), shape=(nclusters, n))
    return np.asarray(Mm[a].multiply(Mm[b]).sum(axis=1)).ravel().astype(np.int64)


def _linked_labels(a: np.ndarray, b: np.ndarray, shared: np.ndarray, core_size: np.ndarray, m: int) -> np.ndarray:
    """Connected components of the linked cluster graph restricted to the given (touching) pairs."""
    ok = shared >= np.minimum(m, core_size[a] + core_size[b])
    nc = core_size.size
    L = sp.csr_matrix((np.ones(int(ok.sum()), np.int8), (a[ok], b[ok])), shape=(nc, nc))
    return connected_components(L, directed=False)[1]


class _Members:
    """Per-cluster frame sets, built lazily for the few clusters the Python-level bridging touches."""

    def __init__(self, mc: np.ndarray, mg: np.ndarray, nclusters: int):
        o = np.argsort(mc, kind="stable")
        self._g = mg[o]
        self._b = np.r_[0, np.cumsum(np.bincount(mc, minlength=nclusters))]
        self._sets: dict[int, set[int]] = {}
        self._add_c: list[int] = []
        self._add_g: list[int] = []

    def add(self, c: int, frames: list[int]) -> None:
        """Add ``frames`` to cluster ``c`` (as overlap rows recorded for :meth:`extended`)."""
        self[c].update(frames)
        self._add_c.extend([c] * len(frames))
        self._add_g.extend(frames)

    def extended(self, mc: np.ndarray, mg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The membership arrays with every added row appended."""
        if not self._add_c:
            return mc, mg
        return np.r_[mc, np.asarray(self._add_c, np.int64)], np.r_[mg, np.asarray(self._add_g, np.int64)]

    def __getitem__(self, c: int) -> set[int]:
        s = self._sets.get(c)
        if s is None:
            s = set(self._g[self._b[c]:self._b[c + 1]].tolist())
            self._sets[c] = s
        return s


def neighbors_in(A: sp.csr_matrix, g: int, allowed: set[int], allowed_arr: np.ndarray) -> list[int]:
    """Neighbours of ``g`` inside ``allowed`` (vectorised for hub frames with many neighbours)."""
    nb = A.indices[A.indptr[g]:A.indptr[g + 1]]
    if nb.size > 64:
        return nb[np.isin(nb, allowed_arr)].tolist()
    return [h for h in nb.tolist() if h in allowed]


def grow(A: sp.csr_matrix, members: set[int], allowed: set[int], room: int, need: int) -> list[int]:
    """Frames of ``allowed`` to add to a cluster (``members``) in breadth-first order from it.

    Each added frame is adjacent to the cluster or to a frame added before, so the cluster stays connected.
    """
    added: list[int] = []
    limit = min(room, need)
    if limit <= 0 or not allowed:
        return added
    allowed_arr = np.fromiter(allowed, np.int64, len(allowed))
    seen = set(members)
    frontier = []
    for g in sorted(members):
        for h in neighbors_in(A, g, allowed, allowed_arr):
            if h not in seen:
                seen.add(h)
                frontier.append(h)
    while frontier and len(added) < limit:
        nxt = []
        for g in sorted(frontier):
            if len(added) >= limit:
                break
            added.append(g)
            for h in neighbors_in(A, g, allowed, allowed_arr):
                if h not in seen:
                    seen.add(h)
                    nxt.append(h)
        frontier = nxt
    return added


def tree_links(A: sp.csr_matrix, part: np.ndarray, mc: np.ndarray, mg: np.ndarray, core_size: np.ndarray,
                size: np.ndarray, comp_of_part: np.ndarray, tight: np.ndarray, cand: Candidates, M: int, m: int,
                stats: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Link the clusters of capacity-bound components along a maximum-tie spanning tree of touching pairs.

    Rooted at the largest core, each cluster takes up to ``m`` frames from its parent's cluster only (breadth-first
    from itself, so it stays connected). A cluster thus spends at most ``m`` frames of room on linking, and the
    core cap (<= max_cluster_frames - min_overlap_frames) always leaves that much.
    """
    nclusters = core_size.size
    sel = tight[comp_of_part[cand.pair_lo]]
    if not sel.any():
        return mc, mg
    lo, hi, tie = cand.pair_lo[sel], cand.pair_hi[sel], cand.pair_tie[sel]
    cost = (tie.max() + 1.0) - tie  # positive; the minimum spanning tree of cost = maximum tie
    from scipy.sparse.csgraph import minimum_spanning_tree

    T = minimum_spanning_tree(sp.csr_matrix((cost, (lo, hi)), shape=(nclusters, nclusters)))
    T = (T + T.T).tocsr()
    members = _Members(mc, mg, nclusters)
    linked = 0
    for c in np.flatnonzero(tight).tolist():
        parts_c = np.flatnonzero(comp_of_part == c)
        root = int(parts_c[np.argmax(core_size[parts_c])])
        order, pred = breadth_first_order(T, root, directed=False, return_predecessors=True)
        for child in order[1:].tolist():
            par = int(pred[child])
            sc, sp_ = members[child], members[par]
            need = min(m, int(core_size[child] + core_size[par])) - len(sc & sp_)
            for x, y in ((par, child), (child, par)):
                if need <= 0:
                    break
                sy, sx = members[y], members[x]
                got = grow(A, sy, sx - sy, int(M - size[y]), need)
                members.add(y, got)
                size[y] += len(got)
                need -= len(got)
            linked += need <= 0
    stats["tree_links"] = linked
    return members.extended(mc, mg)


def bridge(A: sp.csr_matrix, part: np.ndarray, mc: np.ndarray, mg: np.ndarray, core_size: np.ndarray,
            size: np.ndarray, comp_of_part: np.ndarray, cand: Candidates, M: int, m: int,
            stats: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add bridging overlap until each component's linked cluster graph is connected (where capacity allows).

    Kruskal over the touching pairs, strongest first; returns the components whose linked graph is still
    disconnected (the caller then links them along a spanning tree instead).
    """
    nclusters = core_size.size
    shared = pair_shared(mc, mg, nclusters, A.shape[0], cand.pair_lo, cand.pair_hi)
    lab = _linked_labels(cand.pair_lo, cand.pair_hi, shared, core_size, m)
    n_link = np.unique(lab).size
    n_comp = np.unique(comp_of_part).size
    if n_link == n_comp:
        return mc, mg, np.zeros(0, np.int64)
    parent = list(range(int(lab.max()) + 1))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    members = _Members(mc, mg, nclusters)
    order = np.argsort(-cand.pair_tie, kind="stable")
    bridged = 0
    for p in order.tolist():
        a, b = int(cand.pair_lo[p]), int(cand.pair_hi[p])
        ra, rb = find(int(lab[a])), find(int(lab[b]))
        if ra == rb:
            continue
        sa, sb = members[a], members[b]
        need = min(m, int(core_size[a] + core_size[b])) - len(sa & sb)
        # fill the cluster with more room first, from the other cluster's frames (core first, then overlap)
        for x, y in sorted(((a, b), (b, a)), key=lambda t: -(M - size[t[1]])):
            if need <= 0:
                break
            sy, sx = members[y], members[x]
            core_x = {g for g in sx if part[g] == x}
            got = grow(A, sy, core_x, int(M - size[y]), need)
            if len(got) < need:
                got += grow(A, sy | set(got), sx - sy - set(got), int(M - size[y]) - len(got), need - len(got))
            members.add(y, got)
            size[y] += len(got)
            need -= len(got)
        if need <= 0:
            parent[ra] = rb
            bridged += 1
    stats["bridged_pairs"] = stats.get("bridged_pairs", 0) + bridged
    mc, mg = members.extended(mc, mg)
    roots = np.array([find(int(x)) for x in lab.tolist()], np.int64)
    cr = np.unique(np.c_[comp_of_part, roots], axis=0)
    counts = np.bincount(cr[:, 0])
    return mc, mg, np.flatnonzero(counts > 1)
