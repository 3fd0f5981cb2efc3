"""The partition report: cluster sizes, overlap per touching pair, cut weight, balance and repair counts.

It goes into the stage manifest and the CLI output, so a user can see why clusters are smaller than
``max_cluster_frames`` or share fewer frames than ``min_overlap_frames`` (star-like graphs, full clusters)
without reading the table. ``cluster_pairs`` is also what tests use to check the linking invariants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ..config import PartitionConfig
from .clusters import Clusters
from .load import Graph
from .overlap import Candidates, pair_shared


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    return {"min": int(x.min()), "median": float(np.median(x)), "mean": round(float(x.mean()), 2),
            "max": int(x.max())}


def _histogram(sizes: np.ndarray, max_frames: int) -> dict[str, int]:
    edges = [1, 2, 3, 5, 9, 17, 33, 65, 129, 257, 513]
    edges = [e for e in edges if e <= max_frames] + [max_frames + 1]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        cnt = int(((sizes >= lo) & (sizes < hi)).sum())
        out[f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"] = cnt
    return out


def cluster_pairs(clusters: Clusters, A: sp.csr_matrix, m: int) -> dict[str, np.ndarray]:
    """Every pair of clusters whose cores touch (an edge between them): shared frames, boundary frames, linked.

    ``linked`` = shared >= min(m, |core a| + |core b|). Pairs that share frames without touching are not listed
    (their count would be quadratic in hub frames); connectivity judged on touching pairs is conservative.
    """
    nclusters = int(clusters.cluster_id.max()) + 1 if len(clusters) else 0
    n = A.shape[0]
    core_part = np.full(n, -1, np.int64)
    core_part[clusters.image_id[clusters.core]] = clusters.cluster_id[clusters.core]
    core_size = np.bincount(clusters.cluster_id[clusters.core], minlength=nclusters)
    coo = A.tocoo()
    pu, pv = core_part[coo.row], core_part[coo.col]
    cross = (pu >= 0) & (pv >= 0) & (pu != pv)
    nc = max(nclusters, 1)
    fk = np.unique(coo.row[cross].astype(np.int64) * nc + pv[cross])  # (boundary frame, other core)
    fsrc, fdst = core_part[fk // nc], fk % nc
    lo, hi = np.minimum(fsrc, fdst), np.maximum(fsrc, fdst)
    pk, boundary = np.unique(lo * nc + hi, return_counts=True)
    a, b = pk // nc, pk % nc
    shared = pair_shared(clusters.cluster_id, clusters.image_id, nclusters, n, a, b)
    linked = shared >= np.minimum(m, core_size[a] + core_size[b])
    return {"a": a, "b": b, "shared": shared, "boundary": boundary, "touching": np.ones(a.size, bool),
            "linked": linked}


def build_report(clusters: Clusters, graph: Graph, part: np.ndarray, new_id: np.ndarray, cand: Candidates,
            selected: np.ndarray, comp_ids: np.ndarray, comp_sizes: np.ndarray, clustered_comp: np.ndarray,
            cut_info: dict[int, dict[str, Any]], stats: dict[str, Any], cfg: PartitionConfig,
            u: np.ndarray, v: np.ndarray, w: np.ndarray) -> dict[str, Any]:
    M, m = cfg.max_cluster_frames, cfg.min_overlap_frames
    cid = clusters.cluster_id
    nclusters = int(cid.max()) + 1 if cid.size else 0
    sizes = np.bincount(cid, minlength=nclusters)
    core_sizes = np.bincount(cid[clusters.core], minlength=nclusters)
    pairs = cluster_pairs(clusters, graph.A, m)
    touching = pairs["touching"]
    short = touching & (pairs["shared"] < np.minimum(m, pairs["boundary"]))
    full = sizes == M
    cap_limited = short & (full[pairs["a"]] | full[pairs["b"]])
    cross = part[u] != part[v]
    total_w = float(w.sum()) / 2
    cut_w = float(w[cross].sum()) / 2
    comp_of_cluster = np.zeros(nclusters, np.int64)
    comp_of_cluster[cid] = clusters.component_id
    per_comp_all = np.bincount(comp_of_cluster) if nclusters else np.zeros(0, np.int64)
    per_comp = per_comp_all[per_comp_all > 0]
    # balance of the cut components: core sizes against the ideal core size METIS was asked for
    by_comp = np.argsort(comp_of_cluster, kind="stable")
    cbounds = np.r_[0, np.cumsum(per_comp_all)]
    balance = []
    for c, info in cut_info.items():
        cs = core_sizes[by_comp[cbounds[c]:cbounds[c + 1]]]
        balance.append({"component": c, "frames": info["frames"], "clusters": int(cs.size),
                        "parts_requested": info["parts_requested"], "ideal_core": info["ideal_core"],
                        "core_cap": info["core_cap"], "max_core": int(cs.max()), "min_core": int(cs.min()),
                        "max_over_ideal": round(float(cs.max()) / info["ideal_core"], 3),
                        "parts_below_1_minus_tol": int((cs < (1 - cfg.balance_tolerance) * info["ideal_core"]).sum())})
    balance.sort(key=lambda r: -r["frames"])
    singles = comp_sizes == 1
    linked_ok = _linked_connected(clusters, pairs)
    warnings = list(graph.warnings)
    if not linked_ok:
        warnings.append("the linked cluster graph of some component is disconnected (clusters too full to bridge)")
    if int(cap_limited.sum()):
        warnings.append(f"{int(cap_limited.sum())} touching pairs share fewer than min(min_overlap_frames, boundary) "
                        "frames because their clusters are full (star-like graph)")
    return {
        "frames": int((graph.component >= 0).sum()),
        "frames_clustered": int(clusters.core.sum()),
        "frames_skipped": int(comp_sizes[~clustered_comp].sum()),
        "components": int(comp_ids.size),
        "components_clustered": int(clustered_comp.sum()),
        "components_cut": len(cut_info),
        "singletons": int(singles.sum()),
        "singletons_reconstructed": int((singles & clustered_comp).sum()),
        "small_components_skipped": int((~clustered_comp & ~singles).sum()),
        "clusters": nclusters,
        "cluster_rows": int(cid.size),
        "overlap_rows": int((~clusters.core).sum()),
        "cluster_frames": _stats(sizes),
        "core_frames": _stats(core_sizes),
        "size_histogram": _histogram(sizes, M),
        "clusters_per_component": {"max": int(per_comp.max(initial=0)), "components_with_one": int((per_comp == 1).sum()),
                                   "components_with_several": int((per_comp > 1).sum())},
        "overlap_per_edge": {"touching_pairs": int(touching.sum()), "linked_pairs": int(pairs["linked"].sum()),
                             **_stats(pairs["shared"][touching]),
                             "below_min_boundary_limited": int((touching & (pairs["shared"] < m) & ~short).sum()),
                             "below_min_capacity_limited": int(cap_limited.sum())},
        "cut_weight": round(cut_w, 4), "total_weight": round(total_w, 4),
        "cut_ratio": round(cut_w / total_w, 6) if total_w > 0 else 0.0,
        "balance": balance[:20],
        "balance_tolerance": cfg.balance_tolerance,
        "cluster_graph_connected": linked_ok,
        "repair": {"pieces_moved": int(stats.get("pieces_moved", 0)), "orphan_parts": int(stats.get("orphan_parts", 0)),
                   "cap_recuts": int(stats.get("cap_recuts", 0)), "overflow_splits": int(stats.get("overflow_splits", 0)),
                   "bridged_pairs": int(stats.get("bridged_pairs", 0)), "tree_links": int(stats.get("tree_links", 0)),
                   "capacity_limited_components": int(stats.get("tight_components", 0))},
        "metis_seconds": round(float(stats.get("metis_seconds", 0.0)), 3),
        "max_cluster_frames": M, "min_overlap_frames": m, "k": cfg.attention_neighbors,
        "reference_frame": "core frame with the largest in-cluster weighted degree",
        "warnings": warnings,
    }


def _linked_connected(clusters: Clusters, pairs: dict[str, np.ndarray]) -> bool:
    if not len(clusters):
        return True
    nclusters = int(clusters.cluster_id.max()) + 1
    ok = pairs["linked"]
    L = sp.csr_matrix((np.ones(int(ok.sum()), np.int8), (pairs["a"][ok], pairs["b"][ok])),
                      shape=(nclusters, nclusters))
    ncl, lab = connected_components(L, directed=False)
    comp_of = np.zeros(nclusters, np.int64)
    comp_of[clusters.cluster_id] = clusters.component_id
    return ncl == np.unique(comp_of).size
