"""The export stage (`sparse-vggt export`): a COLMAP workspace, coloured PLY, GLB, plots and report.md.

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

Which files are written, and in which order, is the registry in ``formats.py``; this module reads the merge,
names the images, lays out ``images/``, calls the enabled formats and writes report.md last.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..config import ExportConfig, PipelineConfig
from ..store import RunStore
from .colmap import (
    CAMERA_MODELS, FOCAL_PRIORS, IMAGE_MODES, SHARED_CAMERA, export_names, is_safe_name, needs_upright_copy,
    write_images_dir,
)
from .context import STAGE, ComponentContext, ExportContext, ExportError
from .formats import enabled_formats, stale_paths
from .report import make_report

log = logging.getLogger(__name__)


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


def run(run_dir: str | Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: list[Any] | None = None) -> dict[str, Any]:
    """Write the COLMAP workspace, PLY, GLB, plots and report.md from ``store.zarr/merge``; return a manifest.

    A finished export with the same options is returned as is unless ``force``. Export writes one workspace for the
    whole merge, so ``units`` must be None.
    """
    if units is not None:
        raise ValueError(f"the export stage has no units to select (got units={units!r}); pass units=None")
    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg: ExportConfig = config.export
    _check_config(cfg)
    wanted = dataclasses.asdict(cfg)
    if not force and store.is_stage_complete(STAGE) and store.stage_manifest(STAGE).get("config") == wanted:
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
    stale = [out / p for p in stale_paths()] + ([out / "images"] if cfg.images == "none" else [])
    for old in stale:  # every format's paths, enabled or not: a format switched off leaves nothing behind
        if old.is_symlink() or old.is_file():
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
        rotated = sum(1 for i in exp_paths if needs_upright_copy(exp_paths[i], orient.get(i, 1)))
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
    ctx = ExportContext(store, config, out, m, names, exp_paths, hw, exif_focal,
                        out / "images" if cfg.images != "none" else None)
    for k in np.unique(m["img_component"]):
        k = int(k)
        sel = m["img_component"] == k
        comp = ComponentContext(ctx, k, m["img_image_ids"][sel].astype(np.int64), m["img_extrinsics"][sel],
                                m["img_intrinsics"][sel])
        entry: dict[str, Any] = {"component": k}
        for _, fmt in enabled_formats(cfg, per_component=True):
            entry.update(fmt.write(comp))
        if comp.display_points is not None:  # the GLB shows the same points: their count also without a PLY
            entry.setdefault("ply_points", int(len(comp.display_points)))
        manifest["components"].append(entry)
    manifest["images"] = int(len(m["img_image_ids"]))
    manifest["points3D"] = int(sum(c.get("points3D", 0) for c in manifest["components"]))
    for _, fmt in enabled_formats(cfg, per_component=False):
        manifest.update(fmt.write(ctx))
    report = out / "report.md"
    report.write_text(make_report(store, manifest))
    manifest["report"] = report.name
    store.stage_finished(STAGE, manifest)
    return manifest
