"""Merge per-cluster reconstructions into one frame per connected component (`sparse-vggt merge`).

Every cluster's VGGT run lives in its own similarity gauge (reference frame at the origin, arbitrary scale).
Clusters that share frames are related by a Sim(3); we estimate it from the *same pixels* of the shared frames
unprojected in both clusters (dense, confidence-weighted correspondences; RANSAC on minimal samples, then IRLS with
a Huber loss around weighted Umeyama). Residuals are relative to the point's depth, so thresholds are scale free.
Edges that fail a threshold are rejected with the reason recorded. Per connected component of accepted edges, a
maximum-weight spanning tree gives initial cluster->world transforms, and a Sim(3) pose graph over *all* accepted
edges (Levenberg-Marquardt on Lie-algebra residuals) distributes loop errors. Each image takes its pose from the
cluster where it is ``core``; points are fused from core frames with a confidence threshold, an optional
cross-cluster depth-consistency filter, and voxel downsampling.

Layout written to ``store.zarr/merge/`` (group attrs ``complete`` written last, then the stage marker)::

    cluster_ids        (C,)    int64    clusters that took part (C = included clusters)
    cluster_sim3       (C,4,4) float64  cluster -> component world: X_world = S @ X_cluster (pose-graph result)
    cluster_sim3_init  (C,4,4) float64  the spanning-tree initialisation (for diagnosis)
    cluster_component  (C,)    int64    merge component (0 = most core images); its own world frame
    edges/pairs        (E,2)   int64    cluster pairs (a, b) that share frames, a < b
    edges/sim3         (E,4,4) float64  measured X_a = S @ X_b (identity when estimation failed)
    edges/accepted     (E,)    bool
    images/image_ids   (M,)    int64    posed images (row ids of images.parquet)
    images/extrinsics  (M,3,4) float64  world -> camera (OpenCV) in the component's world frame
    images/intrinsics  (M,3,3) float64  original upright pixels
    images/component   (M,)    int64
    images/cluster     (M,)    int64    cluster the pose came from (its core cluster unless that was excluded)
    points/xyz         (P,3)   float32  fused points, component world frame
    points/rgb         (P,3)   uint8
    points/conf        (P,)    float32  summed confidence of the merged pixels
    points/component   (P,)    int64
    points/track_offsets (P+1,) int64   CSR over the two arrays below (one observation per image and point)
    points/track_image_ids (T,) int64
    points/track_xy    (T,2)   float32  pixel (x, y) in the original upright image

Group attrs: ``residuals`` (the DESIGN name; one dict per edge: clusters, shared frames, correspondences, inliers,
inlier ratio, relative RMSE/median residual, scale, accepted, reason, and after the global solve the loop residual
global_rot_deg / global_trans_rel / global_log_scale), ``excluded_clusters`` ({id: reason}), ``components``,
``pose_graph`` (cost before/after, iterations), ``fusion`` (counts).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

from .config import MergeConfig, PipelineConfig
from .geometry import (
    GeometryError, rotation_angle_deg, sim3_exp, sim3_inverse, sim3_log, sim3_parts, umeyama, unproject_pixels,
)
from .progress import track
from .store import RunStore, RunStoreError

log = logging.getLogger(__name__)

STAGE = "merge"


class MergeError(RuntimeError):
    """Merge cannot produce any model (e.g. no usable cluster); the message says what to do."""


# ------------------------------------------------------------------------------------------------------------
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


def _load_cluster(store: RunStore, cache: "DepthCache", cid: int, core_ids: set[int], all_ids: set[int],
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


# ------------------------------------------------------------------------------------------------------------
# correspondences on shared frames
# ------------------------------------------------------------------------------------------------------------
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


def _frame_maps(cache: DepthCache, c: ClusterData, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, w = cache.get(c.cid)
    return d[rows], w[rows]


def _valid_mask(depth: np.ndarray, conf: np.ndarray, quantile: float) -> np.ndarray:
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


def _to_image(A: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([u, v, np.ones_like(u)], -1).astype(np.float64) @ A.T  # (N, 2) original pixels


def _to_depth(A: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        xy = _to_image(a.depth_to_image[ra[k]], u, v)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < W) & (xy[:, 1] >= 0) & (xy[:, 1] < H)
        ub, vb = _to_depth(b.depth_to_image[rb[k]], xy)
        hb, wb = b.depth_hw
        inside &= (ub >= 0) & (ub < wb) & (vb >= 0) & (vb < hb)
        u, v, ub, vb, xy = u[inside], v[inside], ub[inside], vb[inside], xy[inside]
        ok_a = _valid_mask(da[k], ca[k], cfg.min_confidence_quantile)[v, u]
        ok_b = _valid_mask(db[k], cb[k], cfg.min_confidence_quantile)[vb, ub]
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


# ------------------------------------------------------------------------------------------------------------
# robust Sim(3)
# ------------------------------------------------------------------------------------------------------------
def _rel_residuals(S: np.ndarray, xb: np.ndarray, xa: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """|xa - S xb| / norm for one (4,4) or a batch (B,4,4) of transforms."""
    pred = xb @ np.swapaxes(S[..., :3, :3], -1, -2) + S[..., None, :3, 3]
    return np.linalg.norm(pred - xa, axis=-1) / norm


def robust_sim3(
    xb: np.ndarray, xa: np.ndarray, weight: np.ndarray, norm: np.ndarray, cfg: MergeConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, float]]:
    """Sim(3) ``S`` with ``xa ~ S xb``: RANSAC (minimal 3-point Umeyama) then IRLS Huber on the inliers.

    Residuals are relative (divided by ``norm``, the point's depth). Raises :class:`GeometryError` for degenerate
    geometry (collinear points) or when no hypothesis has inliers.
    """
    n = len(xa)
    if n < 3:
        raise GeometryError(f"only {n} correspondences")
    score_idx = rng.choice(n, size=min(n, 1024), replace=False)
    best, best_score, best_frac = None, -1.0, 0.0
    iters = max(1, cfg.ransac_iterations)
    done = 0
    while done < iters:
        m = min(32, iters - done)
        samp = rng.integers(0, n, size=(m, 3))
        samp = samp[(samp[:, 0] != samp[:, 1]) & (samp[:, 0] != samp[:, 2]) & (samp[:, 1] != samp[:, 2])]
        done += m
        if not len(samp):
            continue
        with np.errstate(all="ignore"):
            hyp = umeyama(xb[samp], xa[samp], check_degenerate=False)
            ok = np.isfinite(hyp).all(axis=(1, 2))
            if not ok.any():
                continue
            hyp = hyp[ok]
            inl = _rel_residuals(hyp, xb[score_idx], xa[score_idx], norm[score_idx]) < cfg.inlier_threshold
            score = (inl * weight[score_idx]).sum(-1)
        j = int(np.argmax(score))
        if score[j] > best_score:
            best, best_score, best_frac = hyp[j], float(score[j]), float(inl[j].mean())
        # adaptive stop: enough samples for a 99.9% chance of one all-inlier triple at the best inlier ratio
        need = math.log(1e-3) / math.log(max(1e-12, 1.0 - best_frac**3)) if 0 < best_frac < 1 else 0.0
        if best_frac >= 1 or done >= max(need, 32):
            break
    if best is None or best_score <= 0:
        raise GeometryError("no RANSAC hypothesis has inliers")
    S = best
    inl = None
    for _ in range(max(1, cfg.irls_iterations)):
        r = _rel_residuals(S, xb, xa, norm)
        new_inl = r < cfg.inlier_threshold
        if new_inl.sum() < 3:
            raise GeometryError("fewer than 3 inliers")
        huber = np.where(r <= cfg.huber_delta, 1.0, cfg.huber_delta / np.maximum(r, 1e-12))
        w = weight * huber / norm**2  # relative residuals: weight each squared error by 1/depth^2
        S_new = umeyama(xb[new_inl], xa[new_inl], w[new_inl], check_degenerate=True)
        converged = inl is not None and np.array_equal(new_inl, inl) and np.allclose(S_new, S, atol=1e-10, rtol=1e-9)
        S, inl = S_new, new_inl
        if converged:
            break
    r = _rel_residuals(S, xb, xa, norm)
    inl = r < cfg.inlier_threshold
    stats = {
        "correspondences": int(n),
        "inliers": int(inl.sum()),
        "inlier_ratio": float(inl.mean()),
        "rmse_rel": float(np.sqrt(np.mean(r[inl] ** 2))) if inl.any() else float("inf"),
        "median_rel": float(np.median(r)),
        "scale": float(sim3_parts(S)[0]),
    }
    return S, stats


def camera_agreement(S: np.ndarray, a: ClusterData, b: ClusterData, shared: np.ndarray) -> tuple[float, float]:
    """How well the shared frames' *cameras* agree once cluster b is mapped into a by the point alignment ``S``.

    Depth and camera come from different heads of the model; a pair whose depths align but whose cameras do not
    (e.g. random weights, or a failed cluster) would give a wrong model, so both must agree. Returns the median
    rotation difference (degrees) and the median centre distance relative to cluster a's median depth.
    """
    ra = np.array([a.index[int(i)] for i in shared])
    rb = np.array([b.index[int(i)] for i in shared])
    s, RS, tS = sim3_parts(S)
    Ea, Eb = a.extrinsics[ra], b.extrinsics[rb]
    rot = rotation_angle_deg(Ea[:, :, :3] @ np.swapaxes(Eb[:, :, :3] @ RS.T, 1, 2))
    Ca = -np.einsum("nji,nj->ni", Ea[:, :, :3], Ea[:, :, 3])
    Cb = -np.einsum("nji,nj->ni", Eb[:, :, :3], Eb[:, :, 3])
    ctr = np.linalg.norm(Ca - (s * Cb @ RS.T + tS), axis=1) / max(a.length, 1e-12)
    return float(np.median(rot)), float(np.median(ctr))


def estimate_edge(
    store: DepthCache, a: ClusterData, b: ClusterData, shared: np.ndarray, image_hw: dict[int, tuple[int, int]],
    cfg: MergeConfig, rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Measure X_a = S X_b for one cluster pair and decide whether to accept it (reason when not)."""
    info: dict[str, Any] = {"clusters": [a.cid, b.cid], "shared_frames": int(len(shared)), "accepted": False,
                            "reason": ""}
    corr = pair_correspondences(store, a, b, shared, image_hw, cfg)
    n = len(corr["xa"])
    info["correspondences"] = int(n)
    if n < cfg.min_correspondences:
        info["reason"] = f"too few valid correspondences ({n} < merge.min_correspondences={cfg.min_correspondences})"
        return np.eye(4), info
    try:
        S, stats = robust_sim3(corr["xb"], corr["xa"], corr["weight"], corr["depth_a"], cfg, rng)
    except GeometryError as exc:
        info["reason"] = f"degenerate geometry: {exc}"
        return np.eye(4), info
    info.update(stats)
    cam_rot, cam_ctr = camera_agreement(S, a, b, shared)
    info["camera_rot_deg"], info["camera_center_rel"] = cam_rot, cam_ctr
    if stats["inlier_ratio"] < cfg.min_inlier_ratio:
        info["reason"] = (f"inlier ratio {stats['inlier_ratio']:.2f} < merge.min_inlier_ratio={cfg.min_inlier_ratio}")
    elif stats["rmse_rel"] > cfg.max_rmse:
        info["reason"] = f"relative inlier RMSE {stats['rmse_rel']:.3f} > merge.max_rmse={cfg.max_rmse}"
    elif cam_rot > cfg.max_camera_rotation_deg:
        info["reason"] = (f"shared cameras disagree with the point alignment: median rotation {cam_rot:.2f} deg > "
                          f"merge.max_camera_rotation_deg={cfg.max_camera_rotation_deg}")
    elif cam_ctr > cfg.max_camera_center_rel:
        info["reason"] = (f"shared camera centres disagree with the point alignment: median {cam_ctr:.3f} of the "
                          f"scene depth > merge.max_camera_center_rel={cfg.max_camera_center_rel}")
    elif not np.isfinite(S).all() or stats["scale"] <= 0:
        info["reason"] = "non-finite transform"
    else:
        info["accepted"] = True
    return S, info


# ------------------------------------------------------------------------------------------------------------
# global alignment
# ------------------------------------------------------------------------------------------------------------
def spanning_tree_init(n: int, pairs: np.ndarray, meas: np.ndarray, weight: np.ndarray, root: int) -> np.ndarray:
    """Node -> world transforms (n,4,4) from the maximum-weight spanning tree (root = identity).

    ``pairs`` (E,2) node indices, ``meas`` (E,4,4) with X_a = meas X_b. All nodes must be connected.
    """
    wmax = float(weight.max()) if len(weight) else 1.0
    cost = (wmax + 1.0) - weight  # positive; larger weight -> cheaper
    G = sp.coo_matrix((cost, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(G + G.T)
    tree = tree + tree.T
    order, pred = breadth_first_order(tree, root, directed=False, return_predecessors=True)
    lookup = {(int(a), int(b)): e for e, (a, b) in enumerate(pairs)}
    T = np.tile(np.eye(4), (n, 1, 1))
    for node in order[1:]:
        p = int(pred[node])
        if (p, int(node)) in lookup:  # X_p = S X_node
            T[node] = T[p] @ meas[lookup[(p, int(node))]]
        else:
            T[node] = T[p] @ sim3_inverse(meas[lookup[(int(node), p)]])
    return T


def _edge_residuals(T: np.ndarray, pairs: np.ndarray, meas_inv: np.ndarray, length_b: np.ndarray,
                    sqrt_w: np.ndarray) -> np.ndarray:
    """(E,7): sqrt(w) * log(S_ab^-1 T_a^-1 T_b), translation divided by the length of cluster b."""
    return _residual_pairs(T[pairs[:, 0]], T[pairs[:, 1]], meas_inv, length_b, sqrt_w)


def pose_graph(
    T0: np.ndarray, pairs: np.ndarray, meas: np.ndarray, length: np.ndarray, weight: np.ndarray, root: int,
    max_iterations: int = 50,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Levenberg-Marquardt over node transforms (right perturbations ``T exp(d)``), root fixed (gauge).

    Every edge contributes a 7-vector residual; the Jacobian blocks are central differences of the batched
    residual (each edge depends on two nodes), assembled sparse, and the damped normal equations are solved with
    a sparse direct solver, so the cost per iteration grows with the number of edges.
    """
    n, E = len(T0), len(pairs)
    T = T0.copy()
    meas_inv = sim3_inverse(meas)
    lb = length[pairs[:, 1]]
    sw = np.sqrt(weight)
    free = np.ones(n, bool)
    free[root] = False
    col_of = np.full(n, -1)
    col_of[free] = np.arange(int(free.sum()))
    nv = 7 * int(free.sum())
    r = _edge_residuals(T, pairs, meas_inv, lb, sw)
    cost0 = cost = 0.5 * float((r**2).sum())
    info: dict[str, Any] = {"edges": int(E), "nodes": int(n), "cost_initial": cost0, "iterations": 0}
    if E == 0 or nv == 0:
        info["cost_final"] = cost
        return T, info
    lam, h = 1e-4, 1e-6
    rows_e = np.arange(E)
    for it in range(max_iterations):
        blocks = []  # (E,7,7) per side: d residual / d perturbation of that side's node
        Ta, Tb = T[pairs[:, 0]], T[pairs[:, 1]]
        for side in (0, 1):
            J = np.empty((E, 7, 7))
            for k in range(7):
                d = np.zeros(7)
                d[k] = h
                if side == 0:
                    rp = _residual_pairs(Ta @ sim3_exp(d), Tb, meas_inv, lb, sw)
                    rm = _residual_pairs(Ta @ sim3_exp(-d), Tb, meas_inv, lb, sw)
                else:
                    rp = _residual_pairs(Ta, Tb @ sim3_exp(d), meas_inv, lb, sw)
                    rm = _residual_pairs(Ta, Tb @ sim3_exp(-d), meas_inv, lb, sw)
                J[:, :, k] = (rp - rm) / (2 * h)
            blocks.append(J)
        rr, cc, vv = [], [], []
        for side in (0, 1):
            nodes = pairs[:, side]
            keep = free[nodes]
            e_idx, n_idx = rows_e[keep], col_of[nodes[keep]]
            J = blocks[side][keep]
            ri = (7 * e_idx)[:, None, None] + np.arange(7)[None, :, None]
            ci = (7 * n_idx)[:, None, None] + np.arange(7)[None, None, :]
            rr.append(np.broadcast_to(ri, J.shape).ravel())
            cc.append(np.broadcast_to(ci, J.shape).ravel())
            vv.append(J.ravel())
        Jm = sp.csr_matrix((np.concatenate(vv), (np.concatenate(rr), np.concatenate(cc))), shape=(7 * E, nv))
        g = Jm.T @ r.ravel()
        Hm = (Jm.T @ Jm).tocsc()
        diag = Hm.diagonal()
        improved = False
        for _ in range(10):
            A = Hm + sp.diags(lam * np.maximum(diag, 1e-9), format="csc")
            step = spla.spsolve(A, -g)
            if not np.isfinite(step).all():
                lam *= 10
                continue
            Tn = T.copy()
            Tn[free] = T[free] @ sim3_exp(step.reshape(-1, 7))
            rn = _edge_residuals(Tn, pairs, meas_inv, lb, sw)
            cn = 0.5 * float((rn**2).sum())
            if cn < cost:
                improved = True
                rel = (cost - cn) / max(cost, 1e-300)
                T, r, cost = Tn, rn, cn
                lam = max(lam / 3.0, 1e-9)
                break
            lam *= 4.0
        info["iterations"] = it + 1
        if not improved or rel < 1e-10 or float(np.abs(step).max()) < 1e-12:
            break
    info["cost_final"] = cost
    return T, info


def _residual_pairs(Ta: np.ndarray, Tb: np.ndarray, meas_inv: np.ndarray, lb: np.ndarray, sw: np.ndarray) -> np.ndarray:
    D = meas_inv @ sim3_inverse(Ta) @ Tb
    xi = sim3_log(D)
    xi[:, :3] /= lb[:, None]
    return xi * sw[:, None]


def global_extrinsics(T: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """Camera extrinsics (n,3,4) of one cluster -> extrinsics in the world of cluster->world ``T`` (4,4).

    X_c = T^-1 X_w; camera coords scaled by s so the camera stays rigid: R_w = R R_T^T, t_w = s t - R_w t_T.
    """
    s, RT, tT = sim3_parts(T)
    R = ext[:, :, :3] @ RT.T
    t = s * ext[:, :, 3] - (R @ tT[:, None])[..., 0]
    return np.concatenate([R, t[..., None]], -1)


# ------------------------------------------------------------------------------------------------------------
# fusion
# ------------------------------------------------------------------------------------------------------------
def _sample(depth: np.ndarray, A: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Depth at the nearest depth-map pixel of original pixels ``xy`` (NaN outside the map)."""
    u, v = _to_depth(A, xy)
    h, w = depth.shape
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out = np.full(len(xy), np.nan, np.float64)
    out[ok] = depth[v[ok], u[ok]]
    return out


def _load_colors(root: Path | None, path: str) -> np.ndarray | None:
    if root is None:
        return None
    from .ingest import load_image

    try:
        return np.asarray(load_image(root / path))
    except (OSError, ValueError) as exc:
        log.warning("no colours for %s: %s", path, exc)
        return None


def voxel_reduce(
    xyz: np.ndarray, conf: np.ndarray, rgb: np.ndarray, comp: np.ndarray, img: np.ndarray, xy: np.ndarray,
    voxel: dict[int, float],
) -> dict[str, np.ndarray]:
    """One point per (component, voxel): confidence-weighted position/colour, one track entry per image.

    The track of a voxel point lists, per image, the pixel with the highest confidence that fell in the voxel.
    """
    if len(xyz) == 0:
        return {"xyz": np.zeros((0, 3), np.float32), "rgb": np.zeros((0, 3), np.uint8),
                "conf": np.zeros(0, np.float32), "component": np.zeros(0, np.int64),
                "track_offsets": np.zeros(1, np.int64), "track_image_ids": np.zeros(0, np.int64),
                "track_xy": np.zeros((0, 2), np.float32)}
    size = np.array([voxel[int(c)] for c in comp]) if len(voxel) > 1 else np.full(len(comp), next(iter(voxel.values())))
    q = np.floor(xyz / size[:, None]).astype(np.int64)
    keys = np.column_stack([comp, q])
    _, vid = np.unique(keys, axis=0, return_inverse=True)
    vid = vid.ravel()
    nv = int(vid.max()) + 1
    wsum = np.bincount(vid, conf, nv)
    out_xyz = np.stack([np.bincount(vid, conf * xyz[:, k], nv) for k in range(3)], -1) / wsum[:, None]
    out_rgb = np.stack([np.bincount(vid, conf * rgb[:, k], nv) for k in range(3)], -1) / wsum[:, None]
    out_comp = np.zeros(nv, np.int64)
    out_comp[vid] = comp
    o = np.lexsort((-conf, img, vid))
    first = np.ones(len(o), bool)
    first[1:] = (vid[o][1:] != vid[o][:-1]) | (img[o][1:] != img[o][:-1])
    sel = o[first]  # sorted by voxel, then image
    counts = np.bincount(vid[sel], minlength=nv)
    return {
        "xyz": out_xyz.astype(np.float32), "rgb": np.clip(np.rint(out_rgb), 0, 255).astype(np.uint8),
        "conf": wsum.astype(np.float32), "component": out_comp,
        "track_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "track_image_ids": img[sel].astype(np.int64), "track_xy": xy[sel].astype(np.float32),
    }


def fuse_points(
    cache: DepthCache, clusters: dict[int, ClusterData], order: list[int], T: np.ndarray, comp: np.ndarray,
    posed: dict[int, tuple[int, int]], images: Any, P_ext: np.ndarray, P_comp: np.ndarray, cfg: MergeConfig,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Points from every posed frame's source cluster, filtered, coloured, voxel-downsampled per component."""
    from .geometry import camera_centers

    meta = images.schema.metadata or {}
    root = Path(meta[b"photos_root"].decode()) if b"photos_root" in meta else None
    if cfg.colors and root is None:
        log.warning("images table has no photos_root: points are not coloured")
    paths = dict(zip(images.column("image_id").to_numpy().tolist(), images.column("path").to_pylist()))
    image_hw = {int(i): (int(h), int(w)) for i, h, w in zip(images.column("image_id").to_numpy(),
                                                             images.column("height").to_numpy(),
                                                             images.column("width").to_numpy())}
    appears: dict[int, list[tuple[int, int]]] = {}
    for node, c in enumerate(order):
        for r, img in enumerate(clusters[c].image_ids):
            appears.setdefault(int(img), []).append((node, r))
    scale = sim3_parts(T)[0]
    stats = {"frames": 0, "pixels_valid": 0, "pixels_inconsistent": 0, "images_without_colors": 0}
    acc: dict[str, list[np.ndarray]] = {k: [] for k in ("xyz", "conf", "rgb", "comp", "img", "xy")}

    def depth_of(node: int) -> np.ndarray:
        return cache.get(order[node])[0]

    for node, c in track(list(enumerate(order)), total=len(order), description="merge: fuse points"):
        cd = clusters[c]
        rows = [r for r, img in enumerate(cd.image_ids) if posed.get(int(img)) == (node, r)]
        if not rows:
            continue
        depth, conf = cache.get(c)
        s = cfg.fuse_stride
        h, w = cd.depth_hw
        v, u = np.meshgrid(np.arange(s // 2, h, s), np.arange(s // 2, w, s), indexing="ij")
        u, v = u.ravel(), v.ravel()
        for r in rows:
            img = int(cd.image_ids[r])
            H, W = image_hw[img]
            xy = _to_image(cd.depth_to_image[r], u, v)
            ok = (xy[:, 0] >= 0) & (xy[:, 0] < W) & (xy[:, 1] >= 0) & (xy[:, 1] < H)
            ok &= _valid_mask(depth[r], conf[r], cfg.fuse_confidence_quantile)[v, u]
            d = depth[r][v, u].astype(np.float64)
            stats["frames"] += 1
            if cfg.depth_consistency:
                others = [(n2, r2) for n2, r2 in appears[img] if n2 != node and comp[n2] == comp[node]]
                if others:
                    mine = d * scale[node]
                    cols = [mine] + [_sample(depth_of(n2)[r2], clusters[order[n2]].depth_to_image[r2], xy) * scale[n2]
                                     for n2, r2 in others]
                    stack = np.stack(cols, 0)
                    stack[~(np.isfinite(stack) & (stack > 0))] = np.nan
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN median
                        med = np.nanmedian(stack, 0)
                    bad = np.abs(mine - med) > cfg.depth_consistency_tolerance * med
                    bad &= ok
                    stats["pixels_inconsistent"] += int(bad.sum())
                    ok &= ~bad
            if not ok.any():
                continue
            stats["pixels_valid"] += int(ok.sum())
            X = unproject_pixels(xy[ok], d[ok], cd.extrinsics[r], cd.intrinsics[r])
            X = X @ T[node][:3, :3].T + T[node][:3, 3]
            colors = _load_colors(root, paths[img]) if cfg.colors else None
            if colors is not None:
                px = np.clip(np.rint(xy[ok]).astype(np.int64), 0, [colors.shape[1] - 1, colors.shape[0] - 1])
                rgb = colors[px[:, 1], px[:, 0]].astype(np.float64)
            else:
                stats["images_without_colors"] += int(cfg.colors)
                rgb = np.full((int(ok.sum()), 3), 128.0)
            acc["xyz"].append(X)
            acc["conf"].append(conf[r][v[ok], u[ok]].astype(np.float64))
            acc["rgb"].append(rgb)
            acc["comp"].append(np.full(int(ok.sum()), int(comp[node])))
            acc["img"].append(np.full(int(ok.sum()), img))
            acc["xy"].append(xy[ok])
    cat = {k: (np.concatenate(v) if v else np.zeros((0, 3) if k in ("xyz", "rgb") else (0,))) for k, v in acc.items()}
    if len(cat["xy"]) == 0:
        cat["xy"] = np.zeros((0, 2))
    voxel: dict[int, float] = {}
    for k in np.unique(P_comp):
        centers = camera_centers(P_ext[P_comp == k])
        extent = float(np.linalg.norm(centers.max(0) - centers.min(0)))
        if extent <= 0:  # one camera: use the spread of its points instead
            pts = cat["xyz"][cat["comp"] == k]
            extent = float(np.linalg.norm(np.ptp(pts, 0))) if len(pts) else 1.0
        voxel[int(k)] = cfg.voxel_size if cfg.voxel_size > 0 else max(extent / 1000.0, 1e-9)
    pts = voxel_reduce(cat["xyz"], np.maximum(cat["conf"], 1e-6), cat["rgb"], cat["comp"].astype(np.int64),
                       cat["img"].astype(np.int64), cat["xy"], voxel)
    stats["points_before_voxel"] = int(len(cat["xyz"]))
    stats["points"] = int(len(pts["xyz"]))
    stats["voxel_size"] = {str(k): v for k, v in voxel.items()}
    return pts, stats


# ------------------------------------------------------------------------------------------------------------
# stage entry
# ------------------------------------------------------------------------------------------------------------
def merge(run_dir: str | Path, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Align all complete cluster reconstructions and fuse them; write ``store.zarr/merge``; return a manifest."""
    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg = config.merge
    if store.is_stage_complete(STAGE) and store.is_unit_complete("merge"):
        log.info("merge already complete in %s", store.root)
        return store.stage_manifest(STAGE)
    store.require_stage("partition", needed_by="merge")
    if store.is_stage_complete("reconstruct"):  # verify every cluster before reading it (issue 15)
        from .reconstruct import cluster_status

        redo = cluster_status(store.root, config)[1]
        if redo:
            raise RunStoreError(f"cluster(s) {redo} of {store.root} failed verification (recorded in "
                                "orchestration/events.jsonl) and must be recomputed before merging: run "
                                f"`sparse-vggt reconstruct {store.root}` (or `sparse-vggt run`).")
    if not store.is_stage_complete("reconstruct"):
        log.warning("the reconstruct stage has not finished; merging the clusters that are complete "
                    "(missing ones are excluded and reported)")
    store.stage_started(STAGE)
    rng = np.random.default_rng(cfg.seed)
    cache = DepthCache(store)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 4)
        clock = now

    images = store.read_table("images", columns=["image_id", "path", "width", "height", "status"])
    img_ids = images.column("image_id").to_numpy()
    # only kept images: skipped rows (empty, corrupt, too large...) have no size, and no stage may use them
    images = images.filter(pc.equal(images.column("status"), "ok"))
    image_hw = {int(i): (int(h), int(w)) for i, h, w in zip(images.column("image_id").to_numpy(),
                                                             images.column("height").to_numpy(),
                                                             images.column("width").to_numpy())}
    ctab = store.read_table("clusters", columns=["cluster_id", "image_id", "role"])
    t_cid = ctab.column("cluster_id").to_numpy()
    t_img = ctab.column("image_id").to_numpy()
    t_core = np.asarray(pc.equal(ctab.column("role"), "core").to_numpy(zero_copy_only=False), bool)

    # ---- load + validate clusters
    clusters: dict[int, ClusterData] = {}
    excluded: dict[int, str] = {}
    cids = np.unique(t_cid)
    for cid in track(cids, total=len(cids), description="merge: load clusters"):
        rows = t_cid == cid
        not_kept = sorted({int(i) for i in t_img[rows].tolist()} - image_hw.keys())
        if not_kept:
            excluded[int(cid)] = (f"image ids {not_kept[:5]} were skipped by scan (status != ok); re-run "
                                  "`sparse-vggt partition --force`")
            log.warning("cluster %d excluded from merge: %s", cid, excluded[int(cid)])
            continue
        try:
            clusters[int(cid)] = _load_cluster(store, cache, int(cid), set(t_img[rows & t_core].tolist()),
                                               set(t_img[rows].tolist()), cfg)
        except (ValueError, RunStoreError) as exc:
            excluded[int(cid)] = str(exc)
            log.warning("cluster %d excluded from merge: %s", cid, exc)
    if not clusters:
        raise MergeError(f"no usable cluster reconstruction in {store.root}: "
                         + "; ".join(f"{k}: {v}" for k, v in excluded.items())
                         + ". Run `sparse-vggt reconstruct` first.")
    lap("load")
    order = sorted(clusters)
    node_of = {c: i for i, c in enumerate(order)}
    C = len(order)

    # ---- cluster pairs sharing frames
    rows_c, rows_i = [], []
    for c in order:
        rows_c.append(np.full(len(clusters[c].image_ids), node_of[c]))
        rows_i.append(clusters[c].image_ids)
    occ = sp.csr_matrix((np.ones(sum(len(x) for x in rows_c)), (np.concatenate(rows_c), np.concatenate(rows_i))),
                        shape=(C, int(img_ids.max()) + 1 if len(img_ids) else 1))
    shared_counts = sp.triu(occ @ occ.T, k=1).tocoo()
    pair_nodes = np.stack([shared_counts.row, shared_counts.col], -1).astype(np.int64)
    pair_nodes = pair_nodes[np.lexsort((pair_nodes[:, 1], pair_nodes[:, 0]))] if len(pair_nodes) else \
        np.zeros((0, 2), np.int64)
    E = len(pair_nodes)
    meas = np.tile(np.eye(4), (E, 1, 1))
    edge_info: list[dict[str, Any]] = []
    for e in track(range(E), total=E, description="merge: pairwise Sim(3)"):
        a, b = clusters[order[pair_nodes[e, 0]]], clusters[order[pair_nodes[e, 1]]]
        shared = np.intersect1d(a.image_ids, b.image_ids)
        meas[e], info = estimate_edge(cache, a, b, shared, image_hw, cfg, rng)
        edge_info.append(info)
        if not info["accepted"]:
            log.warning("edge %d-%d rejected: %s", a.cid, b.cid, info["reason"])
    accepted = np.array([i["accepted"] for i in edge_info], bool) if E else np.zeros(0, bool)
    lap("pairwise")

    # ---- components of accepted edges; spanning tree + pose graph per component
    acc_pairs = pair_nodes[accepted]
    adj = sp.coo_matrix((np.ones(len(acc_pairs)), (acc_pairs[:, 0], acc_pairs[:, 1])), shape=(C, C))
    ncomp, label = connected_components(adj + adj.T, directed=False)
    n_core = np.array([int(clusters[c].core.sum()) for c in order])
    comp_size = np.bincount(label, weights=n_core, minlength=ncomp)
    rank = np.empty(ncomp, np.int64)
    rank[np.lexsort((np.arange(ncomp), -comp_size))] = np.arange(ncomp)
    comp = rank[label]
    T_init = np.tile(np.eye(4), (C, 1, 1))
    T = np.tile(np.eye(4), (C, 1, 1))
    lengths = np.array([clusters[c].length for c in order])
    pg_info: list[dict[str, Any]] = []
    edge_w = np.array([i.get("inliers", 0) for i in edge_info], float)
    for k in range(ncomp):
        nodes = np.flatnonzero(comp == k)
        local = {int(nd): j for j, nd in enumerate(nodes)}
        m = accepted & np.isin(pair_nodes[:, 0], nodes)
        lp = np.array([[local[int(x)] for x in p] for p in pair_nodes[m]], np.int64).reshape(-1, 2)
        root = int(np.argmax(n_core[nodes] * 1.0 - 1e-9 * np.arange(len(nodes))))
        Ti = spanning_tree_init(len(nodes), lp, meas[m], edge_w[m], root) if len(lp) else np.tile(np.eye(4), (1, 1, 1))
        T_init[nodes] = Ti
        if cfg.optimize and len(lp) >= len(nodes):  # a loop exists: the pose graph can change something
            ew = np.ones(len(lp))
            To, info = pose_graph(Ti, lp, meas[m], lengths[nodes], ew, root, cfg.max_iterations)
        else:
            To, info = Ti, {"edges": int(len(lp)), "nodes": int(len(nodes)), "iterations": 0,
                            "note": "tree only" if len(lp) < len(nodes) else "optimisation disabled"}
        T[nodes] = To
        info["component"] = int(k)
        pg_info.append(info)

    lap("pose_graph")
    # ---- per-edge residual after the global solve (how well the loop closed)
    for e in np.flatnonzero(accepted):
        a, b = pair_nodes[e]
        D = sim3_inverse(meas[e]) @ sim3_inverse(T[a]) @ T[b]
        xi = sim3_log(D)
        edge_info[e]["global_rot_deg"] = float(np.degrees(np.linalg.norm(xi[3:6])))
        edge_info[e]["global_trans_rel"] = float(np.linalg.norm(xi[:3]) / lengths[b])
        edge_info[e]["global_log_scale"] = float(xi[6])

    # ---- global poses: each image from its core cluster (an included overlap cluster if that one is excluded)
    posed: dict[int, tuple[int, int]] = {}  # image -> (node, row)
    for c in order:
        cd = clusters[c]
        for r, img in enumerate(cd.image_ids):
            if cd.core[r]:
                posed[int(img)] = (node_of[c], r)
    fallback = 0
    for c in order:
        cd = clusters[c]
        for r, img in enumerate(cd.image_ids):
            if int(img) not in posed:
                posed[int(img)] = (node_of[c], r)
                fallback += 1
    pose_ids = np.array(sorted(posed), np.int64)
    P_ext = np.zeros((len(pose_ids), 3, 4))
    P_K = np.zeros((len(pose_ids), 3, 3))
    P_comp = np.zeros(len(pose_ids), np.int64)
    P_cl = np.zeros(len(pose_ids), np.int64)
    for j, img in enumerate(pose_ids):
        node, r = posed[int(img)]
        cd = clusters[order[node]]
        P_ext[j] = global_extrinsics(T[node], cd.extrinsics[r:r + 1])[0]
        P_K[j] = cd.intrinsics[r]
        P_comp[j] = comp[node]
        P_cl[j] = cd.cid

    lap("poses")
    fusion: dict[str, Any] = {}
    points = None
    if cfg.fuse:
        points, fusion = fuse_points(cache, clusters, order, T, comp, posed, images, P_ext, P_comp, cfg)

    lap("fuse")
    # ---- write
    store.remove_group("merge")
    g = store.group("merge")
    store.write_array(g, "cluster_ids", np.array(order, np.int64))
    store.write_array(g, "cluster_sim3", T)
    store.write_array(g, "cluster_sim3_init", T_init)
    store.write_array(g, "cluster_component", comp.astype(np.int64))
    ge = store.group("merge/edges")
    store.write_array(ge, "pairs", np.array([[order[a], order[b]] for a, b in pair_nodes], np.int64).reshape(-1, 2))
    store.write_array(ge, "sim3", meas)
    store.write_array(ge, "accepted", accepted)
    gi = store.group("merge/images")
    store.write_array(gi, "image_ids", pose_ids)
    store.write_array(gi, "extrinsics", P_ext)
    store.write_array(gi, "intrinsics", P_K)
    store.write_array(gi, "component", P_comp)
    store.write_array(gi, "cluster", P_cl)
    if points is not None:
        gp = store.group("merge/points")
        for name, arr in points.items():
            store.write_array(gp, name, arr)
    components = []
    for k in range(ncomp):
        nodes = np.flatnonzero(comp == k)
        components.append({"component": int(k), "clusters": [int(order[x]) for x in nodes],
                           "images": int((P_comp == k).sum())})
    n_points = int(len(points["xyz"])) if points is not None else 0
    manifest = {
        "clusters": int(len(cids)),
        "clusters_merged": int(C),
        "clusters_excluded": {str(k): v for k, v in excluded.items()},
        "edges": int(E),
        "edges_accepted": int(accepted.sum()),
        "edges_rejected": {f"{i['clusters'][0]}-{i['clusters'][1]}": i["reason"] for i in edge_info
                           if not i["accepted"]},
        "components": int(ncomp),
        "images_posed": int(len(pose_ids)),
        "images_posed_from_overlap": int(fallback),
        "points": n_points,
        "pose_graph": pg_info,
    }
    g.attrs.update(_json({"residuals": edge_info, "excluded_clusters": {str(k): v for k, v in excluded.items()},
                          "components": components, "pose_graph": pg_info, "fusion": fusion}))
    store.mark_unit_complete("merge", images=int(len(pose_ids)), points=n_points)
    manifest["fusion"] = fusion
    lap("write")
    manifest["seconds"] = seconds
    store.stage_finished(STAGE, _json(manifest))
    return _json(manifest)


def _json(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars/arrays to Python, non-finite floats to None) for attrs and manifests."""
    if isinstance(obj, dict):
        return {str(k): _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
run = lambda run_dir, config=None, *, force=False, units=None: merge(run_dir, config)  # noqa: E731  # TEMP r18-sched
