"""Synthetic city scenes with known cameras and depth, cut into clusters and "reconstructed" with known errors.

Why: merge/export/evaluate must be tested at city scale (thousands of frames, dozens to thousands of clusters)
without running VGGT. A scene here is a Manhattan grid of box buildings on a ground plane; cameras walk the
streets at eye height looking along and across the street. Depth maps are exact ray casts (small, e.g. 24x32).

The covisibility graph comes from geometry (frames that see the same 4 m voxels), it is cut by the real
partitioner (:func:`sparse_vggt.partition.partition_graph`), and every cluster gets a "reconstruction" written in
the run-directory format of DESIGN.md: the ground truth seen in that cluster's own gauge (its reference frame at
the origin, a random scale, like VGGT's normalisation), with multiplicative depth noise, optional pose noise, a
fraction of outlier pixels (wrong depth, confidence drawn like the inliers so confidence cannot reveal them) in
frames shared with other clusters, and confidence maps. :class:`SyntheticRun` keeps the ground truth.

:func:`synthetic_city_graph` skips the geometry: a k-NN graph of points along city streets, cheap enough for
partition tests and the million-frame partition benchmark.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation

from .config import PartitionConfig, PipelineConfig
from .geometry import camera_centers, sim3_from_parts
from .store import RunStore

log = logging.getLogger(__name__)

SKY_DEPTH = 150.0  # metres; rays that hit nothing get this depth and the lowest confidence (1.0, like VGGT's floor)


@dataclass
class CityScene:
    """Ground truth of a synthetic city: cameras, intrinsics, depth and colours at depth-map resolution."""

    extrinsics: np.ndarray  # (N, 3, 4) world->camera
    intrinsics: np.ndarray  # (N, 3, 3) in ORIGINAL image pixels
    depth: np.ndarray  # (N, h, w) float32 metres (SKY_DEPTH where nothing is hit)
    sky: np.ndarray  # (N, h, w) bool
    colors: np.ndarray  # (N, h, w, 3) uint8
    depth_to_image: np.ndarray  # (2, 3) depth pixel -> original pixel (same for every frame)
    image_hw: tuple[int, int]
    names: list[str]
    boxes: np.ndarray  # (B, 6) xmin ymin zmin xmax ymax zmax

    @property
    def n(self) -> int:
        return int(self.extrinsics.shape[0])

    @property
    def extent(self) -> float:
        """Diagonal of the bounding box of the camera centres (the same definition as ``evaluate``)."""
        c = camera_centers(self.extrinsics)
        return float(np.linalg.norm(c.max(0) - c.min(0)))


def _look_rotation(forward: np.ndarray) -> np.ndarray:
    """World->camera rotations (N, 3, 3) for OpenCV cameras looking along ``forward`` with world z up."""
    z = forward / np.linalg.norm(forward, axis=-1, keepdims=True)
    up = np.array([0.0, 0.0, 1.0])
    x = np.cross(z, up)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)  # points down
    return np.stack([x, y, z], axis=-2)


def _city_boxes(grid: int, block: float, street: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Buildings: each block is split into up to 2x2 boxes of random heights. Returns boxes and their colours."""
    boxes, cols = [], []
    half = street / 2
    for i in range(grid):
        for j in range(grid):
            x0, x1 = i * block + half, (i + 1) * block - half
            y0, y1 = j * block + half, (j + 1) * block - half
            xs = [x0, x0 + (x1 - x0) * rng.uniform(0.35, 0.65), x1]
            ys = [y0, y0 + (y1 - y0) * rng.uniform(0.35, 0.65), y1]
            for a in range(2):
                for b in range(2):
                    h = rng.uniform(8.0, 40.0)
                    boxes.append([xs[a] + 0.5, ys[b] + 0.5, 0.0, xs[a + 1] - 0.5, ys[b + 1] - 0.5, h])
                    cols.append(rng.integers(60, 230, 3))
    return np.asarray(boxes, dtype=np.float64), np.asarray(cols, dtype=np.uint8)


def _cast(origin: np.ndarray, dirs: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray casting against boxes and the ground plane z=0. ``dirs`` (P,3) are scaled so t is camera depth.

    Returns (t (P,), hit index (P,): box index, -1 ground, -2 nothing).
    """
    safe = np.where(np.abs(dirs) < 1e-12, 1e-12, dirs)  # no 0 * inf = nan on slab boundaries
    inv = (1.0 / safe).astype(np.float32)  # (P, 3)
    lo = (boxes[None, :, :3] - origin).astype(np.float32) * inv[:, None, :]  # (P, B, 3)
    hi = (boxes[None, :, 3:] - origin).astype(np.float32) * inv[:, None, :]
    tmin = np.minimum(lo, hi).max(axis=-1)
    tmax = np.maximum(lo, hi).min(axis=-1)
    hit = (tmax >= tmin) & (tmin > 1e-6)
    t_box = np.where(hit, tmin, np.inf)
    best = np.argmin(t_box, axis=1) if boxes.size else np.zeros(len(dirs), np.int64)
    t = t_box[np.arange(len(dirs)), best] if boxes.size else np.full(len(dirs), np.inf)
    idx = np.where(np.isfinite(t), best, -2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 2] < -1e-9, -origin[2] / dirs[:, 2], np.inf)
    ground = t_ground < t
    t = np.where(ground, t_ground, t)
    idx = np.where(ground, -1, idx)
    far = ~np.isfinite(t) | (t > SKY_DEPTH)
    return np.where(far, SKY_DEPTH, t), np.where(far, -2, idx)


def make_city_scene(
    n_frames: int, seed: int = 0, depth_hw: tuple[int, int] = (24, 32), image_scale: int = 2,
    block: float = 40.0, street: float = 12.0, fov_w_deg: float = 70.0,
) -> CityScene:
    """Cameras along the streets of a square grid city; exact depth by ray casting.

    The grid size is chosen so that frames are about 1.2-2 m apart along the streets. Headings are the street
    direction (either way) turned by up to 70 degrees, pitch -15..+5 degrees, eye height 1.4-2.0 m, 3 m jitter
    across the street.
    """
    if n_frames < 2:
        raise ValueError("a synthetic scene needs at least 2 frames")
    rng = np.random.default_rng(seed)
    grid = max(1, int(round((-1 + math.sqrt(1 + 4 * n_frames * 1.5 / (2 * block))) / 2)))
    boxes, box_cols = _city_boxes(grid, block, street, rng)
    L = grid * block
    # frames on the 2 (grid+1) street lines, evenly spread, in walking order
    n_lines = 2 * (grid + 1)
    per_line = np.full(n_lines, n_frames // n_lines)
    per_line[: n_frames % n_lines] += 1
    pos, fwd = [], []
    for line, count in enumerate(per_line):
        if count == 0:
            continue
        along = (np.arange(count) + rng.uniform(0.2, 0.8, count)) * (L / count)
        across = (line % (grid + 1)) * block + rng.uniform(-3.0, 3.0, count)
        horizontal = line < grid + 1
        xy = np.stack([along, across], -1) if horizontal else np.stack([across, along], -1)
        direction = np.array([1.0, 0.0]) if horizontal else np.array([0.0, 1.0])
        sign = np.where(rng.random(count) < 0.5, 1.0, -1.0)
        yaw = np.radians(rng.uniform(-70.0, 70.0, count))
        base = np.arctan2(direction[1], direction[0]) + np.where(sign < 0, math.pi, 0.0) + yaw
        pitch = np.radians(rng.uniform(-15.0, 5.0, count))
        f = np.stack([np.cos(base) * np.cos(pitch), np.sin(base) * np.cos(pitch), np.sin(pitch)], -1)
        z = rng.uniform(1.4, 2.0, count)
        pos.append(np.concatenate([xy, z[:, None]], -1))
        fwd.append(f)
    centers = np.concatenate(pos)
    R = _look_rotation(np.concatenate(fwd))
    names = [f"street_{s:03d}/frame_{i:05d}.png" for s, c in enumerate(per_line) for i in range(c)]
    return render_scene(centers, R, boxes, box_cols, names, depth_hw, image_scale, fov_w_deg)


def render_scene(
    centers: np.ndarray, R: np.ndarray, boxes: np.ndarray, box_cols: np.ndarray, names: list[str],
    depth_hw: tuple[int, int] = (24, 32), image_scale: int = 2, fov_w_deg: float = 70.0,
) -> CityScene:
    """Ray-cast depth, sky mask and colours for cameras (centres (N,3), world->camera rotations (N,3,3))."""
    n_frames = len(centers)
    ext = np.concatenate([R, -(R @ centers[..., None])], -1)
    h, w = depth_hw
    fx = (w / 2) / math.tan(math.radians(fov_w_deg) / 2)
    K_d = np.array([[fx, 0, w / 2], [0, fx, h / 2], [0, 0, 1.0]])
    A = np.array([[image_scale, 0, 0], [0, image_scale, 0]], dtype=np.float64)
    K_img = np.vstack([A, [0, 0, 1]]) @ K_d
    v, u = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rays_cam = np.stack([(u - K_d[0, 2]) / fx, (v - K_d[1, 2]) / fx, np.ones_like(u, dtype=np.float64)], -1)
    rays_cam = rays_cam.reshape(-1, 3)
    depth = np.empty((n_frames, h, w), np.float32)
    sky = np.empty((n_frames, h, w), bool)
    colors = np.empty((n_frames, h, w, 3), np.uint8)
    corners = np.stack([boxes[:, [a, b, c]] for a in (0, 3) for b in (1, 4) for c in (2, 5)], 1)  # (B, 8, 3)
    for i in range(n_frames):
        # cull boxes entirely behind the camera, beyond the sky depth, or beside the view frustum
        cam = (corners - centers[i]) @ R[i].T  # (B, 8, 3)
        zc = np.maximum(cam[..., 2], 1e-9)
        lim = (w / 2) / fx * 1.05
        near = (
            (cam[..., 2] > 0).any(1)
            & (cam[..., 2].min(1) < SKY_DEPTH)
            & ~((cam[..., 0] > lim * zc).all(1) | (cam[..., 0] < -lim * zc).all(1))
        )
        dirs = rays_cam @ R[i]  # R^T ray (row vectors)
        t, idx = _cast(centers[i], dirs, boxes[near])
        depth[i] = t.reshape(h, w)
        sky[i] = (idx == -2).reshape(h, w)
        cols = np.empty((len(t), 3), np.uint8)
        cols[idx == -2] = (135, 190, 235)
        cols[idx == -1] = (110, 110, 105)
        on_box = idx >= 0
        cols[on_box] = box_cols[np.flatnonzero(near)[idx[on_box]]]
        # window stripes on facades so the colour image has texture
        p = centers[i] + dirs * t[:, None]
        stripe = on_box & ((np.floor(p[:, 2] / 3.0) % 2) == 1)
        cols[stripe] = (cols[stripe] * 0.6).astype(np.uint8)
        colors[i] = cols.reshape(h, w, 3)
    return CityScene(
        extrinsics=ext, intrinsics=np.repeat(K_img[None], n_frames, 0), depth=depth, sky=sky, colors=colors,
        depth_to_image=A, image_hw=(h * image_scale, w * image_scale), names=names, boxes=boxes,
    )


def make_ring_scene(
    n_frames: int, seed: int = 0, radius: float = 30.0, depth_hw: tuple[int, int] = (24, 32),
) -> CityScene:
    """Cameras on a circle around a plaza of towers, looking inward (+-25 degrees): a loop for drift tests."""
    rng = np.random.default_rng(seed)
    boxes, cols = [], []
    for k in range(6):
        a = 2 * math.pi * k / 6
        cx, cy = 9.0 * math.cos(a), 9.0 * math.sin(a)
        half = rng.uniform(2.0, 3.5)
        boxes.append([cx - half, cy - half, 0.0, cx + half, cy + half, rng.uniform(8.0, 30.0)])
        cols.append(rng.integers(60, 230, 3))
    ang = 2 * math.pi * (np.arange(n_frames) + rng.uniform(-0.3, 0.3, n_frames)) / n_frames
    r = radius + rng.uniform(-2.0, 2.0, n_frames)
    centers = np.stack([r * np.cos(ang), r * np.sin(ang), rng.uniform(1.4, 2.0, n_frames)], -1)
    yaw = ang + math.pi + np.radians(rng.uniform(-25.0, 25.0, n_frames))
    pitch = np.radians(rng.uniform(-5.0, 15.0, n_frames))
    fwd = np.stack([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)], -1)
    names = [f"ring/frame_{i:05d}.png" for i in range(n_frames)]
    return render_scene(centers, _look_rotation(fwd), np.asarray(boxes, float), np.asarray(cols, np.uint8), names,
                        depth_hw)


def ring_clusters(n_frames: int, n_clusters: int, overlap: int = 4) -> Any:
    """Clusters of consecutive frames on a loop; cluster c also holds the first ``overlap`` core frames of c+1.

    The cluster graph is then exactly a ring (each cluster shares frames with its two neighbours only).
    """
    from .partition import Clusters

    bounds = np.linspace(0, n_frames, n_clusters + 1).round().astype(int)
    cid, img, core, pos = [], [], [], []
    for c in range(n_clusters):
        cores = list(range(bounds[c], bounds[c + 1]))
        nxt = bounds[(c + 1) % n_clusters]
        extra = [(nxt + k) % n_frames for k in range(overlap)]
        members = cores + extra
        cid += [c] * len(members)
        img += members
        core += [True] * len(cores) + [False] * len(extra)
        pos += list(range(len(members)))
    m = len(cid)
    return Clusters(cluster_id=np.array(cid, np.int64), image_id=np.array(img, np.int64), core=np.array(core),
                    component_id=np.zeros(m, np.int64), position=np.array(pos, np.int64),
                    nbr_offsets=np.zeros(m + 1, np.int64), nbr_values=np.zeros(0, np.int64))


def covisibility_graph(
    scene: CityScene, k: int = 10, voxel: float = 4.0, min_weight: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric top-k graph from shared surface voxels (cosine of voxel-occupancy vectors).

    Returns (indptr, indices, weights, component) like ``store.zarr/graph``; component ids are ranked by size.
    """
    n = scene.n
    rows, keys = [], []
    for i in range(n):
        from .geometry import unproject_depth

        pts = unproject_depth(scene.depth[i], scene.extrinsics[i], _depth_K(scene, i))[~scene.sky[i]]
        vox = np.unique(np.floor(pts / voxel).astype(np.int64), axis=0)
        keys.append(vox)
        rows.append(np.full(len(vox), i))
    allv = np.concatenate(keys)
    _, col = np.unique(allv, axis=0, return_inverse=True)
    M = sp.csr_matrix((np.ones(len(col), np.float32), (np.concatenate(rows), col.ravel())), shape=(n, col.max() + 1))
    norms = np.sqrt(np.asarray(M.sum(1)).ravel())
    C = (M @ M.T).tocsr()
    C.setdiag(0)
    C.eliminate_zeros()
    C = C.tocoo()
    wgt = C.data / (norms[C.row] * norms[C.col])
    keep = wgt >= min_weight
    r, c, wv = C.row[keep], C.col[keep], wgt[keep]
    order = np.lexsort((-wv, r))
    r, c, wv = r[order], c[order], wv[order]
    start = np.searchsorted(r, np.arange(n))
    rank = np.arange(len(r)) - start[r]
    top = rank < k
    return symmetric_csr_with_components(r[top], c[top], wv[top], n)


def _depth_K(scene: CityScene, i: int) -> np.ndarray:
    A = np.vstack([scene.depth_to_image, [0, 0, 1]])
    return np.linalg.solve(A, scene.intrinsics[i])


@dataclass
class NoiseModel:
    """Errors of the per-cluster "reconstructions" (all relative, so they are scale free)."""

    depth_noise: float = 0.05  # std of multiplicative per-pixel depth noise
    outlier_fraction: float = 0.2  # pixels of shared frames whose depth is wrong (x U(0.3, 3))
    outliers_everywhere: bool = False  # also corrupt frames that only one cluster has
    rotation_noise_deg: float = 0.0  # per-frame camera rotation noise (std, degrees)
    translation_noise: float = 0.0  # per-frame camera centre noise, std relative to the cluster's median depth
    scale_range: tuple[float, float] = (0.2, 5.0)  # log-uniform random scale of each cluster's gauge


@dataclass
class SyntheticRun:
    """A run directory made from a synthetic scene, plus the truth needed to score merge on it."""

    root: Path
    scene: CityScene
    cluster_ids: np.ndarray
    cluster_from_world: dict[int, np.ndarray]  # true Sim(3) (4x4): cluster coords = S @ world coords
    partition_report: dict[str, Any] = field(default_factory=dict)
    drift: dict[int, Any] = field(default_factory=dict)  # cluster -> (image_ids, D) as passed to write_run


def _clusters_from_partition(indptr, indices, weights, component, cfg: PartitionConfig):
    from .partition import partition_graph

    return partition_graph(indptr, indices, weights, component, cfg)


def write_run(
    run_dir: str | Path, scene: CityScene, graph: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    clusters: Any, noise: NoiseModel | None = None, seed: int = 0, write_images: bool = False,
    config: PipelineConfig | None = None, extra_transform: Callable[[int, np.ndarray], np.ndarray] | None = None,
    skip_clusters: tuple[int, ...] = (), drift: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> SyntheticRun:
    """Write images/clusters tables, the graph and per-cluster reconstructions (+ stage markers) to ``run_dir``.

    ``clusters`` is a :class:`sparse_vggt.partition.Clusters`. ``extra_transform(cluster_id, world_to_cluster)``
    may replace a cluster's true gauge (used to inject drift). ``skip_clusters`` are left unreconstructed (to test
    missing clusters). ``drift[cluster_id] = (image_ids, D)`` reconstructs those frames of that cluster (cameras
    and depth together) in the gauge ``D @ S`` instead of ``S``, like a reconstruction that drifted by ``D`` before
    reaching them (the pairwise alignment through those frames then carries the error). With ``write_images`` the
    colour images are written as PNG under ``<run>/photos``.
    """
    noise = noise or NoiseModel()
    rng = np.random.default_rng(seed)
    config = config or PipelineConfig()
    store = RunStore.create_or_open(run_dir, config)
    photos = Path(run_dir) / "photos"
    H, W = scene.image_hw
    if write_images:
        from PIL import Image

        for i, name in enumerate(scene.names):
            path = photos / name
            path.parent.mkdir(parents=True, exist_ok=True)
            img = np.repeat(np.repeat(scene.colors[i], int(scene.depth_to_image[1, 1]), 0),
                            int(scene.depth_to_image[0, 0]), 1)
            Image.fromarray(img).save(path)
    n = scene.n
    images = pa.table({
        "image_id": pa.array(np.arange(n, dtype=np.int64)),
        "path": pa.array(scene.names),
        "sha256": pa.array([f"synthetic{i:060d}" for i in range(n)]),
        "width": pa.array(np.full(n, W, np.int64)),
        "height": pa.array(np.full(n, H, np.int64)),
        "orientation": pa.array(np.ones(n, np.int64)),
        "focal_px": pa.array(scene.intrinsics[:, 0, 0].astype(np.float64)),
        "gps_lat": pa.array([None] * n, pa.float64()),
        "gps_lon": pa.array([None] * n, pa.float64()),
        "gps_alt": pa.array([None] * n, pa.float64()),
        "timestamp": pa.array([None] * n, pa.float64()),
        "chunk_id": pa.array(np.zeros(n, np.int64)),
        "status": pa.array(["ok"] * n),
        "duplicates": pa.array([[] for _ in range(n)], pa.list_(pa.string())),
    }).replace_schema_metadata({b"photos_root": str(photos.resolve()).encode()})
    store.write_table("images", images)
    store.stage_finished("scan", {"images": n, "synthetic": True})
    indptr, indices, weights, component = graph
    g = store.group("graph")
    for name, arr in (("indptr", indptr), ("indices", indices), ("weights", weights), ("component", component)):
        store.write_array(g, name, np.asarray(arr))
    g.attrs.update({"method": "synthetic-voxels"})
    store.stage_finished("graph", {"synthetic": True, "edges": int(len(indices) // 2)})
    store.write_table("clusters", clusters.to_table())
    store.stage_finished("partition", {"synthetic": True, "clusters": clusters.n_clusters})

    shared_count = np.bincount(clusters.image_id, minlength=n)
    cids = np.unique(clusters.cluster_id)
    truth: dict[int, np.ndarray] = {}
    h, w = scene.depth.shape[1:]
    for cid in cids:
        rows = np.flatnonzero(clusters.cluster_id == cid)
        rows = rows[np.argsort(clusters.position[rows], kind="stable")]
        ids = clusters.image_id[rows]
        E = scene.extrinsics[ids]
        # VGGT-like gauge: reference frame at the origin, random scale
        scale = math.exp(rng.uniform(math.log(noise.scale_range[0]), math.log(noise.scale_range[1])))
        E0 = np.vstack([E[0], [0, 0, 0, 1]])
        S = sim3_from_parts(scale, np.eye(3), np.zeros(3)) @ E0  # cluster <- world
        if extra_transform is not None:
            S = extra_transform(int(cid), S)
        truth[int(cid)] = S
        S_f = np.repeat(S[None], len(ids), 0)  # per-frame gauge (drift moves some frames)
        if drift and int(cid) in drift:
            moved, D = drift[int(cid)]
            S_f[np.isin(ids, moved)] = D @ S
        s = np.cbrt(np.linalg.det(S_f[:, :3, :3]))
        RS, tS = S_f[:, :3, :3] / s[:, None, None], S_f[:, :3, 3]
        Rc = E[:, :, :3] @ np.swapaxes(RS, 1, 2)
        tc = s[:, None] * E[:, :, 3] - (Rc @ tS[:, :, None])[..., 0]
        if noise.rotation_noise_deg > 0:
            dR = Rotation.from_rotvec(rng.normal(0, math.radians(noise.rotation_noise_deg), (len(ids), 3))).as_matrix()
            Rc_noisy = dR @ Rc
        else:
            Rc_noisy = Rc
        centers = -(np.swapaxes(Rc, 1, 2) @ tc[..., None])[..., 0]
        if noise.translation_noise > 0:
            med = float(np.median(scene.depth[ids][~scene.sky[ids]])) if (~scene.sky[ids]).any() else 1.0
            centers = centers + rng.normal(0, noise.translation_noise * med, centers.shape) * s[:, None]
        tc = -(Rc_noisy @ centers[..., None])[..., 0]
        ext = np.concatenate([Rc_noisy, tc[..., None]], -1).astype(np.float32)
        depth = scene.depth[ids].astype(np.float64) * s[:, None, None]
        depth *= 1.0 + rng.normal(0, noise.depth_noise, depth.shape)
        conf = 1.0 + rng.gamma(2.0, 2.0, depth.shape)
        bad_frames = (shared_count[ids] > 1) | noise.outliers_everywhere
        out = (rng.random(depth.shape) < noise.outlier_fraction) & bad_frames[:, None, None]
        depth[out] *= rng.uniform(0.3, 3.0, int(out.sum()))
        sky = scene.sky[ids]
        conf[sky] = 1.0
        depth = np.maximum(depth, 1e-3 * s[:, None, None])
        if int(cid) in skip_clusters:
            continue
        path = f"clusters/{int(cid)}"
        store.remove_group(path)
        grp = store.group(path)
        store.write_array(grp, "extrinsics", ext)
        store.write_array(grp, "intrinsics", scene.intrinsics[ids].astype(np.float32))
        store.write_array(grp, "depth", depth.astype(np.float16), chunks=(1, h, w))
        store.write_array(grp, "depth_conf", conf.astype(np.float16), chunks=(1, h, w))
        store.write_array(grp, "image_ids", ids.astype(np.int64))
        store.write_array(grp, "depth_to_image", np.repeat(scene.depth_to_image[None], len(ids), 0).astype(np.float32))
        store.mark_unit_complete(path, model="synthetic", k=0, dtype="float16", device="cpu", frames=len(ids))
    if not skip_clusters:
        store.stage_finished("reconstruct", {"synthetic": True, "clusters": int(len(cids)),
                                             "noise": dataclasses.asdict(noise)})
    return SyntheticRun(root=Path(run_dir), scene=scene, cluster_ids=cids, cluster_from_world=truth,
                        drift=dict(drift or {}))


def synthetic_run(
    run_dir: str | Path, n_frames: int = 400, max_cluster_frames: int = 64, min_overlap_frames: int = 8,
    noise: NoiseModel | None = None, seed: int = 0, depth_hw: tuple[int, int] = (24, 32),
    write_images: bool = False, config: PipelineConfig | None = None,
    clusterer: Callable[..., Any] | None = None, **kwargs: Any,
) -> SyntheticRun:
    """Scene -> covisibility graph -> real partitioner (or ``clusterer``) -> run directory with reconstructions."""
    scene = make_city_scene(n_frames, seed=seed, depth_hw=depth_hw)
    graph = covisibility_graph(scene)
    pcfg = PartitionConfig(max_cluster_frames=max_cluster_frames, min_overlap_frames=min_overlap_frames, seed=seed)
    config = config or PipelineConfig()
    config.partition = pcfg
    clusters, report = (clusterer or _clusters_from_partition)(*graph, pcfg)
    run = write_run(run_dir, scene, graph, clusters, noise=noise, seed=seed, write_images=write_images,
                    config=config, **kwargs)
    run.partition_report = report
    return run


def synthetic_city_graph(n: int, k: int = 10, seed: int = 0, outliers: float = 0.002, plazas: float = 0.1
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A k-NN covisibility graph of photos taken along the streets of a grid city (plus plazas and outliers).

    Frames lie on random streets of a square street grid (jittered across the street), a fraction ``plazas`` in
    dense blobs around intersections and a fraction ``outliers`` anywhere; each frame links to its ``k`` nearest
    frames with weight ``exp(-d / (8 s))`` (s = mean spacing along a street) and links longer than ``40 s`` are
    dropped, so far outliers become isolated frames. Returns (indptr, indices, weights, component).
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    streets = max(2, int(round(math.sqrt(n) / 12)))
    gap = 1.0 / streets
    n_out = int(n * outliers)
    n_pl = int(n * plazas)
    n_st = n - n_out - n_pl
    spacing = 2 * streets * 1.0 / max(1, n_st)
    horiz = rng.random(n_st) < 0.5
    line = (rng.integers(0, streets, n_st) + 0.5) * gap
    along = rng.random(n_st)
    across = line + rng.normal(0, spacing * 2, n_st)
    xy_st = np.where(horiz[:, None], np.c_[along, across], np.c_[across, along])
    centers = (rng.integers(0, streets, (max(1, n_pl // 200 + 1), 2)) + 0.5) * gap
    which = rng.integers(0, len(centers), n_pl)
    xy_pl = centers[which] + rng.normal(0, gap * 0.08, (n_pl, 2))
    xy_out = rng.random((n_out, 2)) * 1.2 - 0.1
    xy = np.concatenate([xy_st, xy_pl, xy_out])[rng.permutation(n)]
    tree = cKDTree(xy)
    kk = min(k + 1, n)
    dist, idx = tree.query(xy, k=kk, workers=2)
    dist, idx = dist[:, 1:], idx[:, 1:]
    rows = np.repeat(np.arange(n), kk - 1)
    cols = idx.ravel()
    d = dist.ravel()
    keep = (d <= 40 * spacing) & (cols < n)
    rows, cols, d = rows[keep], cols[keep], d[keep]
    wgt = np.exp(-d / (8 * spacing)).astype(np.float32)
    return symmetric_csr_with_components(rows, cols, wgt, n)


def symmetric_csr_with_components(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n: int
                                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed weighted pairs -> the graph stage's arrays: symmetric CSR (max weight of both directions) and
    component ids numbered by decreasing component size (0 = largest), as synthetic graphs need them."""
    A = sp.csr_matrix((np.asarray(weights, np.float32), (rows, cols)), shape=(n, n))
    A = A.maximum(A.T).tocsr()
    A.sort_indices()
    ncomp, lab = connected_components(A, directed=False)
    sizes = np.bincount(lab)
    rank = np.empty(ncomp, np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(ncomp)
    return A.indptr.astype(np.int64), A.indices.astype(np.int64), A.data.astype(np.float32), rank[lab]
