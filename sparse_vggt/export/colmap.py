"""The COLMAP workspace: ``images/`` (names safe for every format), ``sparse/<k>/`` models and ``pairs.txt``.

A drop-in data directory for COLMAP, hloc, nerfstudio and gsplat: intrinsics, poses and keypoints are in the
upright pixels of exactly the files in ``images/`` (EXIF-rotated and HEIC photos become upright JPEG copies), and
names with whitespace are mapped so the text models, binary models and pairs.txt always agree.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..config import ExportConfig
from ..store import RunStore
from .bundle_adjust import mean_error, run_bundle_adjustment
from .context import ComponentContext, ExportContext, ExportError

log = logging.getLogger(__name__)

CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
SHARED_CAMERA = ("image", "folder", "size")
IMAGE_MODES = ("link", "copy", "none")
FOCAL_PRIORS = ("predicted", "exif")
_NOT_COLMAP_READABLE = (".heic", ".heif")


# ------------------------------------------------------------------------------------------------------------
# names and the images/ folder
# ------------------------------------------------------------------------------------------------------------
def is_safe_name(name: str) -> bool:
    """True when ``name`` survives whitespace-separated formats (COLMAP text, pairs.txt)."""
    return bool(name) and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name)


def needs_upright_copy(path: str, orientation: int) -> bool:
    return orientation not in (0, 1) or path.lower().endswith(_NOT_COLMAP_READABLE)


def export_names(paths: dict[int, str], orientation: dict[int, int], mode: str) -> dict[int, str]:
    """Name of each image inside the models (relative to ``images/``), unique and whitespace-free if possible."""
    out: dict[int, str] = {}
    taken: set[str] = set()
    ids = sorted(paths)
    if mode != "none":  # we write images/: names we do not change are reserved first
        for i in ids:
            name = _base_name(paths[i], orientation.get(i, 1))
            if is_safe_name(name):
                out[i] = name
                taken.add(name)
    for i in ids:
        if i in out:
            continue
        if mode == "none":
            out[i] = paths[i]
            continue
        name = "".join("_" if (c.isspace() or ord(c) < 32 or ord(c) == 127) else c
                       for c in _base_name(paths[i], orientation.get(i, 1)))
        if name in taken:
            p = PurePosixPath(name)
            name = str(p.with_name(f"{p.stem}~{i}{p.suffix}"))
        out[i] = name
        taken.add(name)
    return out


def _base_name(path: str, orientation: int) -> str:
    return path + ".jpg" if path.lower().endswith(_NOT_COLMAP_READABLE) else path


def write_images_dir(images_dir: Path, photos_root: Path | None, paths: dict[int, str], names: dict[int, str],
                     orientation: dict[int, int], mode: str) -> dict[str, int]:
    """Populate ``images/``: symlinks (or copies) of the photos, upright copies where pixels would differ."""
    from ..scan import load_image

    if images_dir.is_symlink():
        images_dir.unlink()
    elif images_dir.exists():
        shutil.rmtree(images_dir)  # never follows the symlinks inside
    counts = {"linked": 0, "copied": 0, "upright_copies": 0}
    for i in sorted(names):
        dst = images_dir / names[i]
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = (photos_root / paths[i]) if photos_root is not None else None
        if needs_upright_copy(paths[i], orientation.get(i, 1)):
            if src is None or not src.is_file():
                raise ExportError(f"{paths[i]} must be written upright into export/images but the photo is not at "
                                  f"{src}; restore the photos folder, or set export.images=none.")
            img = load_image(src)
            kwargs: dict[str, Any] = {}
            if dst.suffix.lower() in (".jpg", ".jpeg"):
                kwargs = {"quality": 95}
                from PIL import Image

                with Image.open(src) as raw:
                    exif = raw.getexif()
                if exif:
                    exif[0x0112] = 1  # keep the EXIF (focal, GPS, time), orientation now "upright"
                    kwargs["exif"] = exif.tobytes()
            img.save(dst, **kwargs)
            counts["upright_copies"] += 1
        elif mode == "copy":
            if src is None or not src.is_file():
                raise ExportError(f"export.images=copy but {paths[i]} is not at {src}; restore the photos folder "
                                  "or use export.images=link.")
            shutil.copy2(src, dst)
            counts["copied"] += 1
        else:
            if src is None:
                raise ExportError("images.parquet records no photos_root, so export/images cannot link the photos; "
                                  "re-run `sparse-vggt scan`, or set export.images=none.")
            os.symlink(src.resolve() if src.exists() else src.absolute(), dst)
            counts["linked"] += 1
    return counts


# ------------------------------------------------------------------------------------------------------------
# cameras
# ------------------------------------------------------------------------------------------------------------
def camera_params(model: str, fx: float, fy: float, cx: float, cy: float) -> list[float]:
    """COLMAP parameter vector of ``model`` for a pinhole (fx, fy, cx, cy); distortion starts at zero."""
    f = 0.5 * (fx + fy)
    return {"PINHOLE": [fx, fy, cx, cy], "SIMPLE_PINHOLE": [f, cx, cy], "SIMPLE_RADIAL": [f, cx, cy, 0.0],
            "RADIAL": [f, cx, cy, 0.0, 0.0], "OPENCV": [fx, fy, cx, cy, 0.0, 0.0, 0.0, 0.0]}[model]


def camera_groups(image_ids: np.ndarray, paths: dict[int, str], hw: dict[int, tuple[int, int]], shared: str
                  ) -> np.ndarray:
    """Group index per image: each image alone, or images sharing (folder, size) / size."""
    if shared == "image":
        return np.arange(len(image_ids))
    keys: dict[tuple, int] = {}
    out = np.empty(len(image_ids), np.int64)
    for n, i in enumerate(image_ids.tolist()):
        key = (hw[i],) if shared == "size" else (str(PurePosixPath(paths[i]).parent), hw[i])
        out[n] = keys.setdefault(key, len(keys))
    return out


def build_cameras(image_ids: np.ndarray, intrinsics: np.ndarray, paths: dict[int, str],
                  hw: dict[int, tuple[int, int]], exif_focal: dict[int, float], cfg: ExportConfig
                  ) -> tuple[list[dict[str, Any]], np.ndarray, int]:
    """Camera dicts (camera_id, model, width, height, params) and the camera index of each image."""
    model = cfg.camera_model.upper()
    pin = np.stack([intrinsics[:, 0, 0], intrinsics[:, 1, 1], intrinsics[:, 0, 2], intrinsics[:, 1, 2]], 1)
    pin = pin.astype(np.float64)
    n_exif = 0
    if cfg.focal_prior == "exif":
        for n, i in enumerate(image_ids.tolist()):
            f = exif_focal.get(i)
            if f is not None and np.isfinite(f) and f > 0:
                pin[n, :2] = f
                n_exif += 1
    groups = camera_groups(image_ids, paths, hw, cfg.shared_camera)
    cams = []
    for g in range(int(groups.max()) + 1 if len(groups) else 0):
        members = np.flatnonzero(groups == g)
        fx, fy, cx, cy = np.median(pin[members], axis=0)
        h, w = hw[int(image_ids[members[0]])]
        cam_id = int(image_ids[members[0]]) + 1 if cfg.shared_camera == "image" else g + 1
        cams.append({"camera_id": cam_id, "model": model, "width": int(w), "height": int(h),
                     "params": camera_params(model, float(fx), float(fy), float(cx), float(cy))})
    return cams, groups, n_exif


# ------------------------------------------------------------------------------------------------------------
# COLMAP model
# ------------------------------------------------------------------------------------------------------------
def write_colmap(
    out_dir: Path, names: dict[int, str], image_ids: np.ndarray, extrinsics: np.ndarray,
    cameras: list[dict[str, Any]], cam_of_image: np.ndarray, points: dict[str, np.ndarray] | None, text: bool,
    bundle_adjust: bool = False, ba_refine_focal: bool = True, ba_max_iterations: int = 100,
    ba_refine_distortion: bool = False,
) -> dict[str, Any]:
    """One COLMAP model. Image ids are image_id + 1; camera ids come from ``cameras``."""
    import pycolmap

    if text:
        bad = [names[int(i)] for i in image_ids if not is_safe_name(names[int(i)])]
        if bad:
            raise ExportError(f"{len(bad)} image name(s) contain whitespace or control characters (e.g. "
                              f"{bad[0]!r}), which COLMAP's text format cannot hold. Use export.images=link or "
                              "copy (names are then mapped safely), or export.colmap_text=false (binary keeps them).")
    rec = pycolmap.Reconstruction()
    obs: dict[int, list[tuple[int, np.ndarray]]] = {int(i): [] for i in image_ids}
    if points is not None and len(points["xyz"]):
        off = points["track_offsets"]
        for p in range(len(points["xyz"])):
            for t in range(off[p], off[p + 1]):
                img = int(points["track_image_ids"][t])
                if img in obs:
                    obs[img].append((p, points["track_xy"][t]))
    for c in cameras:
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model=c["model"], width=c["width"], height=c["height"],
                                                        params=c["params"], camera_id=c["camera_id"]))
    point_obs: dict[int, list[tuple[int, int]]] = {}
    for img, E, g in zip(image_ids, extrinsics, cam_of_image):
        img = int(img)
        kp = np.array([xy for _, xy in obs[img]], np.float64).reshape(-1, 2)
        image = pycolmap.Image(name=names[img], keypoints=kp, camera_id=cameras[int(g)]["camera_id"],
                               image_id=img + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(np.asarray(E, np.float64)))
        for k, (p, _) in enumerate(obs[img]):
            point_obs.setdefault(p, []).append((img + 1, k))
    n_obs = 0
    if points is not None:
        for p in sorted(point_obs):
            track = pycolmap.Track([pycolmap.TrackElement(i, k) for i, k in point_obs[p]])
            rec.add_point3D(points["xyz"][p].astype(np.float64), track, points["rgb"][p].astype(np.uint8))
            n_obs += len(point_obs[p])
    stats: dict[str, Any] = {"images": int(len(image_ids)), "cameras": len(cameras),
                             "points3D": int(rec.num_points3D()), "observations": n_obs}
    if rec.num_points3D():
        rec.update_point_3d_errors()
        stats["reprojection_error_px"] = round(float(rec.compute_mean_reprojection_error()), 4)
    if bundle_adjust:
        rec, stats["bundle_adjustment"] = run_bundle_adjustment(rec, cameras[0]["model"] if cameras else "PINHOLE",
                                                                ba_refine_focal, ba_refine_distortion,
                                                                ba_max_iterations)
        stats["reprojection_error_px"] = mean_error(rec)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(out_dir))
    if text:
        rec.write_text(str(out_dir))
    return stats


def write_pairs(path: Path, store: RunStore, names: dict[int, str]) -> dict[str, Any]:
    """The covisibility graph restricted to exported images, as "name_a name_b" lines (each pair once)."""
    if "graph" not in store.zarr or "indptr" not in store.zarr["graph"]:
        return {"pairs": 0, "skipped": "store.zarr/graph is missing"}
    g = store.zarr["graph"]
    indptr, indices = np.asarray(g["indptr"][...]), np.asarray(g["indices"][...])
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    keep = rows < indices
    a, b = rows[keep], indices[keep]
    exported = np.zeros(len(indptr) - 1, bool)
    ids = np.fromiter(names.keys(), np.int64, len(names))
    exported[ids[ids < exported.size]] = True
    sel = exported[a] & exported[b]
    a, b = a[sel], b[sel]
    safe = np.zeros(exported.size, bool)
    for i, name in names.items():
        if i < safe.size:
            safe[i] = is_safe_name(name)
    ok = safe[a] & safe[b]
    n_unsafe = int((~ok).sum())
    a, b = a[ok], b[ok]
    with open(path, "w", encoding="utf-8") as fh:  # streamed: city-scale graphs have 10^7 pairs
        for s in range(0, a.size, 100_000):
            fh.write("".join(f"{names[int(x)]} {names[int(y)]}\n"
                             for x, y in zip(a[s:s + 100_000], b[s:s + 100_000])))
    out: dict[str, Any] = {"pairs": int(a.size)}
    if n_unsafe:
        out["pairs_left_out_unsafe_names"] = n_unsafe
        log.warning("pairs.txt: %d pair(s) left out because an image name contains whitespace "
                    "(export.images=none keeps original names)", n_unsafe)
    return out


def write_model(ctx: ComponentContext) -> dict[str, Any]:
    """Format writer: the component's model in ``sparse/<k>/`` (cameras, images with keypoints, points3D)."""
    run, cfg = ctx.run, ctx.run.cfg
    E, K, img_ids = ctx.extrinsics, ctx.intrinsics, ctx.image_ids
    cams, cam_of_image, n_exif = build_cameras(img_ids, K, run.paths, run.hw, run.exif_focal, cfg)
    model_dir = run.out / "sparse" / str(ctx.component)
    stats = write_colmap(model_dir, run.names, img_ids, E, cams, cam_of_image, ctx.track_points, cfg.colmap_text,
                         cfg.bundle_adjust, cfg.ba_refine_focal, cfg.ba_max_iterations, cfg.ba_refine_distortion)
    entry: dict[str, Any] = {"colmap": str(model_dir.relative_to(run.store.root)), **stats,
                             "exif_focal_images": n_exif}
    exif_focal = run.exif_focal
    ratio = [float(Ki[0, 0]) / exif_focal[int(i)] for i, Ki in zip(img_ids, K)
             if exif_focal.get(int(i)) and np.isfinite(exif_focal[int(i)]) and exif_focal[int(i)] > 0]
    if ratio:  # a sanity check of the predicted focal against the cameras' own metadata
        entry["predicted_over_exif_focal_median"] = round(float(np.median(ratio)), 4)
        entry["images_with_exif_focal"] = len(ratio)
    return entry


def write_pairs_file(ctx: ExportContext) -> dict[str, Any]:
    """Format writer: ``pairs.txt``."""
    pairs_file = ctx.out / "pairs.txt"
    return {"pairs": {"file": pairs_file.name, **write_pairs(pairs_file, ctx.store, ctx.names)}}
