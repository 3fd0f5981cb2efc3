"""Partition the covisibility graph into connected, overlapping, bounded clusters.

VGGT (even sparse) runs on a bounded number of frames per worker, and clusters must share frames so that their
reconstructions can be merged. This module turns ``store.zarr/graph`` (symmetric CSR + component ids) into
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

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from scipy.sparse.csgraph import breadth_first_order, connected_components, dijkstra

from .config import ConfigError, PartitionConfig, PipelineConfig
from .progress import track
from .store import RunStore

log = logging.getLogger(__name__)

WEIGHT_SCALE = 1000  # integer resolution of METIS edge weights
_ROWS_PER_CHUNK = 262_144  # membership rows per vectorised order/neighbour block (bounds memory)


class PartitionError(ValueError):
    """The graph or the config cannot be partitioned; the message says what to fix."""


class PartitionConfigError(PartitionError, ConfigError):
    """A partition setting that can never give bounded, overlapping clusters: a usage error (CLI exit code 2)."""


# ---------------------------------------------------------------------------------------------------------------
# result container
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Clusters:
    """Rows of clusters.parquet, sorted by (cluster_id, position); neighbours as CSR (offsets, values)."""

    cluster_id: np.ndarray
    image_id: np.ndarray
    core: np.ndarray  # bool: role == "core"
    component_id: np.ndarray
    position: np.ndarray
    nbr_offsets: np.ndarray  # (rows + 1,)
    nbr_values: np.ndarray  # image ids

    def __len__(self) -> int:
        return int(self.cluster_id.size)

    @property
    def n_clusters(self) -> int:
        return int(np.unique(self.cluster_id).size)

    def neighbors(self, row: int) -> np.ndarray:
        return self.nbr_values[self.nbr_offsets[row]:self.nbr_offsets[row + 1]]

    def to_table(self, metadata: dict[str, Any] | None = None) -> pa.Table:
        if self.nbr_values.size >= 2**31:
            raise PartitionError("too many neighbour entries for one table; lower partition.k")
        nbrs = pa.ListArray.from_arrays(pa.array(self.nbr_offsets.astype(np.int32)),
                                        pa.array(self.nbr_values.astype(np.int64), type=pa.int64()))
        role = pa.DictionaryArray.from_arrays(pa.array(np.where(self.core, 0, 1).astype(np.int8)),
                                              pa.array(["core", "overlap"])).cast(pa.string())
        table = pa.table({
            "cluster_id": pa.array(self.cluster_id.astype(np.int64)),
            "image_id": pa.array(self.image_id.astype(np.int64)),
            "role": role,
            "component_id": pa.array(self.component_id.astype(np.int64)),
            "position": pa.array(self.position.astype(np.int64)),
            "neighbors": nbrs,
        })
        if metadata:
            table = table.replace_schema_metadata({b"partition": json.dumps(metadata).encode()})
        return table

    @classmethod
    def from_table(cls, table: pa.Table) -> "Clusters":
        need = {"cluster_id", "image_id", "role", "component_id", "position", "neighbors"}
        missing = need - set(table.column_names)
        if missing:
            raise PartitionError(f"clusters table lacks columns {sorted(missing)}; re-run `sparse-vggt partition`")
        nb = table.column("neighbors").combine_chunks()
        if isinstance(nb, pa.ChunkedArray):  # pragma: no cover - pyarrow versions differ
            nb = nb.chunk(0)
        offsets = np.asarray(nb.offsets.to_numpy(), dtype=np.int64)
        values = np.asarray(nb.values.to_numpy(), dtype=np.int64)
        values = values[offsets[0]:offsets[-1]]
        offsets = offsets - offsets[0]
        return cls(
            cluster_id=table.column("cluster_id").to_numpy().astype(np.int64),
            image_id=table.column("image_id").to_numpy().astype(np.int64),
            core=np.asarray(table.column("role").to_numpy(zero_copy_only=False) == "core"),
            component_id=table.column("component_id").to_numpy().astype(np.int64),
            position=table.column("position").to_numpy().astype(np.int64),
            nbr_offsets=offsets, nbr_values=values,
        )

    def select(self, rows: np.ndarray) -> "Clusters":
        """The given rows (in that order), neighbour lists carried along."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = np.diff(self.nbr_offsets)[rows]
        offsets = np.zeros(rows.size + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        values = self.nbr_values[_ranges(self.nbr_offsets[rows], lens)]
        return Clusters(self.cluster_id[rows], self.image_id[rows], self.core[rows], self.component_id[rows],
                        self.position[rows], offsets, values)

    @staticmethod
    def concat(parts: list["Clusters"]) -> "Clusters":
        offs, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offs.append(p.nbr_offsets[1:] + base)
            base += int(p.nbr_offsets[-1])
        return Clusters(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("cluster_id", "image_id", "core", "component_id", "position")),
                        np.concatenate(offs), np.concatenate([p.nbr_values for p in parts]))


# ---------------------------------------------------------------------------------------------------------------
# small vectorised helpers
# ---------------------------------------------------------------------------------------------------------------
def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), without a Python loop."""
    lens = np.asarray(lens, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lens)
    offs = np.arange(total, dtype=np.int64) - np.repeat(ends - lens, lens)
    return np.repeat(np.asarray(starts, dtype=np.int64), lens) + offs


def _group_rank(keys_sorted: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal keys (keys already sorted)."""
    n = keys_sorted.size
    if n == 0:
        return np.zeros(0, np.int64)
    start = np.flatnonzero(np.r_[True, keys_sorted[1:] != keys_sorted[:-1]])
    return np.arange(n, dtype=np.int64) - np.repeat(start, np.diff(np.r_[start, n]))


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


# ---------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------
def resolve_max_cluster_frames(config: PipelineConfig) -> PartitionConfig:
    """``partition.max_cluster_frames = "auto"`` -> the largest cluster whose predicted VGGT forward peak
    (sparse_vggt.memory, worst-case square images of ``reconstruct.image_size``) fits ``reconstruct.memory_gb``
    on the reconstruct device; an explicit number is returned unchanged (it always wins)."""
    cfg = config.partition
    value = cfg.max_cluster_frames
    if not isinstance(value, str):
        return cfg
    if value.strip().lower() != "auto":
        raise PartitionError(f"partition.max_cluster_frames={value!r}: use a number of frames or 'auto'")
    from . import memory

    rc = config.reconstruct
    device, dtype, gb = _reconstruct_device(rc)
    side = int(rc.image_size)
    neighbors = cfg.k if rc.attention == "sparse" else None
    try:
        frames = memory.max_frames(gb, side, side, neighbors, dtype, device,
                                   config=_preset_config(rc.preset), head_chunk_frames=rc.head_chunk_frames or 8,
                                   attention_memory_mb=rc.attention_memory_mb)
    except ValueError as exc:
        raise PartitionError(str(exc)) from exc
    log.info("partition.max_cluster_frames=auto -> %d frames (%.1f GB on %s, %s, %dx%d, %s)", frames, gb, device,
             dtype, side, side, "dense" if neighbors is None else f"k={neighbors}")
    return dataclasses.replace(cfg, max_cluster_frames=frames)


def _preset_config(preset: str) -> dict[str, Any]:
    from .models.vggt import PRESETS

    return dict(PRESETS.get(preset, {}))


def _reconstruct_device(rc: Any) -> tuple[str, str, float]:
    """(device type, compute dtype, memory in GB) the reconstruct workers are assumed to have. An explicit
    ``reconstruct.device`` is taken as given (partition may run on another machine); ``auto`` means this one."""
    import torch

    device = (rc.device or "auto").lower()
    if device == "auto":
        from .device import select_device

        device = select_device("auto").type
    device = device.split(":")[0]
    if rc.dtype and rc.dtype != "auto":
        dtype = rc.dtype
    else:
        dtype = {"cuda": "bfloat16", "mps": "float16"}.get(device, "float32")
    gb = float(rc.memory_gb or 0.0)
    if gb <= 0:
        if device == "cuda" and torch.cuda.is_available():
            gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        else:
            import psutil

            gb = psutil.virtual_memory().total / 2**30
        log.info("reconstruct.memory_gb=0: using this machine's %.1f GB", gb)
    return device, dtype, gb


def validate_config(cfg: PartitionConfig) -> None:
    """Reject configs that cannot give bounded, overlapping clusters (before touching any data)."""
    if isinstance(cfg.max_cluster_frames, str):
        raise PartitionConfigError("partition.max_cluster_frames='auto' must be resolved first "
                             "(sparse_vggt.partition.resolve_max_cluster_frames)")
    if cfg.min_overlap_frames < 1:
        raise PartitionConfigError(f"partition.min_overlap_frames={cfg.min_overlap_frames} must be >= 1: clusters that "
                             "share no frame cannot be merged")
    if cfg.max_cluster_frames < 2 * cfg.min_overlap_frames:
        raise PartitionConfigError(
            f"partition.max_cluster_frames={cfg.max_cluster_frames} < 2 * min_overlap_frames="
            f"{cfg.min_overlap_frames}: a cluster could be all overlap. Raise max_cluster_frames or lower "
            "min_overlap_frames (e.g. --set partition.min_overlap_frames="
            f"{max(1, cfg.max_cluster_frames // 2)}).")
    if cfg.k < 1:
        raise PartitionConfigError(f"partition.k={cfg.k} must be >= 1 (neighbours per frame inside a cluster)")
    if not (0.0 < cfg.balance_tolerance <= 1.0):
        raise PartitionConfigError(f"partition.balance_tolerance={cfg.balance_tolerance} must be in (0, 1]")
    if cfg.min_component_frames < 1:
        raise PartitionConfigError(f"partition.min_component_frames={cfg.min_component_frames} must be >= 1")


@dataclass
class _Graph:
    n: int
    A: sp.csr_matrix  # symmetric, float64, no self loops, only kept rows have edges
    component: np.ndarray  # int64, -1 = excluded
    warnings: list[str] = field(default_factory=list)


def _load_graph(indptr: Any, indices: Any, weights: Any, component: Any) -> _Graph:
    component = np.asarray(component)
    if component.ndim != 1:
        raise PartitionError(f"graph/component must be 1-D, got shape {component.shape}")
    if component.size and not np.issubdtype(component.dtype, np.integer):
        raise PartitionError(f"graph/component must be integers, got {component.dtype}")
    component = component.astype(np.int64)
    n = component.size
    indptr = np.asarray(indptr).astype(np.int64)
    indices = np.asarray(indices).astype(np.int64)
    weights = np.asarray(weights).astype(np.float64)
    rerun = "Re-run `sparse-vggt graph RUN --force`."
    if indptr.shape != (n + 1,):
        raise PartitionError(f"graph/indptr has {indptr.size} entries, expected {n + 1} (component has {n} rows). "
                             + rerun)
    if indptr[0] != 0 or (n and np.any(np.diff(indptr) < 0)) or indptr[-1] != indices.size:
        raise PartitionError("graph/indptr is not a valid CSR row pointer (must start at 0, never decrease and "
                             f"end at len(indices)={indices.size}). " + rerun)
    if weights.shape != indices.shape:
        raise PartitionError(f"graph/weights has {weights.size} entries but indices has {indices.size}. " + rerun)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise PartitionError(f"graph/indices out of range [0, {n}). " + rerun)
    if not np.all(np.isfinite(weights)):
        raise PartitionError(f"graph/weights has {int((~np.isfinite(weights)).sum())} non-finite values. " + rerun)
    warnings: list[str] = []
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    keep = rows != indices
    if not keep.all():
        warnings.append(f"dropped {int((~keep).sum())} self-loop entries")
    excl = (component[rows] < 0) | (component[indices] < 0)
    if (excl & keep).any():
        warnings.append(f"dropped {int((excl & keep).sum())} edge entries touching excluded images (component -1)")
    keep &= ~excl
    rows, cols, w = rows[keep], indices[keep], weights[keep]
    del keep, excl
    if (component[rows] != component[cols]).any():
        bad = int((component[rows] != component[cols]).sum())
        raise PartitionError(f"{bad} graph edges join different components: graph/component is inconsistent with "
                             "the edges. " + rerun)
    key = rows * n + cols
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    if key_s.size and (np.diff(key_s) == 0).any():
        raise PartitionError("graph has duplicate (row, column) entries. " + rerun)
    key_t = np.sort(cols * n + rows)
    if not np.array_equal(key_s, key_t):
        raise PartitionError("graph is not symmetric (some edge i->j has no j->i): the covisibility graph must be "
                             "undirected. " + rerun)
    del key, key_s, key_t
    A = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    A.sort_indices()
    asym = abs(A - A.T)
    if asym.nnz and asym.max() > 1e-6 * max(1.0, float(np.abs(A.data).max(initial=0.0))):
        warnings.append("edge weights were not symmetric; used the mean of both directions")
        A = ((A + A.T) * 0.5).tocsr()
        A.sort_indices()
    # every labelled component must be connected by the edges
    kept = np.flatnonzero(component >= 0)
    if kept.size:
        sub = A[kept][:, kept]
        ncomp, lab = connected_components(sub, directed=False)
        pairs = np.unique(component[kept] * (ncomp + 1) + lab)
        if pairs.size != np.unique(component[kept]).size:
            raise PartitionError("a graph/component label covers frames that the edges do not connect "
                                 "(component ids are stale). " + rerun)
    return _Graph(n=n, A=A, component=component, warnings=warnings)


# ---------------------------------------------------------------------------------------------------------------
# cutting one component: METIS + connectivity repair + core cap
# ---------------------------------------------------------------------------------------------------------------
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


def _split_part(A: sp.csr_matrix, nparts: int, cap: int, wmax: float, tol: float, seed: int,
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
            sl = _split_part(sub, k, cap, wmax, tol, seed, stats, use_metis=it < 3)
            stats["cap_recuts"] = stats.get("cap_recuts", 0) + 1
            new = np.where(sl == 0, p, next_label + sl - 1)
            next_label += int(sl.max())
            labels[idx] = new
    raise PartitionError(f"could not bring core parts under the cap of {cap} frames")  # pragma: no cover


def _cut_component(A: sp.csr_matrix, core_target: float, cfg: PartitionConfig, wmax: float,
                   stats: dict[str, int]) -> tuple[np.ndarray, dict[str, Any]]:
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


# ---------------------------------------------------------------------------------------------------------------
# overlap selection (vectorised over all cross-part edges)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Cand:
    frame: np.ndarray  # boundary frame (core in src)
    src: np.ndarray
    dst: np.ndarray  # cluster it may be added to
    tie: np.ndarray  # sum of weights from frame to dst's core
    pair: np.ndarray  # index into pair_lo/pair_hi
    rank: np.ndarray  # interleaved priority within the pair (0 = first)
    pair_lo: np.ndarray
    pair_hi: np.ndarray
    pair_tie: np.ndarray


def _candidates(u: np.ndarray, v: np.ndarray, w: np.ndarray, part: np.ndarray, nparts: int) -> _Cand:
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
    r_side[o] = _group_rank(pidx[o] * 2 + side[o])
    o2 = np.lexsort((frame, side, -tie, r_side, pidx))
    rank = np.empty(o2.size, np.int64)
    rank[o2] = _group_rank(pidx[o2])
    pair_tie = np.bincount(pidx, weights=tie, minlength=upk.size) * 0.5
    return _Cand(frame, src, dst, tie, pidx, rank, upk // nparts, upk % nparts, pair_tie)


def _capacity_fill(cand: _Cand, aff_pair: np.ndarray, mc: np.ndarray, mg: np.ndarray, size: np.ndarray,
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
                     _pair_shared(mc, mg, nclusters, n, cand.pair_lo[aff_ids], cand.pair_hi[aff_ids]).tolist()))
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


# ---------------------------------------------------------------------------------------------------------------
# in-cluster order and neighbour sets (vectorised over all clusters, in row chunks)
# ---------------------------------------------------------------------------------------------------------------
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
    eidx = _ranges(A.indptr[mg[rl]], deg[rl])
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
        jj = _ranges(row_start[rh], row_size[rh])
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
    position[out] = _group_rank(mc[out])
    inv = np.empty(R, np.int64)
    inv[out] = np.arange(R)
    e = np.lexsort((mg[j], -w, inv[i]))
    ie = inv[i][e]
    keep = _group_rank(ie) < k
    ie, vals = ie[keep], mg[j][e][keep]
    offsets = np.zeros(R + 1, np.int64)
    np.cumsum(np.bincount(ie, minlength=R), out=offsets[1:])
    return out, position[out], offsets, vals


def _order_and_neighbors(mc: np.ndarray, mg: np.ndarray, core: np.ndarray, comp: np.ndarray,
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


# ---------------------------------------------------------------------------------------------------------------
# shared-frame bookkeeping and bridging
# ---------------------------------------------------------------------------------------------------------------
def _pair_shared(mc: np.ndarray, mg: np.ndarray, nclusters: int, n: int, a: np.ndarray, b: np.ndarray
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


def _neighbors_in(A: sp.csr_matrix, g: int, allowed: set[int], allowed_arr: np.ndarray) -> list[int]:
    """Neighbours of ``g`` inside ``allowed`` (vectorised for hub frames with many neighbours)."""
    nb = A.indices[A.indptr[g]:A.indptr[g + 1]]
    if nb.size > 64:
        return nb[np.isin(nb, allowed_arr)].tolist()
    return [h for h in nb.tolist() if h in allowed]


def _grow(A: sp.csr_matrix, members: set[int], allowed: set[int], room: int, need: int) -> list[int]:
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
        for h in _neighbors_in(A, g, allowed, allowed_arr):
            if h not in seen:
                seen.add(h)
                frontier.append(h)
    while frontier and len(added) < limit:
        nxt = []
        for g in sorted(frontier):
            if len(added) >= limit:
                break
            added.append(g)
            for h in _neighbors_in(A, g, allowed, allowed_arr):
                if h not in seen:
                    seen.add(h)
                    nxt.append(h)
        frontier = nxt
    return added


def _tree_links(A: sp.csr_matrix, part: np.ndarray, mc: np.ndarray, mg: np.ndarray, core_size: np.ndarray,
                size: np.ndarray, comp_of_part: np.ndarray, tight: np.ndarray, cand: _Cand, M: int, m: int,
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
                got = _grow(A, sy, sx - sy, int(M - size[y]), need)
                members.add(y, got)
                size[y] += len(got)
                need -= len(got)
            linked += need <= 0
    stats["tree_links"] = linked
    return members.extended(mc, mg)


def _bridge(A: sp.csr_matrix, part: np.ndarray, mc: np.ndarray, mg: np.ndarray, core_size: np.ndarray,
            size: np.ndarray, comp_of_part: np.ndarray, cand: _Cand, M: int, m: int,
            stats: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add bridging overlap until each component's linked cluster graph is connected (where capacity allows).

    Kruskal over the touching pairs, strongest first; returns the components whose linked graph is still
    disconnected (the caller then links them along a spanning tree instead).
    """
    nclusters = core_size.size
    shared = _pair_shared(mc, mg, nclusters, A.shape[0], cand.pair_lo, cand.pair_hi)
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
            got = _grow(A, sy, core_x, int(M - size[y]), need)
            if len(got) < need:
                got += _grow(A, sy | set(got), sx - sy - set(got), int(M - size[y]) - len(got), need - len(got))
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


# ---------------------------------------------------------------------------------------------------------------
# the pure entry point
# ---------------------------------------------------------------------------------------------------------------
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
    graph = _load_graph(indptr, indices, weights, component)
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
            "raise graph.k, lower graph.min_similarity) or set partition.reconstruct_singletons=true.")
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
        labels, info = _cut_component(sub, core_target, cfg, wmax, stats)
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
        cand = _candidates(u, v, w, part, nparts)
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
            sl = _split_part(sub, 2, max(1, idx.size - 1), wmax, tol, cfg.seed, stats)
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
            mc, mg = _tree_links(A, part, mc, mg, core_size, size, comp_of_part, tight, cand, M, m, bstats)
        mc, mg, disconnected = _bridge(A, part, mc, mg, core_size, size, comp_of_part, cand, M, m, bstats)
        if disconnected.size == 0 or tight[disconnected].all():
            break
        tight[disconnected] = True
    stats.update(bstats)
    stats["tight_components"] = int(tight.sum())
    if aff_pair.any():
        mc, mg = _capacity_fill(cand, aff_pair, mc, mg, size, M, m, n)
    core_flag = np.zeros(mc.size, bool)
    core_flag[:cf.size] = True

    # --- cluster ids ordered by (component, part) -----------------------------------------------------------
    new_id = np.empty(nparts, np.int64)
    new_id[np.lexsort((np.arange(nparts), comp_of_part))] = np.arange(nparts)
    clusters = _order_and_neighbors(new_id[mc], mg, core_flag, comp, A, cfg.k)

    report = _report(clusters, graph, part, new_id, cand, selected, comp_ids, comp_sizes, clustered_comp,
                     cut_info, stats, cfg, u, v, w)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return clusters, report


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
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
    shared = _pair_shared(clusters.cluster_id, clusters.image_id, nclusters, n, a, b)
    linked = shared >= np.minimum(m, core_size[a] + core_size[b])
    return {"a": a, "b": b, "shared": shared, "boundary": boundary, "touching": np.ones(a.size, bool),
            "linked": linked}


def _report(clusters: Clusters, graph: _Graph, part: np.ndarray, new_id: np.ndarray, cand: _Cand,
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
        "max_cluster_frames": M, "min_overlap_frames": m, "k": cfg.k,
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


# ---------------------------------------------------------------------------------------------------------------
# run-directory stage
# ---------------------------------------------------------------------------------------------------------------
def _read_graph(store: RunStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if "graph" not in store.zarr:
        raise PartitionError(f"{store.root}: store.zarr/graph is missing; run `sparse-vggt graph {store.root}`.")
    grp = store.zarr["graph"]
    missing = [a for a in ("indptr", "indices", "weights", "component") if a not in grp]
    if missing:
        raise PartitionError(f"store.zarr/graph lacks {missing}; re-run `sparse-vggt graph {store.root} --force`.")
    return tuple(np.asarray(grp[a][...]) for a in ("indptr", "indices", "weights", "component"))  # type: ignore


def _table_metadata(cfg: PartitionConfig) -> dict[str, Any]:
    return {"config": dataclasses.asdict(cfg), "reference_frame": "max in-cluster weighted degree (core)"}


def partition(run_dir: Path, config: PipelineConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The partition stage: store.zarr/graph -> tables/clusters.parquet (+ manifest with the report)."""
    store = RunStore.open(run_dir)
    config = config or store.config()
    requested = config.partition
    cfg = resolve_max_cluster_frames(config)
    validate_config(cfg)
    if store.is_stage_complete("partition") and store.has_table("clusters") and not force:
        manifest = store.stage_manifest("partition")
        if manifest.get("config") == dataclasses.asdict(requested):
            log.info("partition stage already finished in %s; nothing to do", store.root)
            return manifest
        log.warning("partition config changed since the last run; re-partitioning %s", store.root)
    store.require_stage("graph", "partition")
    indptr, indices, weights, component = _read_graph(store)
    store.stage_started("partition")
    clusters, report = partition_graph(indptr, indices, weights, component, cfg)
    path = store.write_table("clusters", clusters.to_table(_table_metadata(cfg)))
    manifest = {**report, "table": str(path.relative_to(store.root)), "config": dataclasses.asdict(requested),
                "max_cluster_frames_resolved": cfg.max_cluster_frames, "splits": []}
    store.stage_finished("partition", manifest)
    log.info("partition: %d clusters over %d frames (%d components, %d singletons)", report["clusters"],
             report["frames_clustered"], report["components"], report["singletons"])
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# out-of-memory fallback: split one cluster in two
# ---------------------------------------------------------------------------------------------------------------
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
    sl = _split_part(sub, 2, core.size - 1, wmax, cfg.balance_tolerance, cfg.seed, stats)
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
        got = _grow(A, halves[i], core_sets[j] - halves[i], M - len(halves[i]), want)
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
    new_rows = _order_and_neighbors(mc, mg, cflag, comp_arr, A, cfg.k)
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
        for h in _neighbors_in(A, g, allowed, allowed_arr):
            if h not in seen:
                seen.add(h)
                prev[h] = -1
                frontier.append(h)
    order: list[int] = []
    while frontier:
        order.extend(sorted(frontier))
        nxt = []
        for g in sorted(frontier):
            for h in _neighbors_in(A, g, allowed, allowed_arr):
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
    indptr, indices, weights, component = _read_graph(store)
    graph = _load_graph(indptr, indices, weights, component)
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


# ---------------------------------------------------------------------------------------------------------------
# synthetic city-like graphs (tests and benchmarks)
# ---------------------------------------------------------------------------------------------------------------
def synthetic_city_graph(n: int, k: int = 10, seed: int = 0, outliers: float = 0.002, plazas: float = 0.1
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A k-NN covisibility graph of photos taken along the streets of a grid city (plus plazas and outliers).

    Frames lie on random streets of a square street grid (jittered across the street), a fraction ``plazas`` in
    dense blobs around intersections and a fraction ``outliers`` anywhere; each frame links to its ``k`` nearest
    frames with weight ``exp(-d / (8 s))`` (s = mean spacing along a street) and links longer than ``40 s`` are
    dropped, so far outliers become isolated frames. Returns (indptr, indices, weights, component).
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    streets = max(2, int(round(math.sqrt(n) / 12)))
    gap = 1.0 / streets
    n_out = int(n * outliers)
    n_pl = int(n * plazas)
    n_st = n - n_out - n_pl
    spacing = 2 * streets * 1.0 / max(1, n_st)
    horiz = rng.random(n_st) < 0.5
    line = (rng.integers(0, streets, n_st) + 0.5) * gap
    along = rng.random(n_st)
    across = line + rng.normal(0, spacing * 2, n_st)
    xy_st = np.where(horiz[:, None], np.c_[along, across], np.c_[across, along])
    centers = (rng.integers(0, streets, (max(1, n_pl // 200 + 1), 2)) + 0.5) * gap
    which = rng.integers(0, len(centers), n_pl)
    xy_pl = centers[which] + rng.normal(0, gap * 0.08, (n_pl, 2))
    xy_out = rng.random((n_out, 2)) * 1.2 - 0.1
    xy = np.concatenate([xy_st, xy_pl, xy_out])[rng.permutation(n)]
    tree = cKDTree(xy)
    kk = min(k + 1, n)
    dist, idx = tree.query(xy, k=kk, workers=2)
    dist, idx = dist[:, 1:], idx[:, 1:]
    rows = np.repeat(np.arange(n), kk - 1)
    cols = idx.ravel()
    d = dist.ravel()
    keep = (d <= 40 * spacing) & (cols < n)
    rows, cols, d = rows[keep], cols[keep], d[keep]
    wgt = np.exp(-d / (8 * spacing)).astype(np.float32)
    return symmetric_csr_with_components(rows, cols, wgt, n)


def symmetric_csr_with_components(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n: int
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed weighted pairs -> the graph stage's arrays: symmetric CSR (max weight of both directions) and
    component ids numbered by decreasing component size (0 = largest), as synthetic graphs need them."""
    A = sp.csr_matrix((np.asarray(weights, np.float32), (rows, cols)), shape=(n, n))
    A = A.maximum(A.T).tocsr()
    A.sort_indices()
    ncomp, lab = connected_components(A, directed=False)
    sizes = np.bincount(lab)
    rank = np.empty(ncomp, np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(ncomp)
    return A.indptr.astype(np.int64), A.indices.astype(np.int64), A.data.astype(np.float32), rank[lab]
run = lambda run_dir, config=None, *, force=False, units=None: partition(run_dir, config, force=force)  # noqa: E731  # TEMP r18-sched
