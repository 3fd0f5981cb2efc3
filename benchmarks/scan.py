"""Scan throughput: `sparse-vggt scan` over N distinct JPEGs made from the bundled photos.

Each image is a bundled photo with a random crop and re-encode, so every file has its own bytes (no duplicate
folding) and real photo statistics. Variants in one run: full decode validation (default) vs header-only
(`scan.decode_check=false`), so the cost of decoding is a ratio on the same machine state.

    python benchmarks/scan.py --images 1000 [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sparse_vggt.config import PipelineConfig
from sparse_vggt.scan import run as run_scan

SAMPLES = Path(__file__).resolve().parents[1] / "sparse_vggt" / "data" / "sacre_coeur" / "images"


def make_photos(root: Path, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    total = 0
    for i in range(n):
        img = sources[i % len(sources)]
        w, h = img.size
        dx, dy = int(rng.integers(0, w // 10)), int(rng.integers(0, h // 10))
        crop = img.crop((dx, dy, w - int(rng.integers(0, w // 10)), h - int(rng.integers(0, h // 10))))
        path = root / f"seq{i // 100:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=90)
        total += path.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench_scan_"))
    try:
        photos = work / "photos"
        nbytes = make_photos(photos, args.images)
        rows = []
        for variant, decode in (("full decode", True), ("header only", False)):
            cfg = PipelineConfig()
            cfg.scan.decode_check = decode
            t0 = time.perf_counter()
            manifest = run_scan(work / f"run_{int(decode)}", cfg, photos=photos)
            dt = time.perf_counter() - t0
            assert manifest["kept"] == args.images, manifest
            rows.append({"bench": "scan", "variant": variant, "images": args.images, "seconds": round(dt, 2),
                         "images_per_s": round(args.images / dt, 1), "mb_per_s": round(nbytes / dt / 1e6, 1),
                         "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                         "machine": platform.machine()})
        if args.json:
            for r in rows:
                print(json.dumps(r))
        else:
            print(f"{args.images} JPEGs, {nbytes / 1e6:.0f} MB")
            print(f"{'variant':<12} {'seconds':>8} {'images/s':>9} {'MB/s':>7}")
            for r in rows:
                print(f"{r['variant']:<12} {r['seconds']:>8} {r['images_per_s']:>9} {r['mb_per_s']:>7}")
            print(f"full decode / header only time ratio: {rows[0]['seconds'] / rows[1]['seconds']:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
