"""Ingest on real photos and the bad/edge fixtures: what is kept, what is skipped and why, resume, EXIF."""

from __future__ import annotations

import io
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from sparse_vggt import scan as scan_mod
from sparse_vggt.config import PipelineConfig
from sparse_vggt.scan import ScanError, focal_from_exif, inspect_image, load_image, run as run_scan
from sparse_vggt.store import RunStore


@pytest.fixture
def photo_tree(tmp_path: Path, sample_photos: Path, fixtures_dir: Path) -> Path:
    """Sample photos + edge + bad fixtures + one byte-identical copy + files that must not be scanned."""
    root = tmp_path / "photos"
    shutil.copytree(fixtures_dir / "edge", root / "edge")
    shutil.copytree(fixtures_dir / "bad", root / "bad")
    sub = root / "Street A"
    sub.mkdir()
    for p in sorted(sample_photos.glob("*.jpg"))[:4]:
        shutil.copy(p, sub / p.name)
    first = sorted(sub.iterdir())[0]
    shutil.copy(first, root / "copy_of_first.JPG")  # upper-case extension, identical bytes
    (root / "readme.txt").write_text("not a photo")
    (root / ".DS_Store").write_bytes(b"\0\0")
    for p in root.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return root


def _rows(run: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(run / "tables" / "images.parquet").to_pylist()}


def test_scan_keeps_converts_and_skips_with_reasons(tmp_path: Path, photo_tree: Path) -> None:
    manifest = run_scan(tmp_path / "run", PipelineConfig(), photos=photo_tree)
    rows = _rows(tmp_path / "run")
    skipped = {p: r["status"] for p, r in rows.items() if r["status"] != "ok"}
    assert set(skipped) == {"bad/empty.jpg", "bad/notes.jpg", "bad/truncated.jpg", "edge/tiny.jpg"}
    assert skipped["bad/empty.jpg"] == "empty file"
    assert skipped["bad/notes.jpg"].startswith("not an image")
    assert skipped["bad/truncated.jpg"].startswith("truncated or corrupt")
    assert skipped["edge/tiny.jpg"].startswith("too small (16x16")
    for name in ("alpha.png", "cmyk.jpg", "gray16.png", "palette.png", "rotated.jpg"):
        assert rows[f"edge/{name}"]["status"] == "ok", name
    assert "readme.txt" not in rows and ".DS_Store" not in rows
    # one row per distinct content; the copy is listed on the first file in sorted order
    first_in_street = sorted(p for p in rows if p.startswith("Street A/"))[0]
    assert "copy_of_first.JPG" not in rows  # "Street A/..." sorts first (upper case before lower case)
    assert rows[first_in_street]["duplicates"] == ["copy_of_first.JPG"]
    assert manifest["duplicates"] == 1
    assert manifest["kept"] == sum(r["status"] == "ok" for r in rows.values()) == 9
    assert manifest["skip_reasons"] == {"empty file": 1, "not an image": 1, "truncated or corrupt": 1, "too small": 1}
    # ids are row numbers in sorted path order; chunks count kept images only
    table = pq.read_table(tmp_path / "run" / "tables" / "images.parquet")
    assert table.column("image_id").to_pylist() == list(range(table.num_rows))
    assert table.column("path").to_pylist() == sorted(table.column("path").to_pylist())
    assert table.schema.metadata[b"photos_root"].decode() == str(photo_tree.resolve())
    for r in rows.values():
        assert (r["chunk_id"] >= 0) == (r["status"] == "ok")
        assert len(r["sha256"]) == 64 or r["status"] != "ok"


def test_chunking_and_exif_orientation(tmp_path: Path, photo_tree: Path, sample_photos: Path) -> None:
    cfg = PipelineConfig()
    cfg.scan.chunk_size = 4
    run_scan(tmp_path / "run", cfg, photos=photo_tree)
    rows = _rows(tmp_path / "run")
    ok = [r for r in sorted(rows.values(), key=lambda r: r["image_id"]) if r["status"] == "ok"]
    assert [r["chunk_id"] for r in ok] == [i // 4 for i in range(len(ok))]
    rot = rows["edge/rotated.jpg"]
    assert rot["orientation"] == 6 and (rot["width"], rot["height"]) == (780, 1063)  # upright size
    upright = np.asarray(load_image(photo_tree / "edge/rotated.jpg"), dtype=np.float32)
    source = np.asarray(load_image(sample_photos / "02928139_3448003521.jpg"), dtype=np.float32)
    assert upright.shape == source.shape
    assert np.abs(upright - source).mean() < 3.0  # re-encoded JPEG, not a transposed image
    with Image.open(photo_tree / "edge/rotated.jpg") as raw:
        assert raw.size == (1063, 780)  # stored landscape: the orientation really was applied


@pytest.mark.parametrize("name", ["alpha.png", "cmyk.jpg", "gray16.png", "palette.png"])
def test_colour_modes_become_8bit_rgb_close_to_the_source(fixtures_dir: Path, name: str) -> None:
    img = load_image(fixtures_dir / "edge" / name)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.std() > 20  # not blank, not clipped to one value
    if name == "gray16.png":
        with Image.open(fixtures_dir / "edge" / name) as raw:
            assert raw.mode.startswith("I")
            hi = np.asarray(raw, dtype=np.float64)
        assert np.abs(arr[..., 0] - hi / 257.0).max() <= 1.0  # 16-bit range rescaled, not clipped


def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = np.asarray(scan_mod.to_rgb(Image.open(io.BytesIO(buf.getvalue()))))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 255)


def test_rescan_rewrites_nothing_and_changed_folder_is_refused(tmp_path: Path, photo_tree: Path) -> None:
    run = tmp_path / "run"
    first = run_scan(run, PipelineConfig(), photos=photo_tree)
    table = run / "tables" / "images.parquet"
    before = (table.stat().st_mtime_ns, table.read_bytes(), (run / "run.json").read_bytes())
    again = run_scan(run, PipelineConfig(), photos=photo_tree)
    assert again == first
    assert (table.stat().st_mtime_ns, table.read_bytes(), (run / "run.json").read_bytes()) == before
    shutil.copy(photo_tree / "edge" / "cmyk.jpg", photo_tree / "new.jpg")
    with pytest.raises(ScanError, match="changed since"):
        run_scan(run, PipelineConfig(), photos=photo_tree)
    other = tmp_path / "other"
    shutil.copytree(photo_tree, other)
    with pytest.raises(ScanError, match="was scanned from"):
        run_scan(run, PipelineConfig(), photos=other)


def test_interrupted_scan_resumes_without_lost_or_duplicated_rows(
        tmp_path: Path, photo_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_scan(tmp_path / "ref", PipelineConfig(), photos=photo_tree)
    reference = pq.read_table(tmp_path / "ref" / "tables" / "images.parquet")

    cfg = PipelineConfig()
    cfg.scan.progress_every = 3
    real = scan_mod.inspect_image
    calls: list[int] = []

    def dying(data: bytes, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("simulated kill")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(scan_mod, "inspect_image", dying)
    monkeypatch.setattr(scan_mod.os, "cpu_count", lambda: 1)  # one worker: a deterministic kill point
    with pytest.raises(KeyboardInterrupt):
        run_scan(tmp_path / "run", cfg, photos=photo_tree)
    store = RunStore.open(tmp_path / "run")
    assert not store.is_stage_complete("scan") and not store.has_table("images")
    progress = pq.read_table(tmp_path / "run" / "tables" / scan_mod.PROGRESS_FILE)
    assert progress.num_rows == 6  # flushed twice, every 3 files

    calls.clear()
    monkeypatch.setattr(scan_mod, "inspect_image", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run_scan(tmp_path / "run", cfg, photos=photo_tree)
    assert len(calls) == len(scan_mod.find_photos(photo_tree, cfg.scan.extensions)) - 6  # only the files without a flushed record were inspected again
    resumed = pq.read_table(tmp_path / "run" / "tables" / "images.parquet")
    assert resumed.to_pylist() == reference.to_pylist()
    assert not (tmp_path / "run" / "tables" / scan_mod.PROGRESS_FILE).exists()


def test_exif_focal_gps_and_time() -> None:
    img = Image.new("RGB", (400, 300), (10, 120, 30))
    exif = Image.Exif()
    exif.get_ifd(0x8825).update({1: "S", 2: (48.0, 46.0, 30.0), 3: "W", 4: (2.0, 17.0, 15.0), 5: 0, 6: 95.5})
    exif.get_ifd(0x8769).update({0xA405: 28, 0x9003: "2024:05:06 07:08:09"})
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    info = inspect_image(buf.getvalue(), min_side=16)
    assert info["status"] == "ok"
    assert info["focal_px"] == pytest.approx(28 / 36 * 400)
    assert info["gps_lat"] == pytest.approx(-(48 + 46 / 60 + 30 / 3600))
    assert info["gps_lon"] == pytest.approx(-(2 + 17 / 60 + 15 / 3600))
    assert info["gps_alt"] == pytest.approx(95.5)
    assert info["timestamp"] == datetime(2024, 5, 6, 7, 8, 9)


def test_focal_from_sensor_resolution_when_no_35mm_value() -> None:
    # 4.0 mm lens, 1000 px per cm on the sensor, recorded at 4000 px wide, stored at 1000 px wide
    ifd = {0x920A: 4.0, 0xA20E: 1000.0, 0xA210: 3, 0xA002: 4000}
    assert focal_from_exif(ifd, (1000, 750)) == pytest.approx(4.0 * 100.0 * 0.25)
    assert focal_from_exif({0x920A: 4.0}, (1000, 750)) is None


def test_real_exif_focal_is_close_to_the_calibration(fixtures_dir: Path) -> None:
    """Sceaux castle photos carry FocalLengthIn35mmFilm; K.txt is the openMVG calibration of the same camera."""
    K = np.loadtxt(fixtures_dir / "sceaux_castle" / "K.txt")
    path = sorted((fixtures_dir / "sceaux_castle" / "images").glob("*.JPG"))[0]
    info = inspect_image(path.read_bytes(), min_side=64)
    assert info["focal_px"] == pytest.approx(K[0, 0], rel=0.08)  # EXIF is a prior, not a calibration
    assert info["timestamp"] is not None


def test_heif_is_read(tmp_path: Path) -> None:
    if not scan_mod.HEIF_AVAILABLE:
        pytest.skip("pillow-heif not installed")
    img = Image.new("RGB", (96, 80), (200, 30, 60))
    photos = tmp_path / "photos"
    photos.mkdir()
    img.save(photos / "a.HEIC", format="HEIF")
    cfg = PipelineConfig()
    manifest = run_scan(tmp_path / "run", cfg, photos=photos)
    assert manifest["kept"] == 1
    arr = np.asarray(load_image(photos / "a.HEIC"), dtype=np.float32)
    assert np.abs(arr.mean(axis=(0, 1)) - [200, 30, 60]).max() < 8


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="no photos"):
        run_scan(tmp_path / "run", PipelineConfig(), photos=tmp_path / "empty")
    with pytest.raises(ScanError, match="is not a folder"):
        run_scan(tmp_path / "run2", PipelineConfig(), photos=tmp_path / "nope")


def test_min_side_is_configurable(tmp_path: Path, photo_tree: Path) -> None:
    cfg = PipelineConfig()
    cfg.scan.min_side = 10
    run_scan(tmp_path / "run", cfg, photos=photo_tree)
    assert _rows(tmp_path / "run")["edge/tiny.jpg"]["status"] == "ok"


def test_exif_transpose_matches_pillow_for_every_orientation(tmp_path: Path) -> None:
    base = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3) * 2)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        base.save(path, exif=exif.tobytes())
        expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        got = load_image(path)
        assert np.array_equal(np.asarray(got), expected), orientation
        info = inspect_image(path.read_bytes(), min_side=1)
        assert (info["width"], info["height"]) == got.size


def test_every_edge_file_converts_to_its_source_photo(fixtures_dir: Path, sample_photos: Path) -> None:
    """Each edge/ file is made from one bundled photo (tests/fixtures/README.md): after load_image it must look
    like that photo, so a wrong conversion (inverted CMYK, saturated 16-bit grey, alpha on black, a missed EXIF
    rotation) fails here, not only a blank image."""
    def rgb(path: Path) -> np.ndarray:
        return np.asarray(load_image(path), dtype=np.float32)

    edge = fixtures_dir / "edge"
    for name, source, tol in (("cmyk.jpg", "10265353_3838484249.jpg", 3.0),
                              ("palette.png", "17295357_9106075285.jpg", 5.0),
                              ("rotated.jpg", "02928139_3448003521.jpg", 3.0)):
        got, want = rgb(edge / name), rgb(sample_photos / source)
        assert got.shape == want.shape, name
        assert np.abs(got - want).mean() < tol, name
    # alpha: 0 in the left 64 columns (-> white), 128 in the rest of the top 48 rows (-> half white), else opaque
    got, want = rgb(edge / "alpha.png"), rgb(sample_photos / "32809961_8274055477.jpg")
    assert (got[:, :64] == 255).all()
    assert np.abs(got[:48, 64:] - (0.5 * want[:48, 64:] + 127.5)).mean() < 1.0
    assert np.abs(got[48:, 64:] - want[48:, 64:]).mean() < 0.5
    # 16-bit grey (8-bit x 257): scaled back to the source's grey levels, not clipped to 255
    got = rgb(edge / "gray16.png")
    with Image.open(sample_photos / "44120379_8371960244.jpg") as src:
        grey = np.asarray(src.convert("L"), dtype=np.float32)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert np.abs(got[..., 0] - grey).max() <= 1.0
