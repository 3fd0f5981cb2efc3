"""What an export format writer receives: the run-wide context and one merge component's slice of it.

The stage reads ``store.zarr/merge`` and ``images.parquet`` once and decides the image names; every writer then
works from these objects, so a new format needs no I/O of its own beyond the files it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ExportConfig, PipelineConfig
from ..store import RunStore

STAGE = "export"


class ExportError(ValueError):
    """The export cannot be written as configured; the message says which option to change."""


@dataclass
class ExportContext:
    """The whole export: store, options, merged arrays and the exported images' names, paths and sizes."""

    store: RunStore
    config: PipelineConfig
    out: Path  # <run>/export
    merged: dict[str, np.ndarray]  # store.zarr/merge: img_* per posed image, pt_* per fused point (if fused)
    names: dict[int, str]  # image_id -> name inside the models (relative to images/)
    paths: dict[int, str]  # image_id -> photo path relative to the photos root (exported images)
    hw: dict[int, tuple[int, int]]  # image_id -> upright (height, width), every kept image
    exif_focal: dict[int, float]  # image_id -> EXIF focal in pixels, where the photo has one
    images_dir: Path | None  # export/images, or None with export.images=none

    @property
    def cfg(self) -> ExportConfig:
        return self.config.export


@dataclass
class ComponentContext:
    """One merge component (its own world frame): its posed images and, through properties, its points."""

    run: ExportContext
    component: int
    image_ids: np.ndarray  # (n,) int64
    extrinsics: np.ndarray  # (n,3,4) world -> camera
    intrinsics: np.ndarray  # (n,3,3)

    @property
    def suffix(self) -> str:
        """File name suffix: component 0 writes points.ply / scene.glb, component k points_k.ply / scene_k.glb."""
        return "" if self.component == 0 else f"_{self.component}"

    @cached_property
    def track_points(self) -> dict[str, np.ndarray] | None:
        """Points with their tracks for the COLMAP model (the most confident ``export.max_track_points``)."""
        m = self.run.merged
        if "pt_xyz" not in m:
            return None
        pm = np.flatnonzero(m["pt_component"] == self.component)
        pm = pm[subsample(len(pm), self.run.cfg.max_track_points, m["pt_conf"][pm])]
        off = m["pt_track_offsets"]
        starts, ends = off[pm], off[pm + 1]
        tsel = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(pm) else np.zeros(0, int)
        return {"xyz": m["pt_xyz"][pm], "rgb": m["pt_rgb"][pm],
                "track_offsets": np.concatenate([[0], np.cumsum(ends - starts)]),
                "track_image_ids": m["pt_track_image_ids"][tsel], "track_xy": m["pt_track_xy"][tsel]}

    @cached_property
    def display_points(self) -> np.ndarray | None:
        """Indices of the points shown in PLY/GLB (uniform subsample to ``export.max_points``); None unfused."""
        m = self.run.merged
        if "pt_xyz" not in m:
            return None
        pm = np.flatnonzero(m["pt_component"] == self.component)
        return pm[subsample(len(pm), self.run.cfg.max_points, seed=0)]

    @cached_property
    def cloud(self) -> Any:
        """The display points as one coloured ``trimesh.PointCloud`` (None when there are none)."""
        import trimesh

        pm = self.display_points
        if pm is None or not len(pm):
            return None
        m = self.run.merged
        rgba = np.concatenate([m["pt_rgb"][pm], np.full((len(pm), 1), 255, np.uint8)], 1)
        return trimesh.PointCloud(m["pt_xyz"][pm].astype(np.float64), colors=rgba)


def subsample(n: int, cap: int, conf: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    if conf is not None:
        return np.sort(np.argsort(-conf, kind="stable")[:cap])
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))
