"""Correspondences between clusters that share frames: the same pixels unprojected in both reconstructions.

Every cluster predicts depth for a shared photo in its own gauge. Mapping a grid of depth-map pixels to the
original image (``depth_to_image``) and on into the other cluster's depth map gives dense, confidence-weighted
3D-3D pairs without feature matching. The pixel mappings are shared with fusion.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from ..config import MergeConfig
from ..geometry import unproject_pixels
from .clusters import ClusterData, DepthCache


def overlapping_pairs(clusters: dict[int, ClusterData], order: list[int], n_image_ids: int) -> np.ndarray:
    """(E,2) node pairs a < b (indices into ``order``) of clusters that share at least one frame, sorted."""
    node_of = {c: i for i, c in enumerate(order)}
    C = len(order)
    rows_c, rows_i = [], []
    for c in order:
        rows_c.append(np.full(len(clusters[c].image_ids), node_of[c]))
        rows_i.append(clusters[c].image_ids)
    occ = sp.csr_matrix((np.ones(sum(len(x) for x in rows_c)), (np.concatenate(rows_c), np.concatenate(rows_i))),
                        shape=(C, n_image_ids))
    shared_counts = sp.triu(occ @ occ.T, k=1).tocoo()
    pair_nodes = np.stack([shared_counts.row, shared_counts.col], -1).astype(np.int64)
    pair_nodes = pair_nodes[np.lexsort((pair_nodes[:, 1], pair_nodes[:, 0]))] if len(pair_nodes) else \
        np.zeros((0, 2), np.int64)
    return pair_nodes


def _frame_maps(cache: DepthCache, c: ClusterData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, w = cache.get(c.cid)
    return d[rows], w[rows]


def valid_mask(depth: np.ndarray, conf: np.ndarray, quantile: float) -> np.ndarray:
    """Finite positive depth with confidence at or above the frame's ``quantile`` (over its valid pixels)."""
    ok = np.isfinite(depth) & (depth > 0) & np.isfinite(conf)
    if quantile > 0 and ok.any():
        thr = np.quantile(conf[ok], quantile)
        ok &= conf >= thr
    return ok


def _grid(h: int, w: int, cfg: MergeConfig) -> tuple[np.ndarray, np.ndarray]:
    stride = cfg.grid_stride or max(1, int(round(math.sqrt(h * w / max(cfg.grid_points, 1)))))
    v, u = np.meshgrid(np.arange(stride // 2, h, stride), np.arange(stride // 2, w, stride), indexing="ij")
    return u.ravel(), v.ravel()


def to_image(A: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([u, v, np.ones_like(u)], -1).astype(np.float64) @ A.T  # (N, 2) original pixels


def to_depth(A: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    M, t = A[:, :2], A[:, 2]
    uv = np.linalg.solve(M, (xy - t).T).T
    return np.rint(uv[:, 0]).astype(np.int64), np.rint(uv[:, 1]).astype(np.int64)


def pair_correspondences(
    store: DepthCache, a: ClusterData, b: ClusterData, shared: np.ndarray, image_hw: dict[int, tuple[int, int]],
    cfg: MergeConfig,
) -> dict[str, np.ndarray]:
    """Same pixels of the shared frames unprojected in cluster a and cluster b.

    Returns xa, xb (N,3), weight (N,) = sqrt(conf_a conf_b), depth_a (N,) (residual normaliser), frame (N,).
    """
    if len(shared) > cfg.max_pair_frames:
        shared = shared[np.linspace(0, len(shared) - 1, cfg.max_pair_frames).round().astype(int)]
    ra = np.array([a.index[int(i)] for i in shared])
    rb = np.array([b.index[int(i)] for i in shared])
    da, ca = _frame_maps(store, a, ra)
    db, cb = _frame_maps(store, b, rb)
    out: dict[str, list[np.ndarray]] = {"xa": [], "xb": [], "weight": [], "depth_a": [], "frame": []}
    for k, img in enumerate(shared):
        H, W = image_hw[int(img)]
        u, v = _grid(*a.depth_hw, cfg)
        xy = to_image(a.depth_to_image[ra[k]], u, v)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < W) & (xy[:, 1] >= 0) & (xy[:, 1] < H)
        ub, vb = to_depth(b.depth_to_image[rb[k]], xy)
        hb, wb = b.depth_hw
        inside &= (ub >= 0) & (ub < wb) & (vb >= 0) & (vb < hb)
        u, v, ub, vb, xy = u[inside], v[inside], ub[inside], vb[inside], xy[inside]
        ok_a = valid_mask(da[k], ca[k], cfg.min_confidence_quantile)[v, u]
        ok_b = valid_mask(db[k], cb[k], cfg.min_confidence_quantile)[vb, ub]
        sel = ok_a & ok_b
        if not sel.any():
            continue
        za, zb = da[k][v[sel], u[sel]].astype(np.float64), db[k][vb[sel], ub[sel]].astype(np.float64)
        out["xa"].append(unproject_pixels(xy[sel], za, a.extrinsics[ra[k]], a.intrinsics[ra[k]]))
        out["xb"].append(unproject_pixels(xy[sel], zb, b.extrinsics[rb[k]], b.intrinsics[rb[k]]))
        out["weight"].append(np.sqrt(ca[k][v[sel], u[sel]].astype(np.float64) * cb[k][vb[sel], ub[sel]]))
        out["depth_a"].append(za)
        out["frame"].append(np.full(int(sel.sum()), int(img)))
    if not out["xa"]:
        return {"xa": np.zeros((0, 3)), "xb": np.zeros((0, 3)), "weight": np.zeros(0), "depth_a": np.zeros(0),
                "frame": np.zeros(0, np.int64)}
    return {k: np.concatenate(v) for k, v in out.items()}
