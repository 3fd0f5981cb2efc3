"""synthetic scenes: exact ray-cast depth, real partitioner, per-cluster gauges, noise/outlier/drift model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparse_vggt import synthetic as syn
from sparse_vggt.geometry import camera_centers, sim3_apply, sim3_from_parts, sim3_inverse, unproject_depth
from sparse_vggt.store import RunStore


def _depth_K(scene: syn.CityScene) -> np.ndarray:
    A = np.vstack([scene.depth_to_image, [0, 0, 1]])
    return np.linalg.solve(A, scene.intrinsics[0])


def test_city_depth_is_an_exact_ray_cast() -> None:
    scene = syn.make_city_scene(150, seed=2)
    assert scene.n == 150 and len(set(scene.names)) == 150
    pts = unproject_depth(scene.depth, scene.extrinsics, _depth_K(scene))  # (N,h,w,3)
    hit = pts[~scene.sky]
    assert len(hit) > 0.5 * scene.sky.size
    on_ground = np.abs(hit[:, 2]) < 1e-3
    b = scene.boxes
    inside = ((hit[:, None, :] >= b[None, :, :3] - 1e-3) & (hit[:, None, :] <= b[None, :, 3:] + 1e-3)).all(-1)
    on_face = (np.abs(hit[:, None, :] - b[None, :, :3]) < 1e-3) | (np.abs(hit[:, None, :] - b[None, :, 3:]) < 1e-3)
    on_box = (inside & on_face.any(-1)).any(1)
    assert (on_ground | on_box).mean() > 0.999
    assert np.allclose(scene.depth[scene.sky], syn.SKY_DEPTH)


def test_written_clusters_are_the_truth_in_their_own_gauge(tmp_path: Path) -> None:
    noise = syn.NoiseModel(depth_noise=0.0, outlier_fraction=0.0)
    run = syn.synthetic_run(tmp_path / "run", n_frames=200, max_cluster_frames=48, min_overlap_frames=6,
                            noise=noise, seed=1)
    store = RunStore.open(run.root)
    table = store.read_table("clusters")
    cid = table.column("cluster_id").to_numpy()
    assert np.bincount(cid).max() <= 48
    is_core = np.array([r == "core" for r in table.column("role").to_pylist()])
    assert sorted(table.column("image_id").to_numpy()[is_core]) == list(range(200))  # each image core once
    assert store.is_stage_complete("reconstruct") and len(run.cluster_ids) >= 4
    for cid in run.cluster_ids:
        g = store.group(f"clusters/{int(cid)}")
        ids = g["image_ids"][...]
        S = run.cluster_from_world[int(cid)]
        ext = g["extrinsics"][...].astype(np.float64)
        # cameras: centres map back to the truth; the reference frame sits at the origin
        back = sim3_apply(sim3_inverse(S), camera_centers(ext))
        np.testing.assert_allclose(back, camera_centers(run.scene.extrinsics[ids]), atol=1e-3)
        np.testing.assert_allclose(camera_centers(ext[:1]), 0, atol=1e-4)
        # depth: unprojected cluster points map back onto the true surface points (fp16 storage)
        K = np.linalg.solve(np.vstack([g["depth_to_image"][0], [0, 0, 1]]), g["intrinsics"][0])
        pc = unproject_depth(g["depth"][...].astype(np.float64), ext, K)
        pw = unproject_depth(run.scene.depth[ids].astype(np.float64), run.scene.extrinsics[ids], K)
        keep = ~run.scene.sky[ids]
        err = np.linalg.norm(sim3_apply(sim3_inverse(S), pc[keep]) - pw[keep], axis=-1)
        assert np.median(err / run.scene.depth[ids][keep]) < 2e-3


def test_noise_outliers_only_in_shared_frames_and_drift(tmp_path: Path) -> None:
    n = 60
    scene = syn.make_ring_scene(n, seed=3)
    clusters = syn.ring_clusters(n, 4, overlap=5)
    graph = (np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(n, np.int64))
    D = sim3_from_parts(1.1, np.eye(3), np.array([1.0, 0.0, 0.0]))
    moved = clusters.image_id[(clusters.cluster_id == 0) & ~clusters.core]
    run = syn.write_run(tmp_path / "run", scene, graph, clusters, noise=syn.NoiseModel(0.05, 0.2), seed=0,
                        drift={0: (moved, D)})
    g = RunStore.open(run.root).group("clusters/0")
    ids = g["image_ids"][...]
    S = run.cluster_from_world[0]
    true_depth = scene.depth[ids] * np.cbrt(np.linalg.det(S[:3, :3]))
    ratio = g["depth"][...].astype(np.float64) / true_depth
    drifted = np.isin(ids, moved)
    ratio[drifted] /= 1.1  # drifted frames are also scaled by D
    shared = np.bincount(clusters.image_id, minlength=n)[ids] > 1  # frames other clusters also hold
    valid = ~scene.sky[ids]
    far_off = np.abs(ratio - 1) > 0.25  # beyond 5 sigma of the 5% noise: outliers
    assert far_off[~shared][valid[~shared]].mean() < 1e-3
    assert 0.12 < far_off[shared][valid[shared]].mean() < 0.25
    assert 0.04 < np.std(ratio[~shared][valid[~shared]]) < 0.06
    # drifted frames: their cameras are in the gauge D S, the others in S
    C = camera_centers(g["extrinsics"][...].astype(np.float64))
    truth = camera_centers(scene.extrinsics[ids])
    np.testing.assert_allclose(C[drifted], sim3_apply(D @ S, truth[drifted]), atol=1e-3)
    np.testing.assert_allclose(C[~drifted], sim3_apply(S, truth[~drifted]), atol=1e-3)


def test_scene_needs_two_frames() -> None:
    with pytest.raises(ValueError, match="at least 2 frames"):
        syn.make_city_scene(1)
