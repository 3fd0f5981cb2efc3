"""GLB scene per component: the display point cloud and every camera as a frustum (line segments).

One file that any glTF viewer opens, for a quick look at the whole model without COLMAP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..geometry import camera_centers
from .context import ComponentContext


def frusta_segments(
    extrinsics: np.ndarray, intrinsics: np.ndarray, hw: list[tuple[int, int]], size: float,
) -> np.ndarray:
    """(8 N, 2, 3) line segments: apex-to-corner edges and the image rectangle at distance ``size``."""
    segs = []
    for E, K, (h, w) in zip(extrinsics, intrinsics, hw):
        R, t = E[:, :3], E[:, 3]
        C = -R.T @ t
        px = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
        rays = np.stack([(px[:, 0] - K[0, 2]) / K[0, 0], (px[:, 1] - K[1, 2]) / K[1, 1], np.ones(4)], -1)
        corners = C + (rays * size) @ R  # R^T ray
        for k in range(4):
            segs.append([C, corners[k]])
            segs.append([corners[k], corners[(k + 1) % 4]])
    return np.asarray(segs, np.float64).reshape(-1, 2, 3)


def write(ctx: ComponentContext) -> dict[str, Any]:
    """Format writer: ``scene.glb`` (component 0) or ``scene_<k>.glb``; frusta 2% of the camera extent unless
    ``export.frustum_scale`` is set."""
    import trimesh

    run, E, K = ctx.run, ctx.extrinsics, ctx.intrinsics
    centers = camera_centers(E)
    extent = float(np.linalg.norm(centers.max(0) - centers.min(0)))
    geoms = [ctx.cloud] if ctx.cloud is not None else []
    size = run.cfg.frustum_scale or max(0.02 * extent, 1e-3)
    segs = frusta_segments(E, K, [run.hw[int(i)] for i in ctx.image_ids], size)
    geoms.append(trimesh.load_path(segs))
    glb = run.out / f"scene{ctx.suffix}.glb"
    trimesh.Scene(geoms).export(str(glb))
    return {"glb": glb.name}
