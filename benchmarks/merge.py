"""Merge benchmark: time and peak memory of `sparse_vggt.merge.run` for 100 and 1,000 clusters.

Synthetic city runs (sparse_vggt.synthetic: ray-cast depth, the real partitioner, 5% depth noise, 20% outlier
pixels in overlap frames) are built first (timed apart), then each merge runs in its own child process so its
peak RSS (VmHWM) is its own; ``baseline_rss_bytes`` is the child's RSS after imports, before merge. The child
also reports merge's own per-phase seconds (load, pairwise, pose_graph, poses, fuse, write) and the accuracy
against the synthetic truth (ATE / extent, mean rotation error), so speed and correctness come from one run.

    python benchmarks/merge.py                         # 100 and 1,000 clusters, table
    python benchmarks/merge.py --clusters 100 --json   # one JSON object per line
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def _child(run_dir: str, variant: str) -> dict:
    from sparse_vggt.config import PipelineConfig
    from sparse_vggt.evaluate import evaluate_poses
    from sparse_vggt.merge import run as merge
    from sparse_vggt.store import RunStore

    store = RunStore.open(run_dir)
    store.stage_invalidate("merge")
    cfg = store.config()
    cfg.merge.colors = False  # no photos written for benchmark scenes
    cfg.merge.fuse = variant != "poses_only"
    base = _status("VmRSS:")
    t0 = time.perf_counter()
    manifest = merge(run_dir, cfg)
    secs = time.perf_counter() - t0
    peak = _status("VmHWM:")
    truth = np.load(Path(run_dir) / "truth.npz")
    g = store.group("merge/images", create=False)
    ids = g["image_ids"][...]
    names = [str(i) for i in range(len(truth["extrinsics"]))]
    res = evaluate_poses([names[i] for i in ids], g["extrinsics"][...], names, truth["extrinsics"],
                         g["component"][...])
    return {"seconds": secs, "peak_bytes": peak, "baseline_rss_bytes": base, "phase_seconds": manifest["seconds"],
            "edges": manifest["edges"], "edges_accepted": manifest["edges_accepted"],
            "components": manifest["components"], "points": manifest["points"],
            "ate_rel_extent": res["ate_rel_extent"], "rotation_error_mean_deg": res["rotation_error_mean_deg"]}


def build(run_dir: Path, clusters: int, args: argparse.Namespace, frames: int | None = None) -> dict:
    from sparse_vggt import synthetic as syn
    from sparse_vggt.config import PipelineConfig

    # about (max_cluster_frames - overlap) core frames per cluster with this partitioner setting
    frames = frames or int(clusters * args.core_per_cluster)
    t0 = time.perf_counter()
    run = syn.synthetic_run(run_dir, n_frames=frames, max_cluster_frames=args.max_cluster_frames,
                            min_overlap_frames=args.min_overlap_frames, depth_hw=tuple(args.depth_hw),
                            seed=args.seed, config=PipelineConfig())
    np.savez(run_dir / "truth.npz", extrinsics=run.scene.extrinsics)
    return {"frames": frames, "clusters": int(len(run.cluster_ids)), "setup_seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, nargs="+", default=[100, 1000], help="target cluster counts")
    p.add_argument("--frames", type=int, nargs="+", help="scene frames per entry of --clusters (overrides the "
                   "--core-per-cluster estimate; the partitioner decides the actual cluster count, which is reported)")
    p.add_argument("--core-per-cluster", type=float, default=11.0,
                   help="scene frames per target cluster (about 11-14 core frames per cluster at max 32 / overlap 6)")
    p.add_argument("--max-cluster-frames", type=int, default=32)
    p.add_argument("--min-overlap-frames", type=int, default=6)
    p.add_argument("--depth-hw", type=int, nargs=2, default=[24, 32])
    p.add_argument("--variants", nargs="+", default=["full", "poses_only"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the synthetic runs here and reuse them (default: a temporary dir)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    rows = []
    keep = contextlib.nullcontext(args.workdir) if args.workdir else None
    with keep or tempfile.TemporaryDirectory(prefix="merge_bench_") as tmp:
        for k, target in enumerate(args.clusters):
            frames = args.frames[k] if args.frames else None
            run_dir = Path(tmp) / f"c{target}_f{frames or int(target * args.core_per_cluster)}"
            if (run_dir / "truth.npz").exists():
                info = json.loads((run_dir / "bench_info.json").read_text())
            else:
                info = build(run_dir, target, args, frames)
                (run_dir / "bench_info.json").write_text(json.dumps(info))
            for variant in args.variants:
                out = subprocess.run([sys.executable, __file__, "--child", str(run_dir), variant],
                                     capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                row = {"bench": "merge", "variant": variant, **info, "depth_hw": args.depth_hw,
                       "max_cluster_frames": args.max_cluster_frames, "min_overlap_frames": args.min_overlap_frames,
                       "cores": os.cpu_count(), **res}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
    if not args.json:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="merge (synthetic city, 5% depth noise, 20% overlap outliers)")
        for c in ("clusters", "frames", "variant", "edges", "seconds", "peak RSS MB", "pairwise s", "pose graph s",
                  "fuse s", "ATE/extent", "rot err deg"):
            t.add_column(c, justify="right")
        for r in rows:
            ph = r["phase_seconds"]
            t.add_row(str(r["clusters"]), str(r["frames"]), r["variant"], str(r["edges"]), f"{r['seconds']:.2f}",
                      f"{r['peak_bytes'] / 2**20:.0f}", f"{ph.get('pairwise', 0):.2f}",
                      f"{ph.get('pose_graph', 0):.2f}",
                      f"{ph.get('fuse', 0):.2f}", f"{r['ate_rel_extent']:.2e}", f"{r['rotation_error_mean_deg']:.3f}")
        Console().print(t)


if __name__ == "__main__":
    main()
