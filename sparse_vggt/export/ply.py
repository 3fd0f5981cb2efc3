"""Coloured point cloud per component as PLY (``points.ply``, ``points_<k>.ply``): the fused points for tools
that read plain point clouds (CloudCompare, MeshLab, Open3D)."""

from __future__ import annotations

from typing import Any

from .context import ComponentContext


def write(ctx: ComponentContext) -> dict[str, Any]:
    """Format writer: the component's display points (``export.max_points``); no file when it has none."""
    if ctx.display_points is None:  # merge did not fuse points
        return {}
    out: dict[str, Any] = {}
    if ctx.cloud is not None:
        ply = ctx.run.out / f"points{ctx.suffix}.ply"
        ctx.cloud.export(str(ply))
        out["ply"] = ply.name
    out["ply_points"] = int(len(ctx.display_points))
    return out
