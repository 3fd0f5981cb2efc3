"""Fused points: every posed frame's depth from its source cluster, filtered, coloured and voxel-downsampled.

A frame's points come from the cluster its pose comes from, so each pixel is used once. Overlap frames are
checked against the other clusters' depth for the same pixel (a depth that disagrees with the median is dropped),
and one point per (component, voxel) keeps a track with the best pixel of every image that fell in the voxel,
which the COLMAP export turns into points3D observations.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MergeConfig
from ..geometry import camera_centers, sim3_parts, unproject_pixels
from ..progress import track
from .clusters import ClusterData, DepthCache
from .correspondences import to_depth, to_image, valid_mask

log = logging.getLogger(__name__)


def _sample(depth: np.ndarray, A: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Depth at the nearest depth-map pixel of original pixels ``xy`` (NaN outside the map)."""
    u, v = to_depth(A, xy)
    h, w = depth.shape
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out = np.full(len(xy), np.nan, np.float64)
    out[ok] = depth[v[ok], u[ok]]
    return out


def _load_colors(root: Path | None, path: str) -> np.ndarray | None:
    if root is None:
        return None
    from ..scan import load_image

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
            xy = to_image(cd.depth_to_image[r], u, v)
            ok = (xy[:, 0] >= 0) & (xy[:, 0] < W) & (xy[:, 1] >= 0) & (xy[:, 1] < H)
            ok &= valid_mask(depth[r], conf[r], cfg.fuse_confidence_quantile)[v, u]
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
