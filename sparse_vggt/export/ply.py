"""Coloured point cloud per component as PLY (``points.ply``, ``points_<k>.ply``): the fused points for tools
that read plain point clouds (CloudCompare, MeshLab, Open3D)."""

from __future__ import annotations

from typing import Any

from .context import ComponentContext


def write(ctx: ComponentContext) -> dict[str, Any]:
    """Format writer: the component's display points (``export.max_points``); nothing when it has none."""
    if ctx.cloud is None:
        return {}
    ply = ctx.run.out / f"points{ctx.suffix}.ply"
    ctx.cloud.export(str(ply))
    return {"ply": ply.name}
