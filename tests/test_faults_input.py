"""Bad input never stops a run: the input rows of the fault table, and the full flow on a folder that
mixes the sample photos with every bad/ and edge/ fixture.

Rows covered here: bad/ files mixed with good photos (used to crash merge on NaN sizes), 12 images of 90 MP
scanned with threads (one used to be accepted: the warning filter was process-global), a file name with invalid
UTF-8 bytes (used to abort the scan), broken symbolic links and links leaving the photo folder.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sparse_vggt import scan as scan_mod
from sparse_vggt import synthetic as syn
from sparse_vggt.config import PipelineConfig
from sparse_vggt.export import run as export
from sparse_vggt.scan import ScanError, run as run_scan
from sparse_vggt.merge import run as merge
from sparse_vggt.store import RunStore

REPO = Path(__file__).resolve().parents[1]
EDGE_CONVERTED = ("alpha.png", "cmyk.jpg", "gray16.png", "palette.png", "rotated.jpg")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4)
def _bilevel_idat(width: int, height: int) -> bytes:
    return zlib.compress((b"\0" + bytes((width + 7) // 8)) * height, 6)  # each row: filter byte 0 + packed bits


def _bilevel_png(width: int, height: int, tag: str) -> bytes:
    """A valid, fully decodable 1-bit PNG of ``width`` x ``height`` black pixels (an 11 MB raw image for 90 MP
    compresses to ~11 kB); ``tag`` goes into a tEXt chunk so files differ in bytes and are not folded as copies."""
    return (b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + _chunk(b"tEXt", b"Comment\0" + tag.encode())
            + _chunk(b"IDAT", _bilevel_idat(width, height))
            + _chunk(b"IEND", b""))


def _rows(run: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(run / "tables" / "images.parquet").to_pylist()}


def _many_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_mod.os, "cpu_count", lambda: 8)  # the scan's pool uses min(8, cpu_count) threads


def test_90mp_images_scanned_with_threads_are_all_too_large(
        tmp_path: Path, sample_photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PipelineConfig().scan.max_image_pixels == Image.MAX_IMAGE_PIXELS  # default: Pillow's limit
    root = tmp_path / "photos"
    root.mkdir()
    side = 9500  # 90,250,000 pixels: above Pillow's 89,478,485, below its 2x error threshold (only a warning)
    for i in range(12):
        (root / f"big_{i:02d}.png").write_bytes(_bilevel_png(side, side, str(i)))
    for p in sorted(sample_photos.glob("*.jpg")):  # decoding real photos alongside widens the old race window
        shutil.copy(p, root / p.name)
    with Image.open(root / "big_00.png") as probe:  # the files are real images Pillow would decode
        assert probe.size == (side, side)
    _many_threads(monkeypatch)
    filters_before = list(warnings.filters)
    manifest = run_scan(tmp_path / "run", PipelineConfig(), photos=root)
    assert list(warnings.filters) == filters_before  # the scan leaves the process-global filters alone
    rows = _rows(tmp_path / "run")
    for i in range(12):
        status = rows[f"big_{i:02d}.png"]["status"]
        assert status.startswith(f"too large ({side}x{side} = {side * side} pixels > scan.max_image_pixels="), status
    assert manifest["kept"] == 10 and manifest["skip_reasons"] == {"too large": 12}


def test_pixel_limit_is_an_explicit_configurable_comparison(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below Pillow's limit Pillow never warns, so only an explicit width x height comparison can reject these."""
    root = tmp_path / "photos"
    root.mkdir()
    sizes = {}
    for i in range(12):
        w, h = (1000, 1000) if i % 3 == 0 else ((1001, 1000) if i % 3 == 1 else (999, 1000))
        (root / f"img_{i:02d}.png").write_bytes(_bilevel_png(w, h, str(i)))
        sizes[f"img_{i:02d}.png"] = w * h
    cfg = PipelineConfig()
    cfg.scan.max_image_pixels = 1_000_000
    _many_threads(monkeypatch)
    run_scan(tmp_path / "run", cfg, photos=root)
    rows = _rows(tmp_path / "run")
    for name, pixels in sizes.items():
        if pixels > 1_000_000:
            assert rows[name]["status"].startswith("too large (1001x1000 = 1001000 pixels"), rows[name]["status"]
        else:  # the limit itself is allowed
            assert rows[name]["status"] == "ok", (name, rows[name]["status"])


def test_pixel_limit_above_what_pillow_decodes_is_refused(tmp_path: Path, sample_photos: Path) -> None:
    scan_mod.check_pixel_limit(2 * Image.MAX_IMAGE_PIXELS)  # Pillow still decodes up to here (with a warning)
    cfg = PipelineConfig()
    cfg.scan.max_image_pixels = 2 * Image.MAX_IMAGE_PIXELS + 1
    with pytest.raises(ScanError, match="max_image_pixels"):
        run_scan(tmp_path / "run", cfg, photos=sample_photos)
    cfg.scan.max_image_pixels = 0
    with pytest.raises(ScanError, match=">= 1"):
        run_scan(tmp_path / "run2", cfg, photos=sample_photos)


def test_undecodable_file_names_are_recorded_rows(tmp_path: Path, sample_photos: Path) -> None:
    photos = sorted(sample_photos.glob("*.jpg"))
    clean = tmp_path / "clean"
    clean.mkdir()
    for p in photos[:3]:
        shutil.copy(p, clean / p.name)
    mixed = tmp_path / "mixed"
    shutil.copytree(clean, mixed)
    # names that are not UTF-8 (Latin-1 e-acute, a lone 0xff), one on a file and one on a folder
    os.makedirs(os.fsencode(mixed) + b"/dir\xff", exist_ok=True)
    Path(os.fsdecode(os.fsencode(mixed) + b"/caf\xe9.jpg")).write_bytes(photos[3].read_bytes())
    Path(os.fsdecode(os.fsencode(mixed) + b"/dir\xff/x.jpg")).write_bytes(photos[4].read_bytes())

    ref = run_scan(tmp_path / "run_clean", PipelineConfig(), photos=clean)
    manifest = run_scan(tmp_path / "run", PipelineConfig(), photos=mixed)  # used to abort: "surrogates not allowed"
    rows = _rows(tmp_path / "run")
    for name in ("caf\\xe9.jpg", "dir\\xff/x.jpg"):  # a readable stand-in, stored as valid UTF-8
        assert rows[name]["status"].startswith("undecodable file name"), rows[name]
        assert rows[name]["chunk_id"] == -1
    assert manifest["kept"] == ref["kept"] == 3 and manifest["skip_reasons"] == {"undecodable file name": 2}
    # the good photos keep their ids, hashes and sizes
    clean_rows = _rows(tmp_path / "run_clean")
    for path, r in clean_rows.items():
        assert {k: rows[path][k] for k in ("image_id", "sha256", "width", "height", "chunk_id", "status")} == \
            {k: r[k] for k in ("image_id", "sha256", "width", "height", "chunk_id", "status")}
    # the listing fingerprint takes raw names: a re-scan of the unchanged folder is a no-op, not an abort
    assert run_scan(tmp_path / "run", PipelineConfig(), photos=mixed) == manifest


def test_symlinks_become_rows_with_reasons(tmp_path: Path, sample_photos: Path) -> None:
    photos = sorted(sample_photos.glob("*.jpg"))
    root = tmp_path / "photos"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(photos[0], root / "a.jpg")
    shutil.copy(photos[1], outside / "out.jpg")
    shutil.copy(photos[2], outside / "in_linked_folder.jpg")
    (root / "inside_link.jpg").symlink_to(root / "a.jpg")  # same content as a.jpg: folded as a copy
    (root / "leaves.jpg").symlink_to(outside / "out.jpg")
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    (root / "loop1.jpg").symlink_to(root / "loop2.jpg")
    (root / "loop2.jpg").symlink_to(root / "loop1.jpg")
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    (root / "sub").mkdir()
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # a folder loop
    os.mkfifo(root / "pipe.jpg")  # must be recorded, never opened (reading a FIFO would block the scan)

    run_scan(tmp_path / "run", PipelineConfig(), photos=root)  # follow_symlinks=false (default)
    rows = _rows(tmp_path / "run")
    assert rows["a.jpg"]["status"] == "ok" and rows["a.jpg"]["duplicates"] == ["inside_link.jpg"]
    assert rows["leaves.jpg"]["status"].startswith("symbolic link leaves the photo folder")
    assert "scan.follow_symlinks=true" in rows["leaves.jpg"]["status"]
    assert rows["broken.jpg"]["status"] == f"broken symbolic link (-> {root / 'missing.jpg'})"
    assert rows["loop1.jpg"]["status"].startswith("broken symbolic link")
    assert rows["loop2.jpg"]["status"].startswith("broken symbolic link")
    assert rows["pipe.jpg"]["status"].startswith("not a regular file")
    assert not any(p.startswith(("linked_folder/", "sub/")) for p in rows)  # folder links are not entered

    cfg = PipelineConfig()
    cfg.scan.follow_symlinks = True
    run_scan(tmp_path / "run_follow", cfg, photos=root)  # the folder loop sub/back -> root must terminate
    rows = _rows(tmp_path / "run_follow")
    assert rows["leaves.jpg"]["status"] == "ok"
    assert rows["linked_folder/in_linked_folder.jpg"]["status"] == "ok"
    assert rows["broken.jpg"]["status"].startswith("broken symbolic link")
    assert rows["pipe.jpg"]["status"].startswith("not a regular file")
    assert len([p for p in rows if p.endswith("in_linked_folder.jpg")]) == 1  # each real folder walked once


def test_malformed_exif_orientation_does_not_stop_the_scan(tmp_path: Path, sample_photos: Path) -> None:
    """An Orientation tag stored as text made ``int()`` raise outside the scan's error handling (whole scan lost)."""
    import io

    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(sorted(sample_photos.glob("*.jpg"))[0], root / "good.jpg")
    # little-endian TIFF with one IFD entry: Orientation (0x0112) as ASCII "sideways" at offset 26
    tiff = (b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 2, 9, 26) + struct.pack("<I", 0)
            + b"sideways\0")
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (10, 20, 30)).save(buf, format="JPEG", exif=b"Exif\0\0" + tiff)
    (root / "odd_exif.jpg").write_bytes(buf.getvalue())
    run_scan(tmp_path / "run", PipelineConfig(), photos=root)
    rows = _rows(tmp_path / "run")
    assert rows["good.jpg"]["status"] == "ok"
    assert rows["odd_exif.jpg"]["status"] == "ok" and rows["odd_exif.jpg"]["orientation"] == 1
    assert scan_mod.load_image(root / "odd_exif.jpg").size == (100, 80)  # what later stages read agrees


def _skip_rows(table: pa.Table, rows: dict[int, str], extra: list[str]) -> pa.Table:
    """``table`` with ``rows`` marked skipped and ``extra`` skipped rows appended, sizes null as scan writes them."""
    data = table.to_pydict()
    for i, reason in rows.items():
        data["status"][i], data["width"][i], data["height"][i], data["chunk_id"][i] = reason, None, None, -1
    for reason in extra:
        for name in data:
            data[name].append(None)
        n = len(data["image_id"])
        data.update({k: data[k][:-1] + [v] for k, v in (("image_id", n - 1), ("path", f"bad/{n}.jpg"),
                                                       ("status", reason), ("chunk_id", -1), ("duplicates", []))})
    return pa.table(data, schema=table.schema)


def test_merge_and_export_use_only_kept_rows(tmp_path: Path) -> None:
    """Skipped rows have no width/height (merge and export used to turn them into NaN -> int and crash); a cluster
    that holds a skipped image (a stale partition) is excluded with its reason, never read."""
    run = syn.synthetic_run(tmp_path / "run", n_frames=300, max_cluster_frames=64, min_overlap_frames=6, seed=5)
    shutil.copytree(run.root, tmp_path / "stale")
    cfg = PipelineConfig()
    cfg.merge.colors = False
    store = RunStore.open(run.root)
    images = store.read_table("images")
    store.write_table("images", _skip_rows(images, {}, ["empty file", "not an image (unidentified format)",
                                                        "truncated or corrupt (image file is truncated)"]))
    m = merge(run.root, cfg)
    assert not m["clusters_excluded"] and m["images_posed"] == run.scene.n
    e = export(run.root, cfg)
    assert e["images"] == run.scene.n

    # a partition that still holds an image the scan now skips: its clusters are excluded, the rest merge
    stale = RunStore.open(tmp_path / "stale")
    clusters = stale.read_table("clusters")
    victim = int(clusters.column("image_id")[0].as_py())
    holding = {int(c) for c, i in zip(clusters.column("cluster_id").to_pylist(),
                                      clusters.column("image_id").to_pylist()) if i == victim}
    stale.write_table("images", _skip_rows(images, {victim: "truncated or corrupt (x)"}, []))
    m = merge(stale.root, cfg)
    assert {int(c) for c in m["clusters_excluded"]} == holding
    assert all("skipped by scan" in r for r in m["clusters_excluded"].values())
    ids = np.asarray(stale.group("merge/images", create=False)["image_ids"][...])
    assert victim not in ids.tolist() and len(ids) > 0
    assert export(stale.root, cfg)["images"] == len(ids)


@pytest.mark.slow
def test_full_flow_on_sample_photos_mixed_with_every_bad_and_edge_file(
        tmp_path: Path, sample_photos: Path, fixtures_dir: Path) -> None:
    """`sparse-vggt run` with the demo's tiny settings exits 0; report.md and `status` list each skipped file."""
    from sparse_vggt.demo import DEMO_SETTINGS

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(sample_photos.glob("*.jpg")):
        shutil.copy(p, photos / p.name)
    shutil.copytree(fixtures_dir / "bad", photos / "bad")
    shutil.copytree(fixtures_dir / "edge", photos / "edge")
    (photos / "broken link.jpg").symlink_to(photos / "gone.jpg")
    (photos / "[").mkdir()  # the relative path "[/b] odd.jpg" is a closing rich markup tag: output must escape it
    (photos / "[" / "b] odd.jpg").write_text("not a photo\n")
    Path(os.fsdecode(os.fsencode(photos) + b"/r\xe9sum\xe9.jpg")).write_bytes(
        sorted(sample_photos.glob("*.jpg"))[0].read_bytes())
    run = tmp_path / "run"
    sets = []
    for key, value in DEMO_SETTINGS.items():
        sets += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    exe = shutil.which("sparse-vggt") or str(Path(sys.executable).parent / "sparse-vggt")
    # a private PREFECT_HOME: its own ephemeral database and local-run lock, so a slot leaked by another (killed)
    # run on this machine cannot make this flow wait for it
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PREFECT_HOME": str(tmp_path / "prefect_home")}
    proc = subprocess.run([exe, "--no-progress", "run", str(photos), str(run), *sets], capture_output=True,
                          text=True, timeout=500, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rows = _rows(run)
    skipped = {p: r["status"] for p, r in rows.items() if r["status"] != "ok"}
    assert set(skipped) == {"bad/empty.jpg", "bad/notes.jpg", "bad/truncated.jpg", "edge/tiny.jpg",
                            "broken link.jpg", "r\\xe9sum\\xe9.jpg", "[/b] odd.jpg"}
    assert skipped["edge/tiny.jpg"].startswith("too small (16x16")
    for name in EDGE_CONVERTED:  # converted, not skipped
        assert rows[f"edge/{name}"]["status"] == "ok", name

    report = (run / "export" / "report.md").read_text()
    assert f"## Skipped photos ({len(skipped)})" in report
    for path, reason in skipped.items():
        assert f"| {path} | {reason} |" in report, path

    status = subprocess.run([exe, "status", str(run)], capture_output=True, text=True, timeout=120, env=env)
    assert status.returncode == 0, status.stderr
    for path, reason in skipped.items():
        assert f"skipped {path}: {reason}" in status.stdout, path

    # later stages used only kept images: every posed / exported image is an ok row, and the edge files are posed
    store = RunStore.open(run)
    posed = set(np.asarray(store.group("merge/images", create=False)["image_ids"][...]).tolist())
    ok_ids = {r["image_id"] for r in rows.values() if r["status"] == "ok"}
    assert posed <= ok_ids
    assert {rows[f"edge/{n}"]["image_id"] for n in EDGE_CONVERTED} <= posed
    assert store.stage_manifest("export")["images"] == len(posed)
