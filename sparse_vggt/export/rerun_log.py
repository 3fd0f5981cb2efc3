"""Optional Rerun recording of the merged model (``export.rerun=true``, needs ``pip install "sparse-vggt[rerun]"``).

Entity layout (one world frame per merge component, side by side in the viewer's tree)::

    world/component_<k>/points                       fused points with their colours
    world/component_<k>/cameras/<image_id>           Transform3D (camera from world) + Pinhole
    world/component_<k>/cameras/<image_id>/image     the photo, downscaled (JPEG-encoded)
    world/component_<k>/camera_centers               one point per camera, coloured by core cluster,
                                                     labelled "cluster <id>"

Written to a file with ``RecordingStream.save`` (no viewer, no network); open it with ``rerun recording.rrd``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..geometry import camera_centers
from ..store import RunStore
from .context import ExportContext, ExportError

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256  # longer side of the images logged with each camera (keeps the file small)
MAX_POINTS = 500_000
MAX_IMAGES = 2_000  # photos logged with their cameras (evenly spread); every camera is logged regardless


def _core_clusters(store: RunStore, image_ids: np.ndarray) -> np.ndarray:
    core: dict[int, int] = {}
    if store.has_table("clusters"):
        ct = store.read_table("clusters", columns=["cluster_id", "image_id", "role"])
        for c, i, r in zip(ct.column("cluster_id").to_pylist(), ct.column("image_id").to_pylist(),
                           ct.column("role").to_pylist()):
            if r == "core":
                core[int(i)] = int(c)
    return np.array([core.get(int(i), -1) for i in image_ids], np.int64)


def _thumbnail(path: Path, size: tuple[int, int]) -> bytes | None:
    from ..scan import load_image

    try:
        img = load_image(path)
    except (OSError, ValueError) as exc:
        log.warning("rerun: cannot read %s for its camera image: %s", path, exc)
        return None
    img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_recording(path: Path, store: RunStore, merged: dict[str, np.ndarray], names: dict[int, str],
                    images_dir: Path | None, hw: dict[int, tuple[int, int]]) -> dict[str, Any]:
    """Write ``path`` (.rrd); returns counts. Raises ExportError with the install command if rerun is missing."""
    try:
        import rerun as rr
    except ImportError as exc:
        raise ExportError('export.rerun=true needs the Rerun SDK: pip install "sparse-vggt[rerun]" '
                          "-c constraints.txt (or set export.rerun=false)") from exc
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    rec = rr.RecordingStream("sparse-vggt", recording_id=f"sparse-vggt:{store.root.name}")
    rec.save(str(path))
    rec.log("world", rr.ViewCoordinates.RIGHT_HAND_Y_DOWN, static=True)  # OpenCV camera convention
    ids = merged["img_image_ids"].astype(np.int64)
    clusters = _core_clusters(store, ids)
    n_images = n_points = n_photos = 0
    stride = max(1, -(-len(ids) // MAX_IMAGES))  # ceil: at most MAX_IMAGES photos in the file
    for k in np.unique(merged["img_component"]).tolist():
        base = f"world/component_{int(k)}"
        sel = np.flatnonzero(merged["img_component"] == k)
        E = merged["img_extrinsics"][sel].astype(np.float64)
        K = merged["img_intrinsics"][sel].astype(np.float64)
        for n, i in enumerate(ids[sel].tolist()):
            ent = f"{base}/cameras/{i}"
            h, w = hw[i]
            # the camera is logged at thumbnail resolution (same field of view) so its image fits its pinhole
            s = min(1.0, THUMBNAIL_SIDE / max(h, w))
            tw, th = max(1, round(w * s)), max(1, round(h * s))
            Ks = np.diag([tw / w, th / h, 1.0]) @ K[n]
            rec.log(ent, rr.Transform3D(translation=E[n, :, 3], mat3x3=E[n, :, :3],
                                        relation=rr.TransformRelation.ChildFromParent), static=True)
            rec.log(ent, rr.Pinhole(image_from_camera=Ks, resolution=[tw, th]), static=True)
            if images_dir is not None and n_images % stride == 0:
                data = _thumbnail(images_dir / names[i], (tw, th))
                if data is not None:
                    rec.log(f"{ent}/image", rr.EncodedImage(contents=data, media_type="image/jpeg"), static=True)
                    n_photos += 1
            n_images += 1
        cl = clusters[sel]
        cols = np.array([cmap(int(c) % 20) if c >= 0 else (0.6, 0.6, 0.6, 1.0) for c in cl])
        rec.log(f"{base}/camera_centers", rr.Points3D(camera_centers(E), colors=cols,
                                                      labels=[f"cluster {int(c)}" for c in cl]), static=True)
        if "pt_xyz" in merged:
            pm = np.flatnonzero(merged["pt_component"] == k)
            if len(pm) > MAX_POINTS:
                pm = np.sort(np.random.default_rng(0).choice(pm, MAX_POINTS, replace=False))
            rec.log(f"{base}/points", rr.Points3D(merged["pt_xyz"][pm], colors=merged["pt_rgb"][pm]), static=True)
            n_points += len(pm)
    rec.flush()
    rec.disconnect()
    return {"file": path.name, "cameras": n_images, "images": n_photos, "points": int(n_points)}


def write(ctx: ExportContext) -> dict[str, Any]:
    """Format writer: ``recording.rrd``."""
    return {"rerun": write_recording(ctx.out / "recording.rrd", ctx.store, ctx.merged, ctx.names, ctx.images_dir,
                                     ctx.hw)}
