"""The out-of-memory fallback: replace one cluster by two halves without touching the other clusters.

When VGGT runs out of memory on a cluster, the orchestrator splits it and retries the halves; the split keeps the
partition's invariants (connected halves, bounded size, links to the neighbouring clusters) and records its
depth in clusters.parquet so a re-run continues the split budget.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from ..config import PartitionConfig, PipelineConfig
from ..store import RunStore
from .clusters import Clusters, PartitionError
from .cut import split_part
from .limits import resolve_max_cluster_frames, validate_config
from .load import load_graph, read_graph
from .order import order_and_neighbors
from .overlap import grow, neighbors_in

log = logging.getLogger(__name__)


def split_clusters_in_memory(clusters: Clusters, cluster_id: int, A: sp.csr_matrix, cfg: PartitionConfig
                             ) -> tuple[Clusters, list[int]]:
    """Replace cluster ``cluster_id`` by two halves (see :func:`split_cluster` for the invariants)."""
    validate_config(cfg)
    M, m = cfg.max_cluster_frames, cfg.min_overlap_frames
    rows = np.flatnonzero(clusters.cluster_id == cluster_id)
    if rows.size == 0:
        raise PartitionError(f"cluster {cluster_id} does not exist (ids 0..{int(clusters.cluster_id.max())})")
    core_rows = rows[clusters.core[rows]]
    core = np.sort(clusters.image_id[core_rows])
    if core.size < 2:
        raise PartitionError(f"cluster {cluster_id} has {core.size} core frame(s) and cannot be split further; "
                             "lower reconstruct.image_size or use a worker with more memory")
    frames_x = set(clusters.image_id[rows].tolist())
    comp_id = int(clusters.component_id[rows[0]])
    n = A.shape[0]
    wmax = float(A.data.max(initial=0.0))
    stats: dict[str, Any] = {}
    sub = A[core][:, core].tocsr()
    sl = split_part(sub, 2, core.size - 1, wmax, cfg.balance_tolerance, cfg.seed, stats)
    if sl.max() > 1:  # repair created an orphan part: fold extra parts into the adjacent half (keeps connectivity)
        raise PartitionError(f"cluster {cluster_id}: could not bisect its core into two connected halves")
    new_ids = [int(clusters.cluster_id.max()) + 1, int(clusters.cluster_id.max()) + 2]
    # part labels: every existing core frame keeps its cluster; X's core goes to the halves
    part = np.full(n, -1, np.int64)
    part[clusters.image_id[clusters.core]] = clusters.cluster_id[clusters.core]
    part[core] = np.where(sl == 0, new_ids[0], new_ids[1])
    halves = [set(core[sl == 0].tolist()), set(core[sl == 1].tolist())]
    overlap_x = frames_x - set(core.tolist())
    indptr, indices = A.indptr, A.indices

    def adjacent(g: int, s: set[int]) -> bool:
        return any(h in s for h in indices[indptr[g]:indptr[g + 1]].tolist())

    # 1) overlap frames of X go to every half they connect to (rounds, so chains of overlap frames follow)
    pending = set(overlap_x)
    changed = True
    while pending and changed:
        changed = False
        for g in sorted(pending):
            hit = [i for i in (0, 1) if adjacent(g, halves[i])]
            for i in hit:
                halves[i].add(g)
            if hit:
                pending.discard(g)
                changed = True
    # 2) the halves share >= min(m, |core|) frames: boundary-first breadth-first growth inside X's frames
    core_sets = [set(core[sl == 0].tolist()), set(core[sl == 1].tolist())]
    need = min(m, core.size) - len(halves[0] & halves[1])
    for i, j in ((0, 1), (1, 0)):
        if need <= 0:
            break
        want = (need + 1) // 2 if i == 0 else need
        got = grow(A, halves[i], core_sets[j] - halves[i], M - len(halves[i]), want)
        halves[i].update(got)
        need -= len(got)
    # 3) clusters that were linked to X stay linked to one half (frames only from X, so sizes stay <= |X|)
    others = np.flatnonzero(clusters.cluster_id != cluster_id)
    oc, og = clusters.cluster_id[others], clusters.image_id[others]
    touched = np.unique(oc[np.isin(og, list(frames_x))])
    core_size = np.bincount(clusters.cluster_id[clusters.core])
    for y in touched.tolist():
        fy = set(og[oc == y].tolist())
        s_xy = fy & frames_x
        if len(s_xy) < min(m, int(core_size[y]) + core.size):
            continue  # was not linked; shares are distributed above
        target = min(m, int(core_size[y]) + core.size)
        best = max((0, 1), key=lambda i: (len(fy & halves[i]), -i))
        deficit = target - len(fy & halves[best])
        if deficit > 0:
            got = _grow_any(A, halves[best], frames_x - halves[best], s_xy, deficit, M - len(halves[best]))
            halves[best].update(got)
    rows_new = []
    for i, cid in enumerate(new_ids):
        fs = np.array(sorted(halves[i]), np.int64)
        rows_new.append((np.full(fs.size, cid, np.int64), fs, part[fs] == cid))
    mc = np.concatenate([r[0] for r in rows_new])
    mg = np.concatenate([r[1] for r in rows_new])
    cflag = np.concatenate([r[2] for r in rows_new])
    comp_arr = np.full(n, comp_id, np.int64)
    new_rows = order_and_neighbors(mc, mg, cflag, comp_arr, A, cfg.attention_neighbors)
    kept = clusters.select(np.flatnonzero(clusters.cluster_id != cluster_id))
    return Clusters.concat([kept, new_rows]), new_ids


def _grow_any(A: sp.csr_matrix, members: set[int], allowed: set[int], targets: set[int], need: int, room: int
              ) -> list[int]:
    """Breadth-first growth of a cluster inside ``allowed`` until ``need`` frames of ``targets`` are added."""
    allowed_arr = np.fromiter(allowed, np.int64, len(allowed))
    seen = set(members)
    prev: dict[int, int] = {}
    frontier = []
    for g in sorted(members):
        for h in neighbors_in(A, g, allowed, allowed_arr):
            if h not in seen:
                seen.add(h)
                prev[h] = -1
                frontier.append(h)
    order: list[int] = []
    while frontier:
        order.extend(sorted(frontier))
        nxt = []
        for g in sorted(frontier):
            for h in neighbors_in(A, g, allowed, allowed_arr):
                if h not in seen:
                    seen.add(h)
                    prev[h] = g
                    nxt.append(h)
        frontier = nxt
    # add target frames nearest first, each with its path back to the cluster (keeps it connected)
    added: list[int] = []
    have = set()
    for t in order:
        if need <= 0:
            break
        if t not in targets or t in have:
            continue
        path = []
        g = t
        while g != -1 and g not in have:
            path.append(g)
            g = prev[g]
        if len(added) + len(path) > room:
            break
        for g in reversed(path):
            have.add(g)
            added.append(g)
            if g in targets:
                need -= 1
    return added


def split_depths(table: pa.Table) -> dict[int, int]:
    """cluster_id -> how many out-of-memory halvings produced it (column ``split_depth``; 0 when absent).

    The depth lives in clusters.parquet so a re-run continues the split budget instead of restarting it.
    """
    ids = table.column("cluster_id").to_pylist()
    if "split_depth" not in table.column_names:
        return {int(c): 0 for c in ids}
    return {int(c): int(d or 0) for c, d in zip(ids, table.column("split_depth").to_pylist())}


def split_cluster(run_dir: Path, cluster_id: int, config: PipelineConfig | None = None) -> list[int]:
    """Out-of-memory fallback: replace one cluster by two halves; returns the two new cluster ids.

    Invariants kept:

    * other clusters' rows (frames, roles, positions, neighbours) are unchanged, and new ids are ``max + 1``,
      ``max + 2``;
    * X's core is bisected by METIS into two non-empty halves, each inducing a connected subgraph; every frame
      stays core in exactly one cluster;
    * each half contains only frames of the old cluster, so it is never larger than it (<= max_cluster_frames)
      and is connected (overlap frames join the halves they are adjacent to; growth is breadth-first);
    * the halves share >= min(min_overlap_frames, core frames) frames where the old cluster's frames allow;
    * every cluster that was linked to the old one (sharing >= min(m, cores) frames) stays linked to one half,
      so the linked cluster graph of the component stays connected.

    ``clusters.parquet`` is rewritten atomically; a stale, incomplete ``store.zarr/clusters/<id>`` group of the
    old cluster is removed; the split is recorded in the partition manifest.
    """
    store = RunStore.open(run_dir)
    config = config or store.config()
    store.require_stage("partition", "split_cluster")
    table = store.read_table("clusters")
    clusters = Clusters.from_table(table)
    if store.is_unit_complete(f"clusters/{cluster_id}"):
        raise PartitionError(f"cluster {cluster_id} is already reconstructed; splitting it would orphan its result")
    indptr, indices, weights, component = read_graph(store)
    graph = load_graph(indptr, indices, weights, component)
    new, ids = split_clusters_in_memory(clusters, int(cluster_id), graph.A, resolve_max_cluster_frames(config))
    meta = table.schema.metadata or {}
    depths = split_depths(table)
    out = new.to_table()
    parent_depth = depths.get(int(cluster_id), 0)
    depth_col = [parent_depth + 1 if c in ids else depths.get(c, 0) for c in out.column("cluster_id").to_pylist()]
    out = out.append_column("split_depth", pa.array(depth_col, type=pa.int32()))
    if meta:
        out = out.replace_schema_metadata(meta)
    store.write_table("clusters", out)
    if f"clusters/{cluster_id}" in store.zarr:
        store.remove_group(f"clusters/{cluster_id}")
    manifest = store.stage_manifest("partition")
    manifest.setdefault("splits", []).append({"cluster": int(cluster_id), "into": ids})
    manifest["clusters"] = new.n_clusters
    store.stage_finished("partition", manifest)
    log.warning("split cluster %d into %s (out-of-memory fallback)", cluster_id, ids)
    return ids
