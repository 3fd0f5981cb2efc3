"""Descriptor throughput: MegaLoc (full ViT-B/14 + SALAD architecture, random weights) images/s.

Two measurements in one run: the model alone on a random batch at ``--size`` px, and the whole describe stage
(decode + resize + normalise + model + Zarr write) over the bundled sample photos.

    python benchmarks/describe.py --device cpu --size 322 --batch 8 --json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def model_only(args: argparse.Namespace) -> dict:
    from sparse_vggt.device import autocast, select_device, select_dtype
    from sparse_vggt.models.megaloc import MegaLoc

    device = select_device(args.device)
    dtype = select_dtype(device, args.dtype)
    torch.manual_seed(0)
    model = MegaLoc(args.preset).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    with torch.inference_mode(), autocast(device, dtype):
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    n = args.batch * args.repeats
    return {"bench": "megaloc_forward", "variant": f"{args.preset}/{dtype}".replace("torch.", ""),
            "seconds": round(sec, 3), "images": n, "images_per_s": round(n / sec, 2),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "device": str(device),
            "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(), "dim": out.shape[1]}


def stage(args: argparse.Namespace) -> dict:
    import logging

    from sparse_vggt.config import PipelineConfig
    from sparse_vggt import describe
    from sparse_vggt.scan import run as run_scan

    logging.getLogger("sparse_vggt").setLevel(logging.ERROR)
    photos = REPO / "sparse_vggt" / "data" / "sacre_coeur" / "images"
    tmp = Path(tempfile.mkdtemp())
    try:
        cfg = PipelineConfig()
        cfg.describe.model, cfg.describe.allow_random_weights = "random", True
        cfg.describe.preset, cfg.describe.image_size = args.preset, args.size
        cfg.describe.batch_size, cfg.describe.device, cfg.describe.dtype = args.batch, args.device, args.dtype
        run_scan(tmp / "run", cfg, photos=photos)
        t0 = time.perf_counter()
        m = describe.run(tmp / "run", cfg)
        sec = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bench": "describe_stage", "variant": f"{args.preset}/{m.get('dtype')}", "seconds": round(sec, 3),
            "images": m["images"], "images_per_s": round(m["images"] / sec, 2),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "device": m.get("device"),
            "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(), "dim": m["dim"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--preset", default="megaloc")
    ap.add_argument("--size", type=int, default=322)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-stage", action="store_true", help="model only (no photos, no ingest)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [model_only(args)]
    if not args.skip_stage:
        rows.append(stage(args))
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['bench']:16s} {r['variant']:18s} {r['images']:4d} images  {r['seconds']:8.2f} s  "
                  f"{r['images_per_s']:7.2f} img/s  peak {r['peak_bytes'] / 1e9:.2f} GB  ({r['device']}, "
                  f"{r['size']} px, batch {r['batch']}, {r['threads']} threads)")


if __name__ == "__main__":
    main()
