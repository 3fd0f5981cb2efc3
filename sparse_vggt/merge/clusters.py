"""Cluster reconstructions as merge reads them: small per-cluster arrays, validated, and a bounded depth cache.

A cluster whose arrays are missing, inconsistent or mostly invalid is excluded from the merge (with the reason)
rather than failing the stage, so ``load_cluster`` raises ``ValueError`` with a message for the report. Depth maps
are the only large arrays: :class:`DepthCache` reads each cluster's maps once and keeps them under a byte budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import MergeConfig
from ..store import RunStore


# cluster loading and validation
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ClusterData:
    """Small per-cluster arrays kept in memory; depth is read from Zarr when needed."""

    cid: int
    image_ids: np.ndarray
    extrinsics: np.ndarray  # (n,3,4) float64
    intrinsics: np.ndarray  # (n,3,3) float64
    depth_to_image: np.ndarray  # (n,2,3) float64
    depth_hw: tuple[int, int]
    core: np.ndarray  # (n,) bool, from clusters.parquet
    length: float  # median valid depth: the cluster's characteristic length (scale normaliser)
    index: dict[int, int] = field(default_factory=dict)  # image_id -> row


def load_cluster(store: RunStore, cache: "DepthCache", cid: int, core_ids: set[int], all_ids: set[int],
                  cfg: MergeConfig) -> ClusterData:
    """Read and validate one cluster; raise ValueError with the exclusion reason."""
    path = f"clusters/{cid}"
    if not store.is_unit_complete(path):
        raise ValueError("missing reconstruction (no complete clusters/%d in the store)" % cid)
    g = store.group(path, create=False)
    need = ("extrinsics", "intrinsics", "depth", "depth_conf", "image_ids", "depth_to_image")
    missing = [k for k in need if k not in g]
    if missing:
        raise ValueError(f"reconstruction lacks arrays {missing}")
    ids = np.asarray(g["image_ids"][...], dtype=np.int64)
    n = len(ids)
    ext = np.asarray(g["extrinsics"][...], dtype=np.float64)
    K = np.asarray(g["intrinsics"][...], dtype=np.float64)
    A = np.asarray(g["depth_to_image"][...], dtype=np.float64)
    dshape = g["depth"].shape
    if ext.shape != (n, 3, 4) or K.shape != (n, 3, 3) or A.shape != (n, 2, 3) or len(dshape) != 3 or dshape[0] != n \
            or g["depth_conf"].shape != dshape:
        raise ValueError(f"inconsistent array shapes (image_ids {n}, extrinsics {ext.shape}, intrinsics {K.shape}, "
                         f"depth {dshape}, depth_to_image {A.shape})")
    if not set(ids.tolist()) <= all_ids:
        raise ValueError("image_ids do not match clusters.parquet for this cluster (stale reconstruction?)")
    if not (np.isfinite(ext).all() and np.isfinite(K).all() and np.isfinite(A).all()):
        raise ValueError("non-finite camera parameters")
    depth = cache.get(cid)[0]
    bad = ~np.isfinite(depth) | (depth <= 0)
    frac = float(bad.mean()) if depth.size else 1.0
    if frac > cfg.max_nonfinite_fraction:
        raise ValueError(f"{frac:.0%} of depth pixels are non-finite or <= 0 (limit "
                         f"{cfg.max_nonfinite_fraction:.0%}, merge.max_nonfinite_fraction)")
    length = float(np.median(depth[~bad]))
    core = np.array([int(i) in core_ids for i in ids])
    return ClusterData(cid=cid, image_ids=ids, extrinsics=ext, intrinsics=K, depth_to_image=A,
                       depth_hw=(int(dshape[1]), int(dshape[2])), core=core, length=length,
                       index={int(i): r for r, i in enumerate(ids)})


class DepthCache:
    """Whole-cluster depth/confidence maps read once from Zarr, kept under a byte budget (oldest dropped first).

    Pairs are visited in cluster order and fusion revisits overlap clusters, so most reads hit the cache.
    """

    def __init__(self, store: RunStore, budget_bytes: int = 1 << 30):
        self.store, self.budget, self.items, self.bytes = store, budget_bytes, {}, 0

    def get(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        if cid in self.items:
            return self.items[cid]
        g = self.store.group(f"clusters/{cid}", create=False)
        item = (np.asarray(g["depth"][...], dtype=np.float32), np.asarray(g["depth_conf"][...], dtype=np.float32))
        size = item[0].nbytes + item[1].nbytes
        while self.items and self.bytes + size > self.budget:
            old = self.items.pop(next(iter(self.items)))
            self.bytes -= old[0].nbytes + old[1].nbytes
        self.items[cid] = item
        self.bytes += size
        return item
