"""The merge stage (`sparse-vggt merge`): one frame per connected component from the cluster reconstructions.

Every cluster's VGGT run lives in its own similarity gauge (reference frame at the origin, arbitrary scale).
Clusters that share frames are related by a Sim(3); we estimate it from the *same pixels* of the shared frames
unprojected in both clusters (dense, confidence-weighted correspondences; RANSAC on minimal samples, then IRLS with
a Huber loss around weighted Umeyama). Residuals are relative to the point's depth, so thresholds are scale free.
Edges that fail a threshold are rejected with the reason recorded. Per connected component of accepted edges, a
maximum-weight spanning tree gives initial cluster->world transforms, and a Sim(3) pose graph over *all* accepted
edges (Levenberg-Marquardt on Lie-algebra residuals) distributes loop errors. Each image takes its pose from the
cluster where it is ``core``; points are fused from core frames with a confidence threshold, an optional
cross-cluster depth-consistency filter, and voxel downsampling.

Layout written to ``store.zarr/merge/`` (group attrs ``complete`` written last, then the stage marker)::

    cluster_ids        (C,)    int64    clusters that took part (C = included clusters)
    cluster_sim3       (C,4,4) float64  cluster -> component world: X_world = S @ X_cluster (pose-graph result)
    cluster_sim3_init  (C,4,4) float64  the spanning-tree initialisation (for diagnosis)
    cluster_component  (C,)    int64    merge component (0 = most core images); its own world frame
    edges/pairs        (E,2)   int64    cluster pairs (a, b) that share frames, a < b
    edges/sim3         (E,4,4) float64  measured X_a = S @ X_b (identity when estimation failed)
    edges/accepted     (E,)    bool
    images/image_ids   (M,)    int64    posed images (row ids of images.parquet)
    images/extrinsics  (M,3,4) float64  world -> camera (OpenCV) in the component's world frame
    images/intrinsics  (M,3,3) float64  original upright pixels
    images/component   (M,)    int64
    images/cluster     (M,)    int64    cluster the pose came from (its core cluster unless that was excluded)
    points/xyz         (P,3)   float32  fused points, component world frame
    points/rgb         (P,3)   uint8
    points/conf        (P,)    float32  summed confidence of the merged pixels
    points/component   (P,)    int64
    points/track_offsets (P+1,) int64   CSR over the two arrays below (one observation per image and point)
    points/track_image_ids (T,) int64
    points/track_xy    (T,2)   float32  pixel (x, y) in the original upright image

Group attrs: ``residuals`` (the DESIGN name; one dict per edge: clusters, shared frames, correspondences, inliers,
inlier ratio, relative RMSE/median residual, scale, accepted, reason, and after the global solve the loop residual
global_rot_deg / global_trans_rel / global_log_scale), ``excluded_clusters`` ({id: reason}), ``components``,
``pose_graph`` (cost before/after, iterations), ``fusion`` (counts).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ..config import PipelineConfig
from ..progress import track
from ..store import RunStore, RunStoreError
from .clusters import ClusterData, DepthCache, load_cluster
from .correspondences import overlapping_pairs
from .fuse import fuse_points
from .pose_graph import align_components, global_extrinsics, loop_residuals
from .sim3 import estimate_edge

log = logging.getLogger(__name__)

STAGE = "merge"


class MergeError(RuntimeError):
    """Merge cannot produce any model (e.g. no usable cluster); the message says what to do."""


def run(run_dir: str | Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: list[Any] | None = None) -> dict[str, Any]:
    """Align all complete cluster reconstructions and fuse them; write ``store.zarr/merge``; return a manifest.

    ``force`` recomputes a finished merge. Merge is one unit of work (it needs every cluster at once), so
    ``units`` must be None.
    """
    if units is not None:
        raise ValueError(f"the merge stage has no units to select (got units={units!r}); pass units=None")
    store = RunStore.open(run_dir)
    config = config or store.config()
    cfg = config.merge
    if not force and store.is_stage_complete(STAGE) and store.is_unit_complete("merge"):
        log.info("merge already complete in %s", store.root)
        return store.stage_manifest(STAGE)
    store.require_stage("partition", needed_by="merge")
    if store.is_stage_complete("reconstruct"):  # a damaged cluster would be merged silently: verify each first
        from ..reconstruct import cluster_status

        redo = cluster_status(store.root, config)[1]
        if redo:
            raise RunStoreError(f"cluster(s) {redo} of {store.root} failed verification (recorded in "
                                "orchestration/events.jsonl) and must be recomputed before merging: run "
                                f"`sparse-vggt reconstruct {store.root}` (or `sparse-vggt run`).")
    if not store.is_stage_complete("reconstruct"):
        log.warning("the reconstruct stage has not finished; merging the clusters that are complete "
                    "(missing ones are excluded and reported)")
    store.stage_started(STAGE)
    rng = np.random.default_rng(cfg.seed)
    cache = DepthCache(store)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 4)
        clock = now

    images = store.read_table("images", columns=["image_id", "path", "width", "height", "status"])
    img_ids = images.column("image_id").to_numpy()
    # only kept images: skipped rows (empty, corrupt, too large...) have no size, and no stage may use them
    images = images.filter(pc.equal(images.column("status"), "ok"))
    image_hw = {int(i): (int(h), int(w)) for i, h, w in zip(images.column("image_id").to_numpy(),
                                                             images.column("height").to_numpy(),
                                                             images.column("width").to_numpy())}
    ctab = store.read_table("clusters", columns=["cluster_id", "image_id", "role"])
    t_cid = ctab.column("cluster_id").to_numpy()
    t_img = ctab.column("image_id").to_numpy()
    t_core = np.asarray(pc.equal(ctab.column("role"), "core").to_numpy(zero_copy_only=False), bool)

    # ---- load + validate clusters
    clusters: dict[int, ClusterData] = {}
    excluded: dict[int, str] = {}
    cids = np.unique(t_cid)
    for cid in track(cids, total=len(cids), description="merge: load clusters"):
        rows = t_cid == cid
        not_kept = sorted({int(i) for i in t_img[rows].tolist()} - image_hw.keys())
        if not_kept:
            excluded[int(cid)] = (f"image ids {not_kept[:5]} were skipped by scan (status != ok); re-run "
                                  "`sparse-vggt partition --force`")
            log.warning("cluster %d excluded from merge: %s", cid, excluded[int(cid)])
            continue
        try:
            clusters[int(cid)] = load_cluster(store, cache, int(cid), set(t_img[rows & t_core].tolist()),
                                              set(t_img[rows].tolist()), cfg)
        except (ValueError, RunStoreError) as exc:
            excluded[int(cid)] = str(exc)
            log.warning("cluster %d excluded from merge: %s", cid, exc)
    if not clusters:
        raise MergeError(f"no usable cluster reconstruction in {store.root}: "
                         + "; ".join(f"{k}: {v}" for k, v in excluded.items())
                         + ". Run `sparse-vggt reconstruct` first.")
    lap("load")
    order = sorted(clusters)
    node_of = {c: i for i, c in enumerate(order)}
    C = len(order)

    # ---- cluster pairs sharing frames
    pair_nodes = overlapping_pairs(clusters, order, int(img_ids.max()) + 1 if len(img_ids) else 1)
    E = len(pair_nodes)
    meas = np.tile(np.eye(4), (E, 1, 1))
    edge_info: list[dict[str, Any]] = []
    for e in track(range(E), total=E, description="merge: pairwise Sim(3)"):
        a, b = clusters[order[pair_nodes[e, 0]]], clusters[order[pair_nodes[e, 1]]]
        shared = np.intersect1d(a.image_ids, b.image_ids)
        meas[e], info = estimate_edge(cache, a, b, shared, image_hw, cfg, rng)
        edge_info.append(info)
        if not info["accepted"]:
            log.warning("edge %d-%d rejected: %s", a.cid, b.cid, info["reason"])
    accepted = np.array([i["accepted"] for i in edge_info], bool) if E else np.zeros(0, bool)
    lap("pairwise")

    # ---- components of accepted edges; spanning tree + pose graph per component
    lengths = np.array([clusters[c].length for c in order])
    edge_w = np.array([i.get("inliers", 0) for i in edge_info], float)
    ncomp, comp, T_init, T, pg_info = align_components(clusters, order, pair_nodes, meas, accepted, edge_w, lengths,
                                                       cfg)

    lap("pose_graph")
    # ---- per-edge residual after the global solve (how well the loop closed)
    loop_residuals(T, pair_nodes, meas, accepted, lengths, edge_info)

    # ---- global poses: each image from its core cluster (an included overlap cluster if that one is excluded)
    posed: dict[int, tuple[int, int]] = {}  # image -> (node, row)
    for c in order:
        cd = clusters[c]
        for r, img in enumerate(cd.image_ids):
            if cd.core[r]:
                posed[int(img)] = (node_of[c], r)
    fallback = 0
    for c in order:
        cd = clusters[c]
        for r, img in enumerate(cd.image_ids):
            if int(img) not in posed:
                posed[int(img)] = (node_of[c], r)
                fallback += 1
    pose_ids = np.array(sorted(posed), np.int64)
    P_ext = np.zeros((len(pose_ids), 3, 4))
    P_K = np.zeros((len(pose_ids), 3, 3))
    P_comp = np.zeros(len(pose_ids), np.int64)
    P_cl = np.zeros(len(pose_ids), np.int64)
    for j, img in enumerate(pose_ids):
        node, r = posed[int(img)]
        cd = clusters[order[node]]
        P_ext[j] = global_extrinsics(T[node], cd.extrinsics[r:r + 1])[0]
        P_K[j] = cd.intrinsics[r]
        P_comp[j] = comp[node]
        P_cl[j] = cd.cid

    lap("poses")
    fusion: dict[str, Any] = {}
    points = None
    if cfg.fuse:
        points, fusion = fuse_points(cache, clusters, order, T, comp, posed, images, P_ext, P_comp, cfg)

    lap("fuse")
    # ---- write
    store.remove_group("merge")
    g = store.group("merge")
    store.write_array(g, "cluster_ids", np.array(order, np.int64))
    store.write_array(g, "cluster_sim3", T)
    store.write_array(g, "cluster_sim3_init", T_init)
    store.write_array(g, "cluster_component", comp.astype(np.int64))
    ge = store.group("merge/edges")
    store.write_array(ge, "pairs", np.array([[order[a], order[b]] for a, b in pair_nodes], np.int64).reshape(-1, 2))
    store.write_array(ge, "sim3", meas)
    store.write_array(ge, "accepted", accepted)
    gi = store.group("merge/images")
    store.write_array(gi, "image_ids", pose_ids)
    store.write_array(gi, "extrinsics", P_ext)
    store.write_array(gi, "intrinsics", P_K)
    store.write_array(gi, "component", P_comp)
    store.write_array(gi, "cluster", P_cl)
    if points is not None:
        gp = store.group("merge/points")
        for name, arr in points.items():
            store.write_array(gp, name, arr)
    components = []
    for k in range(ncomp):
        nodes = np.flatnonzero(comp == k)
        components.append({"component": int(k), "clusters": [int(order[x]) for x in nodes],
                           "images": int((P_comp == k).sum())})
    n_points = int(len(points["xyz"])) if points is not None else 0
    manifest = {
        "clusters": int(len(cids)),
        "clusters_merged": int(C),
        "clusters_excluded": {str(k): v for k, v in excluded.items()},
        "edges": int(E),
        "edges_accepted": int(accepted.sum()),
        "edges_rejected": {f"{i['clusters'][0]}-{i['clusters'][1]}": i["reason"] for i in edge_info
                           if not i["accepted"]},
        "components": int(ncomp),
        "images_posed": int(len(pose_ids)),
        "images_posed_from_overlap": int(fallback),
        "points": n_points,
        "pose_graph": pg_info,
    }
    g.attrs.update(_json({"residuals": edge_info, "excluded_clusters": {str(k): v for k, v in excluded.items()},
                          "components": components, "pose_graph": pg_info, "fusion": fusion}))
    store.mark_unit_complete("merge", images=int(len(pose_ids)), points=n_points)
    manifest["fusion"] = fusion
    lap("write")
    manifest["seconds"] = seconds
    store.stage_finished(STAGE, _json(manifest))
    return _json(manifest)


def _json(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars/arrays to Python, non-finite floats to None) for attrs and manifests."""
    if isinstance(obj, dict):
        return {str(k): _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)
