"""Scan: find the photos, validate them by decoding, read their EXIF, write ``tables/images.parquet``.

Every later stage reads pixels through :func:`load_image`, so EXIF orientation and colour-mode conversion
happen in exactly one place. ``scan`` keeps one row per distinct file content (byte-identical copies are listed
in the ``duplicates`` column of the first copy in sorted order): reconstructing the same photo twice only adds
a degenerate zero-baseline pair. Image ids are row numbers of the sorted listing, so they are stable for a
given folder; a finished scan is never silently redone over a changed folder (the ids would shift under the
later stages).

Bad files never stop a scan: empty, non-image, truncated, too-small and too-large files, file names that are not
valid UTF-8, broken symbolic links and (with ``scan.follow_symlinks=false``) links leaving the photo folder get a
row whose ``status`` says why they were skipped; every later stage uses only ``status == "ok"`` rows. The pixel
limit is an explicit width x height comparison per file (no process-global warning filter, so it holds with the
scan's threads). A scan that dies part-way (exception, SIGKILL) resumes from its last flushed progress file
without duplicated or lost rows.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from .config import PipelineConfig
from .progress import track
from .durable import atomic_write_bytes, file_identity
from .store import RunStore

log = logging.getLogger(__name__)

try:  # HEIC/HEIF support is optional at import time but pinned in the package dependencies
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_AVAILABLE = True
except ImportError:  # pragma: no cover - pillow-heif is a declared dependency
    HEIF_AVAILABLE = False

PROGRESS_FILE = "scan_progress.parquet"

# EXIF tag numbers (EXIF 2.32)
_ORIENTATION = 0x0112
_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
_FOCAL_LENGTH = 0x920A
_FOCAL_35MM = 0xA405
_FOCAL_PLANE_X_RES = 0xA20E
_FOCAL_PLANE_UNIT = 0xA210
_PIXEL_X_DIM = 0xA002
_PIXEL_Y_DIM = 0xA003
_DATETIME_ORIGINAL = 0x9003
_DATETIME_DIGITIZED = 0x9004
_DATETIME = 0x0132
_MM_PER_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}  # FocalPlaneResolutionUnit: inch, cm, mm, micrometre

SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("path", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("orientation", pa.int64()),
    ("focal_px", pa.float64()),
    ("gps_lat", pa.float64()),
    ("gps_lon", pa.float64()),
    ("gps_alt", pa.float64()),
    ("timestamp", pa.timestamp("us")),
    ("chunk_id", pa.int64()),
    ("status", pa.string()),
    ("duplicates", pa.list_(pa.string())),
])
_RECORD_FIELDS = [f.name for f in SCHEMA if f.name not in ("image_id", "chunk_id")]
# the progress file also keys each record on the file's size and mtime so a resumed scan can trust it
_PROGRESS_SCHEMA = pa.schema([f for f in SCHEMA if f.name not in ("image_id", "chunk_id")]
                             + [("size", pa.int64()), ("mtime_ns", pa.int64())])


class ScanError(RuntimeError):
    """The photos folder cannot be scanned as asked (missing, empty, changed under a finished scan)."""


# ---------------------------------------------------------------------------------------------------------
# reading one image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; 16/32-bit grey is rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # full 16-bit range -> 8 bit
        else:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK (Pillow inverts Adobe CMYK JPEGs itself), YCbCr, L, 1, P, ...


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` into an upright 8-bit RGB image (EXIF orientation applied).

    This is the project's single image reader: the describe, reconstruct, verification and merge-colour steps
    all go through it, so every stage sees the same pixels in the same orientation.
    """
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img) or img
        return to_rgb(upright).copy()


@dataclass
class _Record:
    path: str
    sha256: str
    size: int
    mtime_ns: int
    status: str = "ok"
    width: int | None = None
    height: int | None = None
    orientation: int | None = None
    focal_px: float | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    gps_alt: float | None = None
    timestamp: datetime | None = None
    duplicates: list[str] = field(default_factory=list)


def _rational(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return out if np.isfinite(out) else None


def _gps(gps: dict[int, Any]) -> tuple[float | None, float | None, float | None]:
    """GPS IFD -> (lat, lon, alt) in degrees / metres; None where absent or malformed."""

    def degrees(dms: Any, ref: Any, negative: str) -> float | None:
        try:
            d, m, s = (float(x) for x in dms)
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        value = d + m / 60.0 + s / 3600.0
        if isinstance(ref, bytes):
            ref = ref.decode(errors="ignore")
        if str(ref).strip().upper().startswith(negative):
            value = -value
        return value if np.isfinite(value) else None

    lat = degrees(gps.get(2), gps.get(1, "N"), "S")
    lon = degrees(gps.get(4), gps.get(3, "E"), "W")
    if lat is not None and not -90.0 <= lat <= 90.0:
        lat = None
    if lon is not None and not -180.0 <= lon <= 180.0:
        lon = None
    if lat is None or lon is None:
        lat = lon = None
    alt = _rational(gps.get(6))
    if alt is not None:
        ref = gps.get(5, 0)
        if (ref[0] if isinstance(ref, bytes) and ref else ref) == 1:
            alt = -alt
    return lat, lon, alt


def _timestamp(exif_ifd: dict[int, Any], base: Any) -> datetime | None:
    for raw in (exif_ifd.get(_DATETIME_ORIGINAL), exif_ifd.get(_DATETIME_DIGITIZED), base.get(_DATETIME)):
        if not raw:
            continue
        text = raw.decode(errors="ignore") if isinstance(raw, bytes) else str(raw)
        try:
            return datetime.strptime(text.strip().rstrip("\x00")[:19], "%Y:%m:%d %H:%M:%S")
        except ValueError:
            continue
    return None


def focal_from_exif(exif_ifd: dict[int, Any], stored_size: tuple[int, int]) -> float | None:
    """Focal length in pixels of the stored image, like COLMAP's EXIF prior.

    Prefers the 35 mm-equivalent focal length (f35 / 36 mm x the longer side: the 35 mm frame is 36 mm wide);
    otherwise focal length (mm) x focal-plane resolution (pixels per mm of the sensor), rescaled from the
    camera's recorded pixel width to the stored width. Returns None when neither is present or sane.
    """
    w, h = stored_size
    f35 = _rational(exif_ifd.get(_FOCAL_35MM))
    if f35 and f35 > 0:
        return f35 / 36.0 * max(w, h)
    f_mm = _rational(exif_ifd.get(_FOCAL_LENGTH))
    xres = _rational(exif_ifd.get(_FOCAL_PLANE_X_RES))
    unit = exif_ifd.get(_FOCAL_PLANE_UNIT, 2)
    if not (f_mm and f_mm > 0 and xres and xres > 0 and unit in _MM_PER_UNIT):
        return None
    px_per_mm = xres / _MM_PER_UNIT[unit]
    recorded_w = _rational(exif_ifd.get(_PIXEL_X_DIM))
    scale = w / recorded_w if recorded_w and recorded_w > 0 else 1.0
    focal = f_mm * px_per_mm * scale
    return focal if 0 < focal < 1e6 else None


PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's default, the default of scan.max_image_pixels


def check_pixel_limit(max_pixels: int) -> None:
    """Refuse a limit Pillow itself would not honour: every stage decodes with Pillow, which raises
    ``DecompressionBombError`` above 2 x ``Image.MAX_IMAGE_PIXELS``, so such photos could pass the scan and then
    stop describe or reconstruct."""
    pillow = Image.MAX_IMAGE_PIXELS
    if int(max_pixels) < 1:
        raise ScanError(f"scan.max_image_pixels={max_pixels} must be >= 1")
    if pillow is not None and int(max_pixels) > 2 * pillow:
        raise ScanError(f"scan.max_image_pixels={max_pixels} is above the largest image Pillow decodes in this "
                          f"process (2 x PIL.Image.MAX_IMAGE_PIXELS = {2 * pillow}); later stages could not read such "
                          f"photos. Use at most {2 * pillow}.")


def inspect_image(data: bytes, min_side: int, decode_check: bool = True,
                  max_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Validate one file's bytes and read its metadata. Returns the record fields, ``status`` says why not ok.

    The pixel limit is compared explicitly on the header's size, before any decoding: Pillow's own
    ``DecompressionBombWarning`` is only a warning, and turning it into an error needs a warning filter, which is
    process-global and so not safe with the scan's threads.
    """
    if not data:
        return {"status": "empty file"}
    try:
        img = Image.open(io.BytesIO(data))
        stored = img.size
        pixels = int(stored[0]) * int(stored[1])
        if max_pixels is not None and pixels > max_pixels:
            return {"status": f"too large ({stored[0]}x{stored[1]} = {pixels} pixels > scan.max_image_pixels="
                              f"{max_pixels})"}
        exif = img.getexif()
        if decode_check:
            img.load()  # raises on truncated / corrupt data
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:  # warning: a user's -W error
        return {"status": f"too large ({exc})"}
    except Image.UnidentifiedImageError:
        return {"status": "not an image (unidentified format)"}
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return {"status": f"truncated or corrupt ({str(exc).strip() or type(exc).__name__})"}
    except Exception as exc:  # noqa: BLE001 - a decoder failing in another way on hostile bytes is still a skip
        return {"status": f"truncated or corrupt ({type(exc).__name__}: {str(exc).strip()})"}
    try:
        orientation = int(exif.get(_ORIENTATION, 1) or 1)
    except (TypeError, ValueError):  # Pillow's exif_transpose ignores such a value too: the pixels stay as stored
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    w, h = stored if orientation < 5 else stored[::-1]  # 5-8 swap the axes
    if min(w, h) < min_side:
        return {"status": f"too small ({w}x{h} < {min_side} px)", "width": w, "height": h,
                "orientation": orientation}
    info: dict[str, Any] = {"status": "ok", "width": w, "height": h, "orientation": orientation}
    try:
        exif_ifd = dict(exif.get_ifd(_EXIF_IFD))
        gps = dict(exif.get_ifd(_GPS_IFD))
        lat, lon, alt = _gps(gps) if gps else (None, None, None)
        info.update({"focal_px": focal_from_exif(exif_ifd, (w, h)), "gps_lat": lat, "gps_lon": lon,
                     "gps_alt": alt, "timestamp": _timestamp(exif_ifd, exif)})
    except Exception as exc:  # noqa: BLE001 - malformed EXIF costs the priors, never the photo or the scan
        log.debug("ignoring malformed EXIF (%s: %s)", type(exc).__name__, exc)
    return info


# ---------------------------------------------------------------------------------------------------------
# the folder


def find_photos(root: Path, extensions: Iterable[str], follow_symlinks: bool = False) -> list[str]:
    """Paths (POSIX, relative to ``root``) of every photo-named entry under ``root``, sorted; extensions
    case-insensitive.

    Broken symbolic links and other non-regular files with a photo extension are listed too, so the scan records
    them with a reason instead of dropping them silently. A name that is not valid UTF-8 comes back as Python's
    surrogate-escaped ``str`` (see :func:`display_name`). With ``follow_symlinks`` each real folder is entered
    once, so a link loop cannot recurse forever.
    """
    exts = {("." + e.lower().lstrip(".")) for e in extensions}
    found: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        if follow_symlinks:
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirnames[:] = []  # a link back to a folder already walked
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue  # ._AppleDouble files, .DS_Store
            if os.path.splitext(name)[1].lower() in exts:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def display_name(rel: str) -> str:
    """``rel`` itself when it is valid UTF-8; otherwise its bytes with the invalid ones as ``\\xNN`` escapes.

    Parquet (and every text output) needs valid UTF-8, so a file name that is not gets this readable stand-in
    in images.parquet, and its row is skipped (the stand-in does not name a file).
    """
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _check_entry(root: Path, rel: str, follow_symlinks: bool) -> str | None:
    """Why this listed entry cannot be read as a photo (None when it can): name, link, file type."""
    full = root / rel
    if display_name(rel) != rel:
        return "undecodable file name (not valid UTF-8; shown with \\x escapes): rename the file"
    try:
        lst = os.lstat(full)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISLNK(lst.st_mode):
        try:
            target = full.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target, or a link loop
            try:
                to = display_name(os.readlink(full))
            except OSError:
                to = "?"
            return f"broken symbolic link (-> {to})"
        if not follow_symlinks and not target.is_relative_to(root):
            return (f"symbolic link leaves the photo folder (-> {display_name(str(target))}); set "
                    "scan.follow_symlinks=true to include it")
    try:
        st = os.stat(full)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a folder, device, pipe or socket)"
    return None


def _read_and_inspect(root: Path, rel: str, min_side: int, decode_check: bool,
                      max_pixels: int = PILLOW_MAX_IMAGE_PIXELS, follow_symlinks: bool = False) -> _Record:
    full = root / rel
    size, mtime_ns = file_identity(full)
    problem = _check_entry(root, rel, follow_symlinks)
    if problem is not None:
        return _Record(display_name(rel), "", size, mtime_ns, status=problem)
    try:
        data = full.read_bytes()
    except OSError as exc:
        return _Record(rel, "", size, mtime_ns, status=f"unreadable ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()
    info = inspect_image(data, min_side, decode_check, max_pixels=max_pixels)
    return _Record(rel, digest, size, mtime_ns, **info)


def _records_to_table(records: list[_Record], schema: pa.Schema) -> pa.Table:
    cols = {f.name: [getattr(r, f.name) for r in records] for f in schema}
    return pa.table(cols, schema=schema)


def _load_progress(path: Path, root: Path) -> dict[str, _Record]:
    """Records of an interrupted scan that still describe the same files (size and mtime unchanged)."""
    if not path.exists():
        return {}
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # a torn progress file only costs a rescan
        log.warning("ignoring unreadable scan progress file %s (%s)", path, exc)
        return {}
    kept: dict[str, _Record] = {}
    for row in rows:
        full = root / row["path"]
        if not os.path.lexists(full):
            continue  # gone, or an undecodable name stored as its stand-in: inspect again
        if file_identity(full) == (row["size"], row["mtime_ns"]):
            kept[row["path"]] = _Record(**row)
    return kept


def _listing_fingerprint(root: Path, paths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in paths:
        size, mtime_ns = file_identity(root / rel)
        h.update(os.fsencode(rel) + f"\0{size}\0{mtime_ns}\n".encode())  # raw bytes: names need not be UTF-8
    return h.hexdigest()


def run(run_dir: str | Path, config: PipelineConfig | None = None, *, force: bool = False,
        units: Iterable[int] | None = None, photos: str | Path | None = None) -> dict[str, Any]:
    """The scan stage: ``photos`` (recursively) -> ``run_dir/tables/images.parquet``; returns the scan manifest.

    ``photos`` defaults to the folder the run's finished scan recorded (``photos_root`` of its manifest), so a
    re-run needs only the run directory; a new run must name it. ``config`` defaults to the run's recorded one
    (else the defaults). The scan has no units (``units`` must be None). A finished scan of the same, unchanged
    folder is a no-op; a changed folder under a finished scan is an error (start a new run directory) because
    image ids are row numbers that later stages depend on.
    """
    if units is not None:
        raise ValueError("the scan stage has no units: call it with units=None")
    run_dir = Path(run_dir)
    if photos is None or config is None:
        known = RunStore(run_dir).meta() if (run_dir / "run.json").is_file() else {}
        if config is None:
            config = PipelineConfig.from_dict(known["config"]) if known.get("config") else PipelineConfig()
        if photos is None:
            photos = ((known.get("stages") or {}).get("scan") or {}).get("manifest", {}).get("photos_root")
            if photos is None:
                raise ScanError(f"{run_dir} records no photo folder yet: pass the folder that contains the photos")
    photos = Path(photos).expanduser().resolve()
    if not photos.is_dir():
        raise ScanError(f"{photos} is not a folder. Pass the folder that contains the photos.")
    if display_name(str(photos)) != str(photos):
        raise ScanError(f"the photo folder's path {display_name(str(photos))} is not valid UTF-8, which the run "
                          "directory's tables need; rename it.")
    cfg = config.scan
    if cfg.min_side < 1 or cfg.chunk_size < 1:
        raise ScanError("scan.min_side and scan.chunk_size must be >= 1")
    check_pixel_limit(cfg.max_image_pixels)
    store = RunStore.create_or_open(run_dir, config, force=force)
    paths = find_photos(photos, cfg.extensions, cfg.follow_symlinks)
    if not paths:
        raise ScanError(f"no photos with extensions {', '.join(cfg.extensions)} found under {photos}. "
                          "Check the folder, or add extensions with --set scan.extensions=[...]")
    fingerprint = _listing_fingerprint(photos, paths)

    if store.is_stage_complete("scan"):
        manifest = store.stage_manifest("scan")
        if manifest.get("photos_root") != str(photos):
            raise ScanError(f"{store.root} was scanned from {manifest.get('photos_root')}, not {photos}. "
                              "Use a new run directory for another photo folder.")
        if manifest.get("listing_sha256") != fingerprint:
            raise ScanError(f"the photos under {photos} changed since {store.root} was scanned (files added, "
                              "removed or modified). Image ids would shift under the later stages: start a new "
                              "run directory.")
        log.info("scan already complete for %s (%d images kept); nothing to do", store.root, manifest["kept"])
        return manifest

    store.stage_started("scan")
    progress_path = store.tables_dir / PROGRESS_FILE
    done = _load_progress(progress_path, photos)
    if done:
        log.info("resuming an interrupted scan: %d of %d files already inspected", len(done), len(paths))
    todo = [p for p in paths if p not in done]
    flush_every = max(1, cfg.progress_every)

    def flush() -> None:
        table = _records_to_table([done[p] for p in paths if p in done], _PROGRESS_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(progress_path, sink.getvalue().to_pybytes())

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding releases the GIL
        results = pool.map(lambda rel: _read_and_inspect(photos, rel, cfg.min_side, cfg.decode_check,
                                                         int(cfg.max_image_pixels), cfg.follow_symlinks), todo)
        # keyed on the listed name: a record of an undecodable name carries its stand-in, not the name itself
        for n, (rel, record) in enumerate(zip(todo, track(results, total=len(todo), description="scan")), start=1):
            done[rel] = record
            if n % flush_every == 0:
                flush()
    if todo:
        flush()

    table, manifest = _finalise([done[p] for p in paths], photos, cfg.chunk_size)
    manifest["listing_sha256"] = fingerprint
    store.write_table("images", table)
    store.stage_finished("scan", manifest)
    progress_path.unlink(missing_ok=True)
    _log_summary(manifest)
    return manifest


def _finalise(records: list[_Record], photos: Path, chunk_size: int) -> tuple[pa.Table, dict[str, Any]]:
    """Fold byte-identical files into their first copy, number rows, chunk the kept images."""
    unique: list[_Record] = []
    first_by_hash: dict[str, _Record] = {}
    for rec in records:
        rec.duplicates = []
        if rec.sha256 and rec.sha256 in first_by_hash:
            first_by_hash[rec.sha256].duplicates.append(rec.path)
            continue
        if rec.sha256:
            first_by_hash[rec.sha256] = rec
        unique.append(rec)
    chunk_ids: list[int] = []
    kept = 0
    for rec in unique:
        if rec.status == "ok":
            chunk_ids.append(kept // chunk_size)
            kept += 1
        else:
            chunk_ids.append(-1)
    cols = {name: [getattr(r, name) for r in unique] for name in _RECORD_FIELDS}
    cols["image_id"] = list(range(len(unique)))
    cols["chunk_id"] = chunk_ids
    table = pa.table({f.name: cols[f.name] for f in SCHEMA}, schema=SCHEMA)
    table = table.replace_schema_metadata({b"photos_root": str(photos).encode()})

    skipped = [{"path": r.path, "reason": r.status} for r in unique if r.status != "ok"]
    reasons: dict[str, int] = {}
    for s in skipped:
        key = s["reason"].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    ok = [r for r in unique if r.status == "ok"]
    manifest = {
        "photos_root": str(photos),
        "files": len(records),
        "unique": len(unique),
        "duplicates": len(records) - len(unique),
        "kept": len(ok),
        "skipped": len(skipped),
        "skip_reasons": reasons,
        "chunks": (kept + chunk_size - 1) // chunk_size,
        "with_focal": sum(r.focal_px is not None for r in ok),
        "with_gps": sum(r.gps_lat is not None for r in ok),
        "with_time": sum(r.timestamp is not None for r in ok),
        "skipped_files": skipped,
    }
    return table, manifest


def _log_summary(manifest: dict[str, Any]) -> None:
    log.info("scan: %d files, %d unique, %d kept, %d skipped, %d chunks", manifest["files"], manifest["unique"],
             manifest["kept"], manifest["skipped"], manifest["chunks"])
    for item in manifest["skipped_files"][:20]:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    if manifest["skipped"] > 20:
        log.warning("... and %d more skipped files (see images.parquet, column status)", manifest["skipped"] - 20)
