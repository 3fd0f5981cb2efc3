"""The partition algorithm on in-memory arrays: CSR graph + component ids -> cluster rows and a report.

VGGT (even sparse) runs on a bounded number of frames per worker, and clusters must share frames so that their
reconstructions can be merged. The stage turns ``store.zarr/graph`` (symmetric CSR + component ids) into
``tables/clusters.parquet``: one row per (cluster, frame) with the frame's role (``core``/``overlap``), its
position in the cluster's VGGT run (0 = reference frame) and its in-cluster neighbour set.

Algorithm (per connected component; components are never joined):

1. A component with at most ``max_cluster_frames`` frames is one cluster (all frames core). Singleton
   components become clusters only with ``reconstruct_singletons``; components below ``min_component_frames``
   are reported and skipped.
2. Larger components are cut by METIS k-way (pymetis, contiguity requested, ``ufactor`` from
   ``balance_tolerance``) with integer edge weights ``clip(round(w / w_max * 1000), 1, 1000)`` (METIS needs
   positive integers; non-positive similarities get the minimum weight 1). The number of parts is
   ``ceil(n / core_target)`` with ``core_target = (M - min(4 m, M / 2)) / (1 + tol)`` so that a core part
   plus the overlap it receives from ~8 neighbours fits ``M`` (M = max_cluster_frames, m = min_overlap_frames).
3. Repair: every core part must induce a connected subgraph. Pieces that are not the largest piece of their part
   move to the adjacent part they are most tied to (sum of edge weights) that still has room under the core cap;
   a piece with no such neighbour becomes a part of its own.
4. Balance: the core cap is ``floor((1 + tol) * n / parts)``; a part above it (METIS does not guarantee its
   ``ufactor``) is re-cut. Hence every core is within ``(1 + tol)`` of the component's ideal core size from above;
   smaller parts only come from repair orphans and overflow splits and are counted in the report.
5. Overlap: for each pair of touching core parts (an edge between their cores), candidate frames are the
   boundary frames of each side, ranked by their tie (sum of weights) to the other core. The two sides are
   interleaved (best of A, best of B, 2nd of A, ...) and the first ``m`` are added to the other cluster as
   ``overlap``. So a touching pair shares at least ``min(m, boundary frames)``.
6. Size bound: a cluster that would exceed ``M`` has its core bisected (when the core, not its neighbour count,
   is the cause) and step 5 is redone. A component that still overflows (star-like graphs, tiny ``M``) is
   *capacity-bound*: its pair overlap is dropped, its clusters are first linked along a maximum-tie spanning tree
   of touching pairs (each cluster takes <= m frames from its parent, and the core cap leaves that room), then pair
   overlap is re-added greedily under the bound. There, a touching pair may share fewer than
   ``min(m, boundary frames)`` only if every cluster that could receive a further boundary frame is full.
   ``M`` is never exceeded.
7. Connectivity of the cluster graph: two clusters are *linked* when they share at least
   ``min(m, |core a| + |core b|)`` frames. If the linked graph of a component is disconnected (e.g. chains whose
   cut boundary is two frames), the touching pairs joining its pieces, strongest first (Kruskal), get bridging
   overlap: frames of the other cluster, in breadth-first order from the receiving one (so it stays connected),
   until the pair is linked; a component Kruskal cannot connect is treated as capacity-bound (step 6).
8. Per cluster: the reference frame (position 0) is the core frame with the largest in-cluster weighted degree
   (sum of covisibility weights to the other frames of the cluster; ties -> smaller image id). The other frames
   follow in breadth-first (hop) distance from the reference, then by decreasing weighted degree, then image id.
   Each frame's neighbour set is its top-``k`` in-cluster neighbours by edge weight (ties -> smaller image id).

All per-edge work (overlap candidates, shared-frame counts, neighbour sets, orders) is vectorised with
numpy/scipy.sparse; Python loops run only over orphan pieces, overflowing clusters and bridged pairs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..config import PartitionConfig
from ..progress import track
from .clusters import Clusters, PartitionError
from .cut import cut_component, split_part
from .limits import validate_config
from .load import load_graph
from .order import order_and_neighbors
from .overlap import bridge, candidates, capacity_fill, tree_links
from .report import build_report


def _core_target(cfg: PartitionConfig) -> float:
    M, m = cfg.max_cluster_frames, cfg.min_overlap_frames
    return max(1.0, (M - min(4 * m, M // 2)) / (1 + cfg.balance_tolerance))


def partition_graph(indptr: Any, indices: Any, weights: Any, component: Any,
                    cfg: PartitionConfig | None = None) -> tuple[Clusters, dict[str, Any]]:
    """Partition a symmetric CSR covisibility graph; returns the cluster rows and a JSON-able report.

    ``component`` gives the connected-component id of every row (-1 = excluded image). Raises
    :class:`PartitionError` for an invalid config/graph or when no cluster can be formed.
    """
    t0 = time.perf_counter()
    cfg = cfg or PartitionConfig()
    validate_config(cfg)
    graph = load_graph(indptr, indices, weights, component)
    M, m, tol = cfg.max_cluster_frames, cfg.min_overlap_frames, cfg.balance_tolerance
    n, A, comp = graph.n, graph.A, graph.component
    kept = np.flatnonzero(comp >= 0)
    if kept.size == 0:
        raise PartitionError("the graph has no frames to partition (no images, or every image was excluded at "
                             "scan). Check `sparse-vggt status RUN` and the status column of images.parquet.")
    comp_ids, comp_sizes = np.unique(comp[kept], return_counts=True)
    clustered_comp = (comp_sizes >= cfg.min_component_frames) | ((comp_sizes == 1) & cfg.reconstruct_singletons)
    if not clustered_comp.any():
        raise PartitionError(
            f"all {comp_ids.size} components are below partition.min_component_frames={cfg.min_component_frames}"
            f" ({int((comp_sizes == 1).sum())} isolated frames): nothing to reconstruct. Connect more images (e.g. "
            "raise graph.retrieval_neighbors, lower graph.min_similarity) or set partition.reconstruct_singletons=true.")
    wmax = float(A.data.max(initial=0.0))
    stats: dict[str, Any] = {}

    # --- core parts -----------------------------------------------------------------------------------------
    part = np.full(n, -1, np.int64)
    cut_info: dict[int, dict[str, Any]] = {}
    order_frames = np.argsort(comp, kind="stable")
    starts = np.searchsorted(comp[order_frames], comp_ids)
    next_part = 0
    big = [(int(c), int(s), int(st)) for c, s, st, ok in zip(comp_ids, comp_sizes, starts, clustered_comp)
           if ok and s > M]
    small_mask = clustered_comp & (comp_sizes <= M)
    # every small component is one part, vectorised
    small_ids = comp_ids[small_mask]
    lut = np.full(int(comp_ids.max()) + 1, -1, np.int64)
    lut[small_ids] = np.arange(small_ids.size)
    part[kept] = lut[comp[kept]]
    next_part = int(small_ids.size)
    core_target = _core_target(cfg)
    for c, s, st in track(big, total=len(big), description="METIS"):
        idx = order_frames[st:st + s]
        sub = A[idx][:, idx].tocsr()
        labels, info = cut_component(sub, core_target, cfg, wmax, stats)
        part[idx] = labels + next_part
        next_part += int(labels.max()) + 1
        cut_info[c] = info
    nparts = next_part

    # --- overlap, size bound --------------------------------------------------------------------------------
    coo = A.tocoo()
    u, v, w = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data
    del coo
    clustered_frame = part >= 0
    sel_e = clustered_frame[u]
    u, v, w = u[sel_e], v[sel_e], w[sel_e]
    overflow_splits = 0
    for _round in range(6):
        core_size = np.bincount(part[clustered_frame], minlength=nparts)
        cand = candidates(u, v, w, part, nparts)
        selected = cand.rank < m
        incoming = np.bincount(cand.dst[selected], minlength=nparts)
        size = core_size + incoming
        over = np.flatnonzero(size > M)
        if over.size == 0 or _round == 5:
            break
        splittable = over[(core_size[over] >= 2) & (core_size[over] > incoming[over])]
        if splittable.size == 0:
            break
        fo = np.argsort(part, kind="stable")
        pb = np.r_[0, np.cumsum(np.bincount(part[clustered_frame], minlength=nparts))] + int((~clustered_frame).sum())
        for p in splittable.tolist():
            idx = fo[pb[p]:pb[p + 1]]
            sub = A[idx][:, idx].tocsr()
            sl = split_part(sub, 2, max(1, idx.size - 1), wmax, tol, cfg.seed, stats)
            part[idx] = np.where(sl == 0, p, nparts + sl - 1)
            nparts += int(sl.max())
            overflow_splits += 1
    stats["overflow_splits"] = overflow_splits
    aff_pair = np.zeros(cand.pair_lo.size, bool)
    comp_of_part = np.zeros(nparts, np.int64)
    comp_of_part[part[clustered_frame]] = comp[clustered_frame]
    core_size = np.bincount(part[clustered_frame], minlength=nparts)
    cf = np.flatnonzero(clustered_frame)
    # Capacity-bound components (overflow left after the splits: star-like graphs, or tiny max_cluster_frames;
    # or a linked graph Kruskal bridging could not connect) drop all their pair overlap, are linked first along
    # a spanning tree (each cluster spends <= m frames of room on it), then get pair overlap greedily under M.
    tight = np.zeros(int(comp.max()) + 1, bool)
    tight[comp_of_part[over]] = True
    stats["capacity_limited_clusters"] = int(over.size)
    uncapped = selected
    for _attempt in range(2):
        aff_pair = tight[comp_of_part[cand.pair_lo]]
        selected = uncapped & ~aff_pair[cand.pair]
        size = core_size + np.bincount(cand.dst[selected], minlength=nparts)
        assert size.max(initial=0) <= M
        mc = np.r_[part[cf], cand.dst[selected]]
        mg = np.r_[cf, cand.frame[selected]]
        bstats: dict[str, Any] = {}
        if aff_pair.any():
            mc, mg = tree_links(A, part, mc, mg, core_size, size, comp_of_part, tight, cand, M, m, bstats)
        mc, mg, disconnected = bridge(A, part, mc, mg, core_size, size, comp_of_part, cand, M, m, bstats)
        if disconnected.size == 0 or tight[disconnected].all():
            break
        tight[disconnected] = True
    stats.update(bstats)
    stats["tight_components"] = int(tight.sum())
    if aff_pair.any():
        mc, mg = capacity_fill(cand, aff_pair, mc, mg, size, M, m, n)
    core_flag = np.zeros(mc.size, bool)
    core_flag[:cf.size] = True

    # --- cluster ids ordered by (component, part) -----------------------------------------------------------
    new_id = np.empty(nparts, np.int64)
    new_id[np.lexsort((np.arange(nparts), comp_of_part))] = np.arange(nparts)
    clusters = order_and_neighbors(new_id[mc], mg, core_flag, comp, A, cfg.attention_neighbors)

    report = build_report(clusters, graph, part, new_id, cand, selected, comp_ids, comp_sizes, clustered_comp,
                     cut_info, stats, cfg, u, v, w)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return clusters, report
