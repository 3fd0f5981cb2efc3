"""Drop-in COLMAP export: images/ root, EXIF-rotated photos, names, camera options, BA, pairs.txt,
plots in report.md, Rerun recording."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
from PIL import Image

from sparse_vggt import synthetic as syn
from sparse_vggt.config import PipelineConfig
from sparse_vggt.export import ExportError, run as export
from sparse_vggt.scan import load_image, run as run_scan
from sparse_vggt.merge import run as merge
from sparse_vggt.store import RunStore


# ------------------------------------------------------------------------------------------------------------
# real photos: an EXIF-6 portrait shot and a name with a space
# ------------------------------------------------------------------------------------------------------------
def _fake_merge(store: RunStore, ids: np.ndarray, hw: list[tuple[int, int]]) -> None:
    """merge/ as the merge stage leaves it, for cameras looking down +z with a centred principal point."""
    n = len(ids)
    E = np.zeros((n, 3, 4))
    E[:, :, :3] = np.eye(3)
    E[:, :, 3] = np.stack([np.arange(n, dtype=float), np.zeros(n), np.zeros(n)], 1)
    K = np.zeros((n, 3, 3))
    for j, (h, w) in enumerate(hw):
        K[j] = [[0.9 * max(h, w), 0, w / 2], [0, 0.9 * max(h, w), h / 2], [0, 0, 1]]
    g = store.group("merge/images")
    store.write_array(g, "image_ids", np.asarray(ids, np.int64))
    store.write_array(g, "extrinsics", E.astype(np.float32))
    store.write_array(g, "intrinsics", K.astype(np.float32))
    store.write_array(g, "component", np.zeros(n, np.int64))
    store.mark_unit_complete("merge", residuals=[], components=[{"component": 0, "clusters": [], "images": n}])
    for s in ("describe", "graph", "partition", "reconstruct", "merge"):
        store.stage_finished(s, {})


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path, sample_photos: Path) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    shutil.copy(fixtures_dir / "edge" / "rotated.jpg", photos / "rotated.jpg")
    others = sorted(sample_photos.glob("*.jpg"))[:2]
    shutil.copy(others[0], photos / "upright.jpg")
    shutil.copy(others[1], photos / "my photo.jpg")
    import pillow_heif

    pillow_heif.register_heif_opener()
    with Image.open(others[0]) as im:  # a phone's HEIC (COLMAP cannot decode HEIC)
        im.convert("RGB").resize((im.width // 2, im.height // 2)).save(photos / "phone.heic")
    run = tmp_path_factory.mktemp("run") / "run"
    run_scan(run, PipelineConfig(), photos=photos)
    store = RunStore.open(run)
    t = store.read_table("images")
    assert t.column("status").to_pylist() == ["ok"] * 4
    ids = t.column("image_id").to_numpy()
    hw = list(zip(t.column("height").to_pylist(), t.column("width").to_pylist()))
    _fake_merge(store, ids, hw)
    return run


def _by_name(rec: pycolmap.Reconstruction) -> dict[str, pycolmap.Image]:
    return {im.name: im for im in rec.images.values()}


def test_exif_rotated_photo_is_written_upright_and_matches_its_camera(photo_run: Path, fixtures_dir: Path) -> None:
    original = fixtures_dir / "edge" / "rotated.jpg"
    with Image.open(original) as raw:
        assert raw.getexif().get(0x0112) == 6 and raw.size == (1063, 780)  # stored sideways
    cfg = PipelineConfig()
    cfg.export.colmap_text = True
    man = export(photo_run, cfg)
    out = photo_run / "export"
    assert man["images_dir"]["upright_copies"] == 2 and man["images_dir"]["linked"] == 2
    rec = pycolmap.Reconstruction()
    rec.read_text(str(out / "sparse" / "0"))
    ims = _by_name(rec)
    assert set(ims) == {"rotated.jpg", "upright.jpg", "my_photo.jpg", "phone.heic.jpg"}
    for name, im in ims.items():
        cam = rec.cameras[im.camera_id]
        path = out / "images" / name
        assert path.is_file(), name
        with Image.open(path) as raw:  # what COLMAP reads: the raw pixels, no EXIF rotation
            assert raw.size == (cam.width, cam.height), name
            assert raw.getexif().get(0x0112, 1) == 1, name
            raw_pixels = np.asarray(raw.convert("RGB"), np.int16)
        # a reader that applies EXIF (OpenCV's default) and one that ignores it see the same image
        assert cv2.imread(str(path)).shape[:2] == cv2.imread(str(path), cv2.IMREAD_IGNORE_ORIENTATION).shape[:2]
        # and those pixels are the upright pixels the pipeline saw (JPEG re-encoding aside)
        upright = np.asarray(load_image(path.resolve() if path.is_symlink() else path), np.int16)
        assert raw_pixels.shape == upright.shape
        assert np.abs(raw_pixels - upright).mean() < 0.5
    rotated = out / "images" / "rotated.jpg"
    assert not rotated.is_symlink()
    diff = np.abs(np.asarray(load_image(original), np.int16) - np.asarray(Image.open(rotated).convert("RGB"), np.int16))
    assert diff.mean() < 3.0  # quality-95 copy of the upright original
    assert (out / "images" / "upright.jpg").is_symlink()
    assert (out / "images" / "my_photo.jpg").resolve().name == "my photo.jpg"
    assert json.loads((out / "image_names.json").read_text()) == {"my_photo.jpg": "my photo.jpg",
                                                                   "phone.heic.jpg": "phone.heic"}
    with Image.open(out / "images" / "phone.heic.jpg") as im:
        assert im.format == "JPEG"
    # binary and text agree
    rb = pycolmap.Reconstruction()
    rb.read_binary(str(out / "sparse" / "0"))
    assert set(_by_name(rb)) == set(ims)


def test_names_with_whitespace_without_an_images_folder(photo_run: Path) -> None:
    cfg = PipelineConfig()
    cfg.export.images, cfg.export.colmap_text = "none", True
    with pytest.raises(ExportError, match="whitespace"):
        export(photo_run, cfg)
    cfg.export.colmap_text = False  # binary keeps the original names
    man = export(photo_run, cfg)
    assert man["rotated_not_drop_in"] == 2 and not (photo_run / "export" / "images").exists()
    rec = pycolmap.Reconstruction(str(photo_run / "export" / "sparse" / "0"))
    assert "my photo.jpg" in _by_name(rec)


# ------------------------------------------------------------------------------------------------------------
# synthetic scene: camera options, BA, pairs, plots, rerun
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> syn.SyntheticRun:
    root = tmp_path_factory.mktemp("small") / "run"
    run = syn.synthetic_run(root, n_frames=90, max_cluster_frames=40, min_overlap_frames=6, seed=3,
                            write_images=True)
    cfg = PipelineConfig()
    cfg.merge.fuse_stride = 2
    cfg.merge.voxel_size = 0.3  # coarse voxels (scene ~45 m): more points with multi-view tracks, for BA
    merge(root, cfg)
    return run


def test_camera_model_sharing_and_exif_focal(small_run: syn.SyntheticRun) -> None:
    root = small_run.root
    cfg = PipelineConfig()
    cfg.export.camera_model, cfg.export.shared_camera = "SIMPLE_RADIAL", "folder"
    man = export(root, cfg)
    rec = pycolmap.Reconstruction(str(root / "export" / "sparse" / "0"))
    folders = {Path(im.name).parent for im in rec.images.values()}
    assert rec.num_cameras() == len(folders) == man["components"][0]["cameras"] > 1
    for im in rec.images.values():
        cam = rec.cameras[im.camera_id]
        assert cam.model.name == "SIMPLE_RADIAL" and cam.params[3] == 0.0
        assert (cam.height, cam.width) == small_run.scene.image_hw
    # EXIF focal as the prior: images with an EXIF focal start from it
    store = RunStore.open(root)
    t = store.read_table("images")
    focal = np.array(t.column("focal_px").to_pylist())
    focal[::2] = 123.0
    import pyarrow as pa

    store.write_table("images", t.set_column(t.column_names.index("focal_px"), "focal_px", pa.array(focal))
                      .replace_schema_metadata(t.schema.metadata))
    cfg = PipelineConfig()
    cfg.export.focal_prior = "exif"
    man = export(root, cfg)
    rec = pycolmap.Reconstruction(str(root / "export" / "sparse" / "0"))
    gi = store.group("merge/images")
    K = dict(zip(gi["image_ids"][...].tolist(), gi["intrinsics"][...]))
    n_exif = 0
    for im in rec.images.values():
        cam = rec.cameras[im.camera_id]
        i = im.image_id - 1
        want = 123.0 if i % 2 == 0 else focal[i]
        assert cam.params[0] == pytest.approx(want) and cam.params[1] == pytest.approx(want)
        assert cam.params[2] == pytest.approx(K[i][0, 2], abs=1e-4)
        n_exif += 1
    assert sum(c["exif_focal_images"] for c in man["components"]) == small_run.scene.n
    # the predicted/EXIF focal check: half the EXIF focals are 123 px, the other half equal the predicted ones
    want = np.median([K[i][0, 0] / (123.0 if i % 2 == 0 else focal[i]) for i in K])
    assert man["components"][0]["predicted_over_exif_focal_median"] == pytest.approx(want, rel=1e-3)
    assert "predicted/EXIF focal median" in (root / "export" / "report.md").read_text()
    with pytest.raises(ExportError, match="camera_model"):
        cfg.export.camera_model = "FISHEYE_FOO"
        export(root, cfg)


def test_bundle_adjustment_runs_and_does_not_increase_reprojection_error(small_run: syn.SyntheticRun) -> None:
    cfg = PipelineConfig()
    cfg.export.bundle_adjust = True
    cfg.export.camera_model = "SIMPLE_RADIAL"
    man = export(small_run.root, cfg)
    for c in man["components"]:
        ba = c["bundle_adjustment"]
        assert not ba["reverted"] and ba["images_adjusted"] >= 2 and ba["multi_view_points"] > 100
        assert ba["multi_view_error_before_px"] > 0.1  # depth noise: something to adjust
        assert ba["multi_view_error_after_px"] < ba["multi_view_error_before_px"]
        assert ba["reprojection_error_after_px"] <= ba["reprojection_error_before_px"]
    rec = pycolmap.Reconstruction(str(small_run.root / "export" / "sparse" / "0"))
    rec.update_point_3d_errors()
    assert rec.compute_mean_reprojection_error() == pytest.approx(
        man["components"][0]["bundle_adjustment"]["reprojection_error_after_px"], abs=1e-3)
    assert rec.num_reg_images() == man["components"][0]["images"]
    assert "bundle adjustment" in (small_run.root / "export" / "report.md").read_text()


def test_pairs_txt_is_the_covisibility_graph_between_exported_images(small_run: syn.SyntheticRun) -> None:
    man = export(small_run.root, PipelineConfig())
    store = RunStore.open(small_run.root)
    g = store.zarr["graph"]
    indptr, indices = g["indptr"][...], g["indices"][...]
    exported = set(store.group("merge/images")["image_ids"][...].tolist())
    names = small_run.scene.names
    want = {(names[i], names[int(j)]) for i in range(len(indptr) - 1) for j in indices[indptr[i]:indptr[i + 1]]
            if i < j and i in exported and int(j) in exported}
    lines = (small_run.root / "export" / "pairs.txt").read_text().splitlines()
    got = {tuple(line.split(" ")) for line in lines}
    assert len(lines) == len(got) == len(want) == man["pairs"]["pairs"] > 0
    assert got == want
    for a, b in got:  # every name is an image of the models and a file under images/
        assert (small_run.root / "export" / "images" / a).is_file()


def test_plots_are_written_and_linked_from_the_report(small_run: syn.SyntheticRun) -> None:
    man = export(small_run.root, PipelineConfig())
    out = small_run.root / "export"
    text = (out / "report.md").read_text()
    assert "## Checks" in text and "## Plots" in text
    assert len(man["plots"]["files"]) == 4
    for title, rel in man["plots"]["files"].items():
        assert f"![{title}]({rel})" in text
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 150
            px = np.asarray(im.convert("L"))
            assert px.std() > 5  # something was drawn
    cfg = PipelineConfig()
    cfg.export.plots = False
    man = export(small_run.root, cfg)
    assert "plots" not in man and not (out / "plots").exists() and "## Plots" not in (out / "report.md").read_text()


def test_rerun_recording(small_run: syn.SyntheticRun) -> None:
    from rerun.chunk import RrdReader

    cfg = PipelineConfig()
    cfg.export.rerun = True
    man = export(small_run.root, cfg)
    path = small_run.root / "export" / "recording.rrd"
    assert man["rerun"]["cameras"] == man["rerun"]["images"] == small_run.scene.n and man["rerun"]["points"] > 0
    columns = [line.split(":", 1)[1].strip() for line in str(RrdReader(path).store().schema()).splitlines()
               if line.startswith("Column name:")]
    assert sum(c.endswith(":Pinhole:image_from_camera") for c in columns) == small_run.scene.n
    assert sum(c.endswith(":EncodedImage:blob") for c in columns) == small_run.scene.n
    assert "/world/component_0/points:Points3D:positions" in columns
    assert "/world/component_0/camera_centers:Points3D:labels" in columns


def test_plots_markdown_inlines_the_pngs_for_prefect(small_run: syn.SyntheticRun) -> None:
    import base64

    from sparse_vggt.export.plots import plots_markdown

    export(small_run.root, PipelineConfig())
    md = plots_markdown(small_run.root / "export")
    blobs = [part.split(")", 1)[0] for part in md.split("data:image/png;base64,")[1:]]
    assert len(blobs) == 4
    for b in blobs:
        assert base64.b64decode(b).startswith(b"\x89PNG")
    assert "not inlined" in plots_markdown(small_run.root / "export", max_bytes=10)


def test_bundle_adjustment_that_raises_the_error_is_reverted(small_run: syn.SyntheticRun,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A diverged adjustment (simulated: every point pushed off its rays) must not reach the exported model."""

    class Diverging:
        def __init__(self, options, config, rec):
            self.rec = rec

        def solve(self):
            for p in self.rec.points3D.values():
                p.xyz = p.xyz + 5.0

    cfg = PipelineConfig()
    man_plain = export(small_run.root, cfg)
    plain = pycolmap.Reconstruction(str(small_run.root / "export" / "sparse" / "0"))
    monkeypatch.setattr(pycolmap, "create_default_bundle_adjuster", Diverging)
    cfg.export.bundle_adjust = True
    man = export(small_run.root, cfg)
    ba = man["components"][0]["bundle_adjustment"]
    # every multi-view point ends far off its observations: all are dropped, and the adjustment is undone
    assert ba["reverted"] is True and ba["multi_view_points_removed"] == ba["multi_view_points"] > 0
    assert ba["reprojection_error_after_px"] == ba["reprojection_error_before_px"]
    rec = pycolmap.Reconstruction(str(small_run.root / "export" / "sparse" / "0"))
    xyz_plain = np.array(sorted(map(tuple, (p.xyz for p in plain.points3D.values()))))
    xyz = np.array(sorted(map(tuple, (p.xyz for p in rec.points3D.values()))))
    np.testing.assert_allclose(xyz, xyz_plain, atol=1e-9)
    for im in rec.images.values():  # and the poses are the merged ones
        np.testing.assert_allclose(im.cam_from_world().matrix(), plain.images[im.image_id].cam_from_world().matrix(),
                                   atol=1e-9)
    assert man["components"][0]["reprojection_error_px"] == man_plain["components"][0]["reprojection_error_px"]


def test_rerun_without_the_sdk_says_how_to_install_it(small_run: syn.SyntheticRun,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "rerun", None)  # import rerun -> ImportError
    cfg = PipelineConfig()
    cfg.export.rerun = True
    before = RunStore.open(small_run.root).meta()["stages"].get("export")
    with pytest.raises(ExportError, match=r"sparse-vggt\[rerun\]"):
        export(small_run.root, cfg)
    assert RunStore.open(small_run.root).meta()["stages"].get("export") == before  # refused before starting
