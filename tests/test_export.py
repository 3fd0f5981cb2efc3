"""export: COLMAP read back by pycolmap, PLY/GLB load with trimesh, report, multi-component, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycolmap
import pytest
import trimesh

from sparse_vggt import synthetic as syn
from sparse_vggt.cli import main
from sparse_vggt.config import PipelineConfig
from sparse_vggt.evaluate import evaluate
from sparse_vggt.export import run as export
from sparse_vggt.merge import run as merge
from sparse_vggt.store import RunStore, RunStoreError


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[syn.SyntheticRun, dict, dict]:
    root = tmp_path_factory.mktemp("exp") / "run"
    run = syn.synthetic_run(root, n_frames=240, max_cluster_frames=64, min_overlap_frames=6, seed=7,
                            write_images=True)
    cfg = PipelineConfig()
    cfg.merge.fuse_stride = 2
    cfg.export.colmap_text = True
    mm = merge(root, cfg)
    return run, mm, export(root, cfg)


def _merged(root: Path) -> dict[str, np.ndarray]:
    store = RunStore.open(root)
    gi, gp = store.group("merge/images"), store.group("merge/points")
    return {"ids": gi["image_ids"][...], "ext": gi["extrinsics"][...], "K": gi["intrinsics"][...],
            "xyz": gp["xyz"][...], "rgb": gp["rgb"][...], "off": gp["track_offsets"][...],
            "timg": gp["track_image_ids"][...], "txy": gp["track_xy"][...]}


@pytest.mark.parametrize("fmt", ["bin", "txt"])
def test_colmap_round_trip_gives_the_same_poses_and_tracks(exported, fmt: str, tmp_path: Path) -> None:
    run, _, manifest = exported
    model = run.root / "export" / "sparse" / "0"
    assert (model / f"images.{fmt}").exists() and (model / f"points3D.{fmt}").exists()
    rec = pycolmap.Reconstruction()
    (rec.read_binary if fmt == "bin" else rec.read_text)(str(model))
    m = _merged(run.root)
    assert rec.num_reg_images() == len(m["ids"]) == run.scene.n
    by_name = {im.name: im for im in rec.images.values()}
    for k, img in enumerate(m["ids"]):
        im = by_name[run.scene.names[img]]
        np.testing.assert_allclose(im.cam_from_world().matrix(), m["ext"][k], atol=1e-6)
        cam = rec.cameras[im.camera_id]
        np.testing.assert_allclose(cam.calibration_matrix(), m["K"][k], atol=1e-4)
        assert (cam.height, cam.width) == run.scene.image_hw
    assert rec.num_points3D() == manifest["points3D"] == len(m["xyz"])
    assert rec.compute_num_observations() == int(m["off"][-1])
    # every observation is the pixel the point came from, so reprojection errors are small (5% depth noise, a
    # voxel average of a few pixels)
    rec.update_point_3d_errors()
    assert rec.compute_mean_reprojection_error() < 2.0
    pts = np.array([p.xyz for p in rec.points3D.values()])
    assert np.allclose(np.sort(pts[:, 2]), np.sort(m["xyz"][:, 2].astype(np.float64)), atol=1e-4)


def test_ply_and_glb_load_with_trimesh_and_carry_colours(exported) -> None:
    run, _, manifest = exported
    m = _merged(run.root)
    cloud = trimesh.load(run.root / "export" / "points.ply")
    assert isinstance(cloud, trimesh.PointCloud) and len(cloud.vertices) == len(m["xyz"])
    np.testing.assert_allclose(np.asarray(cloud.vertices), m["xyz"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], m["rgb"])
    # colours come from the photos (load_image): single-observation points carry their pixel's scene colour
    single = np.flatnonzero(np.diff(m["off"]) == 1)
    img = m["timg"][m["off"][single]]
    uv = np.rint(m["txy"][m["off"][single]] / 2).astype(int)
    truth = run.scene.colors[img, uv[:, 1], uv[:, 0]]
    assert np.median(np.abs(truth.astype(int) - m["rgb"][single]).max(1)) <= 2
    assert len(np.unique(m["rgb"], axis=0)) > 20
    scene = trimesh.load(run.root / "export" / "scene.glb")
    assert isinstance(scene, trimesh.Scene)
    kinds = {type(g).__name__ for g in scene.geometry.values()}
    assert kinds == {"PointCloud", "Path3D"}
    path = next(g for g in scene.geometry.values() if isinstance(g, trimesh.path.Path3D))
    assert len(path.vertices) >= 5 * run.scene.n  # apex + 4 corners per camera frustum


def test_report_has_every_stage_and_the_merge_numbers(exported) -> None:
    run, mm, manifest = exported
    text = (run.root / "export" / "report.md").read_text()
    for stage in ("scan", "graph", "partition", "reconstruct", "merge", "export"):
        assert f"| {stage} |" in text
    assert "## Merge: cluster edges" in text
    assert f"{mm['edges_accepted']} of {mm['edges']} edges accepted" in text
    assert f"{manifest['points3D']} points3D" in text


def test_eval_of_run_and_of_exported_model_agree(exported) -> None:
    run, _, _ = exported
    model = run.root / "export" / "sparse" / "0"
    a = evaluate(run.root, model)
    assert a["images_matched"] == run.scene.n and a["ate_rel_extent"] < 1e-6 and a["auc30"] == 1.0


def test_rerun_noop_and_text_on_request(tmp_path: Path) -> None:
    n = 48
    scene = syn.make_ring_scene(n, seed=4)
    clusters = syn.ring_clusters(n, 3, overlap=0)  # no shared frames: three components
    graph = (np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(n, np.int64))
    cfg = PipelineConfig()
    cfg.merge.colors = False
    run = syn.write_run(tmp_path / "run", scene, graph, clusters, config=cfg)
    with pytest.raises(RunStoreError, match="merge"):
        export(run.root, cfg)
    merge(run.root, cfg)
    m1 = export(run.root, cfg)
    assert [c["component"] for c in m1["components"]] == [0, 1, 2]
    out = run.root / "export"
    for name in ("points.ply", "points_1.ply", "points_2.ply", "scene.glb", "scene_2.glb"):
        assert (out / name).is_file()
    assert not (out / "sparse" / "0" / "images.txt").exists()
    assert sum(pycolmap.Reconstruction(str(out / "sparse" / str(k))).num_reg_images() for k in range(3)) == n
    assert export(run.root, cfg) == m1
    with pytest.raises(ValueError, match="no units"):
        export(run.root, cfg, units=[0])
    (out / "points_1.ply").unlink()
    assert export(run.root, cfg) == m1 and not (out / "points_1.ply").exists()  # finished: nothing redone
    assert export(run.root, cfg, force=True) == m1 and (out / "points_1.ply").is_file()
    # the CLI's --text redoes the export with text files
    assert main(["-q", "export", str(run.root), "--text"]) == 0
    assert (out / "sparse" / "0" / "images.txt").is_file()
    # eval of the run against one component's model: only that component's images match
    assert main(["eval", str(run.root), "--reference", str(out / "sparse" / "1"), "--json"]) == 0


def test_cli_merge_and_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_registered_format_runs_per_component_in_order_and_owns_its_stale_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export format registry: one writer plus one FORMATS entry adds a format; switched off, its paths go."""
    from sparse_vggt.export import formats
    from sparse_vggt.export.context import ComponentContext

    assert list(formats.FORMATS) == ["colmap", "ply", "glb", "pairs", "plots", "rerun"]
    n = 48
    scene = syn.make_ring_scene(n, seed=4)
    clusters = syn.ring_clusters(n, 3, overlap=0)  # three components
    graph = (np.zeros(n + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(n, np.int64))
    cfg = PipelineConfig()
    cfg.merge.colors = False
    cfg.export.plots = False
    run = syn.write_run(tmp_path / "run", scene, graph, clusters, config=cfg)
    merge(run.root, cfg)
    calls: list[str] = []

    def cameras_json(ctx: ComponentContext) -> dict:
        calls.append(f"cameras_json {ctx.component}")
        path = ctx.run.out / f"cameras{ctx.suffix}.json"
        path.write_text(json.dumps({ctx.run.names[int(i)]: E.tolist() for i, E in zip(ctx.image_ids,
                                                                                       ctx.extrinsics)}))
        return {"cameras_json": path.name}

    def spy(name: str, write):
        return lambda ctx: calls.append(f"{name} {getattr(ctx, 'component', '-')}") or write(ctx)

    for name, f in list(formats.FORMATS.items()):
        monkeypatch.setitem(formats.FORMATS, name, formats.ExportFormat(spy(name, f.write), f.enabled,
                                                                        f.per_component, f.stale))
    monkeypatch.setitem(formats.FORMATS, "cameras_json", formats.ExportFormat(cameras_json, per_component=True))
    monkeypatch.setitem(formats.FORMATS, "off", formats.ExportFormat(lambda ctx: {"off": 1}, enabled=lambda c: False,
                                                                      stale=("old_format",)))
    out = run.root / "export"
    (out / "old_format").mkdir(parents=True)
    (out / "old_format" / "left.txt").write_text("from an earlier export")
    man = export(run.root, cfg)
    per_component = ["colmap", "ply", "glb", "cameras_json"]
    assert calls == [f"{f} {k}" for k in range(3) for f in per_component] + ["pairs -"]  # plots, rerun, off: off
    assert [c["cameras_json"] for c in man["components"]] == ["cameras.json", "cameras_1.json", "cameras_2.json"]
    cams = json.loads((out / "cameras_1.json").read_text())
    assert len(cams) == sum(c["images"] for c in man["components"] if c["component"] == 1)
    assert "off" not in man and not (out / "old_format").exists()
