"""merge: city-scale accuracy on a synthetic scene, loop drift, fusion, bad inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sparse_vggt import synthetic as syn
from sparse_vggt.config import MergeConfig, PipelineConfig
from sparse_vggt.evaluate import evaluate_poses
from sparse_vggt.geometry import (
    GeometryError, camera_centers, sim3_exp, sim3_from_parts, sim3_inverse, sim3_log, sim3_parts, umeyama,
)
from sparse_vggt.merge import MergeError, run as merge
from sparse_vggt.merge.pose_graph import pose_graph, spanning_tree_init
from sparse_vggt.merge.sim3 import robust_sim3
from sparse_vggt.store import RunStore, RunStoreError

EMPTY_GRAPH = lambda n: (np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),  # noqa: E731
                         np.zeros(n, np.int64))


def _cfg(**merge_fields) -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.merge.colors = False
    for k, v in merge_fields.items():
        setattr(cfg.merge, k, v)
    return cfg


def _poses(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = RunStore.open(run_dir).group("merge/images", create=False)
    return g["image_ids"][...], g["extrinsics"][...], g["component"][...]


def _score(run: syn.SyntheticRun) -> dict:
    ids, ext, comp = _poses(run.root)
    names = [run.scene.names[i] for i in ids]
    return evaluate_poses(names, ext, run.scene.names, run.scene.extrinsics, comp)


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> tuple[syn.SyntheticRun, dict]:
    root = tmp_path_factory.mktemp("city") / "run"
    noise = syn.NoiseModel(depth_noise=0.05, outlier_fraction=0.2)
    run = syn.synthetic_run(root, n_frames=2000, max_cluster_frames=128, min_overlap_frames=8, noise=noise, seed=3)
    manifest = merge(root, _cfg())
    return run, manifest


def test_city_scale_merge_meets_accuracy_targets(city: tuple[syn.SyntheticRun, dict]) -> None:
    run, manifest = city
    assert run.scene.n >= 2000 and len(run.cluster_ids) >= 20
    assert manifest["clusters_merged"] == len(run.cluster_ids) and manifest["components"] == 1
    assert manifest["images_posed"] == run.scene.n
    res = _score(run)
    assert res["images_matched"] == run.scene.n
    assert res["ate_rel_extent"] <= 0.01
    assert res["rotation_error_mean_deg"] <= 0.5
    # per-edge numbers are reported; overlaps carry 20% outliers in each cluster, so ~36% of pairs are outliers
    edges = RunStore.open(run.root).group("merge", create=False).attrs["residuals"]
    assert len(edges) == manifest["edges"] >= len(run.cluster_ids) - 1
    for e in edges:
        assert e["accepted"], e
        assert 0.45 < e["inlier_ratio"] < 0.85
        assert e["rmse_rel"] < 0.1 and e["correspondences"] >= 100


def test_city_scale_cluster_transforms_match_truth(city: tuple[syn.SyntheticRun, dict]) -> None:
    """cluster_sim3 maps cluster coordinates to the merged world: world_truth <- merged is one global Sim(3)."""
    run, _ = city
    g = RunStore.open(run.root).group("merge", create=False)
    cids, T = g["cluster_ids"][...], g["cluster_sim3"][...]
    # truth: merged <- cluster = T_c and cluster <- world = S_c, so T_c S_c must be the same for every cluster
    G = np.stack([T[k] @ run.cluster_from_world[int(c)] for k, c in enumerate(cids)])
    ref = G[0]
    xi = sim3_log(sim3_inverse(ref)[None] @ G)
    assert np.degrees(np.linalg.norm(xi[:, 3:6], axis=1)).max() < 0.5
    assert np.abs(xi[:, 6]).max() < 0.01


def test_fused_points_and_tracks_land_on_true_surfaces(city: tuple[syn.SyntheticRun, dict]) -> None:
    run, manifest = city
    store = RunStore.open(run.root)
    gp = store.group("merge/points", create=False)
    xyz, off = gp["xyz"][...].astype(np.float64), gp["track_offsets"][...]
    timg, txy = gp["track_image_ids"][...], gp["track_xy"][...]
    assert len(xyz) == manifest["points"] > 10_000
    assert off[-1] == len(timg) and (np.diff(off) >= 1).all()
    # the first observation of each point is a real pixel: its true 3D point is the ray-cast depth there
    ids, ext, _ = _poses(run.root)
    S = umeyama(camera_centers(ext), camera_centers(run.scene.extrinsics[ids]))
    s, R, t = sim3_parts(S)
    world = xyz @ (s * R).T + t
    img = timg[off[:-1]]
    uv = np.rint(txy[off[:-1]] / 2.0).astype(int)  # synthetic depth maps are half the image resolution
    d = run.scene.depth[img, uv[:, 1], uv[:, 0]]
    K = run.scene.intrinsics[img]
    xy = txy[off[:-1]].astype(np.float64)
    cam = np.stack([(xy[:, 0] - K[:, 0, 2]) * d / K[:, 0, 0], (xy[:, 1] - K[:, 1, 2]) * d / K[:, 1, 1], d], -1)
    E = run.scene.extrinsics[img]
    truth = np.einsum("nji,nj->ni", E[:, :, :3], cam - E[:, :, 3])
    rel = np.linalg.norm(world - truth, axis=1) / d
    assert np.median(rel) < 0.06  # 5% depth noise
    assert (rel > 0.25).mean() < 0.03  # outliers mostly removed by confidence + cross-cluster consistency
    assert manifest["fusion"]["pixels_inconsistent"] > 0


def test_rerun_is_a_noop(city: tuple[syn.SyntheticRun, dict]) -> None:
    run, manifest = city
    again = merge(run.root, _cfg())
    assert again == manifest


def _ring(tmp: Path, optimize: bool) -> tuple[syn.SyntheticRun, dict]:
    n, nc = 96, 8
    scene = syn.make_ring_scene(n, seed=1)
    clusters = syn.ring_clusters(n, nc, overlap=4)
    # every cluster drifted by the same small Sim(3) before reaching the frames it shares with the next one
    D = sim3_from_parts(1.03, Rotation.from_rotvec([0.0, 0.0, np.radians(2.0)]).as_matrix(), np.array([0.3, 0, 0]))
    drift = {c: (clusters.image_id[(clusters.cluster_id == c) & ~clusters.core], D) for c in range(nc)}
    cfg = _cfg(optimize=optimize)
    run = syn.write_run(tmp, scene, EMPTY_GRAPH(n), clusters, drift=drift, config=cfg, seed=2)
    return run, merge(tmp, cfg)


def test_ring_drift_pose_graph_beats_spanning_tree(tmp_path: Path) -> None:
    tree_run, tree_m = _ring(tmp_path / "tree", optimize=False)
    pg_run, pg_m = _ring(tmp_path / "pg", optimize=True)
    assert tree_m["edges_accepted"] == pg_m["edges_accepted"] == 8  # a ring: 8 edges, spanning tree uses 7
    tree, pg = _score(tree_run), _score(pg_run)
    assert pg["ate_rel_extent"] < 0.5 * tree["ate_rel_extent"]
    assert pg["rotation_error_mean_deg"] < tree["rotation_error_mean_deg"]
    info = pg_m["pose_graph"][0]
    assert info["cost_final"] < 0.2 * info["cost_initial"] and info["iterations"] >= 1
    # the tree leaves the whole loop error on the dropped edge; the pose graph spreads it over all edges
    loop = lambda run: [e["global_rot_deg"] for e in RunStore.open(run.root).group("merge").attrs["residuals"]]  # noqa
    assert max(loop(pg_run)) < 0.5 * max(loop(tree_run))


def test_spanning_tree_and_pose_graph_are_exact_on_consistent_edges() -> None:
    rng = np.random.default_rng(0)
    n = 6
    truth = sim3_exp(np.concatenate([rng.normal(0, 2, (n, 6)), rng.normal(0, 0.5, (n, 1))], 1))
    truth[0] = np.eye(4)
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 0], [1, 4]])
    meas = sim3_inverse(truth[pairs[:, 0]]) @ truth[pairs[:, 1]]  # X_a = S X_b with X_w = T X
    T = spanning_tree_init(n, pairs, meas, np.arange(len(pairs), dtype=float) + 1, root=0)
    np.testing.assert_allclose(T, truth, atol=1e-9)
    noisy = T.copy()
    noisy[1:] = noisy[1:] @ sim3_exp(rng.normal(0, 0.05, (n - 1, 7)))
    out, info = pose_graph(noisy, pairs, meas, np.ones(n), np.ones(len(pairs)), root=0)
    np.testing.assert_allclose(out, truth, atol=1e-6)
    assert info["cost_final"] < 1e-12 < info["cost_initial"]


def test_robust_sim3_recovers_transform_with_outliers_and_rejects_collinear() -> None:
    rng = np.random.default_rng(1)
    xb = rng.uniform(-5, 5, (3000, 3)) + [0, 0, 20]
    S = sim3_from_parts(2.5, Rotation.random(random_state=3).as_matrix(), np.array([1.0, -3.0, 2.0]))
    xa = xb @ S[:3, :3].T + S[:3, 3]
    xa *= 1 + rng.normal(0, 0.02, (len(xa), 1))
    bad = rng.random(len(xa)) < 0.4
    xa[bad] += rng.normal(0, 20, (int(bad.sum()), 3))
    norm = np.linalg.norm(xa, axis=1)
    est, stats = robust_sim3(xb, xa, np.ones(len(xa)), norm, MergeConfig(), rng)
    xi = sim3_log(sim3_inverse(S) @ est)
    assert np.degrees(np.linalg.norm(xi[3:6])) < 0.2 and abs(xi[6]) < 0.005
    assert 0.5 < stats["inlier_ratio"] < 0.65
    line = np.linspace(0, 1, 500)[:, None] * np.array([1.0, 2.0, 3.0]) + [0, 0, 10]
    with pytest.raises(GeometryError, match="collinear"):
        robust_sim3(line, line * 2.0, np.ones(500), np.full(500, 10.0), MergeConfig(), rng)


@pytest.fixture()
def small(tmp_path: Path):
    def make(**kw) -> syn.SyntheticRun:
        return syn.synthetic_run(tmp_path / "run", n_frames=300, max_cluster_frames=64, min_overlap_frames=6,
                                 seed=5, **kw)
    return make


def test_bad_depth_cluster_is_excluded_and_partial_nan_is_tolerated(small) -> None:
    run = small()
    store = RunStore.open(run.root)
    cids = [int(c) for c in run.cluster_ids]
    assert len(cids) >= 4
    bad, partial = cids[1], cids[2]
    d = store.zarr[f"clusters/{bad}/depth"]
    arr = d[...]
    arr[:, :, : arr.shape[2] * 3 // 4] = np.nan
    arr[:, 0, -1] = np.inf
    d[...] = arr
    d2 = store.zarr[f"clusters/{partial}/depth"]
    arr2 = d2[...]
    arr2[:, ::5, :] = np.nan  # 20% NaN rows: below merge.max_nonfinite_fraction, pixels simply ignored
    d2[...] = arr2
    # the model wrote these depths: re-mark the units (markers checksum their data; an edit behind a marker's back
    # is storage damage and is redone, see tests/test_faults.py)
    for c in (bad, partial):
        store.mark_unit_complete(f"clusters/{c}")
    m = merge(run.root, _cfg())
    assert str(bad) in m["clusters_excluded"] and "non-finite" in m["clusters_excluded"][str(bad)]
    assert str(partial) not in m["clusters_excluded"]
    # images whose core cluster was excluded take their pose from an included overlap cluster, or stay unposed
    ids, ext, comp = _poses(run.root)
    assert np.isfinite(ext).all()
    assert m["images_posed"] < run.scene.n
    res = _score(run)
    assert res["ate_rel_extent"] < 0.01 and res["rotation_error_mean_deg"] < 0.5
    attrs = store.group("merge").attrs
    assert str(bad) in attrs["excluded_clusters"]


def test_force_recomputes_and_units_are_refused(small, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished merge is returned as is; ``force`` redoes it (same numbers); merge has no units to select."""
    import sparse_vggt.merge.stage as stage

    run = small()
    first = merge(run.root, _cfg())
    assert first["edges"] > 0
    calls = []
    real = stage.estimate_edge
    monkeypatch.setattr(stage, "estimate_edge", lambda *a: calls.append(1) or real(*a))
    assert merge(run.root, _cfg()) == first and not calls
    again = merge(run.root, _cfg(), force=True)
    assert len(calls) == first["edges"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    with pytest.raises(ValueError, match="no units"):
        merge(run.root, _cfg(), units=[0])


def test_missing_cluster_is_reported(small) -> None:
    run = small(skip_clusters=(0,))
    store = RunStore.open(run.root)
    assert not store.is_stage_complete("reconstruct")
    m = merge(run.root, _cfg())
    assert "missing reconstruction" in m["clusters_excluded"]["0"]
    assert m["clusters_merged"] == len(run.cluster_ids) - 1


def test_edge_without_valid_overlap_is_rejected_with_reason(tmp_path: Path) -> None:
    n, nc = 60, 5
    scene = syn.make_ring_scene(n, seed=4)
    clusters = syn.ring_clusters(n, nc, overlap=4)
    run = syn.write_run(tmp_path / "run", scene, EMPTY_GRAPH(n), clusters, config=_cfg(), seed=1)
    store = RunStore.open(run.root)
    # cluster 2's copies of the frames it shares with cluster 3 have no valid depth
    d = store.zarr["clusters/2/depth"]
    arr = d[...]
    ids = store.zarr["clusters/2/image_ids"][...]
    core = clusters.core[clusters.cluster_id == 2]
    arr[~core] = np.nan
    d[...] = arr
    store.mark_unit_complete("clusters/2")  # as if the model wrote these depths (markers checksum their data)
    m = merge(run.root, _cfg())
    assert m["edges"] == nc and m["edges_accepted"] == nc - 1
    assert "too few valid correspondences" in m["edges_rejected"]["2-3"]
    assert m["components"] == 1  # the ring stays connected through the other edges
    assert len(ids) == int((clusters.cluster_id == 2).sum())


def test_camera_agreement_measures_shared_camera_disagreement() -> None:
    """Edges are also checked on the shared frames' cameras (depth and pose come from different model heads; with
    random weights the depths of a far, narrow-FoV patch align while the cameras do not)."""
    from sparse_vggt.merge.clusters import ClusterData
    from sparse_vggt.merge.sim3 import camera_agreement

    rng = np.random.default_rng(0)
    R = Rotation.random(3, random_state=1).as_matrix()
    C = rng.normal(0, 5, (3, 3))
    Ea = np.concatenate([R, -(R @ C[:, :, None])], 2)
    S = sim3_from_parts(2.0, Rotation.random(random_state=2).as_matrix(), np.array([1.0, 2.0, 3.0]))  # X_a = S X_b
    Sinv = sim3_inverse(S)
    s, RS, tS = sim3_parts(Sinv)
    Rb = R @ RS.T
    Eb = np.concatenate([Rb, (s * Ea[:, :, 3])[:, :, None] - Rb @ tS[:, None]], 2)  # the same cameras in b's gauge

    def cluster(cid: int, E: np.ndarray) -> ClusterData:
        return ClusterData(cid=cid, image_ids=np.arange(3), extrinsics=E, intrinsics=np.tile(np.eye(3), (3, 1, 1)),
                           depth_to_image=np.zeros((3, 2, 3)), depth_hw=(2, 2), core=np.ones(3, bool), length=10.0,
                           index={0: 0, 1: 1, 2: 2})

    rot, ctr = camera_agreement(S, cluster(0, Ea), cluster(1, Eb), np.arange(3))
    assert rot < 1e-6 and ctr < 1e-9
    turned = Eb.copy()
    turned[:2, :, :3] = Rotation.from_rotvec([0, 0, np.radians(10.0)]).as_matrix() @ turned[:2, :, :3]
    rot, _ = camera_agreement(S, cluster(0, Ea), cluster(1, turned), np.arange(3))
    assert rot == pytest.approx(10.0, abs=1e-6)  # median over the 3 shared frames
    assert MergeConfig().max_camera_rotation_deg < 10.0


def test_zero_overlap_clusters_become_separate_components(tmp_path: Path) -> None:
    n, nc = 48, 3
    scene = syn.make_ring_scene(n, seed=4)
    clusters = syn.ring_clusters(n, nc, overlap=0)
    run = syn.write_run(tmp_path / "run", scene, EMPTY_GRAPH(n), clusters, config=_cfg(), seed=1)
    m = merge(run.root, _cfg())
    assert m["edges"] == 0 and m["components"] == nc and m["images_posed"] == n
    res = _score(run)
    assert res["components"] == nc
    assert res["ate_rel_extent"] < 1e-3  # each component is exact up to its own similarity
    assert res["rra"]["30"] < 0.5  # pairs across components count as failures


def test_errors_for_unusable_runs(tmp_path: Path, small) -> None:
    with pytest.raises(RunStoreError):
        merge(tmp_path / "nope", _cfg())
    run = small()
    store = RunStore.open(run.root)
    for c in run.cluster_ids:
        store.remove_group(f"clusters/{int(c)}")
    store.stage_invalidate("reconstruct")
    with pytest.raises(MergeError, match="no usable cluster"):
        merge(run.root, _cfg())
    fresh = RunStore.create_or_open(tmp_path / "fresh", PipelineConfig())
    with pytest.raises(RunStoreError, match="partition"):
        merge(fresh.root, _cfg())
    shutil.rmtree(fresh.root)
