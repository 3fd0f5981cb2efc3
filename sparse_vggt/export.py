"""Export the merged model (`sparse-vggt export`): COLMAP per component, coloured PLY, GLB, report.md.

Files under ``<run>/export/``::

    colmap/<k>/            cameras.bin, images.bin, points3D.bin (+ rigs/frames as pycolmap writes them);
                           also the .txt files with ``export.colmap_text``. One model per merge component k
                           (0 = largest); each component has its own world frame.
    points.ply, scene.glb  component 0; other components as points_<k>.ply, scene_<k>.glb
    report.md              every stage's manifest from run.json, merge edges/components, export counts

Cameras are PINHOLE, one per image (VGGT predicts a focal per frame), in original upright pixels. Points3D keep
the tracks fused by merge: each observation is the pixel the point came from, so a COLMAP tool can refine them.
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

from .config import ExportConfig, PipelineConfig
from .geometry import camera_centers
from .store import STAGES, RunStore
from .provenance import weights_markdown

log = logging.getLogger(__name__)

STAGE = "export"


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


def write_colmap(
    out_dir: Path, names: dict[int, str], hw: dict[int, tuple[int, int]], image_ids: np.ndarray,
    extrinsics: np.ndarray, intrinsics: np.ndarray, points: dict[str, np.ndarray] | None, text: bool,
) -> dict[str, int]:
    """One COLMAP model. COLMAP ids are image_id + 1 (cameras and images alike)."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    obs: dict[int, list[tuple[int, np.ndarray]]] = {int(i): [] for i in image_ids}
    if points is not None and len(points["xyz"]):
        off = points["track_offsets"]
        for p in range(len(points["xyz"])):
            for t in range(off[p], off[p + 1]):
                img = int(points["track_image_ids"][t])
                if img in obs:
                    obs[img].append((p, points["track_xy"][t]))
    point_obs: dict[int, list[tuple[int, int]]] = {}
    for img, E, K in zip(image_ids, extrinsics, intrinsics):
        img = int(img)
        h, w = hw[img]
        cam = pycolmap.Camera(model="PINHOLE", width=int(w), height=int(h),
                              params=[float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])],
                              camera_id=img + 1)
        rec.add_camera_with_trivial_rig(cam)
        kp = np.array([xy for _, xy in obs[img]], np.float64).reshape(-1, 2)
        image = pycolmap.Image(name=names[img], keypoints=kp, camera_id=img + 1, image_id=img + 1)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(np.asarray(E, np.float64)))
        for k, (p, _) in enumerate(obs[img]):
            point_obs.setdefault(p, []).append((img + 1, k))
    n_obs = 0
    if points is not None:
        for p in sorted(point_obs):
            track = pycolmap.Track([pycolmap.TrackElement(i, k) for i, k in point_obs[p]])
            rec.add_point3D(points["xyz"][p].astype(np.float64), track, points["rgb"][p].astype(np.uint8))
            n_obs += len(point_obs[p])
    out_dir.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(out_dir))
    if text:
        rec.write_text(str(out_dir))
    return {"images": int(len(image_ids)), "points3D": int(rec.num_points3D()), "observations": n_obs}


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


def export(run_dir: str | Path, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Write COLMAP models, PLY, GLB and report.md from ``store.zarr/merge``; return a manifest."""
    import trimesh

    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg: ExportConfig = config.export
    wanted = dataclasses.asdict(cfg)
    if store.is_stage_complete(STAGE) and store.stage_manifest(STAGE).get("config") == wanted:
        log.info("export already complete in %s", store.root)
        return store.stage_manifest(STAGE)  # same options (e.g. --text not newly asked for): nothing to do
    store.require_stage("merge", needed_by="export")
    store.stage_started(STAGE)
    m = _read_merge(store)
    images = store.read_table("images", columns=["image_id", "path", "width", "height", "status"])
    images = images.filter(pc.equal(images.column("status"), "ok"))  # skipped rows have no size: never export them
    ids = images.column("image_id").to_numpy()
    names = dict(zip(ids.tolist(), images.column("path").to_pylist()))
    hw = {int(i): (int(h), int(w)) for i, h, w in zip(ids, images.column("height").to_numpy(),
                                                       images.column("width").to_numpy())}
    out = store.export_dir
    colmap_root = out / "colmap"
    if colmap_root.exists():
        shutil.rmtree(colmap_root)
    out.mkdir(parents=True, exist_ok=True)
    has_points = "pt_xyz" in m
    manifest: dict[str, Any] = {"components": [], "colmap_text": bool(cfg.colmap_text), "config": wanted}
    for k in np.unique(m["img_component"]):
        k = int(k)
        sel = m["img_component"] == k
        E, K, img_ids = m["img_extrinsics"][sel], m["img_intrinsics"][sel], m["img_image_ids"][sel]
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
        stats = write_colmap(colmap_root / str(k), names, hw, img_ids, E, K, pts, cfg.colmap_text)
        entry: dict[str, Any] = {"component": k, "colmap": str((colmap_root / str(k)).relative_to(store.root)),
                                 **stats}
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


def make_report(store: RunStore, export_manifest: dict[str, Any]) -> str:
    """Markdown with every stage's state and numbers (from run.json) plus merge diagnostics."""
    meta = store.meta()
    stages = meta.get("stages", {})
    lines = [f"# sparse-vggt report: {store.root.name}", "", f"Run created {meta.get('created')}; "
             f"versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}", ""]
    lines += [weights_markdown(meta)]  # real or random weights, checkpoint file and revision
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
    for c in export_manifest.get("components", []):
        lines.append(f"- component {c['component']}: {c['images']} images, {c['points3D']} points3D "
                     f"({c['observations']} observations) in `{c['colmap']}`"
                     + (f", `{c['ply']}`" if "ply" in c else "") + (f", `{c['glb']}`" if "glb" in c else ""))
    return "\n".join(lines) + "\n"
