"""Pairwise Sim(3) between two clusters from their correspondences, robust to outliers, with an accept test.

RANSAC on minimal 3-point Umeyama samples, then IRLS with a Huber loss around weighted Umeyama. Residuals are
relative to the point's depth, so every threshold is scale free. Depth and camera come from different heads of
the model, so an edge is accepted only when the shared frames' cameras agree with the point alignment too; a
rejected edge keeps the reason for the report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import MergeConfig
from ..geometry import GeometryError, rotation_angle_deg, sim3_parts, umeyama
from .clusters import ClusterData, DepthCache
from .correspondences import pair_correspondences


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
