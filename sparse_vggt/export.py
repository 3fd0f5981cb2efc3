"""Export the merged model (`sparse-vggt export`): a COLMAP workspace, coloured PLY, GLB, plots and report.md.

Files under ``<run>/export/`` (a drop-in COLMAP / nerfstudio / gsplat data directory)::

    images/                the images root of every model below: one entry per exported image under its
                           (possibly mapped, see below) name. ``export.images=link`` (default): a symlink to the
                           photo; ``copy``: a copy. Photos whose pixels a tool would read differently from the
                           pipeline are always written as *upright copies*: EXIF orientation 2-8 (a portrait
                           phone shot is stored sideways; COLMAP reads the raw pixels, the pipeline the upright
                           ones) and HEIC/HEIF (which COLMAP cannot decode; saved as ``<name>.jpg``). So intrinsics,
                           poses and keypoints are all in the upright pixels of exactly the files in ``images/``.
                           ``export.images=none``: no images/ folder; names are relative to the photos root
                           recorded in images.parquet (and EXIF-rotated photos are NOT drop-in then).
    sparse/<k>/            cameras.bin, images.bin, points3D.bin (+ rigs/frames as pycolmap writes them; .txt
                           too with ``export.colmap_text``). One model per merge component k (0 = largest),
                           each with its own world frame.
    pairs.txt              the covisibility graph between exported images, one "name_a name_b" per line (hloc /
                           ``colmap matches_importer --match_type pairs``)
    image_names.json       only when names had to be mapped: {exported name: original path}
    points.ply, scene.glb  component 0; other components as points_<k>.ply, scene_<k>.glb
    plots/*.png            top-down cameras by cluster, cluster graph, merge residuals, image status
    recording.rrd          with ``export.rerun`` (needs the ``rerun`` extra): cameras, images, points, clusters
    report.md              run summary, checks, plots, every stage's manifest, merge edges, export counts

Names: COLMAP's text files, pairs.txt and most tools split on whitespace, so an image whose path contains
whitespace or control characters gets a mapped name (each such character -> ``_``, plus ``~<image_id>`` if that
collides) in every model, text and binary alike, so the two formats and pairs.txt always agree; the file in
``images/`` has that name. With ``export.images=none`` nothing can be renamed: the binary model keeps the original
names, and text export refuses with an error that says what to do.

Cameras: ``export.camera_model`` (PINHOLE default; SIMPLE_PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV with zero
distortion), ``export.shared_camera`` (``image``: one camera per image, as VGGT predicts a focal per frame;
``folder``: one per folder and image size; ``size``: one per image size; shared parameters are the members'
median), ``export.focal_prior=exif`` starts from the photo's EXIF focal where it has one. ``export.bundle_adjust``
refines poses, points (and focal, ``export.ba_refine_focal``) with pycolmap; the manifest records the mean
reprojection error before and after. Points3D keep the tracks fused by merge: each observation is the pixel the
point came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.compute as pc

from .config import ExportConfig, PipelineConfig
from .geometry import camera_centers
from .store import STAGES, RunStore
from .provenance import weights_markdown

log = logging.getLogger(__name__)

STAGE = "export"

CAMERA_MODELS = ("PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
SHARED_CAMERA = ("image", "folder", "size")
IMAGE_MODES = ("link", "copy", "none")
FOCAL_PRIORS = ("predicted", "exif")
_NOT_COLMAP_READABLE = (".heic", ".heif")
_BA_MIN_OBSERVATIONS = 15  # multi-view observations an image needs for its pose to be adjusted
_BA_MAX_ERROR_PX = 4.0  # points reprojecting worse than this after the adjustment are dropped (COLMAP's default)


class ExportError(ValueError):
    """The export cannot be written as configured; the message says which option to change."""


def _read_merge(store: RunStore) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    gi = store.group("merge/images", create=False)
    for k in ("image_ids", "extrinsics", "intrinsics", "component"):
        out[f"img_{k}"] = np.asarray(gi[k][...])
    if "points" in store.group("merge", create=False):
        gp = store.group("merge/points", create=False)
        for k in ("xyz", "rgb", "conf", "component", "track_offsets", "track_image_ids", "track_xy"):
            out[f"pt_{k}"] = np.asarray(gp[k][...])
    return out


def _check_config(cfg: ExportConfig) -> None:
    for name, value, allowed in (("camera_model", cfg.camera_model.upper(), CAMERA_MODELS),
                                 ("shared_camera", cfg.shared_camera, SHARED_CAMERA),
                                 ("images", cfg.images, IMAGE_MODES), ("focal_prior", cfg.focal_prior, FOCAL_PRIORS)):
        if value not in allowed:
            raise ExportError(f"export.{name}={value!r} is not supported; use one of: {', '.join(allowed)}")
    if cfg.rerun:  # checked before anything is written
        try:
            import rerun  # noqa: F401
        except ImportError as exc:
            raise ExportError('export.rerun=true needs the Rerun SDK: pip install "sparse-vggt[rerun]" '
                              "-c constraints.txt (or set export.rerun=false)") from exc


# ------------------------------------------------------------------------------------------------------------
# names and the images/ folder
# ------------------------------------------------------------------------------------------------------------
def is_safe_name(name: str) -> bool:
    """True when ``name`` survives whitespace-separated formats (COLMAP text, pairs.txt)."""
    return bool(name) and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in name)


def _needs_upright_copy(path: str, orientation: int) -> bool:
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
    from .ingest import load_image

    if images_dir.is_symlink():
        images_dir.unlink()
    elif images_dir.exists():
        shutil.rmtree(images_dir)  # never follows the symlinks inside
    counts = {"linked": 0, "copied": 0, "upright_copies": 0}
    for i in sorted(names):
        dst = images_dir / names[i]
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = (photos_root / paths[i]) if photos_root is not None else None
        if _needs_upright_copy(paths[i], orientation.get(i, 1)):
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
        rec, stats["bundle_adjustment"] = _bundle_adjust(rec, cameras[0]["model"] if cameras else "PINHOLE",
                                                         ba_refine_focal, ba_refine_distortion, ba_max_iterations)
        stats["reprojection_error_px"] = _mean_error(rec)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(out_dir))
    if text:
        rec.write_text(str(out_dir))
    return stats


def _bundle_adjust(rec: Any, model: str, refine_focal: bool, refine_distortion: bool, max_iterations: int
                   ) -> tuple[Any, dict[str, Any]]:
    """pycolmap bundle adjustment of poses and points (focal optional); returns (reconstruction, report).

    A Cauchy loss keeps fused outliers weak. Points seen by one camera constrain nothing (and Ceres rejects them):
    they are taken out and put back at their depth along their pixel's ray through the adjusted camera, as merge
    made them. Afterwards, as COLMAP does, points behind a camera or over 4 px off are dropped (their count is
    reported). If the adjustment does not lower the mean error of the remaining multi-view points (a diverged or
    degenerate problem), the unadjusted model is kept and the report says so.
    """
    import pycolmap

    if rec.num_points3D() == 0:
        return rec, {"skipped": "no points3D with tracks (merge.fuse=false?): nothing to adjust"}
    before = _mean_error(rec)
    work = pycolmap.Reconstruction(rec)
    opts = pycolmap.BundleAdjustmentOptions()
    opts.refine_focal_length = bool(refine_focal)
    opts.refine_principal_point = False
    opts.refine_extra_params = bool(refine_distortion) and model in ("SIMPLE_RADIAL", "RADIAL", "OPENCV")
    opts.print_summary = False
    opts.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    opts.ceres.loss_function_scale = 2.0
    opts.ceres.solver_options.max_num_iterations = int(max_iterations)
    single = []
    for pid, p in work.points3D.items():
        if p.track.length() == 1:
            el = p.track.elements[0]
            xc = work.images[el.image_id].cam_from_world().matrix() @ np.append(p.xyz, 1.0)
            single.append((pid, el.image_id, el.point2D_idx, xc, np.asarray(p.color, np.uint8)))
    for pid, *_ in single:
        work.delete_point3D(pid)
    info: dict[str, Any] = {"reprojection_error_before_px": before, "refine_focal": bool(refine_focal),
                            "refine_distortion": bool(opts.refine_extra_params), "max_iterations": int(max_iterations),
                            "multi_view_points": work.num_points3D(), "single_view_points": len(single)}
    if work.num_points3D() == 0:
        info["skipped"] = "every point is seen by one camera only: nothing constrains the poses"
        info["reprojection_error_after_px"] = before
        return rec, info
    work.update_point_3d_errors()
    err_before = {pid: float(p.error) for pid, p in work.points3D.items()}
    # an image with few multi-view observations cannot pin its 6 pose parameters (the problem is rank deficient
    # and LM can run off): such images keep their merged pose; two well-observed cameras fix the gauge
    n_obs: dict[int, int] = {}
    for p in work.points3D.values():
        for el in p.track.elements:
            n_obs[el.image_id] = n_obs.get(el.image_id, 0) + 1
    config = pycolmap.BundleAdjustmentConfig()
    adjusted = [i for i, c in n_obs.items() if c >= _BA_MIN_OBSERVATIONS]
    for i in adjusted:
        config.add_image(i)
    info["images_adjusted"] = len(adjusted)
    if len(adjusted) < 2:
        info["skipped"] = f"fewer than 2 images with >= {_BA_MIN_OBSERVATIONS} multi-view observations"
        info["reprojection_error_after_px"] = before
        return rec, info
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    pycolmap.create_default_bundle_adjuster(opts, config, work).solve()
    # as COLMAP does after each adjustment: drop points that ended behind a camera (the reprojection cost does not
    # see that) or far off their observations; compare before/after on the points that stay
    work.update_point_3d_errors()
    drop = []
    for pid, p in work.points3D.items():
        behind = any((work.images[el.image_id].cam_from_world().matrix() @ np.append(p.xyz, 1.0))[2] <= 0
                     for el in p.track.elements)
        if behind or not np.isfinite(p.error) or p.error > _BA_MAX_ERROR_PX:
            drop.append(pid)
    for pid in drop:
        work.delete_point3D(pid)
    kept = list(work.points3D.keys())
    multi_before = round(float(np.mean([err_before[k] for k in kept])), 4) if kept else None
    multi_after = _mean_error(work)
    info.update(multi_view_points_removed=len(drop), multi_view_error_before_px=multi_before,
                multi_view_error_after_px=multi_after)
    if not kept or multi_after is None or not np.isfinite(multi_after) or multi_after > multi_before:
        log.warning("bundle adjustment did not lower the multi-view reprojection error (%s -> %s px, %d of %d points "
                    "dropped): kept the unadjusted model", multi_before, multi_after, len(drop), len(err_before))
        info.update(reverted=True, reprojection_error_after_px=before)
        return rec, info
    for _, img, idx, xc, color in single:  # same depth along the observed pixel's (refined) ray
        image = work.images[img]
        E = image.cam_from_world().matrix()
        xy = image.camera.cam_from_img(image.points2D[idx].xy)
        xc_new = xc if xy is None else xc[2] * np.append(xy, 1.0)  # None: the pixel does not undistort
        work.add_point3D(E[:, :3].T @ (xc_new - E[:, 3]), pycolmap.Track([pycolmap.TrackElement(img, idx)]), color)
    after = _mean_error(work)
    info.update(reverted=False, reprojection_error_after_px=after)
    log.info("bundle adjustment: mean reprojection error %.3f -> %.3f px (multi-view points %.3f -> %.3f, %d "
             "dropped)", before, after, multi_before, multi_after, len(drop))
    return work, info


def _mean_error(rec: Any) -> float | None:
    if rec.num_points3D() == 0:
        return None
    rec.update_point_3d_errors()
    return round(float(rec.compute_mean_reprojection_error()), 4)


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


# ------------------------------------------------------------------------------------------------------------
# PLY / GLB helpers
# ------------------------------------------------------------------------------------------------------------
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


def _subsample(n: int, cap: int, conf: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    if conf is not None:
        return np.sort(np.argsort(-conf, kind="stable")[:cap])
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


# ------------------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------------------
def export(run_dir: str | Path, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Write the COLMAP workspace, PLY, GLB, plots and report.md from ``store.zarr/merge``; return a manifest."""
    import trimesh

    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg: ExportConfig = config.export
    _check_config(cfg)
    wanted = dataclasses.asdict(cfg)
    if store.is_stage_complete(STAGE) and store.stage_manifest(STAGE).get("config") == wanted:
        log.info("export already complete in %s", store.root)
        return store.stage_manifest(STAGE)  # same options (e.g. --text not newly asked for): nothing to do
    store.require_stage("merge", needed_by="export")
    m = _read_merge(store)
    table = store.read_table("images")
    if "status" in table.column_names:  # skipped rows have no size: never export them
        table = table.filter(pc.equal(table.column("status"), "ok"))
    cols = set(table.column_names)
    ids = table.column("image_id").to_numpy()
    paths = dict(zip(ids.tolist(), table.column("path").to_pylist()))
    hw = {int(i): (int(h), int(w)) for i, h, w in zip(ids, table.column("height").to_numpy(),
                                                       table.column("width").to_numpy())}
    orient = dict(zip(ids.tolist(), (table.column("orientation").fill_null(1).to_pylist()
                                     if "orientation" in cols else [1] * len(ids))))
    exif_focal = ({int(i): f for i, f in zip(ids, table.column("focal_px").to_pylist()) if f is not None}
                  if "focal_px" in cols else {})
    meta = table.schema.metadata or {}
    photos_root = Path(meta[b"photos_root"].decode()) if b"photos_root" in meta else None

    exported_ids = m["img_image_ids"].astype(np.int64)
    stale = [int(i) for i in exported_ids if int(i) not in paths]
    if stale:
        raise ExportError(f"store.zarr/merge has {len(stale)} image(s) that images.parquet does not list as kept "
                          f"(e.g. image_id {stale[0]}): the merge is older than the scan. Run the stages after scan "
                          "again (e.g. `sparse-vggt run PHOTOS NEW_RUN`) before exporting.")
    exp_paths = {int(i): paths[int(i)] for i in exported_ids}
    names = export_names(exp_paths, orient, cfg.images)
    unsafe = [n for n in names.values() if not is_safe_name(n)]
    if unsafe and cfg.colmap_text:  # checked before anything is written
        raise ExportError(f"{len(unsafe)} image name(s) contain whitespace or control characters (e.g. "
                          f"{unsafe[0]!r}), which COLMAP's text format cannot hold. Use export.images=link or copy "
                          "(names are then mapped safely), or export.colmap_text=false (binary keeps them).")
    store.stage_started(STAGE)
    out = store.export_dir
    stale = [out / "colmap", out / "sparse", out / "plots"] + ([out / "images"] if cfg.images == "none" else [])
    for old in stale:
        if old.is_symlink():
            old.unlink()
        elif old.exists():
            shutil.rmtree(old)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"components": [], "colmap_text": bool(cfg.colmap_text), "config": wanted,
                                "layout": {"images": "images" if cfg.images != "none" else None,
                                           "sparse": "sparse/<component>"}}
    if cfg.images != "none":
        manifest["images_dir"] = write_images_dir(out / "images", photos_root, exp_paths, names, orient, cfg.images)
    else:
        manifest["images_root"] = str(photos_root) if photos_root else None
        rotated = sum(1 for i in exp_paths if _needs_upright_copy(exp_paths[i], orient.get(i, 1)))
        if rotated:
            log.warning("export.images=none: %d photo(s) are EXIF-rotated or HEIC; their models assume upright "
                        "pixels, which COLMAP does not read from the original files. Use export.images=link.",
                        rotated)
            manifest["rotated_not_drop_in"] = rotated
    mapped = {names[i]: exp_paths[i] for i in names if names[i] != exp_paths[i]}
    names_file = out / "image_names.json"
    names_file.unlink(missing_ok=True)
    if mapped:
        names_file.write_text(json.dumps(mapped, indent=1, ensure_ascii=False))
        manifest["names_mapped"] = len(mapped)
    has_points = "pt_xyz" in m
    for k in np.unique(m["img_component"]):
        k = int(k)
        sel = m["img_component"] == k
        E, K, img_ids = m["img_extrinsics"][sel], m["img_intrinsics"][sel], m["img_image_ids"][sel].astype(np.int64)
        pts = None
        if has_points:
            pm = np.flatnonzero(m["pt_component"] == k)
            pm = pm[_subsample(len(pm), cfg.max_track_points, m["pt_conf"][pm])]
            off = m["pt_track_offsets"]
            starts, ends = off[pm], off[pm + 1]
            tsel = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)]) if len(pm) else np.zeros(0, int)
            pts = {"xyz": m["pt_xyz"][pm], "rgb": m["pt_rgb"][pm],
                   "track_offsets": np.concatenate([[0], np.cumsum(ends - starts)]),
                   "track_image_ids": m["pt_track_image_ids"][tsel], "track_xy": m["pt_track_xy"][tsel]}
        cams, cam_of_image, n_exif = build_cameras(img_ids, K, exp_paths, hw, exif_focal, cfg)
        model_dir = out / "sparse" / str(k)
        stats = write_colmap(model_dir, names, img_ids, E, cams, cam_of_image, pts, cfg.colmap_text,
                             cfg.bundle_adjust, cfg.ba_refine_focal, cfg.ba_max_iterations,
                             cfg.ba_refine_distortion)
        entry: dict[str, Any] = {"component": k, "colmap": str(model_dir.relative_to(store.root)), **stats,
                                 "exif_focal_images": n_exif}
        ratio = [float(Ki[0, 0]) / exif_focal[int(i)] for i, Ki in zip(img_ids, K)
                 if exif_focal.get(int(i)) and np.isfinite(exif_focal[int(i)]) and exif_focal[int(i)] > 0]
        if ratio:  # a sanity check of the predicted focal against the cameras' own metadata
            entry["predicted_over_exif_focal_median"] = round(float(np.median(ratio)), 4)
            entry["images_with_exif_focal"] = len(ratio)
        suffix = "" if k == 0 else f"_{k}"
        centers = camera_centers(E)
        extent = float(np.linalg.norm(centers.max(0) - centers.min(0)))
        geoms = []
        if has_points:
            pm = np.flatnonzero(m["pt_component"] == k)
            pm = pm[_subsample(len(pm), cfg.max_points, seed=0)]
            if len(pm):
                rgba = np.concatenate([m["pt_rgb"][pm], np.full((len(pm), 1), 255, np.uint8)], 1)
                cloud = trimesh.PointCloud(m["pt_xyz"][pm].astype(np.float64), colors=rgba)
                if cfg.ply:
                    ply = out / f"points{suffix}.ply"
                    cloud.export(str(ply))
                    entry["ply"] = ply.name
                geoms.append(cloud)
            entry["ply_points"] = int(len(pm))
        if cfg.glb:
            size = cfg.frustum_scale or max(0.02 * extent, 1e-3)
            segs = frusta_segments(E, K, [hw[int(i)] for i in img_ids], size)
            geoms.append(trimesh.load_path(segs))
            glb = out / f"scene{suffix}.glb"
            trimesh.Scene(geoms).export(str(glb))
            entry["glb"] = glb.name
        manifest["components"].append(entry)
    manifest["images"] = int(len(m["img_image_ids"]))
    manifest["points3D"] = int(sum(c["points3D"] for c in manifest["components"]))
    pairs_file = out / "pairs.txt"
    pairs_file.unlink(missing_ok=True)
    if cfg.pairs:
        manifest["pairs"] = {"file": pairs_file.name, **write_pairs(pairs_file, store, names)}
    if cfg.plots:
        from .plots import write_plots

        manifest["plots"] = write_plots(store, out / "plots", m, config)
    rrd = out / "recording.rrd"
    rrd.unlink(missing_ok=True)
    if cfg.rerun:
        from .rerun_log import write_recording

        manifest["rerun"] = write_recording(rrd, store, m, names, out / "images" if cfg.images != "none" else None,
                                            hw)
    report = out / "report.md"
    report.write_text(make_report(store, manifest))
    manifest["report"] = report.name
    store.stage_finished(STAGE, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, default=str)
        return text if len(text) <= 200 else text[:197] + "..."
    return str(v)


def _checks(store: RunStore) -> list[str]:
    """Things a user must not miss, from the stage manifests (one bullet each)."""
    stages = store.meta().get("stages", {})
    out = []
    graph = stages.get("graph", {}).get("manifest") or {}
    if graph.get("recall_ok") is False:
        out.append(f"graph recall@{graph.get('k')} = {graph.get('recall_at_k')} ({graph.get('method')} search, "
                   f"{graph.get('recall_sample')} sampled queries) is below graph.min_recall = "
                   f"{graph.get('min_recall')}: some covisible pairs are missing from the graph. Use "
                   "graph.method=exact or raise graph.candidates / graph.pca_dim.")
    return out


def make_report(store: RunStore, export_manifest: dict[str, Any]) -> str:
    """Markdown with checks, plots, every stage's state and numbers (from run.json) and merge diagnostics."""
    meta = store.meta()
    stages = meta.get("stages", {})
    lines = [f"# sparse-vggt report: {store.root.name}", "", f"Run created {meta.get('created')}; "
             f"versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}", ""]
    lines += [weights_markdown(meta)]  # real or random weights, checkpoint file and revision
    checks = _checks(store)
    lines += ["## Checks", ""] + ([f"- **WARNING**: {c}" for c in checks] or ["- no warnings"]) + [""]
    plots = export_manifest.get("plots", {})
    if plots.get("files"):
        lines += ["## Plots", ""]
        for title, rel in plots["files"].items():
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    lines += ["## Stages", "", "| stage | state | finished |", "|---|---|---|"]
    for s in STAGES:
        e = stages.get(s, {})
        state = "finished" if e.get("finished") else ("started" if e.get("started") else "pending")
        if s == STAGE:
            state = "finished (this report)"
        lines.append(f"| {s} | {state} | {e.get('finished', '')} |")
    for s in STAGES:
        man = export_manifest if s == STAGE else stages.get(s, {}).get("manifest")
        if not man:
            continue
        lines += ["", f"### {s}", "", "| key | value |", "|---|---|"]
        for k, v in man.items():
            if k in ("pose_graph", "components", "config") and isinstance(v, (list, dict)):
                continue
            lines.append(f"| {k} | {_fmt(v)} |")
    skipped = ((stages.get("scan") or {}).get("manifest") or {}).get("skipped_files") or []
    if skipped:  # every photo the scan skipped, with its reason (the scan table above truncates the list)
        lines += ["", f"## Skipped photos ({len(skipped)})", "", "| file | reason |", "|---|---|"]
        lines += ["| {} | {} |".format(*(str(v).replace("|", "\\|").replace("\n", "\\n")
                                         for v in (s["path"], s["reason"]))) for s in skipped]
    if store.is_unit_complete("merge"):
        attrs = dict(store.group("merge", create=False).attrs)
        edges = attrs.get("residuals", [])
        lines += ["", "## Merge: cluster edges", "",
                  f"{sum(e['accepted'] for e in edges)} of {len(edges)} edges accepted.", "",
                  "| clusters | shared | corr. | inlier ratio | rel. RMSE | scale | camera rot (deg) | loop rot (deg) "
                  "| status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in edges:
            lines.append("| {}-{} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                e["clusters"][0], e["clusters"][1], e.get("shared_frames", ""), e.get("correspondences", ""),
                _fmt(e.get("inlier_ratio", "")), _fmt(e.get("rmse_rel", "")), _fmt(e.get("scale", "")),
                _fmt(e.get("camera_rot_deg", "")), _fmt(e.get("global_rot_deg", "")),
                "accepted" if e["accepted"] else "rejected: " + e["reason"]))
        excl = attrs.get("excluded_clusters", {})
        if excl:
            lines += ["", "## Merge: excluded clusters", ""] + [f"- cluster {k}: {v}" for k, v in excl.items()]
        lines += ["", "## Merge: components and pose graph", ""]
        for c in attrs.get("components", []):
            lines.append(f"- component {c['component']}: {len(c['clusters'])} clusters, {c['images']} images")
        for p in attrs.get("pose_graph", []):
            lines.append(f"- pose graph component {p.get('component')}: {p.get('nodes')} clusters, {p.get('edges')} "
                         f"edges, cost {_fmt(p.get('cost_initial', ''))} -> {_fmt(p.get('cost_final', ''))} in "
                         f"{p.get('iterations')} iterations {p.get('note', '')}")
    lines += ["", "## Export", ""]
    if export_manifest.get("layout", {}).get("images"):
        lines.append("COLMAP workspace: `images/` (image root) + `sparse/<component>/`, e.g. "
                     "`colmap gui --import_path sparse/0 --image_path images` from the export folder; "
                     "nerfstudio/gsplat take the export folder as the data directory.")
    for c in export_manifest.get("components", []):
        ba = c.get("bundle_adjustment", {})
        ba_text = (f", bundle adjustment {ba['reprojection_error_before_px']} -> "
                   f"{ba['reprojection_error_after_px']} px" if "reprojection_error_after_px" in ba else "")
        exif = (f", predicted/EXIF focal median {c['predicted_over_exif_focal_median']} over "
                f"{c['images_with_exif_focal']} images" if "predicted_over_exif_focal_median" in c else "")
        lines.append(f"- component {c['component']}: {c['images']} images, {c['cameras']} cameras, {c['points3D']} "
                     f"points3D ({c['observations']} observations) in `{c['colmap']}`"
                     + (f", `{c['ply']}`" if "ply" in c else "") + (f", `{c['glb']}`" if "glb" in c else "")
                     + ba_text + exif)
    if "pairs" in export_manifest:
        lines.append(f"- `pairs.txt`: {export_manifest['pairs'].get('pairs', 0)} covisibility pairs")
    return "\n".join(lines) + "\n"
run = lambda run_dir, config=None, *, force=False, units=None: export(run_dir, config)  # noqa: E731  # TEMP r18-sched
